"""Garbage collection: drop old versions, then the chunks no version needs.

Per artifact, the `keep` newest versions survive, and so does every version a
channel points at now or could roll back to, and every pinned version. Then a
mark-and-sweep deletes manifests and chunks that no surviving version references.
Chunks younger than `grace` seconds are spared: a publish in progress may have
stored them before committing the manifest that references them. Last, a pack
(`fabric.store.packs`) goes once no chunk reference points into it and it has not
been written for `grace` seconds (a pull in progress writes into its packs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fabric.errors import InvalidInput
from fabric.core.manifest import Manifest
from fabric.store.registry import Registry
from fabric.store.store import Store


@dataclass
class GcReport:
    versions_deleted: list[str] = field(default_factory=list)
    manifests_deleted: int = 0
    chunks_deleted: int = 0
    packs_deleted: int = 0
    bytes_freed: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def gc(store: Store, *, keep: int, pinned: set[str] = frozenset(), grace: float = 3600.0,
       dry_run: bool = False) -> GcReport:
    """Delete all but the newest `keep` versions of each artifact, and unreferenced data.

    Args:
        keep: versions to keep per artifact (at least 1).
        pinned: "artifact@version" strings that must survive whatever their age.
        grace: spare chunks written within this many seconds.
        dry_run: report what would go, delete nothing.
    """
    if keep < 1:
        raise InvalidInput("--keep must be at least 1")
    registry, report = Registry(store), GcReport()
    live_manifests: set[str] = set()
    for artifact in registry.artifacts():
        versions = registry.versions(artifact)
        protected = set(versions[-keep:]) | _channel_versions(registry, artifact)
        protected |= {p.split("@", 1)[1] for p in pinned if p.startswith(artifact + "@")}
        for v in versions:
            if v in protected:
                live_manifests.add(registry.manifest_id(artifact, v))
            else:
                report.versions_deleted.append(f"{artifact}@{v}")
                if not dry_run:
                    registry.delete_version(artifact, v)
    live_chunks = _mark(store, live_manifests)
    _sweep(store, live_manifests, live_chunks, grace, dry_run, report)
    return report


def _channel_versions(registry: Registry, artifact: str) -> set[str]:
    return {v for ch in registry.channels(artifact) for v in ch.stack}


def _mark(store: Store, manifests: set[str]) -> set[str]:
    live: set[str] = set()
    for mid in manifests:
        live.update(Manifest.from_bytes(store.get_manifest_bytes(mid)).chunk_ids())
    return live


def _sweep(store: Store, live_manifests: set[str], live_chunks: set[str], grace: float,
           dry_run: bool, report: GcReport) -> None:
    cutoff = time.time() - grace
    for info in list(store.backend.list("manifests/")):
        mid = "blake3:" + info.key.rsplit("/", 1)[-1].removesuffix(".json")
        if mid not in live_manifests and info.mtime < cutoff:
            report.manifests_deleted += 1
            if not dry_run:
                store.delete_manifest(mid)
    for cid, info in list(store.iter_chunks()):
        if cid not in live_chunks and info.mtime < cutoff:
            report.chunks_deleted += 1
            report.bytes_freed += info.size
            if not dry_run:
                store.delete_chunk(cid)
    _sweep_packs(store, cutoff, dry_run, report)


def _sweep_packs(store: Store, cutoff: float, dry_run: bool, report: GcReport) -> None:
    # In a dry run the chunks that would go still point into their packs, so those
    # packs are not counted: the report errs on the side of what stays.
    used = {ref.pack for _, ref in store.pack_refs()}
    for info in list(store.iter_packs()):
        if info.key not in used and info.mtime < cutoff:
            report.packs_deleted += 1
            report.bytes_freed += info.size
            if not dry_run:
                store.delete_pack(info.key)
