"""The backend protocol: a flat namespace of immutable-ish objects, and what else a backend can do.

A backend knows nothing about chunks or manifests; it stores bytes under keys
(`chunks/ab/ab12…`, `refs/llama/channels/prod`). Five verbs, plus one
compare-and-swap for the few mutable objects (channels, version refs):

    has(key)               -> bool
    get(key)               -> bytes              (NotFound if absent)
    put(key, data)         -> None               (atomic: all or nothing)
    put_if(key, data, expected)                  (CAS: `expected` None = must not exist)
    list(prefix)           -> iterator of ObjectInfo
    delete(key)            -> None               (absent is fine)

Anything more is declared, not probed: each backend has a `capabilities` attribute
(`Capabilities`), and `fabric.store.store.Store` uses an extra verb only where its
capability is declared. A backend that declares a capability implements its verbs:

    parallel_has   has_many(keys) -> list[bool]          many `has` at once (remote round trips)
    parts          put_parts(key, parts)                 write a concatenation without joining it
    deferred       put_parts(key, parts, durable=False)  visible and durable only at flush()
                   flush()
    size           size(key) -> int | None               an object's size without reading it
    files          path(key) -> Path                     objects are files on this machine
    link           link_in(key, src) -> bool             hard-link a file in (False: other file system)
    temp_files     sweep_temp() -> int                   remove a crashed writer's temp files
    list_after     list_after(prefix, after)             `list`, only keys after `after`, in key order
                                                         (S3's StartAfter: one request for a log's tail)

Keys are `/`-separated, relative, and made only by `fabric.store.store` (and the
commit fence's two, by `fabric.store.fence`; the move log's, `fabric.store.movelog`;
the site reports', `fabric.store.reports`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the five verbs (the table in this module's docstring)."""

    parallel_has: bool = False
    parts: bool = False
    deferred: bool = False
    size: bool = False
    files: bool = False
    link: bool = False
    temp_files: bool = False
    list_after: bool = False

    # the verbs each capability promises (checked by the store suite for every backend)
    VERBS = {"parallel_has": ("has_many",), "parts": ("put_parts",), "deferred": ("put_parts", "flush"),
             "size": ("size",), "files": ("path",), "link": ("link_in",), "temp_files": ("sweep_temp",),
             "list_after": ("list_after",)}

    def declared(self) -> list[str]:
        """The names of the capabilities this backend declares."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


class Backend(Protocol):
    capabilities: Capabilities

    def has(self, key: str) -> bool: ...

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes | memoryview) -> None: ...

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def describe(self) -> str: ...
