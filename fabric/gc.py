"""Garbage collection: drop old versions, then the chunks no version needs.

Per artifact, the `keep` newest versions survive (all of them with `keep=None`: the
origin's orphan sweep), and so does every version a channel points at now or could
roll back to (or stages), and every pinned version. Then a mark-and-sweep deletes manifests and
chunks that nothing references, fenced against commits (`fabric.store.fence`): gc
holds the store's sweep lease from before it lists anything until its last delete,
its roots are every version ref and every commit intent listed under the lease, and
it deletes nothing once the lease is lost. Chunks younger than `grace` seconds (by
the store's clock) are spared, so a publish still uploading keeps what it stored
before it commits. Last, a pack (`fabric.store.packs`) goes once no chunk reference
points into it and it has not been written for `grace` seconds (a pull in progress
writes into its packs). A site's packs are its version folders' files: a folder that
retention removed is freed here, once its references moved (`agents.site.retention`). A version's signature envelope (`fabric.store.signatures`) goes
with the version; one whose version is gone (a crash between the two deletes) goes in the
sweep, under the same cutoff.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from fabric.errors import InvalidInput, NotFound
from fabric.core.manifest import Manifest
from fabric.store import fence, signatures
from fabric.store.registry import Registry
from fabric.store.store import Store


@dataclass
class GcReport:
    versions_deleted: list[str] = field(default_factory=list)
    manifests_deleted: int = 0
    chunks_deleted: int = 0
    packs_deleted: int = 0
    bytes_freed: int = 0
    intents_expired: int = 0
    signatures_deleted: int = 0  # envelopes of versions already gone (those of deleted versions go with them)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def gc(store: Store, *, keep: int | None, pinned: set[str] = frozenset(), grace: float = 3600.0,
       dry_run: bool = False, lease: float | None = None) -> GcReport:
    """Delete all but the newest `keep` versions of each artifact, and unreferenced data.

    Args:
        keep: versions to keep per artifact (at least 1; None: every version).
        pinned: "artifact@version" strings that must survive whatever their age.
        grace: spare chunks, manifests and packs written within this many seconds.
        dry_run: report what would go, delete nothing (and take no lease).
        lease: the sweep lease's timeout in seconds (default `fence.LEASE`).

    Raises:
        GcRunning: another gc holds the store's sweep lease.
        GcLeaseLost: the lease was broken while this gc ran; it stopped deleting.
    """
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    registry, report = Registry(store), GcReport()
    kept = _drop_versions(registry, keep, pinned, dry_run, report)
    if dry_run:
        _sweep(store, kept, _mark(store, kept), time.time() - grace, report, None)
        return report
    with fence.SweepLease(store, lease=lease) as sweep:
        intents, report.intents_expired = fence.intent_roots(store, sweep.started, expire=True)
        roots = _committed(registry)  # listed after the intents: a commit deletes its intent last
        live = _mark(store, roots) | _mark(store, intents - roots, missing_ok=True)
        _sweep(store, roots | intents, live, sweep.started - grace, report, sweep.check)
    return report


def _drop_versions(registry: Registry, keep: int | None, pinned: set[str], dry_run: bool,
                   report: GcReport) -> set[str]:
    """Delete the versions that need not stay; the manifest ids of those that do."""
    kept: set[str] = set()
    for artifact in registry.artifacts():
        versions = registry.versions(artifact)
        protected = set(versions if keep is None else versions[-keep:]) | _channel_versions(registry, artifact)
        protected |= {p.split("@", 1)[1] for p in pinned if p.startswith(artifact + "@")}
        for v in versions:
            if v in protected:
                kept.add(registry.manifest_id(artifact, v))
            else:
                report.versions_deleted.append(f"{artifact}@{v}")
                if not dry_run:
                    registry.delete_version(artifact, v)
    return kept


def _committed(registry: Registry) -> set[str]:
    """The manifest id of every version ref in the store now."""
    refs = (registry.store.get_ref(key) for key in registry.store.list_refs("") if "/versions/" in key)
    return {ref.decode() for ref in refs if ref is not None}


def _channel_versions(registry: Registry, artifact: str) -> set[str]:
    return {v for ch in registry.channels(artifact) for v in ch.stack + [ch.staged_version] if v}  # staged too


def _mark(store: Store, manifests: set[str], *, missing_ok: bool = False) -> set[str]:
    """Every chunk the manifests name; with `missing_ok`, an absent manifest names none
    (an intent whose commit failed: it checks its chunks after any sweep)."""
    live: set[str] = set()
    for mid in manifests:
        try:
            live.update(Manifest.from_bytes(store.get_manifest_bytes(mid)).chunk_ids())
        except NotFound:
            if not missing_ok:
                raise
    return live


def _sweep(store: Store, live_manifests: set[str], live_chunks: set[str], cutoff: float, report: GcReport,
           check: Callable[[], None] | None) -> None:
    """Delete what is unreferenced and modified at or before `cutoff` (S3 times have whole
    seconds: with grace 0 what was written in the lease's second goes too); `check` (None: a dry run)
    runs before every delete and raises once gc may no longer delete."""
    for info in list(store.backend.list("manifests/")):
        mid = "blake3:" + info.key.rsplit("/", 1)[-1].removesuffix(".json")
        if mid not in live_manifests and info.mtime <= cutoff:
            report.manifests_deleted += 1
            if check:
                check()
                store.delete_manifest(mid)
    for cid, info in list(store.iter_chunks()):
        if cid not in live_chunks and info.mtime <= cutoff:
            report.chunks_deleted += 1
            report.bytes_freed += info.size
            if check:
                check()
                store.delete_chunk(cid)
    _sweep_packs(store, cutoff, report, check)
    _sweep_signatures(store, cutoff, report, check)


def _sweep_signatures(store: Store, cutoff: float, report: GcReport, check: Callable[[], None] | None) -> None:
    """Delete version envelopes whose version is gone (looked up again right before the delete)."""
    for artifact, version, info in list(signatures.iter_signatures(store)):
        if info.mtime <= cutoff and store.get_ref(f"{artifact}/versions/{version}") is None:
            report.signatures_deleted += 1
            if check:
                check()
                signatures.delete_signature(store, artifact, version)


def _sweep_packs(store: Store, cutoff: float, report: GcReport, check: Callable[[], None] | None) -> None:
    # In a dry run the chunks that would go still point into their packs, so those
    # packs are not counted: the report errs on the side of what stays.
    used = {ref.pack for _, ref in store.pack_refs()}
    for info in list(store.iter_packs()):
        if info.key not in used and info.mtime <= cutoff:
            report.packs_deleted += 1
            report.bytes_freed += info.size
            if check:
                check()
                store.delete_pack(info.key)
