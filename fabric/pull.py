"""Materialising a version: write its files from the store into a folder.

The files are assembled in a hidden sibling folder and moved into place with one
rename at the end, so a reader never sees a half-written version and a failed pull
leaves DEST as it was. Every chunk is verified against its id as it is read.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import DestinationExists, InvalidManifest, MissingChunks, StoreFull
from .manifest import Manifest
from .store import Store


@dataclass
class PullResult:
    artifact: str
    version: str
    manifest_id: str
    dest: str
    files: int
    bytes: int
    chunks_fetched: int = 0
    chunks_reused: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def check_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        if not dest.is_dir() or any(dest.iterdir()):
            raise DestinationExists(f"{dest} exists and is not empty (use --force to replace it)")


def materialize(store: Store, manifest: Manifest, dest: str | os.PathLike, *,
                overwrite: bool = False, progress=None) -> None:
    """Write every file of `manifest` under `dest`, atomically."""
    dest = Path(dest).absolute()
    check_dest(dest, overwrite)
    missing = store.missing(manifest.chunk_ids())
    if missing:
        raise MissingChunks(f"the store lacks {len(missing)} chunk(s) of this version, e.g. {missing[0]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.fabric-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for f in manifest.files:
            _write_file(store, staging, f, progress)
        _swap_into_place(staging, dest)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(f"no space left to write {manifest.artifact}@{manifest.version} into {dest}") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_file(store: Store, root: Path, entry, progress) -> None:
    path = root / entry.path
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidManifest(f"file path {entry.path!r} escapes the destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for cid, size in entry.chunks:
            data = store.get_chunk(cid)
            if len(data) != size:
                raise InvalidManifest(f"{entry.path}: chunk {cid} is {len(data)} bytes, manifest says {size}")
            out.write(data)
            if progress:
                progress(size)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, entry.mode)


def _swap_into_place(staging: Path, dest: Path) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.fabric-old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(staging, dest)
