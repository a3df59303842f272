"""The control plane a site talks to: its upstream relays first, the origin last.

A site in a relay tree reads everything but chunks through its upstream relay, as it
fetches chunks there (docs/protocol.md "Relays"): its event stream, channel reads,
manifests, the version listings of its chunk index, signed statements, and its report.
So the origin holds a stream and a report only from its direct children, however many
sites are below them.

`UpstreamChain` offers the `OriginClient` calls the agent's parts make (`events`,
`channel`, `manifest`, `artifacts`, `versions`, `report_site`, `call`, `get_trust`,
`get_signature`) and sends each to the first source that answers:

* a source that cannot be reached, answers 5xx (`relay_unavailable`: a relay with no
  live upstream of its own), or refuses the site's token (401/403: a relay whose token
  file does not name it) is skipped for `DEAD_FOR` seconds and the next one asked; any
  other answer (a 404, a 422) is the answer;
* an event stream from a source other than the first ends after `RETRY_PREFERRED`
  seconds, so the follower reconnects and the preferred relay is tried again;
* a version's signed statement (or its absence) is asked once for all concurrent asks and
  reused for `SIGNATURE_TTL` seconds; the newest delegations once for all concurrent asks;
* it remembers the stream's epoch and last `seq`, and resumes with `after=seq` (the
  follower re-syncs at every `hello` anyway); every event it passes on also feeds the
  site's own re-served stream (`agents.site.event_relay.EventRelay`) and drops the
  cached control answers for that artifact (`agents.site.event_relay.ReadRelay`).

The chain's relays are the site's `upstreams`, or the topology's pull-through sources
(`fabric.core.topology.Topology.sources_for`); peers are not asked (they answer only
from what they hold).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable

from fabric.core.topology import Topology
from fabric.errors import FabricError, Forbidden, TransferError, Unauthorized
from fabric.logs import get_logger
from fabric.wire.client import OriginClient

from agents.site.config import SiteConfig

log = get_logger("agent")
DEAD_FOR = 5.0  # seconds a source that failed is asked only after the others
RETRY_PREFERRED = 30.0  # seconds an event stream from a fallback source lasts
_QUEUE = 64  # events read ahead of the follower
SIGNATURE_TTL = 2.0  # seconds a version's envelope (or its absence) is reused
_SIGNATURES_KEPT = 256


def relay_urls(cfg: SiteConfig) -> list[str]:
    """The upstream relays of the site's control plane, nearest first (no peers, no origin)."""
    if cfg.upstreams:
        return list(cfg.upstreams)
    if cfg.topology:
        topo = Topology.load(cfg.topology)
        if cfg.site in topo.sites:
            return [s.url for s in topo.sources_for(cfg.site)[:-1] if s.url and s.pull_through]
    return []


def falls_back(e: FabricError) -> bool:
    """Whether an error from one source means "ask the next one" rather than being the answer."""
    return isinstance(e, (TransferError, Unauthorized, Forbidden)) or e.http_status >= 500


class UpstreamChain:
    """OriginClient's control calls, each to the first source of `relays + [origin]` that answers."""

    def __init__(self, relays: list[OriginClient], origin: OriginClient,
                 on_event: Callable[[str, dict, bool], None] | None = None):
        self.sources = [*relays, origin]
        self.origin = origin
        self.current = self.sources[0]  # the source of the event stream, or the one tried last
        self.on_event = on_event  # (type, data, resumed): hello's `resumed` says the epoch is the one before
        self.epoch: str | None = None
        self.seq = 0
        self._dead: dict[str, float] = {}  # url -> until (monotonic)
        self._signatures: dict[tuple, tuple[float, bytes | None]] = {}  # shared asks -> (until, envelope)
        self._asking: dict[tuple, asyncio.Future] = {}

    @property
    def url(self) -> str:
        return self.current.url

    def _order(self) -> list[OriginClient]:
        now = time.monotonic()
        alive = [c for c in self.sources if self._dead.get(c.url, 0) <= now]
        return alive + [c for c in self.sources if c not in alive]

    def _failed(self, client: OriginClient, e: FabricError) -> None:
        self._dead[client.url] = time.monotonic() + DEAD_FOR
        log.info("upstream skipped", source=client.url, error=e.message[:200], code=e.code)

    async def _call(self, name: str, *args, **kw) -> Any:
        order = self._order()
        for client in order:
            try:
                result = await getattr(client, name)(*args, **kw)
            except FabricError as e:
                if client is order[-1] or not falls_back(e):
                    raise
                self._failed(client, e)
                continue
            self._dead.pop(client.url, None)
            return result
        raise AssertionError("unreachable: the chain always has the origin")

    async def channel(self, artifact: str, channel: str):
        return await self._call("channel", artifact, channel)

    async def manifest(self, artifact: str, version: str, base=None):
        return await self._call("manifest", artifact, version, base)

    async def artifacts(self) -> list[str]:
        return await self._call("artifacts")

    async def versions(self, artifact: str) -> list[dict]:
        return await self._call("versions", artifact)

    async def report_site(self, site: str, status: dict) -> None:
        return await self._call("report_site", site, status)

    async def call(self, method: str, path: str, body: dict | None = None) -> Any:
        return await self._call("call", method, path, body)

    async def get_trust(self) -> bytes | None:
        """The newest delegations envelope (or None), one ask for all concurrent ones (every site asks
        at each resync, and a relay passes its children's asks through); not kept after it: a
        revocation published at the origin reaches the next ask."""
        return await self._shared(("trust",), "get_trust", keep=0.0)

    async def get_signature(self, artifact: str, version: str) -> bytes | None:
        """The version's envelope (or None), shared by concurrent asks and kept `SIGNATURE_TTL`
        seconds: a relay passes its children's asks through (`agents.site.trust`), and a
        thousand sites asking for an unsigned version's envelope must cost the origin one."""
        return await self._shared(("signature", artifact, version), "get_signature", artifact, version)

    async def _shared(self, key: tuple, name: str, *args, keep: float = SIGNATURE_TTL) -> bytes | None:
        """`_call(name, *args)`, one for all concurrent asks of `key`, its answer kept `keep` seconds."""
        now = time.monotonic()
        if (hit := self._signatures.get(key)) is not None and hit[0] > now:
            return hit[1]
        if key not in self._asking:
            self._asking[key] = asyncio.ensure_future(self._call(name, *args))
        task = self._asking[key]
        try:
            envelope = await asyncio.shield(task)
        finally:
            if task.done() and self._asking.get(key) is task:
                del self._asking[key]
        if keep > 0:
            self._signatures[key] = (time.monotonic() + keep, envelope)
        while len(self._signatures) > _SIGNATURES_KEPT:
            self._signatures.pop(next(iter(self._signatures)))
        return envelope

    async def raw(self, method: str, path: str, params: dict | None, read: Callable) -> Any:
        """`read(client, method, path, params)` against the first source that answers (the relay's
        pass-through of control reads, `agents.site.event_relay.ReadRelay`)."""
        order = self._order()
        for client in order:
            try:
                result = await read(client, method, path, params)
            except FabricError as e:
                if client is order[-1] or not falls_back(e):
                    raise
                self._failed(client, e)
                continue
            self._dead.pop(client.url, None)
            return result
        raise AssertionError("unreachable: the chain always has the origin")

    async def events(self, after: int = 0) -> AsyncIterator[tuple[str, dict]]:
        """The first answering source's event stream, resumed after the last event seen."""
        order = self._order()
        for client in order:
            queue: asyncio.Queue = asyncio.Queue(_QUEUE)
            reader = asyncio.get_running_loop().create_task(_read_into(client, self.seq if self.epoch else 0,
                                                                       queue))
            try:
                kind, item = await queue.get()
                if kind == "error":
                    if client is order[-1] or not falls_back(item):
                        raise item
                    self._failed(client, item)
                    continue
                if kind == "end":
                    if client is order[-1]:
                        return
                    self._failed(client, TransferError(f"{client.url} ended its event stream at once"))
                    continue
                self.current = client
                self._dead.pop(client.url, None)
                until = None if client is self.sources[0] else time.monotonic() + RETRY_PREFERRED
                while kind == "event":
                    yield self._seen(*item)
                    timeout = None if until is None else max(0.0, until - time.monotonic())
                    try:
                        kind, item = await asyncio.wait_for(queue.get(), timeout)
                    except asyncio.TimeoutError:
                        log.info("leaving a fallback event stream to try the preferred one", source=client.url)
                        return
                if kind == "error":
                    raise item
                return
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    def _seen(self, event: str, data: dict) -> tuple[str, dict]:
        if event == "hello":
            epoch = str(data.get("epoch"))
            resumed = epoch == self.epoch and data.get("complete") is True
            if not resumed:
                self.epoch, self.seq = epoch, _int(data.get("seq"))
            if self.on_event is not None:
                self.on_event(event, data, resumed)
        else:
            self.seq = max(self.seq, _int(data.get("seq")))
            if self.on_event is not None:
                self.on_event(event, data, True)
        return event, data


async def _read_into(client: OriginClient, after: int, queue: asyncio.Queue) -> None:
    """Put ("event", (type, data)) per event, then ("end", None) or ("error", FabricError)."""
    try:
        async for item in client.events(after=after):
            await queue.put(("event", item))
        await queue.put(("end", None))
    except FabricError as e:
        await queue.put(("error", e))
    except Exception as e:  # noqa: BLE001 - reported to the follower, which reconnects
        await queue.put(("error", TransferError(f"event stream from {client.url}: {e!r}"[:300])))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
