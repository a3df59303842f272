"""Packs: chunks whose bytes live inside whole files the store shares with a folder.

A pull writes each fetched chunk once, straight into the file being assembled in
DEST. For the store to hold that chunk too without a second copy, the file is
hard-linked into the store as a *pack* (`packs/<hh>/<32 hex>`), and the chunk's
object under `chunks/` is a small *pack reference* (tag 0xFF) naming the pack, the
offset and the length of the chunk's raw bytes in it (docs/formats.md, `packs/`).

A pack is the same inode as the DEST file: a program that rewrites that file in place
spoils the store's copy too. Every read of a packed chunk is checked against its id
like any other read, so the damage is found, never served as good: `fabric pull`
fetches such chunks again, `fsck --repair` drops their references, and `gc` deletes
a pack once no reference points into it. Only local stores on the same file system
as DEST have packs; elsewhere the store keeps its own copy.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass

from fabric.core.codec import TAG_PACKED
from fabric.core.limits import MAX_CHUNK
from fabric.errors import ChunkNotFound

REF_MAX = 128  # a pack reference is never longer: stored objects this small may be one
_KEY = re.compile(r"packs/([0-9a-f]{2})/\1[0-9a-f]{30}")
_REF = re.compile(re.escape(bytes([TAG_PACKED]))
                  + rb"(packs/[0-9a-f]{2}/[0-9a-f]{32}) (0|[1-9][0-9]{0,15}) ([1-9][0-9]{0,9})")
# A hard link cannot be made here (other file system, no link support, too many links).
_CANNOT_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


@dataclass(frozen=True)
class PackRef:
    pack: str  # the pack's key, `packs/<hh>/<32 hex>`
    offset: int
    size: int

    def encode(self) -> bytes:
        return bytes([TAG_PACKED]) + f"{self.pack} {self.offset} {self.size}".encode()


def new_pack_key() -> str:
    name = uuid.uuid4().hex
    return f"packs/{name[:2]}/{name}"


def is_pack_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def parse(chunk_id: str, stored: bytes) -> PackRef:
    """The pack reference in a stored object that starts with `TAG_PACKED`."""
    m = _REF.fullmatch(stored)
    if m is None or not is_pack_key(m.group(1).decode()) or int(m.group(3)) > MAX_CHUNK:
        raise ChunkNotFound(f"chunk {chunk_id}: malformed pack reference in the store")
    return PackRef(m.group(1).decode(), int(m.group(2)), int(m.group(3)))


def link(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Hard-link `src` as `dst`; False where this file system cannot, instead of raising."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno in _CANNOT_LINK:
            return False
        raise


def read(chunk_id: str, path: str | os.PathLike, ref: PackRef) -> bytes:
    """The bytes `ref` names in the pack file at `path` (unverified: callers check the id)."""
    try:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), ref.size, ref.offset)
    except FileNotFoundError:
        raise ChunkNotFound(f"chunk {chunk_id}: its pack {ref.pack} is gone") from None
    if len(data) != ref.size:
        raise ChunkNotFound(f"chunk {chunk_id}: its pack {ref.pack} is shorter than the reference says")
    return data
