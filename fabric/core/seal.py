"""The site seal: a fast local checksum of every chunk of a version a site wrote.

A site agent verifies every chunk it writes into a version folder against its BLAKE3
id (from the network, or read back from its store). As each verified chunk passes
through on its way into the files (`fabric.pull.Assembly.write`), a `Sealer` takes
its xxh3-128; at the commit the seal is written beside the files, as
`<version folder>/.fabric-seal.json` (`SEAL_FILE`), inside the staging folder, so it
appears by the same rename as the version and goes with it. A worker loading the
version checks the bytes it reads against the seal at memory speed instead of
re-hashing them with BLAKE3 (`agents.worker.sealcheck`); a seal that is missing,
does not parse, names another manifest, lacks a chunk or does not match the bytes is
not trusted, and those bytes are checked with BLAKE3 instead.

The seal detects what happens to a folder after the agent wrote it (a file edited,
replaced or spoiled on disk, a stale seal). It is not a defence against someone who
can write the site's data folder: they could rewrite the seal too (xxh3 is no
cryptographic hash). docs/formats.md "The site seal" specifies the file.

Pure: hashing and encoding, no I/O.
"""

from __future__ import annotations

import threading

import xxhash

from fabric.core import boundedjson, digest
from fabric.core.manifest import Manifest
from fabric.errors import IntegrityError

SEAL_FILE = ".fabric-seal.json"  # inside the version folder; a dot-name, so loaders skip it
FORMAT = "fabric.seal/1"
HASH = "xxh3-128"  # XXH3_128bits, seed 0, canonical (big-endian) 16 bytes, lowercase hex
DIGEST_SIZE = 16
_ENTRY_BYTES = 160  # a reader's bound per chunk entry (the writer uses 110)
_HEAD_BYTES = 1024


def xxh(data: bytes | bytearray | memoryview) -> bytes:
    """The seal digest of `data`: xxh3-128 in canonical byte order. Releases the GIL."""
    return xxhash.xxh3_128_digest(data)


def streaming():
    """An incremental xxh3-128 (`.update(bytes)`, `.digest()`), equal to `xxh` of the whole."""
    return xxhash.xxh3_128()


class Sealer:
    """Collects the seal digests of a version's chunks as they are written. Thread-safe."""

    def __init__(self):
        self._digests: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def add(self, chunk_id: str, data: bytes | bytearray | memoryview) -> None:
        """Seal a chunk whose bytes were just verified against `chunk_id`."""
        d = xxh(data)
        with self._lock:
            self._digests[chunk_id] = d

    def encode(self, manifest: Manifest) -> bytes:
        """The seal file's bytes for `manifest` (every chunk of it must have been added)."""
        ids = manifest.unique_chunks()
        missing = [c for c in ids if c not in self._digests]
        if missing:
            raise IntegrityError(f"cannot seal {manifest.artifact}@{manifest.version}: {len(missing)} chunk(s) "
                                 f"were never written, e.g. {missing[0]}")
        return encode(manifest.id, {c: self._digests[c] for c in ids})


def encode(manifest_id: str, digests: dict[str, bytes]) -> bytes:
    """The canonical seal bytes: one chunk per line, sorted by id (docs/formats.md)."""
    head = f'{{"format": "{FORMAT}", "manifest": "{digest.check_id(manifest_id)}", "hash": "{HASH}", "chunks": {{'
    lines = [f'\n"{digest.check_id(c)}": "{digests[c].hex()}"' for c in sorted(digests)]
    return (head + ",".join(lines) + "\n}}\n").encode()


def max_size(manifest: Manifest) -> int:
    """The most bytes a reader reads of the seal of `manifest` (a bigger file is malformed)."""
    return _HEAD_BYTES + _ENTRY_BYTES * len(manifest.unique_chunks())


class Seal:
    """A decoded seal: the manifest it was written for and each chunk's digest."""

    def __init__(self, manifest_id: str, digests: dict[str, bytes]):
        self.manifest_id = manifest_id
        self.digests = digests

    def get(self, chunk_id: str) -> bytes | None:
        return self.digests.get(chunk_id)


def decode(raw: bytes) -> Seal:
    """Parse a seal file; IntegrityError if it is not one (docs/formats.md "The site seal")."""
    doc = boundedjson.decode(raw, what="the seal", error=IntegrityError)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise IntegrityError(f"the seal is not a {FORMAT} document")
    if doc.get("hash") != HASH:
        raise IntegrityError(f"the seal's hash is {str(doc.get('hash'))[:40]!r}, not {HASH}")
    manifest_id, chunks = doc.get("manifest"), doc.get("chunks")
    if not digest.is_valid(manifest_id) or not isinstance(chunks, dict):
        raise IntegrityError("the seal lacks a valid manifest id or its chunks object")
    digests = {}
    for cid, hexd in chunks.items():
        if not digest.is_valid(cid) or not isinstance(hexd, str) or len(hexd) != 2 * DIGEST_SIZE:
            raise IntegrityError(f"the seal has a bad entry for {str(cid)[:80]!r}")
        try:
            digests[cid] = bytes.fromhex(hexd)
        except ValueError:
            raise IntegrityError(f"the seal's digest for {cid} is not hex") from None
    return Seal(manifest_id, digests)
