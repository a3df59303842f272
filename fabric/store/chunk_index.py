"""The chunk index: which artifacts' versions reference each chunk.

A server shows a chunk (serves it, or says it holds it) only to a token that may pull
an artifact whose versions reference it (docs/protocol.md, "Authentication and
scopes"); the chunk routes (`fabric.wire.chunks`) ask this index which artifacts those
are. It maps chunk id -> artifact names in memory, filled from a `VersionSource`:

* the origin's is its registry (`RegistrySource`), and the origin adds each version it
  commits at once (`add`);
* a relay's is the versions its site holds plus those the origin shows the site's
  token (`agents.site.relay.RelaySource`).

Several origin processes can share one bucket, so a version committed through another
process is not `add`ed here: a lookup that finds an id unknown *refreshes* the index
from its source (a listing of version names, then one manifest read per new version).
Refreshes are coalesced and at least `min_interval` seconds apart, so unknown ids
asked in a burst cost one refresh, not one each; a lookup waits for a refresh that
started after it asked, unless the refresh it waited behind found every id it asks for
(the burst of a rollout: a relay's children ask for a new version's chunks while the
first child's refresh is learning it, and none of them waits out `min_interval`).
Entries are never dropped: a version deleted later (gc) keeps its chunks visible to
whoever could pull them, until the process restarts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Iterable, Protocol

from fabric.errors import FabricError
from fabric.logs import get_logger
from fabric.store.registry import Registry

log = get_logger("chunk-index")
MIN_REFRESH_INTERVAL = 0.5  # seconds between two refreshes of one index


class VersionSource(Protocol):
    """Where an index learns versions: their names, and each one's chunk ids."""

    async def version_keys(self) -> Iterable[tuple[str, str]]: ...

    async def chunk_ids(self, artifact: str, version: str) -> Iterable[str]: ...


class RegistrySource:
    """The versions of a store's registry (the origin's)."""

    def __init__(self, registry: Registry):
        self.registry = registry

    async def version_keys(self) -> Iterable[tuple[str, str]]:
        return await asyncio.to_thread(self.registry.version_keys)

    async def chunk_ids(self, artifact: str, version: str) -> Iterable[str]:
        manifest = await asyncio.to_thread(self.registry.manifest, artifact, version)
        return manifest.chunk_ids()


class ChunkIndex:
    """chunk id -> the artifacts whose versions reference it. Used on one event loop."""

    def __init__(self, source: VersionSource, *, min_interval: float = MIN_REFRESH_INTERVAL):
        self.source, self.min_interval = source, min_interval
        self._versions: set[tuple[str, str]] = set()
        self._chunks: dict[str, set[str]] = {}
        self._lock: asyncio.Lock | None = None  # made on the loop that first refreshes
        self._started = float("-inf")  # monotonic time the last refresh started
        self.refreshes = 0

    def add(self, artifact: str, version: str, chunk_ids: Iterable[str]) -> None:
        """Record a version (the origin calls this for each version it commits)."""
        if (artifact, version) in self._versions:
            return
        self._versions.add((artifact, version))
        for cid in chunk_ids:
            self._chunks.setdefault(cid, set()).add(artifact)

    async def artifacts(self, ids: Iterable[str]) -> dict[str, frozenset[str]]:
        """For each id, the artifacts referencing it (empty: none known, even after a refresh)."""
        ids = list(ids)
        if any(cid not in self._chunks for cid in ids):
            await self.refresh(asked=time.monotonic(), wanted=ids)
        return {cid: frozenset(self._chunks.get(cid, ())) for cid in ids}

    async def refresh(self, *, asked: float | None = None, wanted: list[str] | None = None) -> None:
        """Learn the source's versions that are new here, unless a refresh started since
        `asked`, or the one before found every id in `wanted` (when it is not empty)."""
        asked = time.monotonic() if asked is None else asked
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._started >= asked:
                return  # one that started after the caller asked has just finished
            if wanted and all(cid in self._chunks for cid in wanted):
                return  # the refresh this caller waited behind learned what it asks for
            wait = self._started + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._started = time.monotonic()
            self.refreshes += 1
            try:
                keys = set(await self.source.version_keys()) - self._versions
            except FabricError as e:
                log.warning("chunk index refresh failed", error=e.message)
                return
            for artifact, version in sorted(keys):
                try:
                    self.add(artifact, version, await self.source.chunk_ids(artifact, version))
                except FabricError as e:  # deleted meanwhile, or unreadable: try again next time
                    log.warning("chunk index skips a version", artifact=artifact, version=version,
                                error=e.message)
