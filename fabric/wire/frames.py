"""The wire: definitions shared by every server and client of Fabric's HTTP protocol.

Control messages are JSON; chunks travel in a binary *chunk stream* (specified in
docs/protocol.md). A stream is the 4-byte magic `FBC1`, then frames, then an end
frame:

    chunk frame    0x01 | id (32 bytes) | encoding (u8) | raw size (u32 BE) | payload length (u32 BE) | payload
    missing frame  0x02 | id (32 bytes)                      the source does not hold this chunk
    end frame      0x00 | frame count (u32 BE)               number of frames before it

`FrameReader` parses a stream from any async byte source and treats it as hostile:
every length is bounded before anything is allocated, and a short read is a
`BadFrame`. Decoding and verifying the payload is the receiver's job (off the loop).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Awaitable, Callable

import zstandard

from fabric.core import digest
from fabric.errors import BadFrame, FabricError
from fabric.store.store import TAG_ZSTD, Store  # stored and wire encodings share tags: 0 raw, 1 zstd

API = "/v1"
MAGIC = b"FBC1"
FRAME_END, FRAME_CHUNK, FRAME_MISSING = 0, 1, 2
MAX_CHUNK = 64 << 20  # largest raw chunk accepted (bytes)
MAX_PAYLOAD = MAX_CHUNK + (1 << 20)  # an encoded chunk may be a little larger than raw
MAX_IDS = 4096  # ids per has/fetch request
MAX_JSON = 8 << 20  # largest JSON request body
_CHUNK_HEAD = struct.Struct(">32sBII")
_END = struct.Struct(">I")

CHUNK_STREAM = "application/x-fabric-chunks"


@dataclass(frozen=True)
class Frame:
    kind: int  # FRAME_CHUNK or FRAME_MISSING
    chunk_id: str
    encoding: int = 0
    raw_size: int = 0
    payload: bytes = b""


def id_bytes(chunk_id: str) -> bytes:
    return bytes.fromhex(digest.hex_of(chunk_id))


def id_from_bytes(raw: bytes) -> str:
    return "blake3:" + raw.hex()


def chunk_header(chunk_id: str, encoding: int, raw_size: int, payload_len: int) -> bytes:
    """A chunk frame up to its payload (send the payload after it, uncopied)."""
    return bytes([FRAME_CHUNK]) + _CHUNK_HEAD.pack(id_bytes(chunk_id), encoding, raw_size, payload_len)


def chunk_frame(chunk_id: str, encoding: int, raw_size: int, payload: bytes) -> bytes:
    return chunk_header(chunk_id, encoding, raw_size, len(payload)) + payload


def chunk_frame_size(payload_len: int) -> int:
    return 1 + _CHUNK_HEAD.size + payload_len


def missing_frame_size() -> int:
    return 33


def end_frame_size() -> int:
    return 1 + _END.size


def missing_frame(chunk_id: str) -> bytes:
    return bytes([FRAME_MISSING]) + id_bytes(chunk_id)


def end_frame(count: int) -> bytes:
    return bytes([FRAME_END]) + _END.pack(count)


def encode_stream(frames: list[bytes]) -> bytes:
    """A whole stream in memory (for small uploads and tests)."""
    return MAGIC + b"".join(frames) + end_frame(len(frames))


ReadExactly = Callable[[int], Awaitable[bytes]]


class FrameReader:
    """Parse a chunk stream frame by frame: `async for frame in FrameReader(read)`."""

    def __init__(self, read_exactly: ReadExactly, *, max_frames: int = 1 << 20):
        self._read = read_exactly
        self._count = 0
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
            (count,) = _END.unpack(await self._take(4))
            if count != self._count:
                raise BadFrame(f"end frame counts {count} frames, stream had {self._count}")
            self.done = True
            raise StopAsyncIteration
        self._count += 1
        if self._count > self._max:
            raise BadFrame(f"chunk stream has more than {self._max} frames")
        if kind == FRAME_MISSING:
            return Frame(FRAME_MISSING, id_from_bytes(await self._take(32)))
        if kind != FRAME_CHUNK:
            raise BadFrame(f"unknown frame type {kind}")
        raw_id, encoding, raw_size, length = _CHUNK_HEAD.unpack(await self._take(_CHUNK_HEAD.size))
        if raw_size > MAX_CHUNK or length > MAX_PAYLOAD:
            raise BadFrame(f"frame sizes out of range (raw {raw_size}, payload {length})")
        return Frame(FRAME_CHUNK, id_from_bytes(raw_id), encoding, raw_size, await self._take(length))

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


def decode_frame(frame: Frame, expected_size: int | None = None) -> bytes:
    """A received chunk frame's raw bytes, checked against its id. Runs in a thread."""
    if frame.kind != FRAME_CHUNK:
        raise BadFrame("expected a chunk frame")
    if frame.encoding == TAG_ZSTD:
        _check_zstd_size(frame.chunk_id, frame.payload)
    data = Store.decode_payload(frame.chunk_id, frame.encoding, frame.payload)
    for size in (frame.raw_size or None, expected_size):
        if size is not None and len(data) != size:
            raise BadFrame(f"chunk {frame.chunk_id}: expected {size} bytes, decoded {len(data)}")
    digest.verify(frame.chunk_id, data)
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
