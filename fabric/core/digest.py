"""Content ids: `blake3:<64 hex>`.

A chunk is named by the BLAKE3 digest of its raw (decoded) bytes; a manifest by the
digest of its canonical JSON. Ids carry their algorithm so a reader can tell what
they are. Hashing large buffers releases the GIL and may use several threads, so
callers hash in worker threads, never on an event loop.
"""

from __future__ import annotations

import re

import blake3

from fabric.errors import CorruptChunk, InvalidChunkId

ALGORITHM = "blake3"
_ID_RE = re.compile(r"^blake3:[0-9a-f]{64}$")
_MULTITHREAD_MIN = 1 << 20  # below this, extra hashing threads cost more than they give


def digest(data: bytes | bytearray | memoryview) -> str:
    """Return the id of `data`."""
    threads = blake3.blake3.AUTO if len(data) >= _MULTITHREAD_MIN else 1
    return "blake3:" + blake3.blake3(data, max_threads=threads).hexdigest()


def hasher() -> blake3.blake3:
    """An incremental hash: `update` it with the bytes in order, then `id_of` it."""
    return blake3.blake3()


def id_of(h: blake3.blake3) -> str:
    """The id of what `h` (from `hasher`) was updated with."""
    return "blake3:" + h.hexdigest()


def is_valid(chunk_id: object) -> bool:
    return isinstance(chunk_id, str) and _ID_RE.fullmatch(chunk_id) is not None


def check_id(chunk_id: object) -> str:
    """Return `chunk_id` if it is a well-formed id, else raise InvalidChunkId."""
    if not is_valid(chunk_id):
        shown = repr(chunk_id)[:80]
        raise InvalidChunkId(f"not a valid chunk id (want blake3:<64 lowercase hex>): {shown}")
    return chunk_id  # type: ignore[return-value]


def hex_of(chunk_id: str) -> str:
    return check_id(chunk_id)[len("blake3:"):]


def verify(chunk_id: str, data: bytes | bytearray | memoryview) -> None:
    """Raise CorruptChunk unless `data` hashes to `chunk_id`."""
    actual = digest(data)
    if actual != chunk_id:
        raise CorruptChunk(f"chunk {chunk_id} does not match its bytes (they hash to {actual})")
