"""Verification: is this envelope a statement the trust policy accepts for what is asked?

The algorithm (docs/formats.md "Verification", step by step there):

1. No envelope: `Unsigned`. Parse it (bounded, canonical, DSSE): `StatementMalformed`,
   `StatementNotCanonical`.
2. The payload is the kind asked for and names exactly the artifact (version, channel,
   manifest) asked for, else `StatementMismatch` (mix-and-match).
3. Signatures: each by a revoked key is set aside, each by an unknown key is set aside,
   each by a known key is checked over the PAE bytes. The statement is accepted when
   some rule whose globs match the artifact (and channel) has at least `threshold` of
   its keys among the valid signers. Otherwise, in this order: no signatures →
   `Unsigned`; a known key's signature does not verify → `SignatureInvalid`; a revoked
   key signed → `KeyRevoked`; some valid in-scope signers but too few →
   `ThresholdNotMet`; valid signers none of whose rules match → `KeyOutOfScope`; only
   unknown keys → `UnknownKey`.
4. Channel statements: sequence below the last accepted, or equal with another
   payload digest → `SequenceRollback`; `expires` at or before now → `StatementExpired`
   (carrying the statement, so a site can say "stale" and what it last had).
   Delegations: version below the last accepted → `SequenceRollback`; expired →
   `StatementExpired`.

Pure and cheap (one Ed25519 verification per signature, ~0.1 ms): callable on an event
loop's activation path, though callers on one may still use a thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from fabric.errors import (KeyOutOfScope, KeyRevoked, SequenceRollback, SignatureInvalid, StatementExpired,
                           StatementMismatch, ThresholdNotMet, UnknownKey, Unsigned)
from fabric.trust.envelope import Envelope, digest, load
from fabric.trust.policy import TrustPolicy
from fabric.trust.statements import (ChannelStatement, DelegationsStatement, Rule, Statement, VersionStatement,
                                     format_time, next_channel_statement)


class TrustState:
    """What a site or client says about a channel's or version's signatures."""

    VERIFIED = "verified"  # accepted by the trust policy
    UNSIGNED = "unsigned"  # no trust policy in force: accepted without signatures, loudly
    STALE = "stale"  # the last accepted channel statement has expired; its version keeps serving
    REFUSED = "refused"  # the newest statement was refused; the last good version keeps serving


@dataclass(frozen=True)
class Verified:
    """An accepted statement, the keyids whose signatures counted, and the index of the rule they met."""

    statement: Statement
    keyids: tuple[str, ...]
    rule: int


EnvelopeInput = bytes | Envelope | dict | None


class Verifier:
    """Checks envelopes against a trust policy (plus the newest delegations, once known)."""

    def __init__(self, policy: TrustPolicy, now: Callable[[], float] = time.time):
        self.policy = policy
        self.now = now

    def update_delegations(self, stmt: DelegationsStatement) -> None:
        """Apply an accepted delegations statement (it replaces any earlier one)."""
        self.policy = self.policy.with_delegations(stmt)

    # --- the three kinds ----------------------------------------------------------

    def verify_version(self, envelope_bytes: EnvelopeInput, artifact: str, version: str,
                       manifest_id: str) -> Verified:
        """Accept a version statement for artifact@version with this manifest id, or raise."""
        what = f"{artifact}@{version}"
        env = self._envelope(envelope_bytes, what)
        stmt = env.statement
        if not isinstance(stmt, VersionStatement):
            raise StatementMismatch(f"{what}: the envelope holds a {stmt._type} statement, not a version statement")
        _same(what, "artifact", stmt.artifact, artifact)
        _same(what, "version", stmt.version, version)
        _same(what, "manifest", stmt.manifest, manifest_id)
        return self._authorize(env, stmt, self.policy.rules_for(artifact), what)

    def verify_channel(self, envelope_bytes: EnvelopeInput, artifact: str, channel: str, *,
                       last_sequence: int = 0, last_digest: str | None = None,
                       version: str | None = None, manifest_id: str | None = None) -> ChannelStatement:
        """Accept a channel statement for artifact:channel, or raise (see the module's steps).

        Args:
            last_sequence, last_digest: the sequence and `digest` of the last statement this
                caller accepted for the channel (0, None: none yet).
            version, manifest_id: when given, what the channel is said to point at; the
                statement must name the same.
        """
        return self.check_channel(envelope_bytes, artifact, channel, last_sequence=last_sequence,
                                  last_digest=last_digest, version=version, manifest_id=manifest_id).statement

    def check_channel(self, envelope_bytes: EnvelopeInput, artifact: str, channel: str, *,
                      last_sequence: int = 0, last_digest: str | None = None,
                      version: str | None = None, manifest_id: str | None = None) -> Verified:
        """`verify_channel`, returning the `Verified` (keyids and rule) too."""
        what = f"{artifact}:{channel}"
        env = self._envelope(envelope_bytes, what)
        stmt = env.statement
        if not isinstance(stmt, ChannelStatement):
            raise StatementMismatch(f"{what}: the envelope holds a {stmt._type} statement, not a channel statement")
        _same(what, "artifact", stmt.artifact, artifact)
        _same(what, "channel", stmt.channel, channel)
        if version is not None:
            _same(what, "version", stmt.version, version)
        if manifest_id is not None:
            _same(what, "manifest", stmt.manifest, manifest_id)
        verified = self._authorize(env, stmt, self.policy.rules_for(artifact, channel), what)
        if stmt.sequence < last_sequence:
            raise SequenceRollback(f"{what}: statement sequence {stmt.sequence} is below the last accepted "
                                   f"{last_sequence} (a rollback or replay of an older move)")
        if stmt.sequence == last_sequence and last_digest is not None and env.digest != last_digest:
            raise SequenceRollback(f"{what}: statement sequence {stmt.sequence} was already accepted for another "
                                   "statement (a replay or two moves signed with one sequence)")
        self._fresh(stmt, what)
        return verified

    def verify_delegations(self, envelope_bytes: EnvelopeInput, last_version: int = 0) -> DelegationsStatement:
        """Accept a delegations statement signed by the trust file's root keys (at their threshold)."""
        what = "delegations"
        env = self._envelope(envelope_bytes, what)
        stmt = env.statement
        if not isinstance(stmt, DelegationsStatement):
            raise StatementMismatch(f"{what}: the envelope holds a {stmt._type} statement, not delegations")
        base = self.policy.base()
        scoped = [(-1, Rule(("*",), ("*",), tuple(base.root_keys), base.root_threshold))] if base.root_keys else []
        self._authorize(env, stmt, scoped, what, scope="as root (the trust file's [root] keys)")
        if stmt.version < last_version:
            raise SequenceRollback(f"{what}: version {stmt.version} is below the last accepted {last_version}")
        self._fresh(stmt, what)
        return stmt

    # --- the steps ----------------------------------------------------------------

    def _envelope(self, data: EnvelopeInput, what: str) -> Envelope:
        if data is None:
            raise Unsigned(f"{what} is not signed, and the trust policy requires a signature")
        return load(data)

    def _fresh(self, stmt: ChannelStatement | DelegationsStatement, what: str) -> None:
        now = self.now()
        if stmt.expires <= now:
            raise StatementExpired(f"{what}: the signed statement expired at {format_time(stmt.expires)} "
                                   f"(now {format_time(now)}); the publisher must sign a fresh one", statement=stmt)

    def _authorize(self, env: Envelope, stmt: Statement, scoped: list[tuple[int, Rule]], what: str,
                   scope: str | None = None) -> Verified:
        policy = self.policy
        valid: set[str] = set()
        bad, revoked, unknown = [], [], []
        data = env.pae
        for s in env.signatures:
            if s.keyid in policy.revoked:
                revoked.append(s.keyid)
                continue
            pub = policy.public(s.keyid)
            if pub is None:
                unknown.append(s.keyid)
            elif pub.verify(s.sig, data):
                valid.add(s.keyid)
            else:
                bad.append(s.keyid)
        best: tuple[int, Rule, int] | None = None
        for i, rule in scoped:
            got = tuple(k for k in rule.keys if k in valid)
            if len(got) >= rule.threshold:
                return Verified(stmt, got, i)
            if got and (best is None or len(got) > best[2]):
                best = (i, rule, len(got))
        if not env.signatures:
            raise Unsigned(f"{what}: the envelope carries no signatures")
        if bad:
            raise SignatureInvalid(f"{what}: the signature of {self._names(bad)} does not verify "
                                   "(the statement or signature was altered)")
        if revoked:
            raise KeyRevoked(f"{what}: signed by revoked key {self._names(revoked)}")
        if best is not None:
            raise ThresholdNotMet(f"{what}: {best[2]} valid signature(s) of the {best[1].threshold} its rule "
                                  f"needs (rule for {', '.join(best[1].artifacts)})")
        if valid:
            where = scope or f"for {what.split('@')[0]}"
            raise KeyOutOfScope(f"{what}: signed by {self._names(sorted(valid))}, which no rule trusts {where}")
        raise UnknownKey(f"{what}: signed only by keys the trust policy does not know ({self._names(unknown)})")

    def _names(self, keyids) -> str:
        out = []
        for k in keyids:
            entry = self.policy.keys.get(k)
            out.append(f"{entry.name} ({k[:16]}…)" if entry and entry.name else f"{k[:16]}…")
        return ", ".join(out)


def _same(what: str, field: str, signed: str, asked: str) -> None:
    if signed != asked:
        raise StatementMismatch(f"{what}: the signed statement says {field} {signed!r}, not {asked!r}")


__all__ = ["TrustState", "Verified", "Verifier", "digest", "next_channel_statement"]
