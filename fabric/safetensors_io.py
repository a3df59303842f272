"""Writing safetensors files a piece at a time: header first, then each tensor's bytes.

Used by the demo and the benchmarks to make large models without holding them in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from fabric.core.dtypes import item_size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * item_size(self.dtype)


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict | None = None) -> bytes:
    """The 8-byte length and the JSON header (space-padded to 8 bytes) for `specs`, in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec],
                      fill: Callable[[TensorSpec], Iterable[bytes | memoryview]],
                      metadata: dict | None = None) -> int:
    """Write a safetensors file without holding it in memory; return its size.

    `fill(spec)` yields the tensor's bytes in pieces of any size; their total must
    be `spec.nbytes`.
    """
    with open(path, "wb") as f:
        size = f.write(safetensors_header(specs, metadata))
        for s in specs:
            written = 0
            for piece in fill(s):
                written += f.write(piece)
            if written != s.nbytes:
                raise ValueError(f"{s.name}: wrote {written} bytes, want {s.nbytes}")
            size += written
    return size


def tensor_ranges(path: str | Path) -> dict[str, tuple[int, int]]:
    """Tensor name → (absolute offset, length) in a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()}
