"""Negotiation: what a receiver asks for, and what a sender makes of the asking.

Owns the delta fields of a fetch request (`request_fields`, `fetch_body`,
`parse_fields`; docs/encodings.md, "Negotiation"): a sender that cannot use them (an
old one, or one that lacks the manifests) ignores them and serves stored forms. Owns
the `X-Fabric-Encodings` answer (`parse_encodings`) and manifests as zstd patches
(`serve_manifest`, `read_manifest_body`, `manifest_base`): a receiver that holds an
older version asks for the new manifest against it, and the unchanged chunk ids, most
of a manifest, then cost almost nothing. The functions that take a store are
blocking: async callers run them in threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import zstandard

from fabric.core import digest
from fabric.core.codec import Encoding
from fabric.core.manifest import Manifest, check_name
from fabric.errors import BadFrame, CorruptChunk, FabricError, InvalidInput, NotFound
from fabric.store.registry import Registry
from fabric.store.store import Store
from fabric.wire.protocol import BASE_HEADER, ENCODINGS, MANIFEST_ID_HEADER, MANIFEST_PATCH, MAX_HAVE, MAX_MANIFEST


# --- fetch requests -------------------------------------------------------------------------

def request_fields(store: Store, manifest: Manifest, *, max_have: int = MAX_HAVE) -> dict:
    """The fields a receiver adds to its fetch requests for `manifest`'s chunks (blocking).

    `have` lists the versions of the artifact its registry holds, newest first: a
    committed version's chunks are all in the store (commit checks), so the sender
    may refer to any of them.
    """
    try:
        versions = Registry(store).versions(manifest.artifact)
    except FabricError:
        versions = []
    have = [v for v in reversed(versions) if v != manifest.version][:max_have]
    return {"artifact": manifest.artifact, "version": manifest.version, "have": have,
            "encodings": list(ENCODINGS)}


def fetch_body(ids: list[str], fields: dict | None = None, standalone: Iterable[str] = ()) -> dict:
    """A fetch request body: the ids, the receiver's fields, and the ids to send without references."""
    body: dict = {"ids": ids}
    if fields:
        body.update(fields)
        skip = set(standalone)
        if skip:
            listed = [c for c in ids if c in skip]
            if listed:
                body["standalone"] = listed
    return body


@dataclass(frozen=True)
class Fields:
    """The delta fields of one fetch request, checked."""

    artifact: str
    version: str
    have: tuple[str, ...]
    encodings: frozenset[Encoding]
    standalone: frozenset[str]


def parse_fields(body: dict) -> Fields | None:
    """The delta fields of a fetch body; None if it has none (an old receiver).

    Malformed fields are an InvalidInput: only a client that knows them sends them.
    """
    if "encodings" not in body:
        return None
    encodings = body.get("encodings")
    if not isinstance(encodings, list) or not all(isinstance(e, str) for e in encodings):
        raise InvalidInput("'encodings' must be a list of encoding names")
    known = {e for e in encodings if e in ENCODINGS}
    have = body.get("have", [])
    if not isinstance(have, list):
        raise InvalidInput("'have' must be a list of versions")
    standalone = body.get("standalone", [])
    if not isinstance(standalone, list) or not all(isinstance(c, str) for c in standalone):
        raise InvalidInput("'standalone' must be a list of chunk ids")
    return Fields(
        artifact=check_name("artifact", body.get("artifact")),
        version=check_name("version", body.get("version")),
        have=tuple(check_name("version", v) for v in have[:MAX_HAVE]),
        encodings=frozenset(Encoding.parse(e) for e in known),
        standalone=frozenset(standalone),
    )


def parse_encodings(header: str | None) -> list[str]:
    """The encodings a server's `X-Fabric-Encodings` header lists; raw and zstd without one."""
    names = [n.strip() for n in (header or "").split(",") if n.strip() in ENCODINGS]
    return names if {"raw", "zstd"} <= set(names) else ["raw", "zstd"]


# --- manifests: the new version's manifest against one the receiver holds ---------------------

def encode_manifest(canonical: bytes, base: bytes | None, *, level: int = 19) -> bytes:
    """The manifest's canonical bytes as one zstd frame, with `base` (a manifest the
    receiver holds) as its prefix: the unchanged chunk ids cost almost nothing."""
    prefix = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if base else None
    return zstandard.ZstdCompressor(level=level, dict_data=prefix, write_dict_id=False).compress(canonical)


def decode_manifest(frame: bytes, base: bytes | None, *, manifest_id: str | None = None,
                    max_size: int = MAX_MANIFEST) -> bytes:
    """The manifest bytes from `encode_manifest`'s frame, checked against `manifest_id` if given."""
    try:
        size = zstandard.frame_content_size(frame)
        if not 0 <= size <= max_size:
            raise BadFrame(f"manifest frame declares {size} bytes (at most {max_size})")
        prefix = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if base else None
        out = zstandard.ZstdDecompressor(dict_data=prefix).decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise BadFrame(f"bad manifest frame: {e}") from None
    if manifest_id is not None:
        digest.verify(manifest_id, out)
    return out


@dataclass(frozen=True)
class ManifestBase:
    """A manifest the receiver holds, offered as the base of the next one's patch."""

    version: str
    manifest_id: str
    canonical: bytes


def manifest_base(store: Store, artifact: str, exclude: str | None = None) -> ManifestBase | None:
    """The newest version of `artifact` this store's registry holds, other than `exclude` (blocking)."""
    registry = Registry(store)
    try:
        versions = [v for v in registry.versions(artifact) if v != exclude]
        if not versions:
            return None
        mid = registry.manifest_id(artifact, versions[-1])
        return ManifestBase(versions[-1], mid, store.get_manifest_bytes(mid))
    except FabricError:
        return None


def serve_manifest(store: Store, artifact: str, version: str, base: str | None) -> tuple[bytes, str, dict]:
    """Body, content type and headers answering GET …/versions/{version}?base={base} (blocking).

    With a `base` version this store holds, the body is the manifest as a zstd patch
    against it (`MANIFEST_PATCH`, base id in `BASE_HEADER`); otherwise the canonical
    JSON, as before. Raises the registry's NotFound errors for the target.
    """
    registry = Registry(store)
    mid = registry.manifest_id(artifact, version)
    canonical = store.get_manifest_bytes(mid)
    headers = {MANIFEST_ID_HEADER: mid}
    if base and base != version:
        try:
            base_id = registry.manifest_id(artifact, check_name("version", base))
            base_bytes = store.get_manifest_bytes(base_id)
        except (NotFound, InvalidInput):
            base_bytes = None
        if base_bytes is not None:
            headers[BASE_HEADER] = base_id
            return encode_manifest(canonical, base_bytes), MANIFEST_PATCH, headers
    return canonical, "application/json", headers


def read_manifest_body(body: bytes, content_type: str | None, headers, base: ManifestBase | None) -> bytes:
    """The manifest's canonical bytes from a GET …/versions/{v}[?base=] answer.

    A patch must name the base the receiver offered and decode to the id the
    server sent; anything else is a BadFrame (the caller asks again without `base`).
    """
    if (content_type or "").split(";")[0].strip() != MANIFEST_PATCH:
        return body
    if base is None or headers.get(BASE_HEADER) != base.manifest_id:
        raise BadFrame(f"manifest patch against {headers.get(BASE_HEADER)!r}, which was not offered")
    manifest_id = headers.get(MANIFEST_ID_HEADER)
    if not digest.is_valid(manifest_id):
        raise BadFrame(f"manifest patch without a valid {MANIFEST_ID_HEADER}")
    try:
        return decode_manifest(body, base.canonical, manifest_id=manifest_id)
    except CorruptChunk:
        raise BadFrame(f"manifest patch does not decode to {manifest_id}") from None


__all__ = ["request_fields", "fetch_body", "Fields", "parse_fields", "parse_encodings", "encode_manifest",
           "decode_manifest", "ManifestBase", "manifest_base", "serve_manifest", "read_manifest_body"]
