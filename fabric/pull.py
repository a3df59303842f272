"""Materialising a version: write its files into a folder, atomically.

An `Assembly` builds a version's files in a hidden sibling folder of DEST: every file
is created at its final size, then chunks are written at their offsets in whatever
order they come — straight from the network as each chunk is verified
(`fabric.transfer` calls `Assembly.write`), or from the store for the chunks it
already held (`fill_from_store`). `commit` fsyncs the files and renames the folder
into place, so a reader never sees a half-written version, and a failed pull
leaves DEST as it was. Each byte is written once and hashed once.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import DestinationExists, InvalidManifest, MissingChunks, StoreFull
from .manifest import Manifest
from .store import Store


@dataclass
class PullResult:
    artifact: str
    version: str
    manifest_id: str
    dest: str
    files: int
    bytes: int
    chunks_fetched: int = 0
    chunks_reused: int = 0
    bytes_received: int = 0  # payload bytes on the wire
    bytes_raw: int = 0  # decoded bytes of the chunks fetched
    seconds: float = 0.0

    @property
    def wire_ratio(self) -> float | None:
        """Payload bytes on the wire per raw byte fetched."""
        return round(self.bytes_received / self.bytes_raw, 6) if self.bytes_raw else None

    def to_json(self) -> dict:
        return dict(self.__dict__, wire_ratio=self.wire_ratio)


def check_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        if not dest.is_dir() or any(dest.iterdir()):
            raise DestinationExists(f"{dest} exists and is not empty (use --force to replace it)")


class Assembly:
    """The files of `manifest`, being written under a staging folder next to `dest`."""

    def __init__(self, manifest: Manifest, dest: str | os.PathLike, *, overwrite: bool = False):
        self.manifest = manifest
        self.dest = Path(dest).absolute()
        check_dest(self.dest, overwrite)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.dest.parent / f".{self.dest.name}.fabric-{uuid.uuid4().hex[:8]}"
        self._places: dict[str, list[tuple[Path, int]]] = {}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._guard(self._create_files)

    def _create_files(self) -> None:
        self.staging.mkdir()
        root = self.staging.resolve()
        for entry in self.manifest.files:
            path = self.staging / entry.path
            if not path.resolve().is_relative_to(root):
                raise InvalidManifest(f"file path {entry.path!r} escapes the destination")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(entry.size)
            offset = 0
            for cid, size in entry.chunks:
                self._places.setdefault(cid, []).append((path, offset))
                offset += size

    def write(self, chunk_id: str, data: bytes | memoryview) -> None:
        """Write a verified chunk at every place the version uses it. Thread-safe."""
        with self._lock:
            if chunk_id in self._written or chunk_id not in self._places:
                return
            self._written.add(chunk_id)
        self._guard(self._pwrite_all, chunk_id, data)

    def _pwrite_all(self, chunk_id: str, data) -> None:
        for path, offset in self._places[chunk_id]:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

    def fill_from_store(self, store: Store, progress=None) -> int:
        """Write every chunk not written yet from `store` (verified as read); returns how many."""
        todo = [cid for cid in self._places if cid not in self._written]
        missing = store.missing(todo)
        if missing:
            raise MissingChunks(f"the store lacks {len(missing)} chunk(s) of this version, e.g. {missing[0]}")
        for cid in todo:
            data = store.get_chunk(cid)
            self.write(cid, data)
            if progress:
                progress(len(data) * len(self._places[cid]))
        return len(todo)

    def commit(self) -> None:
        """Make the files durable and move the folder into place as DEST."""
        def finish():
            for entry in self.manifest.files:
                path = self.staging / entry.path
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(path, entry.mode)
            _swap_into_place(self.staging, self.dest)
        self._guard(finish)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _guard(self, fn, *args) -> None:
        """Run `fn`; on any failure remove the staging folder; a full disk is StoreFull."""
        try:
            fn(*args)
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left to write {self.manifest.artifact}@{self.manifest.version} "
                                f"into {self.dest}") from None
            raise
        except BaseException:
            self.abort()
            raise


def materialize(store: Store, manifest: Manifest, dest: str | os.PathLike, *,
                overwrite: bool = False, progress=None) -> None:
    """Write every file of `manifest` under `dest` from `store`, atomically."""
    missing = store.missing(manifest.chunk_ids())
    if missing:
        raise MissingChunks(f"the store lacks {len(missing)} chunk(s) of this version, e.g. {missing[0]}")
    assembly = Assembly(manifest, dest, overwrite=overwrite)
    try:
        assembly.fill_from_store(store, progress)
        assembly.commit()
    except BaseException:
        assembly.abort()
        raise


def _swap_into_place(staging: Path, dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.fabric-old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        os.rename(staging, dest)
