"""Dtypes: the one table of the safetensors element types Fabric knows.

Each `DType` says how many bytes one element takes (`size`, which the chunker and the
manifest check tensor byte ranges against), what kind of number it is, and `planes`:
the width the codec's `bytegroup` and `xor` encodings split a chunk of it into
(docs/encodings.md, "How Fabric picks an encoding"). The list in docs/formats.md and
the worker's torch mapping (`agents.worker.live.DTYPES`) are checked against this table.

`planes` is the element size for integers and floats of 2 to 8 bytes and 1 for the
rest: 1-byte types have nothing to split, and `C64` (a pair of float32s) is left at 1
as the encoder has always treated it, so its chunks encode as they always have; byte
planes of its float32 halves would be width 4.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # as written in a safetensors header: "BF16"
    size: int  # bytes per element
    kind: str  # "bool", "int", "uint", "float" or "complex"
    planes: int  # byte-plane width for the codec (1: no byte planes)

    @property
    def is_float(self) -> bool:
        return self.kind in ("float", "complex")


def _table(*rows: tuple[str, int, str]) -> dict[str, DType]:
    return {name: DType(name, size, kind, size if kind in ("int", "uint", "float") else 1)
            for name, size, kind in rows}


# In the order docs/formats.md lists them.
DTYPES: dict[str, DType] = _table(
    ("BOOL", 1, "bool"), ("U8", 1, "uint"), ("I8", 1, "int"),
    ("F8_E5M2", 1, "float"), ("F8_E4M3", 1, "float"), ("F8_E8M0", 1, "float"),
    ("I16", 2, "int"), ("U16", 2, "uint"), ("F16", 2, "float"), ("BF16", 2, "float"),
    ("I32", 4, "int"), ("U32", 4, "uint"), ("F32", 4, "float"),
    ("I64", 8, "int"), ("U64", 8, "uint"), ("F64", 8, "float"), ("C64", 8, "complex"),
)


def item_size(name: str) -> int:
    """Bytes per element of the safetensors dtype `name` (KeyError if unknown)."""
    return DTYPES[name].size


def plane_width(name: str | None) -> int:
    """The codec's byte-plane width for a dtype; 1 for an unknown dtype or none."""
    d = DTYPES.get((name or "").upper())
    return d.planes if d else 1
