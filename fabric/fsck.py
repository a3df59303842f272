"""fsck: verify every object in a store, and optionally remove the bad ones.

Each chunk is decoded and re-hashed against its id; each manifest is re-hashed and
validated; each version ref must point at a stored manifest whose chunks are all
present; each version's signature envelope must parse (`fabric.store.signatures`) and
name that version and its manifest (fsck holds no keys: it does not verify signatures).
Removing a bad chunk makes the versions that need it incomplete, which the
report says, so a later pull or sync fetches it again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fabric.errors import FabricError
from fabric.core.manifest import Manifest
from fabric.store import signatures
from fabric.store.registry import Registry
from fabric.store.store import Store


@dataclass
class FsckReport:
    chunks: int = 0
    manifests: int = 0
    versions: int = 0
    bad_chunks: list[str] = field(default_factory=list)
    bad_versions: list[str] = field(default_factory=list)  # "artifact@version: reason"
    signatures: int = 0
    bad_signatures: list[str] = field(default_factory=list)  # "artifact@version: reason"
    removed: int = 0
    temp_swept: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and not self.bad_versions and not self.bad_signatures

    def to_json(self) -> dict:
        return dict(self.__dict__, ok=self.ok)


def fsck(store: Store, *, repair: bool = False, progress=None) -> FsckReport:
    """Check `store`. With `repair`, delete corrupt chunks and leftover temp files."""
    report = FsckReport()
    if repair and store.capabilities.temp_files:
        report.temp_swept = store.backend.sweep_temp()
    ids = [cid for cid, _ in store.iter_chunks()]
    report.chunks = len(ids)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for cid, ok in zip(ids, pool.map(lambda c: _chunk_ok(store, c), ids)):
            if not ok:
                report.bad_chunks.append(cid)
                if repair:
                    store.delete_chunk(cid)
                    report.removed += 1
            if progress:
                progress(1)
    _check_versions(store, report)
    _check_signatures(store, report, repair)
    return report


def _check_signatures(store: Store, report: FsckReport, repair: bool) -> None:
    """Each envelope parses and vouches for the version it is stored under; with `repair`, a bad one goes."""
    registry = Registry(store)
    for artifact, version, _ in list(signatures.iter_signatures(store)):
        report.signatures += 1
        data = signatures.get_signature(store, artifact, version)
        if data is None:
            continue
        try:
            _, stmt = signatures.open_envelope(data, signatures.VersionStatement)
            mid = registry.manifest_id(artifact, version)
            if (stmt["artifact"], stmt["version"], stmt["manifest"]) != (artifact, version, mid):
                raise signatures.StatementMismatch(f"it vouches for {stmt['artifact']}@{stmt['version']} "
                                                   f"({stmt['manifest']})")
        except FabricError as e:
            report.bad_signatures.append(f"{artifact}@{version}: {e.code}: {e.message}")
            if repair:
                signatures.delete_signature(store, artifact, version)
                report.removed += 1


def _chunk_ok(store: Store, chunk_id: str) -> bool:
    try:
        store.get_chunk(chunk_id)
        return True
    except FabricError:
        return False


def _check_versions(store: Store, report: FsckReport) -> None:
    registry = Registry(store)
    seen_manifests = set()
    for artifact in registry.artifacts():
        prefix = f"{artifact}/versions/"
        for key in store.list_refs(prefix):
            version = key[len(prefix):]
            report.versions += 1
            try:
                mid = registry.manifest_id(artifact, version)
                m = Manifest.from_bytes(store.get_manifest_bytes(mid))
                seen_manifests.add(mid)
                missing = store.missing(m.chunk_ids())
                if missing:
                    report.bad_versions.append(f"{artifact}@{version}: {len(missing)} chunk(s) missing")
            except FabricError as e:
                report.bad_versions.append(f"{artifact}@{version}: {e.message}")
    report.manifests = len(seen_manifests)
