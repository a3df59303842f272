"""The store: chunks, manifests and refs on a backend.

Layout (specified in docs/formats.md, "Store layout"):

    fabric-store.json                    format marker
    chunks/<hex[:2]>/<hex>               one byte encoding tag, then the payload
    manifests/<hex[:2]>/<hex>.json       canonical manifest JSON
    refs/<artifact>/versions/<version>   the manifest id, as text
    refs/<artifact>/channels/<channel>   channel JSON (current version and history)
    packs/<hh>/<32 hex>                  files shared with a pulled or site version folder (`fabric.store.packs`)
    gc/sweep, gc/intents/<32 hex>        the commit fence between gc and commits (`fabric.store.fence`)

An S3 store (`s3://bucket/prefix`, `fabric.store.s3`) holds the same keys as objects.
What a backend can do beyond the five verbs is declared in its `capabilities`
(`fabric.store.backend.Capabilities`); the store uses only what is declared: parallel
existence checks (S3), writes without joining and deferred durability, sizes without
reads, files for sendfile and packs (local).
Chunks are verified against their id when written and again when read. A chunk may
be stored zstd-compressed when a sample shows it pays. Everything here is blocking
I/O: async callers run it in a thread.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

import zstandard

from fabric.core import digest
from fabric.core.codec import Encoding
from fabric.core.limits import MAX_CHUNK
from fabric.errors import Conflict, CorruptChunk, ChunkNotFound, InvalidInput, NotFound
from fabric.logs import get_logger
from fabric.store import packs
from fabric.store.backend import Backend, Capabilities, ObjectInfo
from fabric.store.local import LocalBackend

if TYPE_CHECKING:
    from fabric.store.s3 import S3Options

__all__ = ["Store", "StoredFile", "open_store", "chunk_key", "manifest_key", "Backend", "Capabilities",
           "ObjectInfo", "LocalBackend"]

STORE_FORMAT = "fabric.store/1"
TAG_RAW, TAG_ZSTD = int(Encoding.RAW), int(Encoding.ZSTD)  # stored forms share the stream's tags 0 and 1
_PACKED = bytes([packs.TAG_PACKED])  # 0xFF: the one stored form that is not a stream tag
_SAMPLE = 64 << 10
_PAYS = 0.9  # store compressed only when it saves at least 10%
_local = threading.local()
log = get_logger("store")


def _zstd_c() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=1)
        _local.d = zstandard.ZstdDecompressor()
    return _local.c


def _zstd_d() -> zstandard.ZstdDecompressor:
    _zstd_c()
    return _local.d


@dataclass
class StoredFile:
    """Where a chunk's stored payload lies in a local file (`Store.open_stored`)."""
    file: BinaryIO
    tag: int  # the payload's stored encoding: 0 raw, 1 zstd
    offset: int
    size: int


def chunk_key(chunk_id: str) -> str:
    h = digest.hex_of(chunk_id)
    return f"chunks/{h[:2]}/{h}"


def manifest_key(manifest_id: str) -> str:
    h = digest.hex_of(manifest_id)
    return f"manifests/{h[:2]}/{h}.json"


class Store:
    def __init__(self, backend: Backend, *, compress: bool = True):
        self.backend = backend
        self.compress = compress
        self.capabilities: Capabilities = backend.capabilities
        self.pack_guard = packs.Guard()  # packs being written here, and which changed ones still verify
        self._takers: dict[str, Callable[[str, bytes | memoryview], bool]] = {}  # chunk id -> an assembly's

    def __repr__(self) -> str:
        return f"Store({self.backend.describe()})"

    # --- chunks ------------------------------------------------------------

    def has_chunk(self, chunk_id: str) -> bool:
        return self.backend.has(chunk_key(chunk_id))

    def missing(self, chunk_ids: Iterable[str]) -> list[str]:
        """The ids among `chunk_ids` this store lacks, each once, in first-seen order."""
        unique = list(dict.fromkeys(chunk_ids))
        if self.capabilities.parallel_has:  # a remote backend asks in parallel
            held = self.backend.has_many([chunk_key(cid) for cid in unique])
            return [cid for cid, h in zip(unique, held) if not h]
        return [cid for cid in unique if not self.has_chunk(cid)]

    def put_chunk(self, chunk_id: str, data: bytes | memoryview, *, verified: bool = False,
                  defer: bool = False) -> int:
        """Store a chunk; return the bytes written. Verifies `data` unless the caller just did.

        With `defer`, a local store makes the chunk durable and visible only at `flush()`
        (a publish writes many chunks, then flushes once before it commits).
        """
        if not verified:
            digest.verify(chunk_id, data)
        taker = self._takers.get(chunk_id) if self._takers else None
        if taker is not None and taker(chunk_id, data):  # written into a version being assembled, referenced
            return len(data)
        payload, tag = self._maybe_compress(data)
        self._write(chunk_key(chunk_id), [bytes([tag]), payload], defer=defer)
        return len(payload) + 1

    def _write(self, key: str, parts: list[bytes | memoryview], *, defer: bool) -> None:
        """Write the concatenation of `parts`: without joining them where the backend can,
        and made durable only at `flush()` with `defer` where it can defer."""
        caps = self.capabilities
        if caps.deferred and defer:
            self.backend.put_parts(key, parts, durable=False)
        elif caps.parts:
            self.backend.put_parts(key, parts)
        else:
            self.backend.put(key, b"".join(parts))

    def flush(self) -> None:
        """Make chunks stored with `defer` durable and visible."""
        if self.capabilities.deferred:
            self.backend.flush()

    def get_chunk(self, chunk_id: str) -> bytes:
        """The chunk's raw bytes, checked against its id."""
        stored = self._get_chunk_object(chunk_id)
        if stored[:1] == _PACKED:
            data = self._read_packed(chunk_id, stored)
        else:
            data = self.decode_stored(chunk_id, stored)
        digest.verify(chunk_id, data)
        return data

    def get_chunk_stored(self, chunk_id: str) -> bytes:
        """The chunk in a stored form (tag byte + payload), unverified: for forwarding as is.

        A packed chunk comes back as tag 0 and its raw bytes: pack references stay home.
        """
        stored = self._get_chunk_object(chunk_id)
        if stored[:1] == _PACKED:
            ref = packs.parse(chunk_id, stored)
            if not self._pack_intact(chunk_id, ref):
                raise ChunkNotFound(f"chunk {chunk_id}: its pack {ref.pack} was changed in place")
            return bytes([TAG_RAW]) + self._read_packed(chunk_id, stored)
        return stored

    def _get_chunk_object(self, chunk_id: str) -> bytes:
        try:
            return self.backend.get(chunk_key(chunk_id))
        except NotFound:
            raise ChunkNotFound(f"chunk {chunk_id} is not in {self}") from None

    @property
    def local(self) -> bool:
        """Whether chunks are files on this machine (`open_stored` works)."""
        return self.capabilities.files

    def open_stored(self, chunk_id: str) -> StoredFile | None:
        """The open file and byte range holding a chunk's stored payload, or None if absent.

        For a local store only: a server sends the range with sendfile. The caller closes
        `file`. The bytes are not verified.
        """
        if not self.capabilities.files:
            raise InvalidInput(f"{self} holds no files: open_stored is for local stores (see `local`)")
        try:
            f = open(self.backend.path(chunk_key(chunk_id)), "rb")
        except FileNotFoundError:
            return None
        size = os.fstat(f.fileno()).st_size
        tag = os.pread(f.fileno(), 1, 0)
        if tag != _PACKED or size > packs.REF_MAX:
            return StoredFile(f, tag[0] if tag else -1, 1, max(0, size - 1))
        with f:
            ref = self._parse_ref(chunk_id, os.pread(f.fileno(), size, 0))
        if ref is None:
            return None
        try:
            pack = open(self.backend.path(ref.pack), "rb")
        except FileNotFoundError:
            return None
        if os.fstat(pack.fileno()).st_size < ref.offset + ref.size or not self._pack_intact(chunk_id, ref):
            pack.close()
            return None
        return StoredFile(pack, TAG_RAW, ref.offset, ref.size)

    def stored_sizes(self, chunk_ids: list[str]) -> list[int | None] | None:
        """Size of each chunk's stored form (tag byte + payload), None where absent;
        None if unknowable cheaply. A packed chunk counts as its tag-0 form."""
        if not self.capabilities.size:
            return None
        size = self.backend.size
        sizes = [size(chunk_key(cid)) for cid in chunk_ids]
        for i, (cid, n) in enumerate(zip(chunk_ids, sizes)):
            if n is not None and n <= packs.REF_MAX:
                try:
                    stored = self.backend.get(chunk_key(cid))
                except NotFound:
                    sizes[i] = None
                    continue
                if stored[:1] == _PACKED:  # as `open_stored` will find it: absent if damaged
                    ref = self._parse_ref(cid, stored)
                    held = size(ref.pack) if ref else None
                    intact = held is not None and held >= ref.offset + ref.size and self._pack_intact(cid, ref)
                    sizes[i] = 1 + ref.size if intact else None
        return sizes

    # --- packs (fabric.store.packs) ------------------------------------------

    def link_pack(self, path: str | os.PathLike) -> str | None:
        """Hard-link the file at `path` into the store as a new pack; its key, or None
        where this store cannot (not local, or another file system)."""
        if not self.capabilities.link:
            return None
        key = packs.new_pack_key()
        return key if self.backend.link_in(key, path) else None

    def take(self, chunk_ids: Iterable[str], taker: Callable[[str, bytes | memoryview], bool]) -> None:
        """Route `put_chunk` of these ids to `taker` (until `release_takes`): it writes the chunk
        into a version being assembled and references it there (True), or declines (False:
        stored as usual). A chunk another fetcher brings (a relay's pull-through) while this
        process assembles a version that needs it is then written once, into the version."""
        with self.pack_guard.lock:
            self._takers.update(dict.fromkeys(chunk_ids, taker))

    def release_takes(self, taker: Callable[[str, bytes | memoryview], bool]) -> None:
        """Stop routing any chunk to `taker` (`take`)."""
        with self.pack_guard.lock:
            self._takers = {cid: t for cid, t in self._takers.items() if t != taker}

    def writing_pack(self, key: str, writing: bool = True) -> None:
        """Say that this process is writing the pack `key` (an assembly in progress) or has
        finished (`writing=False`): a pack being written is not checked before it is served."""
        self.pack_guard.writing(key, writing)

    def _pack_intact(self, chunk_id: str, ref: packs.PackRef) -> bool:
        """Whether a packed chunk may be served unread (`packs.Guard.intact`); one whose pack
        was changed in place and no longer matches loses its reference, so the store lacks
        it and it is fetched again."""
        if not self.capabilities.files:
            return True
        if self.pack_guard.intact(chunk_id, ref, self.backend.path(ref.pack), self.backend.path(chunk_key(chunk_id))):
            return True
        log.warning("a pack was changed in place: dropping the chunk's reference", chunk=chunk_id, pack=ref.pack,
                    store=str(self))
        self.delete_chunk(chunk_id)
        return False

    def put_packed(self, chunk_id: str, ref: packs.PackRef, *, defer: bool = False) -> None:
        """Record that `chunk_id`'s raw bytes are at `ref` in a pack. The caller wrote them
        there and checked them against the id; with `defer`, as `put_chunk`."""
        self._write(chunk_key(chunk_id), [ref.encode()], defer=defer)

    def pack_refs(self) -> Iterator[tuple[str, packs.PackRef]]:
        """Every packed chunk and its reference."""
        for cid, info in self.iter_chunks():
            if info.size <= packs.REF_MAX:
                ref = self.pack_ref(cid)
                if ref is not None:
                    yield cid, ref

    def iter_packs(self) -> Iterator[ObjectInfo]:
        return (i for i in self.backend.list("packs/") if packs.is_pack_key(i.key))

    def delete_pack(self, key: str) -> None:
        if not packs.is_pack_key(key):
            raise InvalidInput(f"{key!r} is not a pack")
        self.backend.delete(key)

    def pack_ref(self, chunk_id: str) -> packs.PackRef | None:
        """The chunk's pack reference, or None if it is not a (well-formed) one."""
        try:
            stored = self.backend.get(chunk_key(chunk_id))
        except NotFound:
            return None
        return self._parse_ref(chunk_id, stored) if stored[:1] == _PACKED else None

    @staticmethod
    def _parse_ref(chunk_id: str, stored: bytes) -> packs.PackRef | None:
        try:
            return packs.parse(chunk_id, stored)
        except ChunkNotFound:
            return None

    def _read_packed(self, chunk_id: str, stored: bytes) -> bytes:
        ref = packs.parse(chunk_id, stored)
        if not self.capabilities.files:  # packs are files shared with a pulled folder: local only
            raise ChunkNotFound(f"chunk {chunk_id}: a pack reference in {self}, which holds no files")
        return packs.read(chunk_id, self.backend.path(ref.pack), ref)

    @staticmethod
    def decode_stored(chunk_id: str, stored: bytes) -> bytes:
        return Store.decode_payload(chunk_id, stored[0] if stored else -1, memoryview(stored)[1:])

    @staticmethod
    def decode_payload(chunk_id: str, tag: int, payload: bytes | memoryview) -> bytes:
        """Raw bytes from a payload in one of the stored encodings (0 raw, 1 zstd)."""
        if tag == TAG_RAW:
            return payload if isinstance(payload, bytes) else bytes(payload)
        if tag == TAG_ZSTD:
            try:
                return _zstd_d().decompress(payload, max_output_size=MAX_CHUNK)
            except zstandard.ZstdError as e:
                raise CorruptChunk(f"chunk {chunk_id}: bad zstd payload ({e})") from None
        raise CorruptChunk(f"chunk {chunk_id}: unknown stored encoding {tag!r}")

    def delete_chunk(self, chunk_id: str) -> None:
        self.backend.delete(chunk_key(chunk_id))

    def iter_chunks(self) -> Iterator[tuple[str, ObjectInfo]]:
        for info in self.backend.list("chunks/"):
            name = info.key.rsplit("/", 1)[-1]
            chunk_id = "blake3:" + name
            if digest.is_valid(chunk_id):
                yield chunk_id, info

    def _maybe_compress(self, data: bytes | memoryview) -> tuple[bytes | memoryview, int]:
        if self.compress and len(data) >= 256:
            sample = bytes(data[:_SAMPLE])
            if len(_zstd_c().compress(sample)) < _PAYS * len(sample):
                packed = _zstd_c().compress(data)
                if len(packed) < _PAYS * len(data):
                    return packed, TAG_ZSTD
        return data, TAG_RAW

    # --- manifests ----------------------------------------------------------

    def put_manifest(self, manifest_id: str, canonical: bytes) -> None:
        if digest.digest(canonical) != manifest_id:
            raise CorruptChunk(f"manifest bytes do not match id {manifest_id}")
        self.backend.put(manifest_key(manifest_id), canonical)

    def get_manifest_bytes(self, manifest_id: str) -> bytes:
        try:
            data = self.backend.get(manifest_key(manifest_id))
        except NotFound:
            raise NotFound(f"manifest {manifest_id} is not in {self}") from None
        digest.verify(manifest_id, data)
        return data

    def has_manifest(self, manifest_id: str) -> bool:
        return self.backend.has(manifest_key(manifest_id))

    def delete_manifest(self, manifest_id: str) -> None:
        self.backend.delete(manifest_key(manifest_id))

    # --- refs (small mutable objects) --------------------------------------

    def get_ref(self, key: str) -> bytes | None:
        try:
            return self.backend.get("refs/" + key)
        except NotFound:
            return None

    def cas_ref(self, key: str, new: bytes, expected: bytes | None) -> None:
        self.backend.put_if("refs/" + key, new, expected)

    def delete_ref(self, key: str) -> None:
        self.backend.delete("refs/" + key)

    def list_refs(self, prefix: str) -> list[str]:
        return sorted(i.key[len("refs/"):] for i in self.backend.list("refs/" + prefix))


def open_store(spec: str | os.PathLike, *, compress: bool = True, create: bool = True,
               s3: S3Options | None = None) -> Store:
    """Open a store from a path (`/var/lib/fabric/store`) or a bucket (`s3://bucket/prefix`).

    `s3` says how to reach the endpoint of an `s3://` store (default: boto3's own
    configuration chain: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …).
    """
    spec = os.fspath(spec)
    if not spec:
        raise InvalidInput("no store given (use --store DIR or FABRIC_STORE)")
    if spec.startswith("s3://"):
        return _open_s3_store(spec, compress=compress, create=create, options=s3)
    root = os.path.abspath(spec)
    marker = os.path.join(root, "fabric-store.json")
    if os.path.exists(root) and not os.path.isdir(root):
        raise InvalidInput(f"store {root} is not a folder")
    if not os.path.exists(marker):
        if not create:
            raise NotFound(f"no Fabric store at {root}")
        if os.path.isdir(root) and os.listdir(root):
            raise InvalidInput(f"{root} is a non-empty folder that is not a Fabric store")
        os.makedirs(root, exist_ok=True)
        LocalBackend(root).put("fabric-store.json", json.dumps({"format": STORE_FORMAT}).encode())
    else:
        _check_marker(marker)
    return Store(LocalBackend(root), compress=compress)


def _open_s3_store(url: str, *, compress: bool, create: bool, options) -> Store:
    from fabric.store.s3 import S3Backend, parse_url  # boto3 is needed only for S3 stores

    bucket, prefix = parse_url(url)
    backend = S3Backend(bucket, prefix, options=options)
    marker = json.dumps({"format": STORE_FORMAT}).encode()
    try:
        _check_format(url, backend.get("fabric-store.json"))
    except NotFound:
        if not create:
            raise NotFound(f"no Fabric store at {url}") from None
        backend.ensure_bucket()
        if not backend.is_empty():
            raise InvalidInput(f"{url} holds objects but is not a Fabric store") from None
        try:
            backend.put_if("fabric-store.json", marker, None)
        except Conflict:
            _check_format(url, backend.get("fabric-store.json"))  # another origin created it first
    backend.check_conditional_writes("fabric-store.json")
    return Store(backend, compress=compress)


def _check_format(where: str, raw: bytes) -> None:
    try:
        fmt = json.loads(raw).get("format")
    except (ValueError, AttributeError):
        fmt = None
    if fmt != STORE_FORMAT:
        raise InvalidInput(f"{where}: not a {STORE_FORMAT} store (format {fmt!r})")


def _check_marker(path: str) -> None:
    try:
        fmt = json.load(open(path)).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != STORE_FORMAT:
        raise InvalidInput(f"{path}: not a {STORE_FORMAT} store (format {fmt!r})")
