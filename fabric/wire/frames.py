"""The chunk stream's one codec: frame layout, parsing, writing, and decoding a chunk.

Control messages are JSON; chunks travel in a binary *chunk stream* (specified in
docs/protocol.md; the constants are `fabric.wire.protocol`'s). A stream is the 4-byte
magic `FBC1`, then frames, then an end frame:

    chunk frame    0x01 | id (32 bytes) | encoding (u8) | raw size (u32 BE) | payload length (u32 BE) | payload
    missing frame  0x02 | id (32 bytes)                      the source does not hold this chunk
    wait frame     0x03 | id (32 bytes)                      a relay is still fetching this chunk
    end frame      0x00 | frame count (u32 BE)               number of chunk and missing frames before it

Wait frames are read only by a `FrameReader(..., waits=True)` (a fetch that sent
`WAIT_HEADER`); anywhere else they are an unknown frame type.

`FrameReader` parses a stream from any async byte source and treats it as hostile:
every length is bounded before anything is allocated, and a short read is a
`BadFrame`. `decode` is the one function every receiver (client fetch, transfer,
origin upload, relay) turns a chunk frame into verified bytes with: tags 0 and 1 are
the store's raw and zstd forms, tags 2 and up (`CODEC_TAGS`) the codec's byte planes and
references (docs/encodings.md), a reference read through the caller's lookup. It is
blocking, CPU-bound work that receivers run in threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

import zstandard

from fabric.core import codec, digest
from fabric.core.codec import Encoding
from fabric.errors import BadFrame, CorruptChunk, FabricError, NotFound, ReferenceMismatch
from fabric.store.store import Store
from fabric.wire.protocol import (CHUNK_HEAD, END, FRAME_CHUNK, FRAME_END, FRAME_MISSING, FRAME_WAIT, MAGIC,
                                  MAX_CHUNK, MAX_PAYLOAD)

CODEC_TAGS = frozenset(Encoding) - {Encoding.RAW, Encoding.ZSTD}  # stream tags only the codec decodes
References = Callable[[str], bytes | codec.FileReference]  # a reference chunk; ReferenceMismatch if unusable


@dataclass(frozen=True)
class Frame:
    kind: int  # FRAME_CHUNK, FRAME_MISSING or FRAME_WAIT
    chunk_id: str
    encoding: int = 0
    raw_size: int = 0
    payload: bytes | bytearray = b""  # a bytearray from a reader with `reserve`
    held: int = 0  # what a reader with `reserve` reserved for it (`memory`)


def memory(encoding: int, raw_size: int, length: int) -> int:
    """The bytes a received chunk frame holds until it is stored: its payload and, for a codec
    encoding (`CODEC_TAGS`), the decoded chunk and its reference beside it (decoding a stored
    form makes its bytes from the payload alone)."""
    return length + (2 * raw_size if encoding in CODEC_TAGS else 0)


def id_bytes(chunk_id: str) -> bytes:
    return bytes.fromhex(digest.hex_of(chunk_id))


def id_from_bytes(raw: bytes) -> str:
    return "blake3:" + raw.hex()


def chunk_header(chunk_id: str, encoding: int, raw_size: int, payload_len: int) -> bytes:
    """A chunk frame up to its payload (send the payload after it, uncopied)."""
    return bytes([FRAME_CHUNK]) + CHUNK_HEAD.pack(id_bytes(chunk_id), encoding, raw_size, payload_len)


def chunk_frame(chunk_id: str, encoding: int, raw_size: int, payload: bytes) -> bytes:
    return chunk_header(chunk_id, encoding, raw_size, len(payload)) + payload


def chunk_frame_size(payload_len: int) -> int:
    return 1 + CHUNK_HEAD.size + payload_len


def missing_frame_size() -> int:
    return 33


def end_frame_size() -> int:
    return 1 + END.size


def missing_frame(chunk_id: str) -> bytes:
    return bytes([FRAME_MISSING]) + id_bytes(chunk_id)


def wait_frame(chunk_id: str) -> bytes:
    return bytes([FRAME_WAIT]) + id_bytes(chunk_id)


def end_frame(count: int) -> bytes:
    return bytes([FRAME_END]) + END.pack(count)


def encode_stream(frames: list[bytes]) -> bytes:
    """A whole stream in memory (for small uploads and tests)."""
    return MAGIC + b"".join(frames) + end_frame(len(frames))


ReadExactly = Callable[[int], Awaitable[bytes]]
Reserve = Callable[[int], Awaitable[None]]  # called with a frame's `memory` before its payload is read
# A payload is read this many bytes at a time, into one buffer of its length. No more than a
# client connection's read buffer (`fabric.wire.client.READ_BUFFER` is this): aiohttp raises a
# StreamReader's read-ahead to twice the largest `read(n)` it is asked for (3.14's
# `set_read_chunk_size`), so 1 MiB pieces let each connection to an upstream hold 2 MiB more
# while its reader waits on the memory budget (a relay's peak, issue 17).
PIECE = 256 << 10


class FrameReader:
    """Parse a chunk stream frame by frame: `async for frame in FrameReader(read)`."""

    def __init__(self, read_exactly: ReadExactly, *, max_frames: int = 1 << 20, waits: bool = False,
                 reserve: Reserve | None = None):
        self._read = read_exactly
        self._reserve = reserve  # e.g. a memory budget: the reader waits on it before each payload
        self._count = 0
        self._waits = 0 if waits else None  # wait frames read (None: not allowed)
        self._max = max_frames
        self._started = False
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Frame:
        if self.done:
            raise StopAsyncIteration
        if not self._started:
            if await self._take(4) != MAGIC:
                raise BadFrame("chunk stream does not start with the FBC1 magic")
            self._started = True
        kind = (await self._take(1))[0]
        if kind == FRAME_END:
            (count,) = END.unpack(await self._take(4))
            if count != self._count:
                raise BadFrame(f"end frame counts {count} frames, stream had {self._count}")
            self.done = True
            raise StopAsyncIteration
        if kind == FRAME_WAIT and self._waits is not None:
            self._waits += 1
            if self._waits > self._max:
                raise BadFrame(f"chunk stream has more than {self._max} wait frames")
            return Frame(FRAME_WAIT, id_from_bytes(await self._take(32)))
        self._count += 1
        if self._count > self._max:
            raise BadFrame(f"chunk stream has more than {self._max} frames")
        if kind == FRAME_MISSING:
            return Frame(FRAME_MISSING, id_from_bytes(await self._take(32)))
        if kind != FRAME_CHUNK:
            raise BadFrame(f"unknown frame type {kind}")
        raw_id, encoding, raw_size, length = CHUNK_HEAD.unpack(await self._take(CHUNK_HEAD.size))
        if raw_size > MAX_CHUNK or length > MAX_PAYLOAD:
            raise BadFrame(f"frame sizes out of range (raw {raw_size}, payload {length})")
        held = 0
        if self._reserve is not None:
            held = memory(encoding, raw_size, length)
            await self._reserve(held)
        return Frame(FRAME_CHUNK, id_from_bytes(raw_id), encoding, raw_size, await self._payload(length), held)

    async def _payload(self, n: int) -> bytes | bytearray:
        """`n` bytes; for a reader with `reserve`, read `PIECE` at a time into one buffer, so
        a large payload is never held twice (pieces and their join)."""
        if n <= PIECE or self._reserve is None:
            return await self._take(n)
        buf, pos = bytearray(n), 0
        while pos < n:
            piece = await self._take(min(PIECE, n - pos))
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        return buf

    async def _take(self, n: int) -> bytes:
        try:
            data = await self._read(n)
        except EOFError as e:  # asyncio.IncompleteReadError is an EOFError
            raise BadFrame(f"chunk stream ended early (wanted {n} more bytes)") from e
        if len(data) != n:
            raise BadFrame(f"chunk stream ended early (wanted {n} bytes, got {len(data)})")
        return data


def bytes_reader(data: bytes) -> ReadExactly:
    """A `read_exactly` over bytes in memory (tests, fuzzing)."""
    pos = 0

    async def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos:pos + n]
        pos += len(chunk)
        if len(chunk) < n:
            raise EOFError
        return chunk

    return read


# --- decoding a chunk frame -------------------------------------------------------------------

def decode(chunk_id: str, tag: int, raw_size: int, payload: bytes | bytearray | memoryview, *,
           references: References | None = None, expected_size: int | None = None) -> bytes | bytearray:
    """A received chunk's bytes, decoded and checked against `chunk_id`.

    Tags 0 (raw) and 1 (zstd) are stored forms: a raw size of 0 means "not stated".
    Tags 2 and up are decoded by the codec; references (`xor`, `patch`, `delta`, `multipatch`) come from
    `references` (see `store_references`), and one it cannot give is a
    ReferenceMismatch, which the receiver answers by asking for the chunk again
    without references. Any other tag is a CorruptChunk. `expected_size` is the size
    the manifest gives. Raises BadFrame, UnknownEncoding, ReferenceMismatch,
    CorruptChunk; never returns bytes that do not hash to `chunk_id`.
    """
    if tag in CODEC_TAGS:
        return _decode_codec(chunk_id, tag, raw_size, payload, references, expected_size)
    if tag == Encoding.ZSTD:
        _check_zstd_size(chunk_id, payload)
    # a raw payload is the chunk: used as it is (a reader's bytearray is not copied)
    data = payload if tag == Encoding.RAW and isinstance(payload, (bytes, bytearray)) else \
        Store.decode_payload(chunk_id, tag, payload)
    for size in (raw_size or None, expected_size):
        if size is not None and len(data) != size:
            raise BadFrame(f"chunk {chunk_id}: expected {size} bytes, decoded {len(data)}")
    digest.verify(chunk_id, data)
    return data


def decode_frame(frame: Frame, expected_size: int | None = None, *, references: References | None = None) -> bytes | bytearray:
    """`decode` for a parsed chunk frame (BadFrame for any other kind)."""
    if frame.kind != FRAME_CHUNK:
        raise BadFrame("expected a chunk frame")
    return decode(frame.chunk_id, frame.encoding, frame.raw_size, frame.payload, references=references,
                  expected_size=expected_size)


def store_references(store: Store | None) -> References:
    """A reference lookup on the receiver's `store`: verified bytes, or ReferenceMismatch. A
    chunk a local store holds raw (its file, or a pack) comes as a `codec.FileReference` on
    its open file, which the decoder reads a piece at a time and checks (`decode` closes it)."""
    def read(ref_id: str) -> bytes | codec.FileReference:
        if store is None:
            raise ReferenceMismatch(f"no store to read reference {ref_id} from")
        stored = store.open_stored(ref_id) if store.local else None
        if stored is not None and stored.tag == Encoding.RAW:
            return codec.FileReference(stored.file, stored.offset, stored.size, ref_id)
        if stored is not None:  # a zstd stored form: decompressed whole below
            stored.file.close()
        try:
            return store.get_chunk(ref_id)
        except NotFound:
            raise ReferenceMismatch(f"reference {ref_id} is not in {store}") from None
        except CorruptChunk:
            raise ReferenceMismatch(f"reference {ref_id} is corrupt in {store}") from None
    return read


def _decode_codec(chunk_id: str, tag: int, raw_size: int, payload: bytes | memoryview,
                  references: References | None, expected_size: int | None) -> bytes | bytearray:
    if expected_size is not None and raw_size != expected_size:
        raise BadFrame(f"chunk {chunk_id}: frame says {raw_size} bytes, the manifest {expected_size}")
    encoding = Encoding.parse(tag)
    held, ids = [], codec.body_references(encoding, payload)  # `multipatch` names several
    try:
        for ref_id in ids:
            if not digest.is_valid(ref_id):
                raise BadFrame(f"chunk {chunk_id}: the payload names no valid reference ({ref_id[:80]!r})")
            held.append((references or store_references(None))(ref_id))
        data = codec.decode_body(encoding, payload, raw_size=raw_size, reference=held[0] if held else None,
                                 reference_id=ids[0] if ids else None, more=held[1:], more_ids=ids[1:])
    finally:
        for ref in held:
            if isinstance(ref, codec.FileReference):
                ref.file.close()
    digest.verify(chunk_id, data)
    return data


def _check_zstd_size(chunk_id: str, payload: bytes) -> None:
    """Refuse a zstd frame whose header claims more than MAX_CHUNK bytes.

    The decompressor allocates the claimed content size up front (and ignores
    `max_output_size` when the header states one), so a 20-byte payload could ask
    for a terabyte.
    """
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise BadFrame(f"chunk {chunk_id}: bad zstd frame header ({e})") from None
    if size > MAX_CHUNK:
        raise BadFrame(f"chunk {chunk_id}: zstd frame claims {size} bytes; at most {MAX_CHUNK}")


def error_body(e: FabricError) -> dict:
    return {"code": e.code, "message": e.message}
