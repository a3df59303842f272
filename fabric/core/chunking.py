"""Chunking: where a file is cut into chunks. No I/O happens here.

Two chunkers, chosen by file name:

* `.safetensors` files are cut along their own structure. The header (the 8-byte
  length and the JSON) is one chunk; each tensor is cut into fixed-size segments
  measured from the tensor's own start, so an unchanged tensor keeps its chunks even
  when the header grows or the tensors are reordered. Bytes that belong to no tensor
  (gaps, trailing bytes) are cut into segments of their own, so any file round-trips.
* every other file is cut by content (FastCDC), so an append or an edit in the middle
  changes only the chunks around it.

`plan_safetensors` turns a parsed header into a list of `Piece`s; `cdc_cuts` turns a
buffer into cut lengths. Reading, hashing and storing are the publisher's business.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pyfastcdc import FastCDC

from fabric.core.dtypes import DTYPES
from fabric.core.limits import MAX_CHUNK
from fabric.errors import InvalidSafetensors

SEGMENT_SIZE = 8 << 20  # tensor segment size (bytes); recorded in each manifest
CDC_MIN, CDC_AVG, CDC_MAX = 16 << 10, 64 << 10, 256 << 10
MAX_HEADER = MAX_CHUNK - 8  # the 8-byte length and the header are one chunk


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the tensor's first byte in the file
    length: int


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int  # 8 + the JSON's length: the data buffer starts here
    tensors: tuple[TensorInfo, ...]  # sorted by offset
    metadata: dict


@dataclass(frozen=True)
class Piece:
    """A byte range of a file that becomes one chunk."""

    offset: int
    length: int
    tensor: str | None = None  # the tensor this segment belongs to, if any
    segment: int = 0  # index of the segment within its tensor


def header_length(prefix: bytes, file_size: int) -> int:
    """Read the JSON header's length from a safetensors file's first 8 bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise InvalidSafetensors(f"file is {file_size} bytes, too short for a safetensors header")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER:
        raise InvalidSafetensors(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise InvalidSafetensors(f"header length {n} is longer than the file ({file_size} bytes)")
    return n


def parse_safetensors_header(header_json: bytes, file_size: int) -> SafetensorsHeader:
    """Validate a safetensors JSON header against the file's size."""
    start = 8 + len(header_json)
    try:
        text = bytes(header_json).decode("utf-8")  # the format is UTF-8 (json.loads would guess)
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidSafetensors(f"header is not valid JSON: {e}") from None
    except ValueError as e:
        raise InvalidSafetensors(str(e)) from None
    if not isinstance(raw, dict):
        raise InvalidSafetensors("header is not a JSON object")
    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidSafetensors("__metadata__ must map strings to strings")
    tensors = sorted(
        (_tensor_info(name, spec, start, file_size - start) for name, spec in raw.items()),
        key=lambda t: (t.offset, t.length),
    )
    _check_no_overlap(tensors)
    return SafetensorsHeader(header_len=start, tensors=tuple(tensors), metadata=metadata)


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("header names a key twice")
    return dict(pairs)


def _tensor_info(name: str, spec: object, start: int, data_len: int) -> TensorInfo:
    if not _is_utf8(name):
        raise InvalidSafetensors(f"tensor name {name!r} is not valid Unicode (a lone surrogate)")
    if not isinstance(spec, dict):
        raise InvalidSafetensors(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidSafetensors(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidSafetensors(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InvalidSafetensors(f"tensor {name!r}: data_offsets must be [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise InvalidSafetensors(
            f"tensor {name!r}: data_offsets [{begin}, {end}] out of range (data is {data_len} bytes)"
        )
    expected = math.prod(shape) * DTYPES[dtype].size
    if end - begin != expected:
        raise InvalidSafetensors(
            f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} (want {expected})"
        )
    return TensorInfo(name, dtype, tuple(shape), start + begin, end - begin)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_no_overlap(tensors: list[TensorInfo]) -> None:
    for a, b in zip(tensors, tensors[1:]):
        if b.offset < a.offset + a.length:
            raise InvalidSafetensors(f"tensors {a.name!r} and {b.name!r} overlap")


def plan_safetensors(header: SafetensorsHeader, file_size: int, segment: int = SEGMENT_SIZE) -> list[Piece]:
    """Cut a safetensors file: header, then each tensor's segments, gaps in between."""
    pieces = [Piece(0, header.header_len)]
    cursor = header.header_len
    for t in header.tensors:
        pieces += _segments(cursor, t.offset - cursor, segment)  # bytes no tensor claims
        pieces += _segments(t.offset, t.length, segment, tensor=t.name)
        cursor = t.offset + t.length
    pieces += _segments(cursor, file_size - cursor, segment)
    return pieces


def _segments(offset: int, length: int, size: int, tensor: str | None = None) -> list[Piece]:
    return [
        Piece(offset + i, min(size, length - i), tensor, i // size)
        for i in range(0, length, size)
    ]


class CdcChunker:
    """FastCDC over a stream fed in windows: bytes in, cut lengths out."""

    def __init__(self, min_size: int = CDC_MIN, avg_size: int = CDC_AVG, max_size: int = CDC_MAX):
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)
        self.max_size = max_size

    def cuts(self, buf: bytes | memoryview, final: bool) -> list[int]:
        """Lengths of the chunks that `buf` certainly ends.

        Unless `final`, the last chunk found may have been cut short by the end of
        the buffer, so it is left out: the caller keeps those bytes and passes them
        again at the start of the next window.
        """
        lengths = [c.length for c in self._cdc.cut_buf(buf)]
        if not final and lengths:
            lengths.pop()
        return lengths
