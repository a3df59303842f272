"""Re-serving the control plane: a relay's event stream and control reads for its children.

A site agent serves, to the sites below it, the origin's `GET /v1/events` and its
read-only control routes, so they never need the origin while this relay lives
(docs/protocol.md "Relays"):

* `EventRelay` is the reading side of an `fabric.wire.events.EventLog`, fed by the
  agent's own upstream stream (`agents.site.control.UpstreamChain`): the upstream's
  `epoch`, its sequence numbers as event ids, the last `KEEP` events for
  `Last-Event-ID` resumes. When the upstream's epoch changes, or a reconnect finds
  events missing (`complete: false`), it drops what it held and takes the new epoch,
  and ends every child's stream (`sse_handler`; `restarts` where the epoch stayed): each
  reconnects, sees the new epoch or `complete: false`, and re-syncs. Children see only
  `version` and `channel` events of artifacts their token (this relay's token file) may
  pull. Before its own stream has opened once, a relay waits up to `CONNECT_WAIT` seconds,
  then answers `503 relay_unavailable`.
* `ReadRelay` answers `GET /v1/artifacts`, `…/{a}/versions`, `…/{a}/versions/{v}`
  (manifests, and patches against a base) and `…/{a}/channels/{c}` for a child's token
  with the same checks as the origin, from its own store where it holds the manifest,
  else from its upstream chain with its own token. Identical concurrent reads share one
  upstream request; answers are kept `TTL` seconds (manifests: until evicted; they never
  change), and so is a `not found` (a channel that does not exist yet, which every site
  below asks for until it does), and an event about an artifact drops what is kept about it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict, deque

import aiohttp
from aiohttp import web

from fabric.core.manifest import check_name
from fabric.errors import NotFound, RelayUnavailable, TransferError, from_code
from fabric.store.store import Store
from fabric.wire.client import OriginClient, error_from, read_body
from fabric.wire.events import Followed, sse_handler
from fabric.wire.negotiate import serve_manifest
from fabric.wire.protocol import ARTIFACTS, EVENTS, MAX_ANSWER, MAX_MANIFEST
from fabric.wire.server import principal

from agents.site.control import UpstreamChain

KEEP = 1024  # events kept for resumes
CONNECT_WAIT = 5.0  # seconds a child's stream waits for this relay's first upstream stream
TTL = 1.0  # seconds a listing or channel answer is kept
_KEPT_BYTES = 16 << 20  # answers kept, all together (the newest is kept whatever its size)
_PASSED = ("Content-Type", "X-Fabric-Manifest-Id", "X-Fabric-Manifest-Base")
RELAY_LOG = web.AppKey("relay_events", object)
READS = web.AppKey("relay_reads", object)


class EventRelay(Followed):
    """The upstream's events, re-served: `epoch`, `seq`, `closed`, `since`, `wait` as EventLog has."""

    def __init__(self, keep: int = KEEP):
        super().__init__(None)  # the upstream's, from its first hello
        self._base = 0  # the log holds every event after this seq
        self._events: deque[dict] = deque(maxlen=keep)
        self._opened = asyncio.Event()

    def feed(self, event: str, data: dict, resumed: bool) -> None:
        """One event from the upstream stream (`UpstreamChain.on_event`)."""
        if event == "hello":
            if not resumed or self.epoch is None:
                if self.epoch is not None:  # events were missed: every child's stream ends (even on the same epoch)
                    self.restarts += 1
                self.epoch = str(data.get("epoch"))
                self._events.clear()
                self.seq = self._base = data["seq"] if isinstance(data.get("seq"), int) else 0
            self._opened.set()
        elif isinstance(data.get("seq"), int) and data["seq"] > self.seq and isinstance(data.get("artifact"), str):
            if data.get("type") in ("version", "channel"):
                if len(self._events) == self._events.maxlen:
                    self._base = self._events[0]["seq"]
                self._events.append(data)
            self.seq = data["seq"]
        else:
            return
        asyncio.get_running_loop().create_task(self._notify())

    def since(self, after: int) -> tuple[list[dict], bool]:
        return [e for e in self._events if e["seq"] > after], after >= self._base

    async def wait(self, after: int, timeout: float) -> None:
        """Until an event to send past `after` (not merely a higher `seq`: the upstream's hello and
        the events not re-served raise it with nothing to send, and a stream that woke for that
        would write keepalives in a loop), a close, a new epoch or a restart; at most `timeout` seconds."""
        stream = self.stream()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: bool(self._events and self._events[-1]["seq"] > after) or self.closed
                    or self.stream() != stream), timeout)
            except asyncio.TimeoutError:
                pass

    async def opened(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._opened.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.epoch is not None


def _visible(request: web.Request, event: dict) -> bool:
    return principal(request).may("pull", event.get("artifact"))


class ReadRelay:
    """Control reads for children: from this store, else the upstream chain, shared and kept briefly."""

    def __init__(self, store: Store, chain: UpstreamChain):
        self.store, self.chain = store, chain
        # key -> (until, answer), or (until, NotFound) for an upstream's 404, kept at most TTL
        self._kept: OrderedDict[tuple, tuple[float, tuple | NotFound]] = OrderedDict()
        self._pending: dict[tuple, asyncio.Future] = {}

    def _changes(self, key: tuple) -> bool:
        """Whether what is kept at `key` can change: anything but a manifest that was found."""
        return key[0] != "manifest" or isinstance(self._kept[key][1], NotFound)

    def forget(self, artifact: str | None) -> None:
        """Drop what is kept about `artifact` (an event named it), and the artifact listing."""
        for key in [k for k in self._kept if self._changes(k) and k[1] in (artifact, None)]:
            del self._kept[key]

    def forget_all(self) -> None:
        """Drop every kept answer but the manifests found (the upstream's event log restarted)."""
        for key in [k for k in self._kept if self._changes(k)]:
            del self._kept[key]

    async def answer(self, key: tuple, path: str, params: dict | None, keep: float) -> tuple:
        now = time.monotonic()
        if (hit := self._kept.get(key)) is not None and hit[0] > now:
            if isinstance(hit[1], NotFound):  # a kept "not there yet": a fresh copy of the error
                raise from_code(hit[1].code, hit[1].message)
            return hit[1]
        if key in self._pending:
            return await asyncio.shield(self._pending[key])
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            limit = MAX_MANIFEST if key[0] == "manifest" else MAX_ANSWER
            answer = await self.chain.raw("GET", path, params, lambda c, m, p, q: _get(c, p, q, limit))
            fut.set_result(answer)
            self._kept[key] = (time.monotonic() + keep, answer)
            while len(self._kept) > 1 and sum(_size(a) for _, a in self._kept.values()) > _KEPT_BYTES:
                self._kept.popitem(last=False)
            return answer
        except BaseException as e:
            if isinstance(e, NotFound):  # kept like an answer, at most TTL: sites poll for a channel
                self._kept[key] = (time.monotonic() + min(keep, TTL), e)  # before it exists
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._pending[key]


def _size(answer: tuple | NotFound) -> int:
    return 0 if isinstance(answer, NotFound) else len(answer[0])


async def _get(client: OriginClient, path: str, params: dict | None, limit: int) -> tuple:
    """(status, body, passed headers) of a GET to `client`; an error answer raises it, and a
    connection that fails or times out is a `TransferError` (the chain then asks the next source;
    before, it escaped the chain and the child got a 500)."""
    try:
        async with client.session.get(client.url + path, params=params) as resp:
            body = await read_body(resp, limit, f"GET {client.url}{path}")
            if resp.status >= 400:
                raise error_from(resp.status, body)
            return body, {h: resp.headers[h] for h in _PASSED if h in resp.headers}
    except aiohttp.ClientError as e:
        raise TransferError(f"GET {client.url}{path}: {e}") from None
    except asyncio.TimeoutError:
        raise TransferError(f"GET {client.url}{path}: timed out") from None


def _respond(answer: tuple) -> web.Response:
    body, headers = answer[0], dict(answer[1])
    ctype = headers.pop("Content-Type", "application/json").split(";")[0]
    return web.Response(body=body, content_type=ctype, headers=headers)


def _artifact(request: web.Request) -> str:
    artifact = check_name("artifact", request.match_info["artifact"])
    principal(request).require("pull", artifact)
    return artifact


async def _artifacts(request: web.Request) -> web.Response:
    reads: ReadRelay = request.app[READS]
    principal(request).require("pull")
    body, _ = await reads.answer(("artifacts", None), ARTIFACTS, None, TTL)
    names = json.loads(body).get("artifacts", [])
    return web.json_response({"artifacts": [a for a in names if principal(request).may("pull", a)]})


async def _versions(request: web.Request) -> web.Response:
    artifact = _artifact(request)
    return _respond(await request.app[READS].answer(("versions", artifact), f"{ARTIFACTS}/{artifact}/versions",
                                                    None, TTL))


async def _channel(request: web.Request) -> web.Response:
    artifact = _artifact(request)
    channel = check_name("channel", request.match_info["channel"])
    path = f"{ARTIFACTS}/{artifact}/channels/{channel}"
    return _respond(await request.app[READS].answer(("channel", artifact, channel), path, None, TTL))


async def _manifest(request: web.Request) -> web.Response:
    artifact = _artifact(request)
    version = check_name("version", request.match_info["version"])
    base = request.query.get("base")
    reads: ReadRelay = request.app[READS]
    try:  # held here: served as the origin serves it (canonical JSON, or a patch against `base`)
        body, ctype, headers = await asyncio.to_thread(serve_manifest, reads.store, artifact, version, base)
        return web.Response(body=body, content_type=ctype, headers=headers)
    except NotFound:
        pass
    params = {"base": base} if base else None
    key = ("manifest", artifact, version, base)
    return _respond(await reads.answer(key, f"{ARTIFACTS}/{artifact}/versions/{version}", params, 3600.0))


async def _events(request: web.Request) -> web.StreamResponse:
    principal(request).require("pull")
    relay: EventRelay = request.app[RELAY_LOG]
    if not await relay.opened(CONNECT_WAIT):
        raise RelayUnavailable("this relay has no event stream from its upstream yet")
    return await _STREAM(request)


_STREAM = sse_handler(RELAY_LOG, require=lambda request: None, visible=_visible)


def relay_routes(app: web.Application, relay: EventRelay, reads: ReadRelay) -> None:
    """Add the re-served event stream and control reads to a site agent's app."""
    app[RELAY_LOG], app[READS] = relay, reads
    app.on_shutdown.append(lambda a: relay.close())
    r = app.router
    r.add_get(EVENTS, _events)
    r.add_get(ARTIFACTS, _artifacts)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/versions", _versions)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/versions/{{version}}", _manifest)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/channels/{{channel}}", _channel)
