"""The registry: artifacts, their versions, and channels.

A version is an immutable name for a manifest: `refs/<artifact>/versions/<version>`
holds the manifest id and is created once (compare-and-swap from absent). Publishing
the same content under the same version again is a no-op; different content is a
`VersionExists` error.

A channel (`prod`, `latest`) is the one mutable pointer. It keeps its history; the
current version is the top of a stack that `promote` pushes and `rollback` pops, so
repeated rollbacks walk back through earlier promotions. Every move is a
compare-and-swap, so two writers cannot lose each other's update.

A signed move carries its channel statement (a DSSE envelope, `fabric.store.signatures`)
into the ref with the move, in the same compare-and-swap: the ref's `statement` is the
envelope of the move that made its current version, and `sequence` the last signed
move's sequence number (each signed move's is the previous plus one). An unsigned move
drops the statement and keeps the sequence. A version's own envelope is kept beside its
ref and deleted with it.

A channel may also name a *staged* version (`staged`: {"version", "at"}): one the sites
following it fetch and hold without activating, so a later promote of it is only the
flip (docs/protocol.md "Staged versions"). `stage` sets it and `unstage` clears it, each
one compare-and-swap that changes neither the history, the statement nor the sequence;
any move that makes the staged version the channel's version clears it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from fabric.errors import (ArtifactNotFound, ChannelNotFound, Conflict, FabricError, InvalidInput,
                     MissingChunks, VersionExists, VersionNotFound)
from fabric.core.boundedjson import decode as decode_json
from fabric.core.manifest import Manifest, check_name
from fabric.store import fence, signatures
from fabric.store.store import Store

_CAS_TRIES = 30


@dataclass(frozen=True)
class Channel:
    artifact: str
    name: str
    history: tuple[dict, ...]  # {"action": "promote"|"rollback", "version", "at"}
    statement: dict | None = None  # the envelope of the signed move that made `version`, if it was signed
    sequence: int = 0  # the last signed move's sequence number (0: never signed)
    staged: dict | None = None  # {"version", "at"}: fetched by the sites, activated by none (`Registry.stage`)

    @property
    def stack(self) -> list[str]:
        out: list[str] = []
        for entry in self.history:
            if entry["action"] == "promote":
                out.append(entry["version"])
            elif out:
                out.pop()
        return out

    @property
    def version(self) -> str | None:
        s = self.stack
        return s[-1] if s else None

    @property
    def statement_bytes(self) -> bytes | None:
        """The channel statement's envelope as bytes (what a verifier reads), or None."""
        return None if self.statement is None else signatures.envelope_bytes(self.statement)

    def to_json(self) -> dict:
        obj = {"artifact": self.artifact, "channel": self.name, "version": self.version,
               "history": list(self.history)}
        if self.sequence:
            obj["sequence"] = self.sequence
        if self.statement is not None:
            obj["statement"] = self.statement
        if self.staged is not None:
            obj["staged"] = self.staged
        return obj

    @property
    def staged_version(self) -> str | None:
        return self.staged["version"] if self.staged else None


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Registry:
    def __init__(self, store: Store):
        self.store = store

    # --- versions ------------------------------------------------------------

    def commit(self, manifest: Manifest) -> str:
        """Record `manifest` as a version. Every chunk must already be stored.

        Fenced against gc (`fabric.store.fence`): the manifest, then an intent naming it,
        then a wait while a gc sweeps, and only then the check that every chunk is
        present, so no sweep can delete a chunk of a version after that check.
        """
        manifest.validate()
        key = _version_key(manifest.artifact, manifest.version)
        existing = self.store.get_ref(key)
        if existing is not None:
            return self._same_content(manifest, existing)
        canonical, mid = manifest.canonical(), manifest.id
        had = self.store.has_manifest(mid)
        self.store.put_manifest(mid, canonical)
        intent = fence.write_intent(self.store, mid)
        try:
            fence.wait_for_sweeps(self.store)
            missing = self.store.missing(manifest.chunk_ids())
            if missing:
                if not had:  # a refused commit leaves nothing behind
                    self.store.delete_manifest(mid)
                raise MissingChunks(
                    f"{manifest.artifact}@{manifest.version} names {len(missing)} chunk(s) the store "
                    f"lacks, e.g. {missing[0]}: upload them before committing"
                )
            if not self.store.has_manifest(mid):  # an older copy of it was collected by that sweep
                return self.commit(manifest)
            intent.check_age()
            try:
                self.store.cas_ref(key, mid.encode(), None)
            except Conflict:
                existing = self.store.get_ref(key)
                if existing is None:
                    raise Conflict(f"{manifest.artifact}@{manifest.version} changed concurrently; try again") from None
                return self._same_content(manifest, existing)
        finally:
            fence.delete_intent(self.store, intent)
        return mid

    def _same_content(self, manifest: Manifest, existing: bytes) -> str:
        """The id of the committed version if it holds what `manifest` holds, else VersionExists.

        A re-publish gets a new `created` time (and maybe another parent), so ids differ
        even for the same files; compare everything but those two fields.
        """
        mid = existing.decode()
        try:
            old = Manifest.from_bytes(self.store.get_manifest_bytes(mid))
        except FabricError:
            old = None
        if old is None or _content(old) != _content(manifest):
            raise VersionExists(
                f"{manifest.artifact}@{manifest.version} already exists with different content"
            )
        return mid

    def manifest_id(self, artifact: str, version: str) -> str:
        ref = self.store.get_ref(_version_key(artifact, version))
        if ref is None:
            if not self.versions(artifact):
                raise ArtifactNotFound(f"no artifact named {artifact!r}")
            raise VersionNotFound(f"{artifact} has no version {version!r}")
        return ref.decode()

    def manifest(self, artifact: str, version: str) -> Manifest:
        data = self.store.get_manifest_bytes(self.manifest_id(artifact, version))
        m = Manifest.from_bytes(data)
        if (m.artifact, m.version) != (artifact, version):
            raise VersionNotFound(f"ref {artifact}@{version} points at a manifest of {m.artifact}@{m.version}")
        return m

    def artifacts(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.store.list_refs("")})

    def version_keys(self) -> list[tuple[str, str]]:
        """(artifact, version) of every version in the store, from one listing (no manifest read)."""
        keys = (k.split("/") for k in self.store.list_refs(""))
        return [(k[0], k[2]) for k in keys if len(k) == 3 and k[1] == "versions"]

    def versions(self, artifact: str) -> list[str]:
        """Version names of `artifact`, oldest first (by the manifests' `created`)."""
        check_name("artifact", artifact)
        prefix = f"{artifact}/versions/"
        names = [k[len(prefix):] for k in self.store.list_refs(prefix)]
        return sorted(names, key=lambda v: (self.manifest(artifact, v).created, v))

    def latest(self, artifact: str) -> str | None:
        vs = self.versions(artifact)
        return vs[-1] if vs else None

    def delete_version(self, artifact: str, version: str) -> str:
        mid = self.manifest_id(artifact, version)
        self.store.delete_ref(_version_key(artifact, version))
        signatures.delete_signature(self.store, artifact, version)
        return mid

    # --- signatures (fabric.store.signatures) ------------------------------------

    def signature(self, artifact: str, version: str) -> bytes | None:
        """The version's envelope, or None if it has none (VersionNotFound if no such version)."""
        self.manifest_id(artifact, version)
        return signatures.get_signature(self.store, artifact, version)

    def put_signature(self, artifact: str, version: str, envelope: bytes) -> bytes:
        """Keep a version envelope (merged with the one held); the envelope now held."""
        return signatures.put_signature(self.store, artifact, version, self.manifest_id(artifact, version),
                                        envelope)

    def trust(self) -> bytes | None:
        return signatures.get_trust(self.store)

    def put_trust(self, envelope: bytes) -> int:
        return signatures.put_trust(self.store, envelope)

    def resolve(self, artifact: str, *, version: str | None = None, channel: str | None = None) -> str:
        """The version a `name@version`, `name:channel` or bare `name` refers to (`resolve_ref`)."""
        if version:
            self.manifest_id(artifact, version)  # it must exist
        return resolve_ref(self, artifact, version=version, channel=channel)

    # --- channels --------------------------------------------------------------

    def channel(self, artifact: str, name: str) -> Channel:
        raw = self.store.get_ref(_channel_key(artifact, name))
        if raw is None:
            raise ChannelNotFound(f"no channel {artifact}:{name}")
        return _channel_from(artifact, name, raw)

    def channels(self, artifact: str) -> list[Channel]:
        prefix = f"{check_name('artifact', artifact)}/channels/"
        return [self.channel(artifact, k[len(prefix):]) for k in self.store.list_refs(prefix)]

    def promote(self, artifact: str, version: str, channel: str, *, statement: dict | None = None) -> Channel:
        """Push `version` on the channel; `statement`: the move's signed channel statement (an envelope)."""
        self.manifest_id(artifact, version)  # the version must exist
        return self._move(artifact, channel, lambda ch: {"action": "promote", "version": version}, statement,
                          "promote")

    def rollback(self, artifact: str, channel: str, *, steps: int | None = None,
                 to: str | None = None, statement: dict | None = None) -> Channel:
        """Pop the channel's stack `steps` times (default 1), or until `to` is on top.

        Each pop appends one `rollback` entry, all in one compare-and-swap, so the history
        keeps the one-entry-per-pop rule readers replay (`rollback_moves`).
        """
        return self._move(artifact, channel,
                          lambda ch: rollback_moves(artifact, channel, ch.stack if ch else [], steps=steps, to=to),
                          statement, "rollback")

    def stage(self, artifact: str, version: str, channel: str) -> Channel:
        """Stage `version` on the channel (created if new): every following site fetches it and
        holds it without activating it. Unsigned even on a signed channel: it activates nothing,
        and the channel keeps its version, history, statement and sequence."""
        self.manifest_id(artifact, version)  # the version must exist
        return self._move(artifact, channel, lambda ch: [], action="stage", staged=version)

    def unstage(self, artifact: str, channel: str) -> Channel:
        """Clear the channel's staged version (nothing staged: no change); the channel must exist."""
        self.channel(artifact, channel)
        return self._move(artifact, channel, lambda ch: [], action="unstage")

    def _move(self, artifact: str, channel: str, step, statement: dict | None = None,
              action: str = "promote", staged: str | None = None) -> Channel:
        check_name("channel", channel)
        key = _channel_key(artifact, channel)
        for attempt in range(_CAS_TRIES):
            raw = self.store.get_ref(key)
            current = _channel_from(artifact, channel, raw) if raw else None
            moves = step(current)
            at = now_rfc3339()
            entries = tuple(dict(e, at=at) for e in (moves if isinstance(moves, list) else [moves]))
            history = (current.history if current else ()) + entries
            sequence = current.sequence if current else 0
            result = Channel(artifact, channel, history).version
            kept = _staged_after(artifact, channel, current, action, staged, result, at)
            signed = statement
            if action in ("stage", "unstage"):  # the version does not move: its statement stays
                if statement is not None:
                    raise InvalidInput(f"a {action} is not signed: it activates nothing (drop 'statement')")
                signed = current.statement if current else None
            elif statement is not None:  # checked against this very move, in this compare-and-swap
                sequence = signatures.check_channel_statement(
                    statement, artifact=artifact, channel=channel, version=result,
                    manifest_id=self.manifest_id(artifact, result) if result else None, action=action,
                    previous=sequence)
            new = Channel(artifact, channel, history, signed, sequence, kept)
            try:
                self.store.cas_ref(key, json.dumps(new.to_json(), sort_keys=True).encode(), raw)
                return new
            except Conflict:
                # exponential back-off with jitter: writers that collided must not retry in lockstep
                time.sleep(random.uniform(0, min(0.1, 0.002 * 2 ** attempt)))
        raise Conflict(f"channel {artifact}:{channel} kept changing; gave up after {_CAS_TRIES} tries")


def _staged_after(artifact: str, channel: str, current: Channel | None, action: str, staged: str | None,
                  result: str | None, at: str) -> dict | None:
    """The channel's `staged` after a move whose resulting version is `result`."""
    if action == "stage":
        if staged == result:
            raise InvalidInput(f"channel {artifact}:{channel} points at {staged} already: nothing to stage")
        return {"version": staged, "at": at}
    kept = current.staged if current else None
    if action == "unstage" or (kept is not None and kept["version"] == result):
        return None  # cleared, or made the channel's version by this move
    return kept


def rollback_moves(artifact: str, channel: str, stack: list[str], *, steps: int | None = None,
                   to: str | None = None) -> list[dict]:
    """The history entries a rollback of a channel whose stack is `stack` appends: one
    `rollback` entry per pop, `steps` pops (default 1) or down to the nearest `to`. The
    one stack rule: the registry moves by it and a signer computes the version it signs by
    it (`rollback_result`)."""
    if steps is not None and to is not None:
        raise InvalidInput("rollback takes steps or to, not both")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InvalidInput(f"rollback steps must be a whole number ≥ 1, not {steps!r}")
    if to is not None:
        check_name("version", to)
        if to not in stack[:-1]:
            raise InvalidInput(f"channel {artifact}:{channel} has no earlier version {to!r} to roll "
                               f"back to (its stack, oldest first: {', '.join(stack) or 'empty'})")
        n = len(stack) - 1 - max(i for i, v in enumerate(stack[:-1]) if v == to)
    else:
        n = steps or 1
        if len(stack) < 2:
            raise InvalidInput(f"channel {artifact}:{channel} has no earlier version to roll back to")
        if len(stack) < n + 1:
            raise InvalidInput(f"channel {artifact}:{channel} has only {len(stack) - 1} earlier "
                               f"version(s) on its stack; cannot roll back {n} steps")
    return [{"action": "rollback", "version": stack[-2 - i]} for i in range(n)]


def rollback_result(channel: Channel, *, steps: int | None = None, to: str | None = None) -> str:
    """The version `channel` points at after that rollback (`rollback_moves`)."""
    moves = rollback_moves(channel.artifact, channel.name, channel.stack, steps=steps, to=to)
    return Channel(channel.artifact, channel.name, channel.history + tuple(moves)).version


def _content(m: Manifest) -> dict:
    obj = m.to_json()
    del obj["created"], obj["parent"]
    return obj


def _version_key(artifact: str, version: str) -> str:
    return f"{check_name('artifact', artifact)}/versions/{check_name('version', version)}"


def _channel_key(artifact: str, channel: str) -> str:
    return f"{check_name('artifact', artifact)}/channels/{check_name('channel', channel)}"


def _channel_from(artifact: str, name: str, raw: bytes) -> Channel:
    try:
        obj = decode_json(raw, what=f"channel {artifact}:{name}")
        history = tuple(
            {"action": e["action"], "version": e["version"], "at": e["at"]} for e in obj["history"]
        )
        statement, sequence = obj.get("statement"), obj.get("sequence", 0)
        if statement is not None and not isinstance(statement, dict):
            raise TypeError("'statement' is not an envelope object")
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise TypeError("'sequence' is not a whole number")
        staged = obj.get("staged")
        if staged is not None:
            staged = {"version": check_name("version", staged["version"]), "at": str(staged["at"])}
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInput(f"channel {artifact}:{name} is unreadable ({e})") from None
    return Channel(artifact, name, history, statement, sequence, staged)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """Split `name`, `name@version` or `name:channel` into (artifact, version, channel)."""
    if "@" in ref:
        artifact, version = ref.split("@", 1)
        return check_name("artifact", artifact), check_name("version", version), None
    if ":" in ref:
        artifact, channel = ref.split(":", 1)
        return check_name("artifact", artifact), None, check_name("channel", channel)
    return check_name("artifact", ref), None, None


def resolve_ref(registry, artifact: str, *, version: str | None = None, channel: str | None = None,
                where: str = "") -> str:
    """The version `artifact@version`, `artifact:channel` or bare `artifact` names, read
    through any registry with `channel(artifact, name)` and `latest(artifact)`: this
    store's `Registry` or an origin's (`fabric.wire.client.RemoteRegistry`). A version
    is returned as given (the caller checks it exists, or lets the manifest read fail);
    `where` ends the not-found message (" at http://origin:7000").
    """
    if version:
        return version
    if channel:
        v = registry.channel(artifact, channel).version
        if v is None:
            raise ChannelNotFound(f"channel {artifact}:{channel} points at no version")
        return v
    latest = registry.latest(artifact)
    if latest is None:
        raise ArtifactNotFound(f"no artifact named {artifact!r}{where}")
    return latest
