"""Reading a version's files for a load: memory-mapped, size-checked, and verified
against the manifest's chunk ids before any weight changes (`VersionFiles`,
`verify_tensors`); `OldFiles` keeps the previous version mapped so a failed load can
be restored from it."""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

from fabric.core import digest
from fabric.core.chunking import SEGMENT_SIZE
from fabric.errors import (CorruptChunk, IntegrityError)
from fabric.logs import get_logger

from agents.worker.buffers import Buffer
from fabric.core.manifest import Manifest, TensorEntry



log = get_logger("worker")


class VersionFiles:
    """A version folder's files, memory-mapped on first use; counts the bytes it hands out."""

    def __init__(self, folder: str | os.PathLike, manifest: Manifest):
        self.folder = Path(folder)
        self.entries = {f.path: f for f in manifest.files}
        self._maps: dict[str, mmap.mmap] = {}
        self._ranges: set[tuple[str, int, int]] = set()

    @property
    def bytes_read(self) -> int:
        return sum(n for _, _, n in self._ranges)

    def _map(self, rel: str) -> mmap.mmap:
        mm = self._maps.get(rel)
        if mm is not None:
            return mm
        entry = self.entries.get(rel)
        if entry is None:
            raise IntegrityError(f"the manifest lists no file {rel!r}")
        path = self.folder / rel
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.size:
                    raise IntegrityError(f"{path} is {size} bytes, the manifest says {entry.size} "
                                         "(truncated or replaced?)")
                # ACCESS_COPY: a private mapping, so torch sees a writable buffer; nothing is written
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else mmap.mmap(-1, 1)
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing") from None
        self._maps[rel] = mm
        return mm

    def prefetch(self, tensors: list[TensorEntry]) -> None:
        """Ask the kernel to start reading these ranges now (a no-op when they are cached)."""
        for t in tensors:
            if t.length and hasattr(mmap, "MADV_WILLNEED"):
                start = t.offset - t.offset % mmap.PAGESIZE
                self._map(t.file).madvise(mmap.MADV_WILLNEED, start, t.offset + t.length - start)

    def view(self, t: TensorEntry) -> memoryview:
        self._ranges.add((t.file, t.offset, t.length))
        return memoryview(self._map(t.file))[t.offset:t.offset + t.length]

    def tensor(self, t: TensorEntry) -> torch.Tensor:
        """The tensor's bytes as a uint8 CPU tensor over the mapping (no copy)."""
        self._ranges.add((t.file, t.offset, t.length))
        return torch.frombuffer(self._map(t.file), dtype=torch.uint8, count=t.length, offset=t.offset)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it
                pass
        self._maps.clear()


def segment_size(manifest: Manifest) -> int:
    seg = (manifest.chunking.get("safetensors") or {}).get("segment", SEGMENT_SIZE)
    if not isinstance(seg, int) or seg <= 0:
        raise IntegrityError(f"manifest gives a bad safetensors segment size {seg!r}")
    return seg


def verify_tensors(files: VersionFiles, tensors: list[TensorEntry], segment: int) -> None:
    """Check each tensor's byte ranges against its chunk ids (the file sizes on opening)."""
    for t in tensors:
        want = math.ceil(t.length / segment)
        if len(t.chunks) != want:
            raise IntegrityError(f"tensor {t.name!r}: {len(t.chunks)} chunk ids for {t.length} bytes "
                                 f"(want {want} of {segment})")
        view = files.view(t)
        for i, cid in enumerate(t.chunks):
            try:
                digest.verify(cid, view[i * segment:(i + 1) * segment])
            except CorruptChunk:
                raise CorruptChunk(f"{files.folder / t.file}: bytes of tensor {t.name!r} "
                                   f"(segment {i}) do not match the manifest") from None


class OldFiles(VersionFiles):
    """The version a buffer holds, mapped before a load so a restore can read it back.

    Mapped before any weight changes: a file the agent prunes meanwhile stays readable.
    """

    def __init__(self, buf: Buffer, changed: list[TensorEntry]):
        super().__init__(buf.folder, buf.manifest)
        index = {t.name: t for t in buf.manifest.tensors}
        self.entries_by_name = {t.name: index[t.name] for t in changed}
        for rel in {t.file for t in self.entries_by_name.values()}:
            self._map(rel)  # size checked here

    def pairs(self, changed: list[TensorEntry], targets: dict[str, torch.Tensor]):
        olds = [self.entries_by_name[t.name] for t in changed if t.length]
        return lambda: ((self.tensor(o), targets[o.name]) for o in olds)


def old_files(buf: Buffer, changed: list[TensorEntry]) -> OldFiles | None:
    """The old files of the tensors a load changes, or None (restore from a memory copy)."""
    if buf.folder is None or buf.manifest is None or not changed:
        return None
    old = {t.name: t for t in buf.manifest.tensors}
    if any(t.name not in old or (old[t.name].dtype, old[t.name].shape) != (t.dtype, t.shape) for t in changed):
        return None
    try:
        return OldFiles(buf, changed)
    except IntegrityError as e:  # gone or changed: fall back to copying the weights aside
        log.warning("old version's files unusable; backing up in memory", folder=str(buf.folder), error=e.message)
        return None
