"""Packs: chunks whose bytes live inside whole files the store shares with a folder.

A pull, or a site agent's deploy, writes each fetched chunk once, straight into the
file being assembled in DEST (a site's `versions/<artifact>/<version>/`). For the store to hold that chunk too without a second copy, the file is
hard-linked into the store as a *pack* (`packs/<hh>/<32 hex>`), and the chunk's
object under `chunks/` is a small *pack reference* (tag 0xFF) naming the pack, the
offset and the length of the chunk's raw bytes in it (docs/formats.md, `packs/`).

A pack is the same inode as the DEST file: a program that rewrites that file in place
spoils the store's copy too. Every read of a packed chunk is checked against its id
like any other read, so the damage is found, never served as good: `fabric pull`
fetches such chunks again, `fsck --repair` drops their references, and `gc` deletes
a pack once no reference points into it. What a server sends unread (sendfile, a
relay's pieces) is checked first when the pack changed after the chunk's reference
(`Guard`): a site whose worker wrote into a version file drops those references and
fetches the chunks again, and never serves the bytes. `adopt` gives a store the chunks
of a verified folder as references into its files. Only local stores on the same file system
as DEST have packs; elsewhere the store keeps its own copy.

A publish into a local store packs too (`PackWriter`), but its packs are the store's
alone: each new chunk of at least 1 MiB that is not worth compressing gets a pack of
its own, written with direct I/O straight from the buffer the publisher read it into,
and a reference. The references are deferred like any publish's chunk objects: they
appear only after the store's `flush`, whose `syncfs` has made the packs durable too.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard

from fabric.core import digest
from fabric.core.codec import TAG_PACKED
from fabric.core.limits import MAX_CHUNK
from fabric.errors import ChunkNotFound, CorruptChunk, StoreFull
from fabric.fileio import pwrite_all

if TYPE_CHECKING:
    from pathlib import Path

    from fabric.core.manifest import Manifest
    from fabric.store.store import Store

REF_MAX = 128  # a pack reference is never longer: stored objects this small may be one
PACK_MIN = 1 << 20  # a publish packs chunks this big; smaller ones stay objects of their own
_ALIGN = 4096  # direct I/O: offsets, lengths and buffers on this boundary
_STAGE = 1 << 20  # the staging buffer for unaligned bytes written with direct I/O
_SAMPLE, _PAYS = 64 << 10, 0.9  # the store's compression rule (docs/formats.md `chunks/`): its sample
_KEY = re.compile(r"packs/([0-9a-f]{2})/\1[0-9a-f]{30}")
_REF = re.compile(re.escape(bytes([TAG_PACKED]))
                  + rb"(packs/[0-9a-f]{2}/[0-9a-f]{32}) (0|[1-9][0-9]{0,15}) ([1-9][0-9]{0,9})")
# A hard link cannot be made here (other file system, no link support, too many links).
_CANNOT_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


@dataclass(frozen=True)
class PackRef:
    pack: str  # the pack's key, `packs/<hh>/<32 hex>`
    offset: int
    size: int

    def encode(self) -> bytes:
        return bytes([TAG_PACKED]) + f"{self.pack} {self.offset} {self.size}".encode()


def new_pack_key() -> str:
    name = uuid.uuid4().hex
    return f"packs/{name[:2]}/{name}"


def is_pack_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def parse(chunk_id: str, stored: bytes) -> PackRef:
    """The pack reference in a stored object that starts with `TAG_PACKED`."""
    m = _REF.fullmatch(stored)
    if m is None or not is_pack_key(m.group(1).decode()) or int(m.group(3)) > MAX_CHUNK:
        raise ChunkNotFound(f"chunk {chunk_id}: malformed pack reference in the store")
    return PackRef(m.group(1).decode(), int(m.group(2)), int(m.group(3)))


def link(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Hard-link `src` as `dst`; False where this file system cannot, instead of raising."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno in _CANNOT_LINK:
            return False
        raise


def read(chunk_id: str, path: str | os.PathLike, ref: PackRef) -> bytes:
    """The bytes `ref` names in the pack file at `path` (unverified: callers check the id)."""
    try:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), ref.size, ref.offset)
    except FileNotFoundError:
        raise ChunkNotFound(f"chunk {chunk_id}: its pack {ref.pack} is gone") from None
    if len(data) != ref.size:
        raise ChunkNotFound(f"chunk {chunk_id}: its pack {ref.pack} is shorter than the reference says")
    return data


class Guard:
    """Which packs may be served without reading them: every pack whose file has not
    changed since its chunks' references were written. A writer that is done with a pack
    sets its mtime back to before its first reference (`fabric.pull.Assembly`); a publish
    writes its packs before their references. So a pack newer than a reference into it
    was written by someone else (a program editing DEST, a worker writing into a site's
    version file), and its chunk is checked against its id before it is served. Packs
    this process is still writing (`writing`) are trusted. Thread-safe."""

    def __init__(self):
        self._writing: set[str] = set()
        self._checked: dict[tuple[str, int, int], int] = {}  # (pack, offset, size) -> pack mtime it verified at
        self.lock = self._lock = threading.Lock()

    def writing(self, key: str, writing: bool = True) -> None:
        with self._lock:
            (self._writing.add if writing else self._writing.discard)(key)

    def intact(self, chunk_id: str, ref: PackRef, pack_path: os.PathLike, ref_path: os.PathLike) -> bool:
        """False if the pack is gone, or changed after the reference and no longer holds the chunk."""
        with self._lock:
            if ref.pack in self._writing:
                return True
        try:
            pack_mtime = os.stat(pack_path).st_mtime_ns
            ref_mtime = os.stat(ref_path).st_mtime_ns
        except FileNotFoundError:
            return False
        key = (ref.pack, ref.offset, ref.size)
        if pack_mtime <= ref_mtime or self._checked.get(key) == pack_mtime:
            return True
        try:
            digest.verify(chunk_id, read(chunk_id, pack_path, ref))
        except (CorruptChunk, ChunkNotFound):
            return False
        with self._lock:
            if len(self._checked) > 100_000:
                self._checked.clear()
            self._checked[key] = pack_mtime
        return True


def adopt(store: Store, manifest: Manifest, folder: Path) -> bool:
    """Give `store` the chunks of a verified, durable version folder that it lacks, as
    references into the folder's files linked as packs (a pack per file that has such a
    chunk); False where the store cannot link them (it then needs copies). Blocking."""
    missing = set(store.missing(manifest.chunk_ids()))
    for entry in manifest.files:
        offset, key = 0, None
        for cid, size in entry.chunks:
            if cid in missing:
                key = key or store.link_pack(folder / entry.path)
                if key is None:
                    return False
                store.put_packed(cid, PackRef(key, offset, size))
                missing.discard(cid)
            offset += size
    return True


class PackWriter:
    """Where a publish into `store` puts each new chunk: a pack of its own, or an object.

    `put` gives a chunk of at least `PACK_MIN` bytes a new pack of its own, written with
    direct I/O (`O_DIRECT`, where the file system allows it: no copy into the page cache,
    no dirty pages left for the final sync), and records a reference to it; one chunk
    per pack, so garbage collection frees each chunk's bytes with its reference. A
    smaller chunk, one the store compresses (its first 64 KiB shrink by the store's
    rule), or any chunk of a store that cannot hold packs (not on this machine, or no
    deferred writes) is stored by the store as an object. Everything is durable and
    visible after `flush`. Thread-safe.
    """

    def __init__(self, store: Store):
        caps = store.capabilities
        self.store = store
        self.enabled = caps.files and caps.deferred
        self._deferred = getattr(store.backend, "defer_bytes", None)  # counts towards the store's next flush

    def put(self, chunk_id: str, data: bytes | memoryview) -> int:
        """Store a chunk the caller checked against its id, durable at `flush`; the bytes written."""
        if not self.enabled or len(data) < PACK_MIN or (self.store.compress and _sample_pays(data)):
            return self.store.put_chunk(chunk_id, data, verified=True, defer=True)
        pack = _Pack(self.store)
        try:
            pack.write(data)
        finally:
            pack.close()
        if self._deferred is not None:
            self._deferred(len(data))
        self.store.put_packed(chunk_id, PackRef(pack.key, 0, len(data)), defer=True)
        return len(data)

    def flush(self) -> None:
        """Make every chunk put so far durable, then visible."""
        self.store.flush()


class _Pack:
    """A new pack holding one chunk, written with direct I/O where the file system allows it."""

    def __init__(self, store: Store):
        self.key = new_pack_key()
        path = store.backend.path(self.key)
        self.where = str(store)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise _full(e, self.where) from None
        self.direct = _set_direct(self.fd)

    def write(self, data: bytes | memoryview) -> None:
        try:
            if self.direct:
                try:
                    self._write_direct(memoryview(data).cast("B"))
                    return
                except OSError as e:  # a file system that took the flag but not the writes
                    if e.errno != errno.EINVAL:
                        raise
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            pwrite_all(self.fd, data, 0)
        except OSError as e:
            raise _full(e, self.where) from None

    def _write_direct(self, view: memoryview) -> None:
        """Whole 4096-byte blocks straight from the caller's buffer where it is aligned, the rest
        (or all of it, where not) through this thread's aligned staging buffer, zero-padded to a
        block; then the file is cut back to the chunk's length."""
        n = len(view)
        head = n - n % _ALIGN if _aligned(view) else 0
        done = 0
        while done < head:
            done += os.pwrite(self.fd, view[done:head], done)
        stage = _staging()
        while done < n:
            k = min(n - done, len(stage))
            stage[:k] = view[done:done + k]
            size = -(-k // _ALIGN) * _ALIGN
            stage[k:size] = bytes(size - k)
            written = 0
            while written < size:
                written += os.pwrite(self.fd, stage[written:size], done + written)
            done += k
        if n % _ALIGN:
            os.ftruncate(self.fd, n)

    def close(self) -> None:
        os.close(self.fd)


def _set_direct(fd: int) -> bool:
    """Turn on direct I/O for `fd`; False where the file system refuses it (tmpfs, some FUSE)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except (OSError, AttributeError):
        return False


def _aligned(view: memoryview) -> bool:
    """Whether `view` starts at a 4096-byte boundary (only a writable buffer can tell)."""
    if view.readonly:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % _ALIGN == 0


_local = threading.local()


def _staging() -> memoryview:
    """This thread's page-aligned buffer for direct writes of unaligned bytes."""
    if not hasattr(_local, "stage"):
        _local.stage = aligned_buffer(_STAGE)
    return _local.stage


def aligned_buffer(size: int) -> memoryview:
    """A page-aligned buffer of `size` bytes (anonymous memory): what a reader fills
    so `PackWriter` can write its blocks with direct I/O without copying them."""
    return memoryview(mmap.mmap(-1, max(size, 1)))


def _full(e: OSError, where: str) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"store {where} is full while writing a pack")
    return e


def _sample_pays(data: bytes | memoryview) -> bool:
    """Whether the first 64 KiB shrink below 90 % with zstd level 1 (the store's first test)."""
    if not hasattr(_local, "zstd"):
        _local.zstd = zstandard.ZstdCompressor(level=1)
    sample = data[:_SAMPLE]
    return len(_local.zstd.compress(sample)) < _PAYS * len(sample)
