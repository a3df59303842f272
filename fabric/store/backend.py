"""The backend protocol: a flat namespace of immutable-ish objects.

A backend knows nothing about chunks or manifests; it stores bytes under keys
(`chunks/ab/ab12…`, `refs/llama/channels/prod`). Five verbs, plus one
compare-and-swap for the few mutable objects (channels, version refs):

    has(key)               -> bool
    get(key)               -> bytes              (NotFound if absent)
    put(key, data)         -> None               (atomic: all or nothing)
    put_if(key, data, expected)                  (CAS: `expected` None = must not exist)
    list(prefix)           -> iterator of ObjectInfo
    delete(key)            -> None               (absent is fine)

Keys are `/`-separated, relative, and made only by `fabric.store.store` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class Backend(Protocol):
    def has(self, key: str) -> bool: ...

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes | memoryview) -> None: ...

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def describe(self) -> str: ...
