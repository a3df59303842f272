"""`--dry-run` for `publish` and `pull`: what would be stored, sent or fetched, with nothing written.

A dry publish runs the real publish (read, cut, hash) into `DryRunTarget`, which asks
where the version would go which chunks it holds and keeps none. A dry pull resolves
the version, reads its manifest and asks the store which chunks it lacks. Neither
creates a store, a folder or a version.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric.core.manifest import Manifest
from fabric.errors import NotFound
from fabric.store.store import Store


class DryRunTarget:
    """A publish `Target` that only asks: `holds(ids)` says which chunks the real target
    (a store, an origin, or nothing yet) already has; `offer` reports each new chunk's
    raw size as what would be stored or sent, and nothing is kept."""

    def __init__(self, holds, registry=None):
        self.holds = holds
        self.registry = registry
        self.manifest: Manifest | None = None

    def offer(self, chunks, dtypes=None) -> list[int]:
        held = self.holds([cid for cid, _ in chunks])
        return [0 if cid in held else len(data) for cid, data in chunks]

    def flush(self) -> None:
        """Nothing was stored."""

    def commit(self, manifest: Manifest) -> str:
        self.manifest = manifest
        return manifest.id

    def promote(self, artifact: str, version: str, channel: str) -> None:
        """No channel moves."""


def local_holds(store: Store | None):
    """`holds` for a local store (None: the store does not exist yet, so it holds nothing)."""
    if store is None:
        return lambda ids: set()
    return lambda ids: set(ids) - set(store.missing(ids))


def remote_holds(origin):
    return lambda ids: set(ids) - set(origin.missing(ids))


def existing_store(open_store, *args, **kw) -> Store | None:
    """The store `open_store` opens without creating it, or None where there is none yet."""
    try:
        return open_store(*args, create=False, **kw)
    except NotFound:
        return None


@dataclass
class Plan:
    """What a publish would store or send, or what a pull would fetch: chunks and bytes
    new (missing where they go) and present (already there)."""

    artifact: str
    version: str
    files: int
    bytes: int
    chunks_new: int
    bytes_new: int
    chunks_present: int
    bytes_present: int

    def to_json(self) -> dict:
        return dict(self.__dict__, dry_run=True)


def publish_plan(result, target: DryRunTarget) -> Plan:
    sizes = target.manifest.unique_chunks() if target.manifest else {}
    return Plan(result.artifact, result.version, result.files, result.bytes,
                chunks_new=result.new_chunks, bytes_new=result.new_bytes,
                chunks_present=result.chunks - result.new_chunks,
                bytes_present=sum(sizes.values()) - result.new_bytes)


def pull_plan(manifest: Manifest, store: Store | None) -> Plan:
    sizes = manifest.unique_chunks()
    missing = set(store.missing(list(sizes))) if store is not None else set(sizes)
    new = sum(sizes[c] for c in missing)
    return Plan(manifest.artifact, manifest.version, len(manifest.files), manifest.size,
                chunks_new=len(missing), bytes_new=new, chunks_present=len(sizes) - len(missing),
                bytes_present=sum(sizes.values()) - new)
