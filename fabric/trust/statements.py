"""The statements a key signs (docs/formats.md "Signed statements"): version, channel, delegations.

* `fabric.version/v1` binds an artifact's version name to its manifest id: no origin
  can serve other bytes, or these bytes under another name, without a signature.
* `fabric.channel/v1` is one signed channel move: which version a channel points at,
  with a per-(artifact, channel) `sequence` (+1 per move: rollback protection) and an
  `expires` time (freeze protection).
* `fabric.delegations/v1`, signed by root keys, adds publisher keys and rules and
  revokes keys, so a root can rotate keys without touching every site's trust file.

Each is a frozen dataclass with `to_json()` and a strict `from_json(obj)`: a missing or
unknown field, a wrong type, a bad name or time raises `StatementMalformed`. Times
are RFC 3339 UTC to the second ("2026-12-02T03:00:00Z") on the wire and integer Unix
seconds in the dataclasses. Pure: no I/O.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fabric.core.manifest import check_name
from fabric.errors import InvalidName, StatementMalformed
from fabric.trust.keys import PublicKey, b64decode_strict, is_keyid

VERSION_TYPE = "fabric.version/v1"
CHANNEL_TYPE = "fabric.channel/v1"
DELEGATIONS_TYPE = "fabric.delegations/v1"
ACTIONS = ("promote", "rollback")
MAX_GLOB = 256  # characters of one artifact or channel glob
_TIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_MANIFEST_RE = re.compile(r"^blake3:[0-9a-f]{64}$")


def format_time(t: float) -> str:
    """Unix seconds as RFC 3339 UTC to the second, the one spelling statements use."""
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object, where: str) -> int:
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise StatementMalformed(f"{where} must be an RFC 3339 UTC time like 2026-12-02T03:00:00Z")
    try:
        t = int(datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        raise StatementMalformed(f"{where} is not a real date and time: {value!r}") from None
    return t


def _now() -> int:
    return int(time.time())


class _Reader:
    """Strict reads from one statement object; failures name the statement kind and field."""

    def __init__(self, obj: object, kind: str, fields: set[str]):
        if not isinstance(obj, dict):
            raise StatementMalformed(f"a {kind} statement is a JSON object, not {type(obj).__name__}")
        missing, unknown = fields - set(obj), set(obj) - fields
        if missing or unknown:
            raise StatementMalformed(f"{kind} statement: missing fields {sorted(missing)}, unknown {sorted(unknown)}")
        self.obj, self.kind = obj, kind

    def fail(self, key: str, why: str):
        raise StatementMalformed(f"{self.kind} statement: {key}: {why}")

    def name(self, key: str, what: str) -> str:
        try:
            return check_name(what, self.obj[key])
        except InvalidName as e:
            self.fail(key, e.message)

    def manifest(self, key: str = "manifest") -> str:
        v = self.obj[key]
        if not isinstance(v, str) or not _MANIFEST_RE.fullmatch(v):
            self.fail(key, "must be a manifest id, blake3:<64 lowercase hex>")
        return v

    def time(self, key: str) -> int:
        return parse_time(self.obj[key], f"{self.kind} statement: {key}")

    def count(self, key: str, minimum: int = 1) -> int:
        v = self.obj[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(key, f"must be an integer >= {minimum}")
        return v


def _globs(v: object, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(
            isinstance(g, str) and 0 < len(g) <= MAX_GLOB and g.isprintable() for g in v):
        raise StatementMalformed(f"{where} must be a non-empty list of globs (printable, 1-{MAX_GLOB} characters)")
    return tuple(v)


@dataclass(frozen=True)
class VersionStatement:
    """`fabric.version/v1`: artifact@version is the manifest `manifest`."""

    artifact: str
    version: str
    manifest: str
    signed_at: int = field(default_factory=_now)

    _type = VERSION_TYPE

    def to_json(self) -> dict:
        return {"_type": VERSION_TYPE, "artifact": self.artifact, "version": self.version,
                "manifest": self.manifest, "signed_at": format_time(self.signed_at)}

    @classmethod
    def from_json(cls, obj: object) -> "VersionStatement":
        r = _Reader(obj, "version", {"_type", "artifact", "version", "manifest", "signed_at"})
        if obj["_type"] != VERSION_TYPE:
            r.fail("_type", f"must be {VERSION_TYPE!r}")
        return cls(r.name("artifact", "artifact"), r.name("version", "version"), r.manifest(), r.time("signed_at"))


@dataclass(frozen=True)
class ChannelStatement:
    """`fabric.channel/v1`: artifact:channel points at version (manifest), move number `sequence`,
    valid until `expires`."""

    artifact: str
    channel: str
    version: str
    manifest: str
    action: str
    sequence: int
    expires: int
    signed_at: int = field(default_factory=_now)

    _type = CHANNEL_TYPE

    def to_json(self) -> dict:
        return {"_type": CHANNEL_TYPE, "artifact": self.artifact, "channel": self.channel,
                "version": self.version, "manifest": self.manifest, "action": self.action,
                "sequence": self.sequence, "expires": format_time(self.expires),
                "signed_at": format_time(self.signed_at)}

    @classmethod
    def from_json(cls, obj: object) -> "ChannelStatement":
        r = _Reader(obj, "channel", {"_type", "artifact", "channel", "version", "manifest", "action",
                                     "sequence", "expires", "signed_at"})
        if obj["_type"] != CHANNEL_TYPE:
            r.fail("_type", f"must be {CHANNEL_TYPE!r}")
        if obj["action"] not in ACTIONS:
            r.fail("action", f"must be one of {', '.join(ACTIONS)}")
        return cls(r.name("artifact", "artifact"), r.name("channel", "channel"), r.name("version", "version"),
                   r.manifest(), obj["action"], r.count("sequence"), r.time("expires"), r.time("signed_at"))


@dataclass(frozen=True)
class Rule:
    """Keys trusted for artifacts (and channels) matching the globs: `threshold` of them must sign."""

    artifacts: tuple[str, ...]
    channels: tuple[str, ...]
    keys: tuple[str, ...]
    threshold: int = 1

    def to_json(self) -> dict:
        return {"artifacts": list(self.artifacts), "channels": list(self.channels), "keys": list(self.keys),
                "threshold": self.threshold}

    @classmethod
    def from_json(cls, obj: object, where: str, known: set[str]) -> "Rule":
        if not isinstance(obj, dict) or set(obj) != {"artifacts", "channels", "keys", "threshold"}:
            raise StatementMalformed(f"{where} must be an object with exactly artifacts, channels, keys, threshold")
        keys = obj["keys"]
        if not isinstance(keys, list) or not keys or not all(is_keyid(k) for k in keys) or len(set(keys)) != len(keys):
            raise StatementMalformed(f"{where}.keys must be a non-empty list of distinct keyids")
        for k in keys:
            if k not in known:
                raise StatementMalformed(f"{where}.keys: {k} is not in the statement's keys")
        t = obj["threshold"]
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= len(keys):
            raise StatementMalformed(f"{where}.threshold must be an integer from 1 to {len(keys)} (the rule's keys)")
        return cls(_globs(obj["artifacts"], f"{where}.artifacts"), _globs(obj["channels"], f"{where}.channels"),
                   tuple(keys), t)


@dataclass(frozen=True)
class DelegationsStatement:
    """`fabric.delegations/v1`, signed by the trust file's root keys: more keys, rules and revocations."""

    version: int
    expires: int
    keys: dict[str, PublicKey]
    rules: tuple[Rule, ...]
    revoked: tuple[str, ...] = ()

    _type = DELEGATIONS_TYPE

    def to_json(self) -> dict:
        return {"_type": DELEGATIONS_TYPE, "version": self.version, "expires": format_time(self.expires),
                "keys": {k: {"public": pub.b64} for k, pub in self.keys.items()},
                "rules": [r.to_json() for r in self.rules], "revoked": list(self.revoked)}

    @classmethod
    def from_json(cls, obj: object) -> "DelegationsStatement":
        r = _Reader(obj, "delegations", {"_type", "version", "expires", "keys", "rules", "revoked"})
        if obj["_type"] != DELEGATIONS_TYPE:
            r.fail("_type", f"must be {DELEGATIONS_TYPE!r}")
        raw_keys = obj["keys"]
        if not isinstance(raw_keys, dict):
            r.fail("keys", "must be an object of keyid -> {public}")
        keys: dict[str, PublicKey] = {}
        for kid, entry in raw_keys.items():
            if not is_keyid(kid) or not isinstance(entry, dict) or set(entry) != {"public"}:
                r.fail(f"keys.{kid[:64]}", "must be a keyid (64 lowercase hex) -> {\"public\": base64}")
            raw = b64decode_strict(entry["public"])
            if raw is None or len(raw) != 32:
                r.fail(f"keys.{kid}.public", "must be the standard base64 of 32 bytes")
            pub = PublicKey(raw)
            if pub.keyid != kid:
                r.fail(f"keys.{kid}", f"the public key's keyid is {pub.keyid}")
            keys[kid] = pub
        if not isinstance(obj["rules"], list):
            r.fail("rules", "must be a list")
        rules = tuple(Rule.from_json(x, f"delegations statement: rules[{i}]", set(keys))
                      for i, x in enumerate(obj["rules"]))
        revoked = obj["revoked"]
        if not isinstance(revoked, list) or not all(is_keyid(k) for k in revoked):
            r.fail("revoked", "must be a list of keyids")
        return cls(r.count("version"), r.time("expires"), keys, rules, tuple(revoked))


Statement = VersionStatement | ChannelStatement | DelegationsStatement
_BY_TYPE = {VERSION_TYPE: VersionStatement, CHANNEL_TYPE: ChannelStatement, DELEGATIONS_TYPE: DelegationsStatement}


def parse_statement(obj: object) -> Statement:
    """The typed statement `obj` (parsed JSON) is, by its `_type`."""
    kind = obj.get("_type") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise StatementMalformed(f"statement _type must be one of {', '.join(_BY_TYPE)}, got {str(kind)[:80]!r}")
    return _BY_TYPE[kind].from_json(obj)


def next_channel_statement(artifact: str, channel: str, version: str, manifest_id: str, action: str,
                           previous_sequence: int, expires_in_s: float, *, now: float | None = None
                           ) -> ChannelStatement:
    """The statement for the next move of artifact:channel (sequence previous + 1), valid for expires_in_s."""
    t = int(time.time() if now is None else now)
    stmt = ChannelStatement(artifact, channel, version, manifest_id, action, int(previous_sequence) + 1,
                            t + int(expires_in_s), t)
    return ChannelStatement.from_json(stmt.to_json())  # the same checks a verifier makes


__all__ = ["VERSION_TYPE", "CHANNEL_TYPE", "DELEGATIONS_TYPE", "VersionStatement", "ChannelStatement",
           "DelegationsStatement", "Rule", "Statement", "parse_statement", "next_channel_statement",
           "format_time", "parse_time"]
