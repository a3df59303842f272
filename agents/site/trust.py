"""Trust at the site: the signed statements a site checks before it fetches a version, and
again before it activates one (docs/trust.md "At the site").

With a trust policy (`trust = "FILE"` in site.toml) every deploy starts from the
followed channel's statement, read from the origin's channel JSON (`statement`):

1. `resolve` verifies it (`fabric.trust.Verifier.verify_channel`: trusted keys in scope,
   threshold, revocation, expiry, and a sequence not below the last one accepted here,
   with the same envelope when equal) and returns the version it names;
2. `check_version`, once the manifest is fetched and before any chunk, checks that the
   manifest's id is the one the statement signed, then takes the version's envelope —
   kept here, else through the control chain (`agents.site.control.UpstreamChain`: the
   upstream relays, the origin last; concurrent asks share one request), else from the
   peers; only if the chain's envelope does not verify, from each of the site's sources
   on its own (relays, peers, the origin last) — the first that verifies — and verifies
   it for (artifact, version, manifest id);
3. `recheck`, right before `current/<artifact>` flips, verifies both again (a key
   revoked or a statement expired meanwhile), and `accept` records the channel's
   sequence and envelope digest and keeps the version's envelope, which the site serves
   to the sites below it untouched (`routes`), so they verify end to end.

A refusal (`fabric.errors.SignatureError`) activates nothing: the active version keeps
serving, the channel says `trust: "refused"` with `trust_error`, and
`fabric_agent_signature_refusals_total{code}` counts it, once per refused statement. A
channel whose accepted statement has expired says `"stale"` and keeps serving its
version (an origin that withholds new moves is seen, not obeyed). At every resync the
site asks the origin for newer root-signed delegations (`GET /v1/trust`).

Without a policy every channel says `"unsigned"`, the agent warns at start, and it still
keeps and re-serves the envelopes it can get, unverified, for the sites below it.

Its files (each written to a temp name, fsynced and renamed):

    <data>/trust/state.json          {"channels": {"A:C": {"sequence", "digest" (of the payload),
                                      "version", "manifest", "expires" (Unix s)}}, "delegations": N}
    <data>/trust/delegations         the newest delegations envelope accepted
    <data>/trust/versions/<A>/<V>    each kept version's envelope, as received
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from fabric.core.manifest import Manifest, check_name
from fabric.errors import (FabricError, SignatureError, from_code, SignatureNotFound, StatementExpired, StatementMalformed,
                           StatementMismatch, TrustNotFound, Unsigned)
from fabric.logs import get_logger
from fabric.trust import ChannelStatement, Envelope, TrustPolicy, Verifier, digest
from fabric.trust.envelope import load
from fabric.trust.statements import format_time
from fabric.wire.client import OriginClient
from fabric.wire.protocol import ARTIFACTS, ENVELOPE, PEER_HEADER, TRUST
from fabric.wire.server import principal

from agents.site.follow import ChannelStatus
from agents.site.layout import Layout
from agents.site.metrics import AgentMetrics

log = get_logger("agent")
SIGNATURE = ARTIFACTS + "/{artifact}/versions/{version}/signature"


@dataclass
class Claim:
    """A verified channel statement on its way to activation, and the envelopes it came in."""

    statement: ChannelStatement
    envelope: Envelope
    version_envelope: bytes | None = None

    @property
    def version(self) -> str:
        return self.statement.version


class SiteTrust:
    """The site's verifier, what it accepted (persisted), and the trust state of each channel."""

    def __init__(self, policy: TrustPolicy | None, layout: Layout, origin: OriginClient, sources: list[OriginClient],
                 metrics: AgentMetrics, channels: dict[str, ChannelStatus], policy_file: Path | None = None):
        self.origin, self.sources, self.metrics, self.channels = origin, sources, metrics, channels
        self.policy_file, self.layout = policy_file, layout
        self.dir = layout.trust
        self.accepted: dict[str, dict] = {}  # "artifact:channel" -> the last statement accepted
        self.delegations = 0  # the newest delegations version accepted
        self.error: dict | None = None  # the last refusal of a delegations envelope
        self._refused: dict[str, tuple[str, str]] = {}  # key -> (code, digest) counted last
        self._delegations_digest: str | None = None
        self._save_turn = asyncio.Lock()
        self._shown: dict[tuple[str, str], tuple] = {}  # (artifact, channel) -> (trust, expires) last set
        self.verifier = self._start(policy)
        for ch in channels.values():
            self._show(ch)

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    # --- start-up -------------------------------------------------------------------------

    def _start(self, policy: TrustPolicy | None) -> Verifier | None:
        """The verifier of `policy` with the delegations kept here (blocking: at start-up)."""
        if policy is None:
            log.warning("unsigned: no trust policy (site.toml `trust`); this site accepts and activates "
                        "versions that nobody signed, from whoever answers as its origin")
            return None
        try:
            raw = json.loads((self.dir / "state.json").read_text())
            self.accepted = {str(k): dict(v) for k, v in raw.get("channels", {}).items()}
            self.delegations = int(raw.get("delegations", 0))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as e:
            log.error("trust state unreadable; starting without rollback history", file=str(self.dir / "state.json"),
                      error=repr(e))
        verifier = Verifier(policy)
        try:
            envelope = (self.dir / "delegations").read_bytes()
        except FileNotFoundError:
            return verifier
        try:
            verifier.update_delegations(verifier.verify_delegations(envelope, 0))
            self._delegations_digest = digest(envelope)
        except StatementExpired as e:  # its keys no longer count, its revocations still do
            for keyid in getattr(e.statement, "revoked", ()) or ():
                policy.revoke(keyid)
            verifier = Verifier(policy)
            log.warning("the delegations kept here have expired; their revocations still hold", error=e.message)
        except SignatureError as e:
            log.error("the delegations kept here do not verify; ignored", code=e.code, error=e.message)
        return verifier

    # --- the checks of a deploy ----------------------------------------------------------------

    async def resolve(self, ch: ChannelStatus) -> Claim | None:
        """The verified statement of a move to deploy; None when there is none (nothing new,
        stale, refused, unreachable). Never raises."""
        a, c = ch.artifact, ch.channel
        try:
            raw = await self.origin.call("GET", f"{ARTIFACTS}/{a}/channels/{c}")
        except FabricError as e:
            ch.error = f"{e.code}: {e.message}"
            return None
        envelope: Envelope | None = None
        acc = self.accepted.get(f"{a}:{c}", {})
        try:
            if not isinstance(raw, dict):
                raise StatementMalformed(f"the answer for channel {a}:{c} is not a JSON object")
            obj = raw.get("statement")
            envelope = None if obj is None else load(obj)  # the channel JSON's `statement` object
            try:
                stmt = self.verifier.verify_channel(envelope, a, c, last_sequence=int(acc.get("sequence", 0)),
                                                    last_digest=acc.get("digest"))
            except StatementExpired as e:
                said = e.statement
                if envelope is not None and envelope.digest == acc.get("digest") and \
                        getattr(said, "version", None) == ch.active:
                    self._set(ch, "stale")
                    return None
                raise
            if raw.get("version") != stmt.version:
                raise StatementMismatch(f"the origin says {a}:{c} points at {raw.get('version')!r}; its signed "
                                        f"statement says {stmt.version!r}")
        except SignatureError as e:
            self.refuse(ch, e, envelope)
            return None
        except Exception as e:  # noqa: BLE001 - whatever an origin sends must not end the deploy loop
            log.error("unexpected error checking a channel statement", artifact=a, channel=c, error=repr(e)[:300])
            return None
        claim = Claim(stmt, envelope)
        if stmt.version == ch.active:
            await self.accept(ch, claim)
            return None
        ch.target = stmt.version  # what the signed move names
        return claim

    async def check_version(self, ch: ChannelStatus, claim: Claim, manifest: Manifest) -> None:
        """Before any chunk: the manifest is the one signed, and the version's own statement verifies."""
        if manifest.id != claim.statement.manifest:
            raise StatementMismatch(f"the manifest of {ch.artifact}@{claim.version} has id {manifest.id}; the "
                                    f"channel statement signed {claim.statement.manifest}")
        claim.version_envelope = await self._version_envelope(ch.artifact, claim.version, manifest.id)

    async def check_staged(self, artifact: str, version: str, manifest: Manifest) -> bytes:
        """Before any chunk of a staged version (`agents.site.staging`): its own statement verifies
        for this manifest, as in `check_version` (no channel statement names it yet). The envelope."""
        return await self._version_envelope(artifact, version, manifest.id)

    async def keep(self, artifact: str, version: str, envelope: bytes) -> None:
        """Keep a verified version envelope (a staged version's), for the deploy and the sites below."""
        await asyncio.to_thread(_write_atomic, self.signature_path(artifact, version), envelope)

    def recheck(self, ch: ChannelStatus, claim: Claim) -> None:
        """Right before activation: both statements still verify (now, with what is known now)."""
        acc = self.accepted.get(f"{ch.artifact}:{ch.channel}", {})
        self.verifier.verify_channel(claim.envelope, ch.artifact, ch.channel,
                                     last_sequence=int(acc.get("sequence", 0)), last_digest=acc.get("digest"))
        self.verifier.verify_version(claim.version_envelope, ch.artifact, claim.version, claim.statement.manifest)

    async def accept(self, ch: ChannelStatus, claim: Claim) -> None:
        """Record the statement as the channel's last accepted one (its sequence guards against
        rollback from now on) and keep the version's envelope."""
        s, key = claim.statement, f"{ch.artifact}:{ch.channel}"
        record = {"sequence": s.sequence, "digest": claim.envelope.digest, "version": s.version,
                  "manifest": s.manifest, "expires": s.expires}
        if self.accepted.get(key) != record:
            self.accepted[key] = record
            await self._save_state()
            log.info("channel statement accepted", artifact=ch.artifact, channel=ch.channel, version=s.version,
                     sequence=s.sequence, expires=s.expires)
        if claim.version_envelope is not None:
            await asyncio.to_thread(_write_atomic, self.signature_path(ch.artifact, s.version), claim.version_envelope)
        self._refused.pop(key, None)
        self._set(ch, "verified")

    async def keep_unverified(self, artifact: str, version: str) -> None:
        """Without a policy: keep the version's envelope as some source has it, for the sites below."""
        for src in self.sources:
            try:
                envelope = await src.get_signature(artifact, version)
            except FabricError:
                continue
            if envelope is not None:
                await asyncio.to_thread(_write_atomic, self.signature_path(artifact, version), envelope)
                return

    def refuse(self, ch: ChannelStatus, e: SignatureError, envelope: Envelope | None = None) -> None:
        """Show and count a refusal (each refused statement once); the active version keeps serving."""
        key = f"{ch.artifact}:{ch.channel}"
        ch.trust, ch.error = "refused", f"{e.code}: {e.message}"
        ch.trust_error = {"code": e.code, "message": e.message}
        self._metrics(ch)
        mark = (e.code, envelope.digest if envelope is not None else "")
        if self._refused.get(key) != mark:
            self._refused[key] = mark
            self.metrics.signature_refusals.labels(e.code).inc()
            log.error("signed statement refused; the active version keeps serving", artifact=ch.artifact,
                      channel=ch.channel, active=ch.active, code=e.code, error=e.message)

    # --- delegations (key rotation and revocation) ---------------------------------------------

    async def refresh_delegations(self) -> None:
        """Take newer root-signed delegations from the origin (`GET /v1/trust`), if it has any."""
        if not self.enabled:
            return
        try:
            envelope = await self.origin.get_trust()
        except FabricError as e:
            log.warning("cannot read the origin's delegations", error=e.message)
            return
        if envelope is None or digest(envelope) == self._delegations_digest:
            return
        try:
            stmt = self.verifier.verify_delegations(envelope, self.delegations)
        except SignatureError as e:
            self.error = {"code": e.code, "message": e.message}
            if self._refused.get("delegations") != (e.code, digest(envelope)):
                self._refused["delegations"] = (e.code, digest(envelope))
                self.metrics.signature_refusals.labels(e.code).inc()
                log.error("delegations refused", code=e.code, error=e.message)
            return
        self._delegations_digest, self.error = digest(envelope), None
        if stmt.version > self.delegations:
            self.verifier.update_delegations(stmt)
            self.delegations = stmt.version
            await asyncio.to_thread(_write_atomic, self.dir / "delegations", envelope)
            await self._save_state()
            log.info("delegations accepted", version=stmt.version, keys=len(stmt.keys), revoked=len(stmt.revoked))

    # --- state, status and metrics -----------------------------------------------------------------

    def signature_path(self, artifact: str, version: str) -> Path:
        return self.layout.signature_path(artifact, version)  # removed with the version (retention)

    async def _save_state(self) -> None:
        async with self._save_turn:
            data = json.dumps({"channels": self.accepted, "delegations": self.delegations}, indent=1).encode()
            await asyncio.to_thread(_write_atomic, self.dir / "state.json", data)

    def _set(self, ch: ChannelStatus, state: str) -> None:
        ch.trust, ch.trust_error = state, None
        if ch.error and isinstance(from_code(ch.error.split(":", 1)[0], ""), SignatureError):
            ch.error = None
        self._metrics(ch)

    def _show(self, ch: ChannelStatus) -> None:
        """The state a channel starts with: unsigned, or what was accepted for its active version."""
        acc = self.accepted.get(f"{ch.artifact}:{ch.channel}")
        if not self.enabled:
            ch.trust = "unsigned"
        elif acc and acc.get("version") == ch.active:
            ch.trust = "verified"
        self._metrics(ch)

    def tick(self) -> None:
        """A verified channel whose statement has expired since is stale (no network: called often)."""
        for ch in self.channels.values():
            acc = self.accepted.get(f"{ch.artifact}:{ch.channel}", {})
            if ch.trust == "verified" and int(acc.get("expires", 0)) <= time.time():
                ch.trust = "stale"
                log.warning("channel statement expired: this site keeps serving its version and says stale",
                            artifact=ch.artifact, channel=ch.channel, active=ch.active, expired=ch.statement_expires)
            self._metrics(ch)

    async def watch(self, interval: float = 1.0) -> None:
        """Run `tick` for the agent's life."""
        while True:
            self.tick()
            await asyncio.sleep(interval)

    def _metrics(self, ch: ChannelStatus) -> None:
        acc = self.accepted.get(f"{ch.artifact}:{ch.channel}")
        expires = int(acc.get("expires", 0)) if acc else 0
        shown = (ch.trust, expires)
        if self._shown.get((ch.artifact, ch.channel)) == shown:
            return  # `tick` calls this every second: a thousand in-process sites spent 6 label lookups each
        self._shown[(ch.artifact, ch.channel)] = shown
        ch.statement_expires = format_time(expires) if expires else None
        labels = (ch.artifact, ch.channel)
        if expires:
            self.metrics.statement_expiry.labels(*labels).set(expires)
        self.metrics.channel_stale.labels(*labels).set(1 if ch.trust == "stale" else 0)
        for state in _STATES:
            self.metrics.channel_trust.labels(*labels, state).set(1 if ch.trust == state else 0)

    def status(self) -> dict:
        return {"policy": str(self.policy_file) if self.policy_file else None, "delegations": self.delegations,
                "error": self.error}

    # --- fetching envelopes ----------------------------------------------------------------------------

    async def _version_envelope(self, artifact: str, version: str, manifest_id: str) -> bytes:
        """The first envelope that verifies: the one kept here, then the control chain's (through the
        upstream relays, one ask for all concurrent ones: `UpstreamChain.get_signature`), then the
        peers'; each chained source on its own (the origin too) only if the chain's did not verify."""
        first_error: SignatureError | None = None
        async for envelope in self._envelopes(artifact, version):
            try:
                self.verifier.verify_version(envelope, artifact, version, manifest_id)
                return envelope
            except SignatureError as e:
                first_error = first_error or e
        raise first_error or Unsigned(f"no source has a signature for {artifact}@{version}")

    async def _envelopes(self, artifact: str, version: str):
        """The candidates of `_version_envelope`, in order, each fetched only once the one before is refused."""
        if (kept := await self._kept(artifact, version)) is not None:
            yield kept
        chain = await self._fetch(self.origin, artifact, version)
        if chain is not None:
            yield chain
        for source in self._beside():
            if (envelope := await self._fetch(source, artifact, version)) is not None:
                yield envelope
        if chain is None:
            return  # nobody up the chain has one: asking each of them again would cost the origin one per site
        chained = self._chained()
        for source in self.sources:
            if source.url in chained and (envelope := await self._fetch(source, artifact, version)) is not None:
                yield envelope

    def _chained(self) -> set[str]:
        """The URLs the control chain asks (relays, origins): its answer speaks for them."""
        return {c.url for c in getattr(self.origin, "sources", [self.origin])}

    def _beside(self) -> list[OriginClient]:
        """The sources the control chain does not ask (peers: they answer from what they hold)."""
        chained = self._chained()
        return [s for s in self.sources if s is not self.origin and s.url not in chained]

    async def _kept(self, artifact: str, version: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self.signature_path(artifact, version).read_bytes)
        except FileNotFoundError:
            return None

    @staticmethod
    async def _fetch(source: OriginClient, artifact: str, version: str) -> bytes | None:
        try:
            return await source.get_signature(artifact, version)
        except FabricError as e:
            log.debug("no signature from source", source=source.url, artifact=artifact, version=version,
                      error=e.message)
            return None

    # --- relaying envelopes ---------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """Serve signed statements on the origin's paths, byte for byte as received: a version's
        envelope kept here (else its sources', passed through), the upstream's delegations."""
        app.router.add_get(SIGNATURE, self._serve_signature)
        app.router.add_get(TRUST, self._serve_trust)

    async def _serve_signature(self, request: web.Request) -> web.Response:
        artifact = check_name("artifact", request.match_info["artifact"])
        version = check_name("version", request.match_info["version"])
        principal(request).require("pull", artifact)
        envelope = await self._kept(artifact, version)
        if envelope is None and not request.headers.get(PEER_HEADER):  # pass through, untouched
            for src in [self.origin, *self._beside()]:  # the chain shares concurrent asks: one goes up
                if (envelope := await self._fetch(src, artifact, version)) is not None:
                    break
        if envelope is None:
            raise SignatureNotFound(f"this site holds no signature for {artifact}@{version}")
        return web.Response(body=envelope, content_type=ENVELOPE)

    async def _serve_trust(self, request: web.Request) -> web.Response:
        """The upstream's delegations, passed through untouched (sites below may trust other root
        keys than this one, or this one none); the ones kept here while the upstream is out of reach."""
        principal(request).require("pull")
        envelope = None
        try:
            envelope = await self.origin.get_trust()
        except FabricError as e:
            log.warning("cannot read the upstream's delegations; serving the ones kept here", error=e.message)
        if envelope is None:
            try:
                envelope = await asyncio.to_thread((self.dir / "delegations").read_bytes)
            except FileNotFoundError:
                raise TrustNotFound("this site holds no delegations") from None
        return web.Response(body=envelope, content_type=ENVELOPE)


_STATES = ("verified", "unsigned", "stale", "refused")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
