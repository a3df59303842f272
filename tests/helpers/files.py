"""Files the tests write and read: random bytes and tensors, safetensors files, folder
trees, and TOML config files.

Safetensors files are written through the `safetensors` library (`write_safetensors`),
or byte by byte (`safetensors_bytes`) for a chosen tensor order or a deliberately
broken header.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import stat
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

_NP_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
              np.dtype("int32"): "I32", np.dtype("int64"): "I64", np.dtype("uint8"): "U8",
              np.dtype("int8"): "I8", np.dtype("bool"): "BOOL"}


# --- bytes and tensors ---------------------------------------------------------------

def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def random_tensors(rng: np.random.Generator, n: int, shape=(64, 64), dtype=np.float32,
                   prefix: str = "layer") -> dict[str, np.ndarray]:
    """`n` distinct random tensors named `{prefix}.000` … (no two share bytes)."""
    return {f"{prefix}.{i:03d}": rng.standard_normal(shape).astype(dtype) for i in range(n)}


# --- safetensors -----------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write with the real safetensors library (it chooses the tensor order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def safetensors_bytes(tensors: list[tuple[str, np.ndarray]], *, metadata: dict | None = None,
                      header: dict | None = None, raw_header: bytes | None = None,
                      trailing: bytes = b"") -> bytes:
    """A safetensors file with the tensors in exactly the given order.

    `header` replaces the computed header (to write broken ones); `raw_header` replaces
    the JSON bytes altogether. The JSON is padded with spaces to 8-byte alignment, as
    the safetensors library does.
    """
    h, data, pos = {}, bytearray(), 0
    for name, arr in tensors:
        buf = np.ascontiguousarray(arr).tobytes()
        h[name] = {"dtype": _NP_DTYPES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [pos, pos + len(buf)]}
        data += buf
        pos += len(buf)
    if metadata is not None:
        h["__metadata__"] = metadata
    if header is not None:
        h = header
    js = raw_header if raw_header is not None else json.dumps(h, separators=(",", ":")).encode()
    if raw_header is None:
        js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js + bytes(data) + trailing


def header_len(path: Path) -> int:
    """8 + the JSON header's length: the size of a safetensors file's header chunk."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# --- folder trees ----------------------------------------------------------------------

def write_tree(root: Path, files: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if modes and rel in modes:
            os.chmod(p, modes[rel])
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path → (bytes, permission bits) of every regular file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = read_tree(a), read_tree(b)
    assert sorted(ta) == sorted(tb)
    for rel in ta:
        assert ta[rel][0] == tb[rel][0], f"{rel} differs"
        assert ta[rel][1] == tb[rel][1], f"{rel} mode {oct(ta[rel][1])} != {oct(tb[rel][1])}"


# --- TOML ------------------------------------------------------------------------------

def toml_value(value) -> str:
    """A TOML value for a bool, number, string (or Path) or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_lines(keys: dict) -> list[str]:
    """`key = value` lines for one table's keys."""
    return [f"{k} = {toml_value(v)}" for k, v in keys.items()]


def page_cache_share(path: Path) -> float:
    """The share of `path`'s pages in the page cache now (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            assert libc.mincore(addr, size, vec) == 0
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec) / pages


def used_bytes(folder) -> int:
    """Bytes in use on the file system holding `folder` (what a write there costs it)."""
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
