"""Signed versions from the publisher's and the puller's side: sign and put statements through a
registry, and check what an origin serves against a trust policy before any chunk moves.

A registry here is a store's `Registry` or an origin's `RemoteRegistry` (both have
`signature`, `put_signature`, `channel`, `manifest_id`, `promote`/`rollback` with a
`statement`, `trust`/`put_trust`), so `fabric publish|promote|rollback|sign --sign-key`
work on either. `Signer` makes the statements (docs/formats.md "Signed statements"):

- a version statement after the commit (or, for `fabric sign`, a cosignature over the
  statement already held, so k-of-n signers sign one payload);
- a channel statement for each move, sequence = the channel's last + 1, computed for the
  version the move will leave on top (`fabric.store.registry.rollback_result`, the stack
  rule the store moves by) and sent with the move; a move that loses a race to another
  writer is signed again for the channel as it then is.

`Check` is the puller's side (`fabric pull --trust`, `fabric verify`): the channel
statement (for NAME:CHANNEL) and the version statement, both verified by
`fabric.trust.Verifier`, and the manifest's id, computed by the puller, compared to the
signed one. `check_ref` reads them through a registry; `check_origin` through an
`OriginClient` and hands back the check to run on the manifest before any chunk is
fetched (`fabric.pull.pull_remote`'s `on_manifest`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fabric.errors import ChannelNotFound, Conflict, FabricError, StatementMismatch
from fabric.store import signatures
from fabric.store.registry import Channel, rollback_result
from fabric.trust import (ChannelStatement, Envelope, Key, TrustPolicy, Verified, Verifier, VersionStatement,
                          digest, sign)
from fabric.trust.statements import format_time, next_channel_statement

DEFAULT_EXPIRY = 7 * 86400.0  # seconds a channel statement is valid (--statement-expiry, FABRIC_STATEMENT_EXPIRY)
_MOVE_TRIES = 5  # a signed move that lost a race is signed again this many times


@dataclass
class Signer:
    """Signs with `keys` (one, or several held by one publisher); channel statements expire after `expiry` s."""

    keys: list[Key]
    expiry: float = DEFAULT_EXPIRY

    @property
    def keyids(self) -> list[str]:
        return [k.keyid for k in self.keys]

    def sign_version(self, registry, artifact: str, version: str, manifest_id: str | None = None) -> bytes:
        """Sign `artifact@version` (or cosign the statement held for it) and put it; the envelope held now.

        The manifest id is the caller's own (`publish` computed it; `fabric sign` reads the
        manifest and hashes it), never taken from the statement held.
        """
        mid = manifest_id or registry.manifest_id(artifact, version)
        stmt = VersionStatement(artifact, version, mid)
        held = registry.signature(artifact, version)
        try:
            old = Envelope.from_bytes(held).statement if held is not None else None
        except FabricError:  # a damaged envelope: the store replaces it with this one
            old = None
        if isinstance(old, VersionStatement) and (old.artifact, old.version, old.manifest) == (
                artifact, version, mid):
            stmt = old  # cosign the same payload: a threshold counts signatures over one statement
        return registry.put_signature(artifact, version, sign(stmt, self.keys).to_bytes())

    def promote(self, registry, artifact: str, version: str, channel: str) -> Channel:
        return self._move(registry, artifact, channel, "promote", lambda ch: version,
                          lambda st: registry.promote(artifact, version, channel, statement=st))

    def rollback(self, registry, artifact: str, channel: str, *, steps: int | None = None,
                 to: str | None = None) -> Channel:
        def result(ch: Channel | None) -> str:
            if ch is None:
                raise ChannelNotFound(f"no channel {artifact}:{channel}")
            return rollback_result(ch, steps=steps, to=to)
        return self._move(registry, artifact, channel, "rollback", result,
                          lambda st: registry.rollback(artifact, channel, steps=steps, to=to, statement=st))

    def channel_statement(self, ch: Channel | None, artifact: str, channel: str, version: str, manifest_id: str,
                          action: str) -> dict:
        """The signed statement (an envelope object) for moving `ch` to `version`."""
        stmt = next_channel_statement(artifact, channel, version, manifest_id, action,
                                      ch.sequence if ch else 0, self.expiry)
        return sign(stmt, self.keys).to_json()

    def _move(self, registry, artifact: str, channel: str, action: str, result, move) -> Channel:
        for attempt in range(_MOVE_TRIES):
            try:
                ch = registry.channel(artifact, channel)
            except ChannelNotFound:
                ch = None
            version = result(ch)
            statement = self.channel_statement(ch, artifact, channel, version,
                                               registry.manifest_id(artifact, version), action)
            try:
                return move(statement)
            except Conflict:  # another writer moved the channel first: sign for it as it is now
                if attempt == _MOVE_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")


# --- the puller's side ------------------------------------------------------------------------

@dataclass
class Check:
    """What a trust policy said about one pull: filled in as each statement verifies."""

    artifact: str
    version: str | None = None
    manifest_id: str | None = None
    verified: Verified | None = None
    channel: ChannelStatement | None = None
    channel_keyids: tuple[str, ...] = ()
    delegations: int | None = None  # the delegations version taken into account
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"artifact": self.artifact, "version": self.version, "manifest_id": self.manifest_id,
               "state": "verified" if self.verified else "unverified", "delegations": self.delegations}
        if self.verified is not None:
            stmt = self.verified.statement
            out.update(keyids=list(self.verified.keyids), rule=self.verified.rule,
                       signed_at=format_time(stmt.signed_at))
        if self.channel is not None:
            c = self.channel
            out["channel"] = {"channel": c.channel, "version": c.version, "sequence": c.sequence,
                              "action": c.action, "expires": format_time(c.expires),
                              "signed_at": format_time(c.signed_at), "keyids": list(self.channel_keyids)}
        return out


def verifier_for(policy: TrustPolicy, delegations: bytes | None, check: Check, memory=None) -> Verifier:
    """A verifier of `policy`, extended by `delegations` (the origin's, verified by the policy's
    root keys) where the policy names root keys; without root keys delegations are ignored.
    `memory` (a store): delegations below the last version accepted there are refused."""
    verifier = Verifier(policy)
    if delegations is not None and policy.root_keys:
        last = signatures.seen(memory)[0] if memory is not None else 0
        stmt = verifier.verify_delegations(delegations, last_version=last)
        verifier.update_delegations(stmt)
        check.delegations = stmt.version
        if memory is not None:
            signatures.remember(memory, stmt.version, None)
    return verifier


def check_channel(verifier: Verifier, ch: Channel, check: Check, memory=None) -> str:
    """Verify `ch`'s statement; the version it signs (what the pull must fetch). With `memory`
    (a store), a sequence below (or equal to, for another statement) the last one accepted
    there is refused (`sequence_rollback`), and the accepted one is recorded."""
    last, last_digest = signatures.seen(memory, ch.artifact, ch.name) if memory is not None else (0, None)
    verified = verifier.check_channel(ch.statement_bytes, ch.artifact, ch.name, last_sequence=last,
                                      last_digest=last_digest)
    check.channel, check.channel_keyids = verified.statement, verified.keyids
    if memory is not None:
        signatures.remember(memory, verified.statement.sequence, digest(ch.statement_bytes), ch.artifact, ch.name)
    if ch.version != check.channel.version:  # the origin's history says otherwise: the signed word wins
        check.steps.append(f"channel {ch.artifact}:{ch.name} points at {ch.version}; its statement signs "
                           f"{check.channel.version}")
    return check.channel.version


def check_version(verifier: Verifier, envelope: bytes | None, artifact: str, version: str, manifest_id: str,
                  check: Check) -> Verified:
    """Verify `artifact@version`'s envelope against the manifest id the puller computed."""
    if check.channel is not None and (check.channel.version, check.channel.manifest) != (version, manifest_id):
        raise StatementMismatch(f"the channel statement signs {check.channel.version} ({check.channel.manifest}), "
                                f"not {version} ({manifest_id})")
    check.verified = verifier.verify_version(envelope, artifact, version, manifest_id)
    check.version, check.manifest_id = version, manifest_id
    return check.verified


class SigningTarget:
    """A publish `Target` (`fabric.publish`) that signs: after the commit, the version statement;
    the channel move, with a channel statement (`fabric publish --sign-key`)."""

    def __init__(self, target, signer: Signer):
        self.target, self.signer = target, signer
        self.registry = target.registry

    def offer(self, chunks, dtypes=None) -> list[int]:
        return self.target.offer(chunks, dtypes)

    def flush(self) -> None:
        self.target.flush()

    def commit(self, manifest) -> str:
        mid = self.target.commit(manifest)
        self.signer.sign_version(self.registry, manifest.artifact, manifest.version, mid)
        return mid

    def promote(self, artifact: str, version: str, channel: str) -> None:
        self.signer.promote(self.registry, artifact, version, channel)


def check_ref(registry, policy: TrustPolicy, artifact: str, version: str | None, channel: str | None,
              memory=None) -> Check:
    """Verify `artifact@version`, `artifact:channel` or the latest `artifact` through `registry`
    (its delegations, the channel's statement, the version's envelope, the manifest's own id);
    `memory`: the store that remembers what was accepted (`check_channel`)."""
    check = Check(artifact)
    verifier = verifier_for(policy, registry.trust(), check, memory)
    if channel:
        version = check_channel(verifier, registry.channel(artifact, channel), check, memory)
    elif not version:
        version = registry.resolve(artifact)
    manifest_id = registry.manifest(artifact, version).id  # hashed here (a remote manifest is checked on arrival)
    check_version(verifier, registry.signature(artifact, version), artifact, version, manifest_id, check)
    return check


async def check_origin(client, policy: TrustPolicy, artifact: str, version: str | None, channel: str | None,
                       memory=None):
    """For a pull from `client` (an `OriginClient`): (the version to pull, the `Check`, a function
    that verifies the fetched manifest and raises to refuse it). The channel statement is
    verified here (against what `memory`, the puller's store, accepted before), the
    version's envelope fetched, and the manifest checked on arrival."""
    check = Check(artifact)
    verifier = verifier_for(policy, await client.get_trust(), check, memory)
    if channel:
        version = check_channel(verifier, await client.channel(artifact, channel), check, memory)
    elif not version:
        version = await client.resolve(artifact, None, None)
    envelope = await client.get_signature(artifact, version)

    def on_manifest(manifest) -> None:
        check_version(verifier, envelope, artifact, version, manifest.id, check)
    return version, check, on_manifest
