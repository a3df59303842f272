"""Signed statements in the store: each version's envelope, the newest delegations, and the
checks a keyless holder (the origin, a relay) can make before it keeps one.

Layout (docs/formats.md "Store layout"):

    sigs/<artifact>/versions/<version>   canonical DSSE envelope JSON of the version's statement
    trust/delegations                    the newest delegations envelope (canonical JSON)
    trust/seen/channels/<a>/<c>          a puller's memory: the last channel statement it accepted
    trust/seen/delegations               … and the last delegations version ({"sequence", "digest"})

A channel's statement lives inside its ref (`fabric.store.registry`); this module checks
it there (`check_channel_statement`). What is checked here is what needs no key: an
envelope parses and is canonical (`fabric.trust.Envelope`), its payload is the right kind
of statement, it names what it is stored under, and a channel statement's sequence is
the previous one plus one. No signature is verified here (the origin holds no keys: sites
and clients verify, `fabric.trust.Verifier`) and no envelope is rewritten: a second
envelope for the same payload adds its signatures (`Envelope.merge`), a different payload
is a `Conflict`. Every write is a compare-and-swap, so two cosigners cannot lose each
other's signature.
"""

from __future__ import annotations

import json
from typing import Iterator

from fabric.core.manifest import check_name
from fabric.errors import (Conflict, FabricError, NotFound, SignatureNotFound, StatementMalformed,
                           StatementMismatch)
from fabric.store.backend import ObjectInfo
from fabric.trust import ChannelStatement, DelegationsStatement, Envelope, VersionStatement, canonical

TRUST_KEY = "trust/delegations"
_CAS_TRIES = 30


def signature_key(artifact: str, version: str) -> str:
    return f"sigs/{check_name('artifact', artifact)}/versions/{check_name('version', version)}"


def open_envelope(data: bytes, kind: type) -> tuple[Envelope, dict]:
    """`data` parsed as an envelope whose payload is a `kind` statement: (envelope, payload object).

    Raises StatementMalformed / StatementNotCanonical (`fabric.trust.Envelope`) for bytes
    that are not one.
    """
    env = Envelope.from_bytes(data)  # bounded, canonical, at most 16 signatures, canonical payload
    if not isinstance(env.statement, kind):  # strict: fields and types
        raise StatementMalformed(f"the envelope holds a {env.statement._type} statement, not a {kind._type} one")
    return env, json.loads(env.payload)


def envelope_bytes(obj: dict) -> bytes:
    """An envelope that travelled as a JSON object (inside a channel ref or a move) as its bytes."""
    try:
        return canonical(obj)
    except (TypeError, ValueError) as e:
        raise StatementMalformed(f"the statement is not an envelope ({e})") from None


def _mismatch(what: str, field: str, got: object, want: object) -> StatementMismatch:
    return StatementMismatch(f"{what} says {field} {str(got)[:120]!r}, but it is stored for {want!r}")


# --- version envelopes -----------------------------------------------------------------------

def get_signature(store, artifact: str, version: str) -> bytes | None:
    try:
        return store.backend.get(signature_key(artifact, version))
    except NotFound:
        return None


def require_signature(store, artifact: str, version: str) -> bytes:
    data = get_signature(store, artifact, version)
    if data is None:
        raise SignatureNotFound(f"{artifact}@{version} has no signature")
    return data


def put_signature(store, artifact: str, version: str, manifest_id: str, data: bytes) -> bytes:
    """Keep `data`, a version envelope for `artifact@version` (whose manifest is `manifest_id`),
    merged with the envelope already held for the same payload; the envelope now held."""
    env, stmt = open_envelope(data, VersionStatement)
    what = f"the statement for {artifact}@{version}"
    for field, want in (("artifact", artifact), ("version", version), ("manifest", manifest_id)):
        if stmt.get(field) != want:
            raise _mismatch(what, field, stmt.get(field), want)
    key = signature_key(artifact, version)
    for _ in range(_CAS_TRIES):
        old = get_signature(store, artifact, version)
        new = data
        if old is not None:
            try:
                held, held_stmt = open_envelope(old, VersionStatement)
            except FabricError:  # a damaged envelope (fsck reports it): a valid one replaces it
                held, held_stmt = None, None
            if held_stmt is not None and held_stmt != stmt:
                raise Conflict(f"{artifact}@{version} is already signed over another statement "
                               f"(signed_at {held_stmt.get('signed_at')}); sign that one (fabric sign)")
            if held is not None:
                new = held.merge(env).to_bytes()
            if new == old:
                return old
        try:
            store.backend.put_if(key, new, old)
            return new
        except Conflict:
            continue
    raise Conflict(f"the signature of {artifact}@{version} kept changing; try again")


def delete_signature(store, artifact: str, version: str) -> None:
    store.backend.delete(signature_key(artifact, version))


def iter_signatures(store) -> Iterator[tuple[str, str, ObjectInfo]]:
    """(artifact, version, object) of every version envelope held."""
    for info in store.backend.list("sigs/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[2] == "versions":
            yield parts[1], parts[3], info


# --- channel statements (inside the channel ref) ------------------------------------------------

def check_channel_statement(envelope: object, *, artifact: str, channel: str, version: str | None,
                            manifest_id: str | None, action: str, previous: int) -> int:
    """The sequence of `envelope` (a JSON object), a channel statement for the move that makes
    `artifact:channel` point at `version`, which must be `previous` + 1.

    StatementMismatch where it names another artifact, channel, version, manifest or action;
    Conflict where its sequence is not the next (the channel moved meanwhile: sign again).
    """
    if not isinstance(envelope, dict):
        raise StatementMalformed("'statement' must be an envelope object")
    _, stmt = open_envelope(envelope_bytes(envelope), ChannelStatement)
    what = f"the statement for {artifact}:{channel}"
    wants = (("artifact", artifact), ("channel", channel), ("version", version), ("manifest", manifest_id),
             ("action", action))
    for field, want in wants:
        if stmt.get(field) != want:
            raise _mismatch(what, field, stmt.get(field), want)
    if stmt["sequence"] != previous + 1:
        raise Conflict(f"{what} has sequence {stmt['sequence']}, but the move needs {previous + 1} "
                       f"(the channel's last signed move was {previous}): sign the move again")
    return stmt["sequence"]


# --- delegations ------------------------------------------------------------------------------

def get_trust(store) -> bytes | None:
    try:
        return store.backend.get(TRUST_KEY)
    except NotFound:
        return None


def delegations_version(data: bytes) -> int:
    return open_envelope(data, DelegationsStatement)[1]["version"]


def put_trust(store, data: bytes) -> int:
    """Keep `data`, a delegations envelope, if its version is above the one held; its version."""
    version = delegations_version(data)
    for _ in range(_CAS_TRIES):
        old = get_trust(store)
        if old is not None:
            try:
                held = delegations_version(old)
            except FabricError:
                held = 0
            if version <= held:
                raise Conflict(f"the delegations held are version {held}; a new one must be above it "
                               f"(this is {version})")
        try:
            store.backend.put_if(TRUST_KEY, data, old)
            return version
        except Conflict:
            continue
    raise Conflict("the delegations kept changing; try again")


# --- a puller's memory of what it accepted (rollback and replay protection) ---------------------

def seen(store, artifact: str | None = None, channel: str | None = None) -> tuple[int, str | None]:
    """(sequence, digest) of the last channel statement (or, without a channel, the last
    delegations version) this store's puller accepted; (0, None) if none."""
    try:
        obj = json.loads(store.backend.get(_seen_key(artifact, channel)))
        return int(obj["sequence"]), obj.get("digest")
    except (NotFound, ValueError, KeyError, TypeError):
        return 0, None


def remember(store, sequence: int, digest: str | None, artifact: str | None = None,
             channel: str | None = None) -> None:
    """Record an accepted statement's sequence (never lowering what is recorded)."""
    if sequence >= seen(store, artifact, channel)[0]:
        store.backend.put(_seen_key(artifact, channel),
                          json.dumps({"sequence": sequence, "digest": digest}, sort_keys=True).encode())


def _seen_key(artifact: str | None, channel: str | None) -> str:
    if channel is None:
        return "trust/seen/delegations"
    return f"trust/seen/channels/{check_name('artifact', artifact)}/{check_name('channel', channel)}"
