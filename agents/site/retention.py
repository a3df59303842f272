"""Retention: which versions a site keeps, and collecting the rest.

A site keeps the last `retention.keep` versions it activated, plus the active one, the
pinned ones, the ones its channels stage (`agents.site.staging`) and the ones its workers
serve, are assigned or would revert to (`agents.site.rollout`), both through `also_keep`; it
removes the other materialised folders and registry entries, then collects the chunks
no kept version needs (`fabric.gc`). Above the high watermark of disk use it keeps fewer
versions, one step at a time, until use falls below the low watermark (or only the
active, pinned, staged and in-use ones remain): a rollback target is never pruned under it.

A version folder's files are the store's packs (`fabric.store.packs`: one copy of each
byte at a site), and a pack stays whole while any chunk reference points into it. A
deploy moves the references of the chunks it reuses into its own files, so pruning the
oldest versions frees their packs; but a folder pruned while an older one stays (a
pinned version, a staged version dropped, a rejected one) may hold the only place of
chunks a kept version needs. Before such a folder goes, those references move to a kept
folder's file that holds the chunk (linked as a pack), or, where none does, the store
takes a copy of its own (`release_packs`), so the pruned files are freed with their
references at the collection that follows.

Everything here is blocking file I/O: `prune` runs in a thread, on a snapshot of the
site's state taken on the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from fabric import gc as gc_mod
from fabric.core import digest
from fabric.errors import FabricError
from fabric.logs import get_logger
from fabric.store import packs
from fabric.store.registry import Registry
from fabric.store.store import Store

from agents.site.config import Retention
from agents.site.layout import Layout, SiteState
from agents.site.metrics import AgentMetrics

log = get_logger("agent")


def kept_versions(state: SiteState, layout: Layout, artifact: str, keep: int) -> set[str]:
    """The last `keep` versions activated, the pinned ones and the active one."""
    kept = set(state.history.get(artifact, [])[-keep:])
    kept |= {p.split("@", 1)[1] for p in state.pins if p.startswith(artifact + "@")}
    active = layout.active(artifact)
    if active:
        kept.add(active)
    return kept


class Pruner:
    """Drops what a site's retention does not keep. Its methods block: call them in a thread."""

    def __init__(self, layout: Layout, registry: Registry, retention: Retention, followed: Iterable[str],
                 metrics: AgentMetrics, also_keep: Callable[[str], set[str]] = lambda artifact: set()):
        self.layout, self.registry, self.retention = layout, registry, retention
        self.followed, self.metrics = set(followed), metrics
        self.also_keep = also_keep  # staged and in-use versions: kept whatever the watermark says

    def prune(self, state: SiteState) -> gc_mod.GcReport:
        """Drop versions beyond retention, then chunks nothing kept needs (`state`: a snapshot)."""
        r = self.retention
        keep = r.keep
        report = self._prune_to(state, keep, grace=300)
        if self.layout.disk_usage() > r.high_watermark:
            while keep > 1 and self.layout.disk_usage() > r.low_watermark:
                keep -= 1
                report = self._prune_to(state, keep, grace=0)
            log.info("disk above high watermark: pruned", keep=keep, disk_used=round(self.layout.disk_usage(), 3))
        self.metrics.disk.set(self.layout.disk_usage())
        return report

    def _prune_to(self, state: SiteState, keep: int, grace: float) -> gc_mod.GcReport:
        doomed: list[tuple[str, str]] = []
        for artifact in set(self.registry.artifacts()) | self.followed:
            kept = kept_versions(state, self.layout, artifact, keep) | self.also_keep(artifact)
            doomed += [(artifact, v) for v in sorted(set(self.layout.materialised(artifact)) - kept)]
            for version in set(self.registry.versions(artifact)) - kept:
                self.registry.delete_version(artifact, version)
        if doomed:  # the registry holds what is kept now: what the doomed folders' packs must still give
            release_packs(self.registry, self.layout, doomed)
        for artifact, version in doomed:
            self.layout.remove_version(artifact, version)
            log.info("version pruned", artifact=artifact, version=version)
        return gc_mod.gc(self.registry.store, keep=10 ** 9, grace=grace)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def release_packs(registry: Registry, layout: Layout, doomed: list[tuple[str, str]]) -> int:
    """Move the references that point into the doomed folders' files (as packs) and that a
    version in `registry` still needs: to a kept folder's file holding the chunk, else to a
    copy in the store. Returns how many moved. Each new place is checked against the id."""
    store: Store = registry.store
    gone = set(doomed)

    def files(pairs) -> set[tuple[int, int] | None]:
        return {_inode(p) for a, v in pairs for p in layout.version_dir(a, v).rglob("*") if p.is_file()}
    kept = [(a, v) for a in registry.artifacts() for v in layout.materialised(a) if (a, v) not in gone]
    doomed_files = files(doomed) - files(kept) - {None}  # a file a kept folder links too stays
    pack_of: dict[tuple[int, int], str] = {}  # inode -> a pack key, for every pack
    doomed_packs: set[str] = set()
    for info in store.iter_packs():
        ino = _inode(store.backend.path(info.key))
        if ino is None:
            continue
        pack_of.setdefault(ino, info.key)
        if ino in doomed_files:
            doomed_packs.add(info.key)
    if not doomed_packs:
        return 0
    stuck = {cid: ref for cid, ref in store.pack_refs() if ref.pack in doomed_packs}
    needed, places = set(), {}
    for artifact in registry.artifacts():
        for version in registry.versions(artifact):
            try:
                manifest = registry.manifest(artifact, version)
            except FabricError:
                continue
            ids = set(manifest.chunk_ids()) & stuck.keys()
            needed |= ids
            folder = layout.version_dir(artifact, version)
            if not ids or (artifact, version) in gone or not folder.is_dir():
                continue
            for entry in manifest.files:
                offset = 0
                for cid, size in entry.chunks:
                    if cid in ids:
                        places.setdefault(cid, (folder / entry.path, offset, size))
                    offset += size
    moved = 0
    for cid in needed:
        if _move_to(store, cid, places.get(cid), pack_of) or _copy(store, cid):
            moved += 1
    if moved:
        log.info("chunk references moved out of pruned versions' files", chunks=moved)
    return moved


def _move_to(store: Store, chunk_id: str, place: tuple[Path, int, int] | None,
             pack_of: dict[tuple[int, int], str]) -> bool:
    """Point `chunk_id` at `place` (a kept folder's file, linked as a pack if it is not one)."""
    if place is None:
        return False
    path, offset, size = place
    ino = _inode(path)
    if ino is None:
        return False
    try:
        with open(path, "rb") as f:
            digest.verify(chunk_id, os.pread(f.fileno(), size, offset))
    except (OSError, FabricError):
        return False
    key = pack_of.get(ino) or store.link_pack(path)
    if key is None:
        return False
    pack_of[ino] = key
    store.put_packed(chunk_id, packs.PackRef(key, offset, size))
    return True


def _copy(store: Store, chunk_id: str) -> bool:
    """Give the store a copy of its own of `chunk_id` (read and checked from its pack)."""
    try:
        store.put_chunk(chunk_id, store.get_chunk(chunk_id), verified=True)
    except FabricError as e:
        log.warning("a kept version's chunk could not be moved out of a pruned version's files", chunk=chunk_id,
                    error=e.message)
        return False
    return True
