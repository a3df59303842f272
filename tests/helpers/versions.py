"""Versions built chunk by chunk, an in-memory store, and weights that take small steps.

Shared by the tests of reference planning (tests/core/test_refplan.py), serving and
decoding chunks (tests/wire/test_chunks.py) and negotiation (tests/wire/test_negotiate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from fabric.core.digest import digest
from fabric.core.manifest import FileEntry, Manifest, TensorEntry
from fabric.core.refplan import ChunkHint, Plan
from fabric.errors import Conflict, NotFound
from fabric.store.registry import Registry
from fabric.store.store import Capabilities, ObjectInfo, Store
from fabric.wire import frames

RNG = np.random.default_rng(42)


class MemoryBackend:
    capabilities = Capabilities()  # the five verbs only

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def has(self, key: str) -> bool:
        return key in self.objects

    def get(self, key: str) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise NotFound(key) from None

    def put(self, key: str, data) -> None:
        self.objects[key] = bytes(data)

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        if self.objects.get(key) != expected:
            raise Conflict(key)
        self.objects[key] = bytes(data)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key, len(self.objects[key]), 0.0)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def describe(self) -> str:
        return "memory"


def mem_store() -> Store:
    return Store(MemoryBackend())


@dataclass
class Seg:
    """One chunk of a file: bytes, and the tensor it is a segment of (if any)."""

    data: bytes
    tensor: str | None = None
    dtype: str | None = None


def version(artifact: str, name: str, created: str, files: dict[str, list[Seg]],
            stores: tuple[Store, ...] = (), commit: bool = True) -> Manifest:
    """A manifest whose files are these chunks in order; chunks stored in `stores`."""
    entries, tensors = [], []
    for path, segs in files.items():
        chunks, offset, open_tensor = [], 0, None
        for seg in segs:
            cid = digest(seg.data)
            chunks.append((cid, len(seg.data)))
            if seg.tensor is not None:
                if open_tensor and open_tensor["name"] == seg.tensor:
                    open_tensor["chunks"].append(cid)
                    open_tensor["length"] += len(seg.data)
                else:
                    open_tensor = {"name": seg.tensor, "dtype": seg.dtype, "offset": offset,
                                   "length": len(seg.data), "chunks": [cid]}
                    tensors.append((path, open_tensor))
            else:
                open_tensor = None
            offset += len(seg.data)
            for s in stores:
                s.put_chunk(cid, seg.data, verified=True)
        entries.append(FileEntry(path, offset, 0o644, tuple(chunks)))
    m = Manifest(artifact=artifact, version=name, created=created, files=tuple(entries), tensors=tuple(
        TensorEntry(path, t["name"], t["dtype"], (t["length"] // _W.get(t["dtype"], 1),), t["offset"],
                    t["length"], tuple(t["chunks"])) for path, t in tensors))
    m.validate()
    if commit:
        for s in stores:
            Registry(s).commit(m)
    return m


_W = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "F64": 8}


def weights(n: int, dtype: str = "BF16", rng=RNG) -> np.ndarray:
    w = rng.normal(0, 0.02, n).astype(np.float32)
    return (w.view(np.uint32) >> 16).astype("<u2") if dtype == "BF16" else w


def step(arr: np.ndarray, rng=RNG) -> np.ndarray:
    """`arr` after a small optimizer step: the low bits of most elements move."""
    if arr.dtype == np.float32:
        return (arr + rng.normal(0, 2e-5, arr.shape).astype(np.float32)).astype(np.float32)
    out = arr.copy()
    idx = rng.integers(0, len(arr), len(arr) // 4)
    out[idx] ^= rng.integers(1, 4, len(idx)).astype(out.dtype)
    return out


def b(arr: np.ndarray) -> bytes:
    return arr.tobytes()


def hint(plan: Plan, data: bytes) -> ChunkHint:
    return plan[digest(data)]


def origin_and_site_stores() -> tuple[Store, Store, list[Manifest]]:
    """An origin holding v1..v3 of `m`, a site holding v1 and v2 (both registries committed)."""
    origin, site = mem_store(), mem_store()
    arrays = [weights(4000) for _ in range(3)]
    versions = []
    for i in range(3):
        arrays = [step(a) for a in arrays]
        stores = (origin, site) if i < 2 else (origin,)
        versions.append(version("m", f"v{i + 1}", f"2026-01-0{i + 1}T00:00:00Z", {
            "m.st": [Seg(b(a), f"t{k}", "BF16") for k, a in enumerate(arrays)],
            "cfg": [Seg(b'{"step": %d}' % i)]}, stores=stores))
    return origin, site, versions


def receive(store: Store | None, chunk_id: str, tag: int, raw_size: int, payload, **kw) -> bytes:
    """What a receiver holding `store` makes of a chunk frame (`fabric.wire.frames.decode`)."""
    return frames.decode(chunk_id, tag, raw_size, payload, references=frames.store_references(store), **kw)
