"""Publishing: read a folder once, cut it into chunks, hash them, keep the new ones.

Each file is read exactly once. A safetensors file on this machine is cut by its header
(`fabric.core.chunking`), and `_WORKERS` threads each read a segment into a buffer of
their own, hash it and offer it to a `Target`, which stores the ones it lacks; other
files are read sequentially and cut by content by the calling thread, which hands
batches of chunks to the workers. At most a few batches are in flight, so memory stays
bounded whatever the model's size. When every file is done, the manifest is committed:
chunks first, then the manifest, then the version ref, so a publish killed at any point
leaves no half version. A local store keeps each new big chunk in a pack of its own,
written with direct I/O from the buffer it was read into (`PackWriter`).

Length: over the ~450-line guide. The one publish path (the target protocol, the
source walk, the readers for files and bucket objects, the hashing pipeline) stays in
one module, so what is read, hashed and offered is read in one place.

A `Target` is where a version goes: a local store (`LocalTarget`) or an origin over
HTTP (`fabric.wire.client.RemoteTarget`). Both answer the same few calls and carry a
`registry` that reads what they hold; `parent_version` picks the new version's parent
through it, the same way for both.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from fabric.core import chunking, digest
from fabric.errors import ArtifactNotFound, ChannelNotFound, InvalidInput, InvalidManifest, SourceChanged, SourceError
from fabric.core.manifest import FileEntry, Manifest, TensorEntry, check_name, check_path
from fabric.store.packs import PackWriter, aligned_buffer
from fabric.store.registry import Channel, Registry, now_rfc3339
from fabric.store.store import Store

_WINDOW = 8 << 20  # bytes read per CDC window
# Threads reading, hashing and writing chunks: more than this machine's 2 CPUs, since a
# thread spends much of a chunk waiting on its direct write (2 threads left the CPUs idle:
# 1.80-2.33 s for 2 GB, 4 threads 1.31-1.57 s, in alternating runs on a quiet 2-CPU machine).
_WORKERS = 4
_IN_FLIGHT = 4  # batches holding their bytes (read by the calling thread) at once: bounds memory
_IN_FLIGHT_READ = 2 * _WORKERS  # batches the workers read themselves, which hold no bytes until then

Progress = Callable[[int], None]


class VersionReads(Protocol):
    """A target's versions as publish reads them: a `Registry`, or an origin's `RemoteRegistry`."""

    def channel(self, artifact: str, name: str) -> Channel: ...  # ChannelNotFound if none

    def latest(self, artifact: str) -> str | None: ...  # an origin may raise ArtifactNotFound


class Target(Protocol):
    """Where a version goes: chunks first (`offer`, then `flush`), then the manifest
    (`commit`), then the channel (`promote`)."""

    registry: VersionReads | None  # what the target holds; None: it keeps no versions (a dry run)

    def offer(self, chunks: list[tuple[str, bytes]], dtypes: list[str | None]) -> list[int]:
        """Store each chunk unless already held; per chunk, the bytes written or sent (0 if held).

        Called from worker threads with the new chunks of one batch (one tensor
        segment, or one window of CDC chunks), so a remote target can ask "which do
        you lack" and upload once per batch. `dtypes` gives each chunk's tensor dtype
        (None outside tensors), for a target that encodes by it. The bytes are valid
        only during the call (their buffer is read into again): a target copies what it keeps.
        """

    def flush(self) -> None:
        """Make every offered chunk durable (before the manifest that names them)."""

    def commit(self, manifest: Manifest) -> str: ...  # the manifest's id

    def promote(self, artifact: str, version: str, channel: str) -> None: ...


def parent_version(registry: VersionReads | None, artifact: str, channel: str | None) -> str | None:
    """The version a new one descends from: the channel's current version if it has
    one, else the artifact's latest, else None (the first version, or no registry)."""
    if registry is None:
        return None
    if channel:
        with contextlib.suppress(ChannelNotFound):
            if version := registry.channel(artifact, channel).version:
                return version
    with contextlib.suppress(ArtifactNotFound):
        return registry.latest(artifact)
    return None


class LocalTarget:
    """Publish into a store on this machine. It keeps chunks as they are, so `offer` ignores dtypes;
    a local store holds them in packs (`fabric.store.packs.PackWriter`)."""

    def __init__(self, store: Store):
        self.store = store
        self.registry = Registry(store)
        self.packs = PackWriter(store)

    def offer(self, chunks: list[tuple[str, bytes]], dtypes: list[str | None] | None = None) -> list[int]:
        return [0 if self.store.has_chunk(cid) else self.packs.put(cid, data) for cid, data in chunks]

    def flush(self) -> None:
        self.packs.flush()  # the chunks are durable before the manifest that names them

    def commit(self, manifest: Manifest) -> str:
        return self.registry.commit(manifest)

    def promote(self, artifact: str, version: str, channel: str) -> None:
        self.registry.promote(artifact, version, channel)


@dataclass
class PublishResult:
    artifact: str
    version: str
    manifest_id: str
    parent: str | None
    files: int
    bytes: int  # source bytes read
    chunks: int  # unique chunks in the version
    new_chunks: int = 0  # chunks the target did not hold
    new_bytes: int = 0  # raw bytes of those chunks
    written_bytes: int = 0  # bytes stored or sent for them (after compression)
    seconds: float = 0.0
    channel: str | None = None

    @property
    def dedup_ratio(self) -> float:
        """Fraction of the version's bytes that were already held."""
        return 1.0 - self.new_bytes / self.bytes if self.bytes else 1.0

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["dedup_ratio"] = round(self.dedup_ratio, 6)
        return d


@dataclass
class _Scan:
    """Chunks of the version so far, and what the target said of them."""

    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    new_chunks: int = 0
    new_bytes: int = 0
    written: int = 0


def publish(src: str | os.PathLike | Sequence[Source], *, artifact: str, target: Target, version: str | None = None,
            channel: str | None = None, metadata: dict | None = None,
            progress: Progress | None = None) -> PublishResult:
    """Publish the file or folder `src` as a new version of `artifact`.

    Args:
        src: a file or a folder (symlinks are followed only inside it), or `Source`s
            that open themselves (objects in a bucket: `fabric.s3source.list_sources`).
        artifact: the artifact's name.
        target: where to publish (`LocalTarget(store)` or an origin client).
        version: the version's name; default: a sortable UTC timestamp.
        channel: move this channel to the new version once committed.
        metadata: free-form string metadata (training step, metrics, …).
        progress: called with the number of source bytes read, as they are read.

    Returns:
        A `PublishResult` with sizes, dedup figures and timing.

    Raises:
        SourceError, SourceChanged, InvalidSafetensors, InvalidName, VersionExists.
    """
    t0 = time.monotonic()
    check_name("artifact", artifact)
    version = check_name("version", version or default_version())
    if channel:
        check_name("channel", channel)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (metadata or {}).items()):
        raise InvalidInput("metadata must map strings to strings")
    if isinstance(src, (str, os.PathLike)):
        files: list = collect_files(Path(src))
    else:
        files = sorted(((_check_rel(s.rel), s) for s in src), key=lambda f: f[0])
    scan = _Scan()
    entries, tensors = [], []
    try:
        with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="fabric-hash") as pool:
            for rel, path in files:
                entry, file_tensors = _publish_file(rel, path, target, pool, scan, progress)
                entries.append(entry)
                tensors += file_tensors
    finally:
        target.flush()  # stored chunks are kept even if this publish fails: a retry reuses them
    parent = parent_version(target.registry, artifact, channel)
    manifest = Manifest(
        artifact=artifact, version=version, parent=parent if parent != version else None,
        created=now_rfc3339(), files=tuple(entries), tensors=tuple(tensors),
        metadata=dict(metadata or {}), chunking=chunking_params(),
    )
    mid = target.commit(manifest)
    if channel:
        target.promote(artifact, version, channel)
    return PublishResult(
        artifact=artifact, version=version, manifest_id=mid, parent=manifest.parent,
        files=len(entries), bytes=manifest.size, chunks=len(scan.seen),
        new_chunks=scan.new_chunks, new_bytes=scan.new_bytes, written_bytes=scan.written,
        seconds=time.monotonic() - t0, channel=channel,
    )


def default_version() -> str:
    """A version name that sorts by time: 20261127.153012.123"""
    return datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S.%f")[:-3]


def chunking_params() -> dict:
    return {
        "hash": digest.ALGORITHM,
        "safetensors": {"segment": chunking.SEGMENT_SIZE},
        "cdc": {"algorithm": "fastcdc2020", "min": chunking.CDC_MIN, "avg": chunking.CDC_AVG,
                "max": chunking.CDC_MAX, "normalization": 1, "seed": 0},
    }


# --- the source ---------------------------------------------------------------------

def collect_files(src: Path) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of every regular file to publish, sorted."""
    try:
        st = src.stat()
    except FileNotFoundError:
        raise SourceError(f"source {src} does not exist") from None
    except OSError as e:
        raise SourceError(f"cannot read source {src}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return [(_check_rel(src.name), src)]
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"source {src} is neither a file nor a folder")
    root = src.resolve()
    out: list[tuple[str, Path]] = []
    _walk(root, root, "", out, {root})
    return sorted(out)


def _check_rel(rel: str) -> str:
    """A name the manifest can hold (UTF-8, no backslash), else SourceError before any work."""
    try:
        rel.encode("utf-8")
        check_path(rel)
    except (UnicodeEncodeError, InvalidManifest):
        raise SourceError(f"{rel!r}: file name cannot be published (not UTF-8, or contains '\\')") from None
    return rel


def _walk(root: Path, folder: Path, rel: str, out: list, visited: set[Path]) -> None:
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise SourceError(f"cannot list {folder}: {e.strerror}") from None
    for name in names:
        path = folder / name
        rel_path = _check_rel(f"{rel}{name}")
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            raise SourceError(f"{rel_path} cannot be resolved (a symlink loop?): {e}") from None
        if not real.is_relative_to(root):
            raise SourceError(f"{rel_path} is a symlink pointing outside the source ({real})")
        if real.is_dir():
            if real in visited:
                raise SourceError(f"{rel_path} is a symlink loop")
            _walk(root, real, rel_path + "/", out, visited | {real})
        elif real.is_file():
            out.append((rel_path, path))
        elif not real.exists():
            raise SourceError(f"{rel_path} is a broken symlink")
        else:
            raise SourceError(f"{rel_path} is not a regular file")


# --- one file ------------------------------------------------------------------------

def _publish_file(rel: str, path: Path, target: Target, pool: ThreadPoolExecutor,
                  scan: _Scan, progress: Progress | None) -> tuple[FileEntry, list[TensorEntry]]:
    if not isinstance(path, Path):
        return _publish_source(rel, path, target, pool, scan, progress)
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise SourceError(f"cannot read {rel}: {e.strerror}") from None
    with f:
        before = os.fstat(f.fileno())
        size = before.st_size
        if rel.endswith(".safetensors"):  # the workers read the segments (`_PieceReader`)
            header, batches = _safetensors_batches(f, size, rel, _PieceReader(f.fileno(), rel))
            in_flight = _IN_FLIGHT_READ
        else:
            header, batches = None, _cdc_batches(f, size, rel)
            in_flight = _IN_FLIGHT
        chunks, segments = _hash_and_offer(batches, target, pool, scan, progress, _dtypes(header), in_flight)
        if os.pread(f.fileno(), 1, size) or _changed(before, os.fstat(f.fileno())):
            raise SourceChanged(f"{rel} changed while it was being published; publish again")
    mode = stat.S_IMODE(before.st_mode) & 0o777
    entry = FileEntry(rel, size, mode, tuple(chunks))
    tensors = _tensor_entries(rel, header, segments) if header else []
    return entry, tensors


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ino) != (b.st_size, b.st_mtime_ns, b.st_ino)


class Source(Protocol):
    """A file to publish that is not a local path, e.g. an object in a bucket."""

    rel: str  # its path in the version
    size: int
    mode: int

    def open(self):
        """A sequential reader with read(n), readinto(buf) and close()."""

    def check_unchanged(self) -> None:
        """Raise SourceChanged if the file changed since it was listed (after reading it)."""


def _publish_source(rel: str, src: Source, target: Target, pool: ThreadPoolExecutor,
                    scan: _Scan, progress: Progress | None) -> tuple[FileEntry, list[TensorEntry]]:
    with contextlib.closing(src.open()) as f:
        if rel.endswith(".safetensors"):
            header, batches = _safetensors_batches(f, src.size, rel)
        else:
            header, batches = None, _cdc_batches(f, src.size, rel)
        chunks, segments = _hash_and_offer(batches, target, pool, scan, progress, _dtypes(header))
        if f.read(1):
            raise SourceChanged(f"{rel} grew while it was being published; publish again")
    src.check_unchanged()
    entry = FileEntry(rel, src.size, src.mode & 0o777, tuple(chunks))
    return entry, _tensor_entries(rel, header, segments) if header else []


def _read_exact(f, n: int, rel: str) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise SourceChanged(f"{rel} is shorter than when publishing began")
        got += k
    return buf


Batch = list[tuple[chunking.Piece | None, "memoryview | _PieceReader"]]  # a reader: the worker reads the piece


class _PieceReader:
    """Reads a piece of an open file into the calling thread's own buffer, reused for its next
    piece; page-aligned, so a local store writes it with direct I/O as it is (`PackWriter`)."""

    _buffers = threading.local()

    def __init__(self, fd: int, rel: str):
        self.fd, self.rel = fd, rel

    def read(self, piece: chunking.Piece) -> memoryview:
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < piece.length:
            buf = self._buffers.buf = aligned_buffer(max(piece.length, chunking.SEGMENT_SIZE))
        view, got = buf[:piece.length], 0
        while got < piece.length:
            n = os.preadv(self.fd, [view[got:]], piece.offset + got)
            if not n:
                raise SourceChanged(f"{self.rel} is shorter than when publishing began")
            got += n
        return view


def _safetensors_batches(f, size: int, rel: str,
                         reader: _PieceReader | None = None) -> tuple[chunking.SafetensorsHeader, Iterator[Batch]]:
    prefix = _read_exact(f, 8, rel) if size >= 8 else b""
    try:
        n = chunking.header_length(prefix, size)
        header_json = _read_exact(f, n, rel)
        header = chunking.parse_safetensors_header(header_json, size)
    except chunking.InvalidSafetensors as e:  # name the file: a sharded model has many
        raise type(e)(f"{rel}: {e.message}") from None
    pieces = chunking.plan_safetensors(header, size)

    def batches() -> Iterator[Batch]:
        first = pieces[0]
        yield [(first, memoryview(prefix + header_json))]
        for p in pieces[1:]:
            yield [(p, reader if reader else memoryview(_read_exact(f, p.length, rel)))]

    return header, batches()


def _cdc_batches(f, size: int, rel: str) -> Iterator[Batch]:
    chunker = chunking.CdcChunker()
    carry = b""
    remaining = size
    while remaining > 0 or carry:
        want = min(_WINDOW, remaining)
        block = f.read(want) if want else b""
        remaining -= len(block)
        if want and not block:
            raise SourceChanged(f"{rel} is shorter than when publishing began")
        buf = memoryview(carry + block if carry else block)
        final = remaining == 0
        cuts = chunker.cuts(buf, final)
        batch, pos = [], 0
        for n in cuts:
            batch.append((None, buf[pos:pos + n]))
            pos += n
        carry = bytes(buf[pos:])
        if batch:
            yield batch
        if final and carry:  # cannot happen with a final cut, but never loop forever
            yield [(None, memoryview(carry))]
            carry = b""


def _hash_and_offer(batches: Iterator[Batch], target: Target, pool: ThreadPoolExecutor,
                    scan: _Scan, progress: Progress | None, dtypes: dict[str, str], in_flight: int = _IN_FLIGHT):
    chunks: list[tuple[str, int]] = []
    segments: list[tuple[chunking.Piece | None, str]] = []
    pending: deque[tuple[Batch, Future]] = deque()

    def drain_one() -> None:
        batch, fut = pending.popleft()
        for (piece, view), (cid, n, written, new) in zip(batch, fut.result()):
            chunks.append((cid, n))
            segments.append((piece, cid))
            if new:
                scan.new_chunks += 1
                scan.new_bytes += n
                scan.written += written
        if progress:
            progress(sum(n for _, n, _, _ in fut.result()))

    for batch in batches:
        pending.append((batch, pool.submit(_work, batch, target, scan, dtypes)))
        if len(pending) >= in_flight:
            drain_one()
    while pending:
        drain_one()
    return chunks, segments


def _dtypes(header: chunking.SafetensorsHeader | None) -> dict[str, str]:
    return {t.name: t.dtype for t in header.tensors} if header else {}


def _work(batch: Batch, target: Target, scan: _Scan, dtypes: dict[str, str]) -> list[tuple[str, int, int, bool]]:
    """Read (where the batch holds a reader) and hash each chunk of a batch, and offer the ones
    new to this publish; per chunk its id, size, bytes written and whether it was new. Runs in a thread."""
    batch = [(piece, v if isinstance(v, memoryview) else v.read(piece)) for piece, v in batch]
    ids = [digest.digest(view) for _, view in batch]
    fresh: dict[str, bytes] = {}
    kinds: list[str | None] = []  # each fresh chunk's tensor dtype, for targets that encode by it
    with scan.lock:
        for cid, (piece, view) in zip(ids, batch):
            if cid not in scan.seen:
                scan.seen.add(cid)
                fresh[cid] = view
                kinds.append(dtypes.get(piece.tensor) if piece is not None and piece.tensor else None)
    written = dict(zip(fresh, target.offer(list(fresh.items()), kinds))) if fresh else {}
    out = []
    for cid, (_, view) in zip(ids, batch):  # a chunk repeated within the batch counts once
        w = written.pop(cid, 0)
        out.append((cid, len(view), w, w > 0))
    return out


def _tensor_entries(rel: str, header: chunking.SafetensorsHeader,
                    segments: list[tuple[chunking.Piece | None, str]]) -> list[TensorEntry]:
    by_tensor: dict[str, list[str]] = {}
    for piece, cid in segments:
        if piece is not None and piece.tensor is not None:
            by_tensor.setdefault(piece.tensor, []).append(cid)
    return [
        TensorEntry(rel, t.name, t.dtype, t.shape, t.offset, t.length, tuple(by_tensor.get(t.name, ())))
        for t in header.tensors
    ]
