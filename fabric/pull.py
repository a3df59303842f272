"""Materialising a version: write its files into a folder, atomically.

An `Assembly` builds a version's files in a hidden sibling folder of DEST: every file
is created at its final size, then chunks are written at their offsets in whatever
order they come — straight from the network as each chunk is verified
(`fabric.transfer` calls `Assembly.write`), or from the store for the chunks it
already held (`fill_from_store`). `commit` fsyncs the files and renames the folder
into place, so a reader never sees a half-written version, and a failed pull
leaves DEST as it was. Each byte is written once and hashed once.

Given a store to pack into, each file is also hard-linked into that store as a pack
(`fabric.store.packs`) the moment it is created, and `keep` records each fetched
chunk there as a reference to its place in the file: the store holds the chunk
without a second copy, and a pull that is killed resumes from the references it
made durable. Where linking is impossible (store not local, another file system),
`packed` is False and the caller stores chunks itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from fabric.errors import ChunkNotFound, CorruptChunk, DestinationExists, InvalidManifest, MissingChunks, StoreFull
from fabric.fileio import create_sized, pwrite_all
from fabric.logs import get_logger
from fabric.core.manifest import Manifest
from fabric.store.store import Store
from fabric.store.packs import PackRef

log = get_logger("pull")


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
    packed: bool = False  # the store shares DEST's files (hard links) instead of keeping copies
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

    def __init__(self, manifest: Manifest, dest: str | os.PathLike, *, overwrite: bool = False,
                 pack_into: Store | None = None):
        self.manifest = manifest
        self.dest = Path(dest).absolute()
        check_dest(self.dest, overwrite)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.dest.parent / f".{self.dest.name}.fabric-{uuid.uuid4().hex[:8]}"
        self.store = pack_into
        self.packed = pack_into is not None
        self._packs: dict[Path, str] = {}  # file -> its pack in the store
        self._referenced: set[Path] = set()  # files whose pack a chunk reference points into
        self._places: dict[str, list[tuple[Path, int]]] = {}
        self._file_locks: dict[Path, threading.Lock] = {}
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
            create_sized(path, entry.size)
            self._file_locks[path] = threading.Lock()
            if entry.chunks:
                self._link(path)
            offset = 0
            for cid, size in entry.chunks:
                self._places.setdefault(cid, []).append((path, offset))
                offset += size

    def _link(self, path: Path) -> None:
        if not self.packed:
            return
        key = self.store.link_pack(path)
        if key is not None:
            self._packs[path] = key
            return
        self.packed = False  # not here: the caller stores its own copies; drop the empty packs
        for key in self._packs.values():
            self.store.delete_pack(key)
        self._packs.clear()

    def write(self, chunk_id: str, data: bytes | memoryview) -> bool:
        """Write a verified chunk at every place the version uses it. Thread-safe.

        False if there was nothing to do: the chunk is not in this version, or is written.
        """
        with self._lock:
            if chunk_id in self._written or chunk_id not in self._places:
                return False
            self._written.add(chunk_id)
        self._guard(self._pwrite_all, chunk_id, data)
        return True

    def keep(self, chunk_id: str, data: bytes | memoryview) -> None:
        """Write a fetched, verified chunk into the files and record it in the store as a
        reference into its pack (durable at the store's next flush). For `packed` only."""
        if chunk_id not in self._places:  # not ours: stored the usual way
            self.store.put_chunk(chunk_id, data, verified=True, defer=True)
        elif self.write(chunk_id, data):
            path, offset = self._places[chunk_id][0]
            self._referenced.add(path)
            self.store.put_packed(chunk_id, PackRef(self._packs[path], offset, len(data)), defer=True)

    def _pwrite_all(self, chunk_id: str, data) -> None:
        view = memoryview(data).cast("B")
        for path, offset in self._places[chunk_id]:
            fd = os.open(path, os.O_WRONLY)
            # One writer per file at a time: the kernel serialises writes to a file anyway,
            # and its lock spins where ours sleeps (seen as 15% of a pull's CPU on 2 cores).
            try:
                with self._file_locks[path]:
                    pwrite_all(fd, view, offset)
            finally:
                os.close(fd)

    def fill_from_store(self, store: Store, progress=None, *, refetch: list[str] | None = None) -> int:
        """Write every chunk not written yet from `store` (verified as read); returns how many.

        When packing into `store`, the store's references move to this version's files
        (durable at its next flush), so the packs of older versions can go with them.
        With `refetch`, a chunk the store cannot give back intact (a pack spoiled by an
        edit in place, say) is deleted from the store and its id appended to `refetch`
        instead of raising: the caller fetches it again and calls this once more.
        """
        todo = [cid for cid in self._places if cid not in self._written]
        missing = store.missing(todo)
        if missing:
            raise MissingChunks(f"the store lacks {len(missing)} chunk(s) of this version, e.g. {missing[0]}")
        done = 0
        for cid in todo:
            try:
                data = store.get_chunk(cid)
            except (CorruptChunk, ChunkNotFound) as e:
                if refetch is None:
                    raise
                log.warning("stored chunk unreadable; fetching it again", chunk=cid, error=e.message)
                store.delete_chunk(cid)
                refetch.append(cid)
                continue
            if self.packed and store is self.store:
                self.keep(cid, data)  # refer to this version's file now: older packs can go sooner
            else:
                self.write(cid, data)
            done += 1
            if progress:
                progress(len(data) * len(self._places[cid]))
        return done

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
        """Remove the staging folder. Packs that chunks refer to stay: a retry resumes from them."""
        shutil.rmtree(self.staging, ignore_errors=True)
        for path, key in self._packs.items():
            if path not in self._referenced:
                self.store.delete_pack(key)

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
