"""The site agent: follow channels, replicate versions, activate them atomically, relay.

One agent runs per site (or per node). It

1. follows the origin's event stream; on every (re)connect it re-reads each followed
   channel from scratch, and it re-reads them every `resync_interval` anyway, so a
   dropped event costs a delay, never a missed version;
2. deploys the channel's version: fetches the manifest from the origin and the
   missing chunks from its planned sources (upstream relay, peers, origin last),
   records the manifest in its own store, materialises the files under
   `versions/<artifact>/<version>/` and only then flips `current/<artifact>`;
3. serves its chunks to the sites below it (same API and token checks as the origin);
   a request for a chunk it lacks starts one upstream fetch that every concurrent
   asker shares (pull-through with request coalescing);
4. keeps the last `retention.keep` versions (plus the active and pinned ones) and
   collects chunks no kept version needs;
5. reports its state to the origin, for `fabric status`.

A failed deploy leaves the active version serving; the agent retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Counter, Gauge

from fabric.wire import delta

from fabric import gc as gc_mod
from fabric.wire import frames as wire
from fabric.wire.auth import TokenTable
from fabric.wire.client import OriginClient
from fabric.errors import FabricError, NotFound
from fabric.logs import get_logger
from fabric.core.manifest import Manifest, check_name
from fabric.pull import Assembly
from fabric.store.registry import Registry
from fabric.wire.server import METRICS, base_app, chunk_routes, principal, read_json
from fabric.wire.server import run_until_signalled
from fabric.store.store import Store, open_store
from fabric.core.topology import Topology, owner_index
from fabric.transfer import Inflight, fetch_chunks

from agents.site.config import SiteConfig
from agents.site.layout import Layout, verify_tree
from agents.site.rollout import Rollout

log = get_logger("agent")
PEER_HEADER = "X-Fabric-Peer"  # "answer from what you hold; do not fetch upstream for me"
AGENT = web.AppKey("agent", object)
_PEER_REQUEST = contextvars.ContextVar("peer_request", default=False)


@dataclass
class ChannelStatus:
    artifact: str
    channel: str
    target: str | None = None  # the version the channel points at
    active: str | None = None
    syncing: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class AgentMetrics:
    def __init__(self, registry):
        self.active = Gauge("fabric_agent_active_version", "1 for each artifact's active version",
                            ["artifact", "version"], registry=registry)
        self.sync_done = Gauge("fabric_agent_sync_bytes_done", "Bytes fetched for the version in progress",
                               ["artifact"], registry=registry)
        self.sync_total = Gauge("fabric_agent_sync_bytes_total", "Bytes of the version in progress",
                                ["artifact"], registry=registry)
        self.by_source = Counter("fabric_agent_bytes_by_source", "Chunk payload bytes fetched, by source",
                                 ["source"], registry=registry)
        self.bad_chunks = Counter("fabric_agent_bad_chunks", "Chunks that failed verification, by source",
                                  ["source"], registry=registry)
        self.deploys = Counter("fabric_agent_deploys", "Deploys by outcome", ["outcome"], registry=registry)
        self.disk = Gauge("fabric_agent_disk_used_ratio", "Fraction of the data disk in use", registry=registry)


class SiteAgent:
    def __init__(self, cfg: SiteConfig):
        self.cfg = cfg
        self.layout = Layout(cfg.data)
        self.layout.sweep_staging()
        self.store: Store = open_store(self.layout.store_dir)
        self.registry = Registry(self.store)
        self.state = self.layout.load_state()
        self.inflight = Inflight()
        self.origin = OriginClient(cfg.origin, cfg.token)
        self.sources = self._plan_sources()
        self.owners = self._plan_owners()
        self.channels = {a: ChannelStatus(a, c, active=self.layout.active(a)) for a, c in cfg.follow}
        self._wake = {a: asyncio.Event() for a, _ in cfg.follow}
        self._deploy_lock = asyncio.Lock()
        self.ready = False
        self.metrics: AgentMetrics | None = None
        self.rollout = Rollout(self, cfg.workers)  # hot-load: workers, canary, rollback (agents/rollout.py)

    # --- sources -----------------------------------------------------------------

    def _plan_sources(self) -> list[OriginClient]:
        """Chunk sources in preference order; the origin is always last."""
        if self.cfg.upstreams:
            urls = [(u, True) for u in self.cfg.upstreams]
        elif self.cfg.topology:
            topo = Topology.load(self.cfg.topology)
            urls = [(s.url, s.pull_through) for s in topo.sources_for(self.cfg.site)[:-1] if s.url]
        else:
            urls = []
        clients = [OriginClient(u, self.cfg.token, headers=None if relay else {PEER_HEADER: "1"})
                   for u, relay in urls]
        return clients + [self.origin]

    def _plan_owners(self) -> list[OriginClient | None]:
        """Sibling hubs sharing the origin's uplink (None for this site), ordered by name."""
        if self.cfg.upstreams or not self.cfg.topology:
            return []
        peers = Topology.load(self.cfg.topology).shard_peers(self.cfg.site)
        return [None if p.name == self.cfg.site else OriginClient(p.url, self.cfg.token) for p in peers]

    def owner(self, chunk_id: str) -> OriginClient | None:
        """The sibling hub to fetch `chunk_id` from first, if another hub owns it."""
        return self.owners[owner_index(chunk_id, len(self.owners))] if self.owners else None

    # --- following -----------------------------------------------------------------

    async def follow_events(self) -> None:
        """Listen to the origin's events forever; re-sync everything on each (re)connect."""
        backoff = 0.5
        while True:
            try:
                async for event, data in self.origin.events():
                    backoff = 0.5
                    if event == "hello":
                        await self.resync()
                    elif event == "channel" and data.get("artifact") in self.channels:
                        ch = self.channels[data["artifact"]]
                        if data.get("channel") == ch.channel:
                            self._want(ch, data.get("version"))
            except FabricError as e:
                log.warning("event stream lost", origin=self.cfg.origin, error=e.message, retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def resync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sync.resync_interval)
            await self.resync()

    async def resync(self) -> None:
        """Read every followed channel at the origin and deploy what changed."""
        for ch in self.channels.values():
            try:
                self._want(ch, (await self.origin.channel(ch.artifact, ch.channel)).version)
            except FabricError as e:
                ch.error = f"{e.code}: {e.message}"
                log.warning("cannot read channel", artifact=ch.artifact, channel=ch.channel, error=e.message)

    def _want(self, ch: ChannelStatus, version: str | None) -> None:
        if version and version != ch.target:
            log.info("channel points at new version", artifact=ch.artifact, channel=ch.channel, version=version)
            ch.target = version
        self._wake[ch.artifact].set()

    async def deploy_loop(self, artifact: str) -> None:
        """Keep the artifact's active version equal to its channel's target (newest wins)."""
        ch, backoff = self.channels[artifact], 1.0
        while True:
            await self._wake[artifact].wait()
            self._wake[artifact].clear()
            target = ch.target
            if target is None or target == ch.active or target in self.state.bad.get(artifact, []):
                continue
            try:
                await self.deploy(ch, target)
                backoff = 1.0
            except Exception as e:  # noqa: BLE001 - a failed deploy must never stop the loop
                if not isinstance(e, FabricError):
                    log.error("unexpected deploy error", artifact=artifact, error=repr(e))
                    e = FabricError(repr(e))
                ch.error = f"{e.code}: {e.message}"
                self._count("failed")
                log.error("deploy failed; the active version keeps serving", artifact=artifact,
                          version=target, active=ch.active, error=e.message, code=e.code, retry_in_s=backoff)
                asyncio.get_running_loop().call_later(backoff, self._wake[artifact].set)
                backoff = min(backoff * 2, 60.0)
            finally:
                ch.syncing = None

    # --- one deploy ------------------------------------------------------------------

    async def deploy(self, ch: ChannelStatus, version: str) -> None:
        artifact = ch.artifact
        async with self._deploy_lock:
            ch.syncing, ch.error = version, None
            base = await asyncio.to_thread(delta.manifest_base, self.store, artifact, version)
            manifest = await self.origin.manifest(artifact, version, base)
            folder = self.layout.version_dir(artifact, version)
            if folder.is_dir():  # materialised before (a rollback, or a restart after it was built)
                await self._fetch(ch, manifest, None)
                await asyncio.to_thread(verify_tree, manifest, folder)
            else:  # build the folder as chunks arrive; the ones the store held are copied after
                assembly = await asyncio.to_thread(Assembly, manifest, folder)
                try:
                    await self._fetch(ch, manifest, assembly.write)
                    await asyncio.to_thread(assembly.fill_from_store, self.store)
                    await asyncio.to_thread(assembly.commit)
                except BaseException:
                    await asyncio.to_thread(assembly.abort)
                    raise
            await asyncio.to_thread(self.registry.commit, manifest)
            if ch.target != version:
                log.info("newer version wanted; not activating", artifact=artifact, version=version,
                         wanted=ch.target)
                return
            previous = ch.active
            self.layout.activate(artifact, version)
            ch.active = version
            history = self.state.history.setdefault(artifact, [])
            if version in history:
                history.remove(version)
            history.append(version)
            self.layout.save_state(self.state)
            self._count("activated")
            self._set_active_metric(artifact, version)
            log.info("version activated", artifact=artifact, version=version, site=self.cfg.site)
            await self.rollout.on_activated(artifact, version, previous)
            await asyncio.to_thread(self.prune)

    async def _fetch(self, ch: ChannelStatus, manifest: Manifest, on_chunk) -> None:
        sizes = manifest.unique_chunks()
        ch.bytes_total, ch.bytes_done = sum(sizes.values()), 0

        def progress(n: int) -> None:
            ch.bytes_done += n
            if self.metrics:
                self.metrics.sync_done.labels(ch.artifact).set(ch.bytes_done)
        if self.metrics:
            self.metrics.sync_total.labels(ch.artifact).set(ch.bytes_total)
        o = self.cfg.sync
        fields = await asyncio.to_thread(delta.request_fields, self.store, manifest)
        stats = await fetch_chunks(sizes, self.store, self.sources, connections=o.connections,
                                   max_rate=o.max_rate, stall_timeout=o.stall_timeout,
                                   give_up_after=o.give_up_after, inflight=self.inflight, progress=progress,
                                   prefer=self.owner, delta_fields=fields, on_chunk=on_chunk)
        ch.bytes_done = ch.bytes_total
        self._count_sources(stats)
        log.info("version fetched", artifact=ch.artifact, version=manifest.version,
                 chunks_fetched=stats.chunks_fetched, chunks_reused=stats.chunks_reused,
                 bytes_received=stats.bytes_received, bytes_raw=stats.bytes_raw,
                 wire_ratio=stats.to_json()["wire_ratio"], by_source=stats.bytes_by_source,
                 bad_chunks=stats.bad_chunks_by_source, seconds=round(stats.seconds, 3))

    def _count_sources(self, stats) -> None:
        """Bytes and bad chunks by source, for our own deploys and for pull-through alike."""
        if self.metrics:
            for src, n in stats.bytes_by_source.items():
                self.metrics.by_source.labels(src).inc(n)
            for src, n in stats.bad_chunks_by_source.items():
                self.metrics.bad_chunks.labels(src).inc(n)

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.deploys.labels(outcome).inc()

    def _set_active_metric(self, artifact: str, version: str) -> None:
        if self.metrics:
            self.metrics.active.clear()
            for a, ch in self.channels.items():
                if ch.active:
                    self.metrics.active.labels(a, ch.active).set(1)

    # --- retention ---------------------------------------------------------------------

    def kept_versions(self, artifact: str, keep: int) -> set[str]:
        history = self.state.history.get(artifact, [])
        kept = set(history[-keep:])
        kept |= {p.split("@", 1)[1] for p in self.state.pins if p.startswith(artifact + "@")}
        active = self.layout.active(artifact)
        if active:
            kept.add(active)
        return kept

    def prune(self) -> gc_mod.GcReport:
        """Drop versions beyond retention, then chunks nothing kept needs. Runs in a thread.

        Above the high watermark of disk use, keep fewer versions, one step at a time,
        until use falls below the low watermark (or only active and pinned ones remain).
        """
        r = self.cfg.retention
        keep = r.keep
        report = self._prune_to(keep, grace=300)
        if self.layout.disk_usage() > r.high_watermark:
            while keep > 1 and self.layout.disk_usage() > r.low_watermark:
                keep -= 1
                report = self._prune_to(keep, grace=0)
            log.info("disk above high watermark: pruned", keep=keep, disk_used=round(self.layout.disk_usage(), 3))
        if self.metrics:
            self.metrics.disk.set(self.layout.disk_usage())
        return report

    def _prune_to(self, keep: int, grace: float) -> gc_mod.GcReport:
        for artifact in set(self.registry.artifacts()) | set(self.channels):
            kept = self.kept_versions(artifact, keep)
            for version in set(self.layout.materialised(artifact)) - kept:
                self.layout.remove_version(artifact, version)
                log.info("version pruned", artifact=artifact, version=version)
            for version in set(self.registry.versions(artifact)) - kept:
                self.registry.delete_version(artifact, version)
        return gc_mod.gc(self.store, keep=10 ** 9, grace=grace)

    # --- HTTP: relay, status, pins ---------------------------------------------------------

    async def relay_get(self, chunk_id: str) -> bytes | None:
        # A peer asks only for what we hold: never make it wait on our own fetch (siblings
        # fetching the same chunks would otherwise wait on each other until they stall).
        fut = None if _PEER_REQUEST.get() else self.inflight.waiter(chunk_id)
        if fut is not None:
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.cfg.sync.give_up_after)
            except asyncio.TimeoutError:
                return None
        try:
            return await asyncio.to_thread(self.store.get_chunk_stored, chunk_id)
        except NotFound:
            return None

    async def relay_prepare(self, request: web.Request, ids: list[str]) -> None:
        """Start one upstream fetch for the asked chunks this site neither holds nor is fetching."""
        if request.headers.get(PEER_HEADER):
            _PEER_REQUEST.set(True)  # seen by relay_get in the reads this handler starts
            return
        lacking = await asyncio.to_thread(self.store.missing, [c for c in ids if c not in self.inflight])
        owned, _ = self.inflight.claim([c for c in lacking if c not in self.inflight])
        if owned:
            asyncio.get_running_loop().create_task(self._pull_through(owned))

    async def _pull_through(self, ids: list[str]) -> None:
        o = self.cfg.sync
        try:
            stats = await fetch_chunks({c: None for c in ids}, self.store, self.sources,
                                       connections=o.connections, stall_timeout=o.stall_timeout,
                                       give_up_after=o.give_up_after, inflight=self.inflight, preclaimed=True,
                                       prefer=self.owner)
            self._count_sources(stats)
        except FabricError as e:
            log.warning("pull-through failed", chunks=len(ids), error=e.message)

    def status(self) -> dict:
        return {"site": self.cfg.site, "ready": self.ready,
                "channels": [c.to_json() for c in self.channels.values()],
                "pins": sorted(self.state.pins), "bad": self.state.bad,
                "disk_used": round(self.layout.disk_usage(), 4), "workers": self.rollout.status(),
                "at": time.time()}

    async def reject_version(self, artifact: str, version: str, previous: str | None, reason: str) -> None:
        """A version failed its canary here: mark it bad and put `previous` back in service."""
        async with self._deploy_lock:
            if version not in self.state.bad.setdefault(artifact, []):
                self.state.bad[artifact].append(version)
            if self.layout.active(artifact) == version:
                if previous:
                    self.layout.activate(artifact, previous)
                else:
                    (self.layout.current / artifact).unlink(missing_ok=True)
                self.channels[artifact].active = previous
                self._set_active_metric(artifact, previous)
            self.layout.save_state(self.state)
            log.error("version rejected at this site", artifact=artifact, version=version, active=previous,
                      reason=reason)

    def pin(self, artifact: str, version: str, pinned: bool) -> None:
        check_name("artifact", artifact)
        check_name("version", version)
        key = f"{artifact}@{version}"
        if pinned:
            if version not in self.layout.materialised(artifact):
                raise NotFound(f"{key} is not materialised at site {self.cfg.site}")
            self.state.pins.add(key)
        else:
            self.state.pins.discard(key)
        self.layout.save_state(self.state)

    async def report_loop(self) -> None:
        """Tell the origin how this site is doing, for `fabric status`."""
        while True:
            try:
                await self.origin.report_site(self.cfg.site, self.status())
            except FabricError as e:
                log.warning("status report failed", error=e.message)
            await asyncio.sleep(self.cfg.report_interval)


def create_app(agent: SiteAgent) -> web.Application:
    tokens = TokenTable.from_file(agent.cfg.tokens) if agent.cfg.tokens else _own_token(agent.cfg)

    async def ready() -> bool:
        return agent.ready

    app = base_app(store=agent.store, tokens=tokens, ready=ready)
    app[AGENT] = agent
    agent.metrics = AgentMetrics(app[METRICS].registry)
    chunk_routes(app, get=agent.relay_get, prepare=agent.relay_prepare)
    agent.rollout.add_routes(app)
    app.router.add_get(f"{wire.API}/site", _status)
    app.router.add_post(f"{wire.API}/site/pins", _pin)
    app.router.add_delete(f"{wire.API}/site/pins/{{artifact}}/{{version}}", _unpin)
    app.cleanup_ctx.append(_background)
    return app


def _own_token(cfg: SiteConfig) -> TokenTable:
    """Without a token file, the relay trusts only the site's own token (pull and admin)."""
    return TokenTable.from_dict({"token": [{"name": cfg.site, "secret": cfg.token, "scopes": ["pull", "admin"]}]})


async def _status(request: web.Request) -> web.Response:
    principal(request).require("pull")
    return web.json_response(request.app[AGENT].status())


async def _pin(request: web.Request) -> web.Response:
    principal(request).require("admin")
    body = await read_json(request)
    agent: SiteAgent = request.app[AGENT]
    await asyncio.to_thread(agent.pin, body.get("artifact"), body.get("version"), True)
    return web.json_response({"pins": sorted(agent.state.pins)})


async def _unpin(request: web.Request) -> web.Response:
    principal(request).require("admin")
    agent: SiteAgent = request.app[AGENT]
    await asyncio.to_thread(agent.pin, request.match_info["artifact"], request.match_info["version"], False)
    return web.json_response({"pins": sorted(agent.state.pins)})


async def _background(app: web.Application):
    agent: SiteAgent = app[AGENT]
    tasks = [asyncio.create_task(agent.follow_events()), asyncio.create_task(agent.resync_periodically()),
             asyncio.create_task(agent.report_loop())]
    tasks += [asyncio.create_task(agent.deploy_loop(a)) for a in agent.channels]
    agent.ready = True
    yield
    agent.ready = False
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in {id(c): c for c in agent.sources + [o for o in agent.owners if o]}.values():
        await client.close()


def run_agent(cfg: SiteConfig) -> None:
    async def main():
        agent = SiteAgent(cfg)
        await run_until_signalled(create_app(agent), cfg.listen, None, f"agent {cfg.site}")
    asyncio.run(main())
