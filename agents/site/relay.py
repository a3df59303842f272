"""Relaying: serving this site's chunks to the sites below it, with pull-through.

Children ask for chunks with the origin's own chunk API and token checks
(`fabric.wire.server.chunk_routes`, wired in `agents.site.app`). A request for chunks
this site neither holds nor is fetching starts one upstream fetch for them, which every
concurrent asker shares (pull-through with request coalescing, `fabric.transfer.Inflight`):
the readers of a chunk being fetched wait for it (`ready`) for as long as this site's
fetches keep making progress: they give up (a missing frame, so the child goes
elsewhere) only after `give_up_after` seconds in which no fetch here stored a chunk.
Meanwhile the chunk routes send the child wait frames (`fabric.wire.chunks`), so a
child never takes a relay that waits on a slow upstream for a dead one.

A sibling peer sends `PEER_HEADER`: it wants only what this site holds, so its request
starts no fetch and waits on none (siblings fetching the same chunks would otherwise
wait on each other until they stall).

While this site pulls a version (`fetching`, around its deploy's and its staging's pulls),
the manifest it is pulling is `pending` to the chunk routes: children asking for that
version before it is committed here get, for each chunk, the delta frame this site's
upstream sent it (`fabric.wire.framecache.Forwarded`, kept from the fetch) when the
child's plan gives the chunk the same references (every one a chunk of a version
committed here), else the chunk's stored form. A relay never encodes
(`fabric.wire.chunks`): its memory stays within issue 17's bound.

Children see only the chunks their tokens may pull (`fabric.wire.chunks.visible`), as
this site's chunk index tells (`RelaySource`): the versions this site holds, and those
the origin shows this site's token, so it can vouch for a version's chunks before it
has fetched them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from dataclasses import replace
from typing import Iterable

from aiohttp import web

from fabric.core.manifest import Manifest
from fabric.errors import FabricError, NotFound
from fabric.logs import get_logger
from fabric.pull import Upstream
from fabric.store.registry import Registry
from fabric.store.store import Store
from fabric.wire.client import OriginClient
from fabric.transfer import fetch_chunks
from fabric.wire.protocol import PEER_HEADER

from agents.site.metrics import AgentMetrics

log = get_logger("agent")
_PEER_REQUEST = contextvars.ContextVar("peer_request", default=False)


class Relay:
    """The `get` and `prepare` hooks of this site's chunk routes."""

    def __init__(self, store: Store, upstream: Upstream, metrics: AgentMetrics):
        self.store, self.upstream, self.metrics = store, upstream, metrics
        self.inflight = upstream.inflight
        # A pull-through fetches for children waiting on it: it was never rate-limited.
        self.options = replace(upstream.options, max_rate=None)
        self._fetching: dict[tuple[str, str], Manifest] = {}  # (artifact, version): its manifest, while pulled

    @contextlib.contextmanager
    def fetching(self, manifest: Manifest):
        """While the body runs, `manifest`'s version is `pending` (it is being pulled here)."""
        key = (manifest.artifact, manifest.version)
        self._fetching[key] = manifest
        try:
            yield
        finally:
            if self._fetching.get(key) is manifest:
                del self._fetching[key]

    def pending(self, artifact: str, version: str) -> Manifest | None:
        """The manifest of `artifact@version` if this site is pulling it now (the chunk
        routes' `pending`; called from their planning threads)."""
        return self._fetching.get((artifact, version))

    async def ready(self, chunk_id: str) -> None:
        """Return once no fetch of `chunk_id` is in flight here, or fetches here have stored
        nothing for `give_up_after` seconds. A peer's request never waits."""
        fut = None if _PEER_REQUEST.get() else self.inflight.waiter(chunk_id)
        patience = self.upstream.options.give_up_after
        while fut is not None and not fut.done():
            try:
                await asyncio.wait_for(asyncio.shield(fut), min(patience, 1.0))
            except asyncio.TimeoutError:
                if time.monotonic() - self.inflight.progressed > patience:
                    log.warning("relay gave up waiting on upstream", chunk=chunk_id, waited_s=patience)
                    return

    async def get(self, chunk_id: str) -> bytes | None:
        """A chunk's stored form, once `ready`; None if absent."""
        await self.ready(chunk_id)
        try:
            return await asyncio.to_thread(self.store.get_chunk_stored, chunk_id)
        except NotFound:
            return None

    async def prepare(self, request: web.Request, ids: list[str]) -> None:
        """Start one upstream fetch for the asked chunks this site neither holds nor is fetching."""
        if request.headers.get(PEER_HEADER):
            _PEER_REQUEST.set(True)  # seen by `get` in the reads this handler starts
            return
        lacking = await asyncio.to_thread(self.store.missing, [c for c in ids if c not in self.inflight])
        owned, _ = self.inflight.claim([c for c in lacking if c not in self.inflight])
        if owned:
            log.debug("pull-through", chunks=len(owned), asked=len(ids))
            asyncio.get_running_loop().create_task(self._pull_through(owned))

    async def _pull_through(self, ids: list[str]) -> None:
        try:
            stats = await fetch_chunks({c: None for c in ids}, self.store, self.upstream.sources, self.options,
                                       inflight=self.inflight, preclaimed=True, prefer=self.upstream.prefer)
            self.metrics.count_sources(stats)
        except FabricError as e:
            log.warning("pull-through failed", chunks=len(ids), error=e.message)


class RelaySource:
    """The versions a relay's chunk index (`fabric.store.chunk_index`) learns: those this
    site holds (its registry), and those the origin lists for this site's token. With the
    origin out of reach, the ones held here still count."""

    def __init__(self, registry: Registry, origin: OriginClient):
        self.registry, self.origin = registry, origin

    async def version_keys(self) -> Iterable[tuple[str, str]]:
        keys = set(await asyncio.to_thread(self.registry.version_keys))
        try:
            for artifact in await self.origin.artifacts():
                keys.update((artifact, v["version"]) for v in await self.origin.versions(artifact))
        except FabricError as e:
            log.warning("chunk index: the origin's versions are out of reach", error=e.message)
        return keys

    async def chunk_ids(self, artifact: str, version: str) -> Iterable[str]:
        try:
            manifest = await asyncio.to_thread(self.registry.manifest, artifact, version)
        except NotFound:
            manifest = await self.origin.manifest(artifact, version)
        return manifest.chunk_ids()
