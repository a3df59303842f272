"""Manifests: the immutable description of one version of an artifact.

A manifest lists every file (path, size, mode, chunks in order) and, for
safetensors files, every tensor (name, dtype, shape, byte range, chunks), plus the
chunker's parameters and free-form metadata. It is stored as canonical JSON (keys
sorted, no insignificant white space, UTF-8) and named by the digest of those bytes.

A manifest read from anywhere is hostile until `Manifest.from_json` has validated it:
relative paths only, no `..`, no duplicates, sizes consistent with chunk lists,
well-formed ids. The format is specified in docs/formats.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Iterator

from fabric.core import digest
from fabric.core.boundedjson import decode
from fabric.core.dtypes import DTYPES
from fabric.core.limits import MAX_CHUNK as MAX_CHUNK_SIZE
from fabric.core.limits import MAX_PATH_BYTES, MAX_PATH_DEPTH, MAX_PATH_PART_BYTES
from fabric.errors import InvalidManifest, InvalidName

FORMAT = "fabric.manifest/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, name: object) -> str:
    """Artifact, version and channel names: 1-128 of [A-Za-z0-9._-], not starting with . - _"""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_path(path: object) -> str:
    """A file path inside a version: relative, `/`-separated, no `.`/`..`/empty parts, and
    one every file system takes: at most MAX_PATH_BYTES in all, MAX_PATH_PART_BYTES per
    part (UTF-8), MAX_PATH_DEPTH parts."""
    if not isinstance(path, str) or not path:
        raise InvalidManifest(f"file path {path!r} is not a non-empty string")
    shown = path if len(path) <= 80 else path[:80] + "…"
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise InvalidManifest(f"file path {shown!r} must be relative and use '/'")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidManifest(f"file path {shown!r} is not valid Unicode") from None
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidManifest(f"file path {shown!r} has an empty, '.' or '..' part")
    if size > MAX_PATH_BYTES or len(parts) > MAX_PATH_DEPTH:
        raise InvalidManifest(f"file path {shown!r} is longer than {MAX_PATH_BYTES} bytes "
                              f"or deeper than {MAX_PATH_DEPTH} parts")
    if any(len(part.encode("utf-8")) > MAX_PATH_PART_BYTES for part in parts):
        raise InvalidManifest(f"file path {shown!r} has a part longer than {MAX_PATH_PART_BYTES} bytes")
    return path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    chunks: tuple[tuple[str, int], ...]  # (chunk id, chunk size) in file order

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mode": self.mode,
                "chunks": [[cid, n] for cid, n in self.chunks]}


@dataclass(frozen=True)
class TensorEntry:
    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    length: int
    chunks: tuple[str, ...]

    def to_json(self) -> dict:
        return {"file": self.file, "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "length": self.length, "chunks": list(self.chunks)}


@dataclass(frozen=True)
class Manifest:
    artifact: str
    version: str
    created: str  # RFC 3339, UTC
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...] = ()
    parent: str | None = None
    metadata: dict = field(default_factory=dict)
    chunking: dict = field(default_factory=dict)

    # --- serialisation ---------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "artifact": self.artifact,
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "chunking": self.chunking,
            "metadata": self.metadata,
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.path)],
            "tensors": [t.to_json() for t in sorted(self.tensors, key=lambda t: (t.file, t.name))],
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @cached_property  # computed once: a manifest is immutable (frozen, and nothing edits its dicts)
    def id(self) -> str:
        return digest.digest(self.canonical())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        obj = decode(data, what="manifest", error=InvalidManifest)
        m = cls.from_json(obj)
        try:
            m.canonical()
        except UnicodeEncodeError:  # JSON may escape lone surrogates ("\ud800"), which have no UTF-8 form
            raise InvalidManifest("manifest holds a string that is not valid Unicode (a lone surrogate)") from None
        return m

    @classmethod
    def from_json(cls, obj: object) -> "Manifest":
        if not isinstance(obj, dict):
            raise InvalidManifest("manifest is not a JSON object")
        if obj.get("format") != FORMAT:
            raise InvalidManifest(f"unknown manifest format {obj.get('format')!r} (want {FORMAT})")
        files = tuple(_file_from_json(f) for f in _list(obj, "files"))
        m = cls(
            artifact=check_name("artifact", obj.get("artifact")),
            version=check_name("version", obj.get("version")),
            parent=None if obj.get("parent") is None else check_name("version", obj.get("parent")),
            created=_str(obj, "created"),
            files=files,
            tensors=tuple(_tensor_from_json(t) for t in _list(obj, "tensors")),
            metadata=_dict(obj, "metadata"),
            chunking=_dict(obj, "chunking"),
        )
        m.validate()
        return m

    # --- invariants --------------------------------------------------------------

    def validate(self) -> None:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise InvalidManifest("manifest lists a file path twice")
        folders = {p[:i] for p in paths for i, ch in enumerate(p) if ch == "/"}
        for p in paths:
            if p in folders:
                raise InvalidManifest(f"{p!r} is both a file and a folder")
        sizes = {f.path: f.size for f in self.files}
        chunk_sizes: dict[str, int] = {}
        for f in self.files:
            for cid, n in f.chunks:
                if chunk_sizes.setdefault(cid, n) != n:  # one id is one run of bytes: one size
                    raise InvalidManifest(f"chunk {cid} is listed with two sizes ({chunk_sizes[cid]} and {n})")
        if len({(t.file, t.name) for t in self.tensors}) != len(self.tensors):
            raise InvalidManifest("manifest lists a tensor twice")
        for t in self.tensors:
            if t.file not in sizes:
                raise InvalidManifest(f"tensor {t.name!r} names unknown file {t.file!r}")
            if t.offset + t.length > sizes[t.file]:
                raise InvalidManifest(f"tensor {t.name!r} lies beyond the end of {t.file!r}")
            if t.length != math.prod(t.shape) * DTYPES[t.dtype].size:
                raise InvalidManifest(f"tensor {t.name!r}: {t.length} bytes for shape {list(t.shape)} of {t.dtype}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise InvalidManifest("metadata must map strings to strings")

    # --- queries -----------------------------------------------------------------

    def chunk_ids(self) -> Iterator[str]:
        """Every chunk id, in file order, repeats included."""
        for f in self.files:
            for cid, _ in f.chunks:
                yield cid

    def unique_chunks(self) -> dict[str, int]:
        """Chunk id → size, each chunk once."""
        out: dict[str, int] = {}
        for f in self.files:
            for cid, n in f.chunks:
                out[cid] = n
        return out

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- parsing helpers (every field checked for type and range) ---------------------

def _list(obj: dict, key: str) -> list:
    v = obj.get(key, [])
    if not isinstance(v, list):
        raise InvalidManifest(f"{key!r} must be a list")
    return v


def _dict(obj: dict, key: str) -> dict:
    v = obj.get(key, {})
    if not isinstance(v, dict):
        raise InvalidManifest(f"{key!r} must be an object")
    return v


def _str(obj: dict, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise InvalidManifest(f"{key!r} must be a string")
    return v


def _count(v: object, what: str, limit: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit:
        raise InvalidManifest(f"{what} must be an integer in [0, {limit}], got {v!r}")
    return v


def _file_from_json(f: object) -> FileEntry:
    if not isinstance(f, dict):
        raise InvalidManifest("a file entry is not an object")
    path = check_path(f.get("path"))
    size = _count(f.get("size"), f"size of {path!r}")
    mode = _count(f.get("mode"), f"mode of {path!r}", 0o777)
    raw_chunks = f.get("chunks")
    if not isinstance(raw_chunks, list):
        raise InvalidManifest(f"chunks of {path!r} must be a list")
    chunks = []
    for c in raw_chunks:
        if not (isinstance(c, list) and len(c) == 2):
            raise InvalidManifest(f"a chunk of {path!r} is not [id, size]")
        cid = digest.check_id(c[0])
        chunks.append((cid, _count(c[1], f"a chunk size in {path!r}", MAX_CHUNK_SIZE)))
        if chunks[-1][1] == 0:
            raise InvalidManifest(f"{path!r} has an empty chunk")
    if sum(n for _, n in chunks) != size:
        raise InvalidManifest(f"chunk sizes of {path!r} add up to {sum(n for _, n in chunks)}, not {size}")
    return FileEntry(path, size, mode, tuple(chunks))


def _tensor_from_json(t: object) -> TensorEntry:
    if not isinstance(t, dict):
        raise InvalidManifest("a tensor entry is not an object")
    name = t.get("name")
    if not isinstance(name, str):
        raise InvalidManifest("a tensor has no name")
    dtype = t.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidManifest(f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = t.get("shape")
    if not isinstance(shape, list):
        raise InvalidManifest(f"tensor {name!r}: shape must be a list")
    chunks = t.get("chunks")
    if not isinstance(chunks, list):
        raise InvalidManifest(f"tensor {name!r}: chunks must be a list")
    return TensorEntry(
        file=check_path(t.get("file")),
        name=name,
        dtype=dtype,
        shape=tuple(_count(d, f"a dimension of {name!r}") for d in shape),
        offset=_count(t.get("offset"), f"offset of {name!r}"),
        length=_count(t.get("length"), f"length of {name!r}"),
        chunks=tuple(digest.check_id(c) for c in chunks),
    )


@dataclass(frozen=True)
class ManifestDiff:
    files_added: tuple[str, ...]
    files_removed: tuple[str, ...]
    files_changed: tuple[str, ...]
    tensors_changed: tuple[str, ...]  # "file:name", new or different in dtype, shape or bytes
    tensors_removed: tuple[str, ...]
    new_chunks: int  # chunks of `new` that `old` lacks
    new_bytes: int

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def diff(old: Manifest | None, new: Manifest) -> ManifestDiff:
    """What `new` changes relative to `old` (everything, if `old` is None)."""
    old_files = {f.path: f for f in old.files} if old else {}
    new_files = {f.path: f for f in new.files}
    old_tensors = {(t.file, t.name): t for t in old.tensors} if old else {}
    new_tensors = {(t.file, t.name): t for t in new.tensors}
    old_chunks = old.unique_chunks() if old else {}
    fresh = {c: n for c, n in new.unique_chunks().items() if c not in old_chunks}
    return ManifestDiff(
        files_added=tuple(sorted(new_files.keys() - old_files.keys())),
        files_removed=tuple(sorted(old_files.keys() - new_files.keys())),
        files_changed=tuple(sorted(p for p in new_files.keys() & old_files.keys()
                                   if new_files[p].chunks != old_files[p].chunks
                                   or new_files[p].mode != old_files[p].mode)),
        tensors_changed=tuple(sorted(f"{k[0]}:{k[1]}" for k, t in new_tensors.items()
                                     if _tensor_differs(old_tensors.get(k), t))),
        tensors_removed=tuple(sorted(f"{k[0]}:{k[1]}" for k in old_tensors.keys() - new_tensors.keys())),
        new_chunks=len(fresh),
        new_bytes=sum(fresh.values()),
    )


def _tensor_differs(old: TensorEntry | None, new: TensorEntry) -> bool:
    return old is None or (old.dtype, old.shape, old.chunks) != (new.dtype, new.shape, new.chunks)
