"""The trust policy: which keys a site or client trusts, for what (docs/trust.md "The trust file").

One TOML file per site or client, kept locally (never fetched from the origin):

    # Fabric trust policy (docs/trust.md)
    revoked = ["<keyid>"]          # top-level: before any [table]

    [root]                         # optional: keys whose delegations extend this file
    keys = ["<keyid>"]
    threshold = 1

    [keys.<keyid>]
    public = "<standard base64 of the 32 raw bytes>"
    name = "ci"                    # informative

    [[rules]]
    artifacts = ["llama*"]         # fnmatch globs, case-sensitive
    channels = ["*"]               # optional, default ["*"]
    keys = ["<keyid>"]
    threshold = 1                  # optional, default 1

`TrustPolicy.load` checks every key and names the bad one (`trust.toml: rules[0].threshold:
must be …`, raising `TrustPolicyInvalid`); `add`, `add_root` and `revoke` edit it and
`save` writes it back atomically. `with_delegations` gives the effective policy once a
root-signed delegations statement is known: the local rules plus the delegated ones, the
local keys plus the delegated ones, and the union of both revocation lists. The root
keys come only from the local file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from fabric.errors import KeyFileInvalid, TrustPolicyInvalid
from fabric.trust.keys import PublicKey, is_keyid
from fabric.trust.statements import MAX_GLOB, DelegationsStatement, Rule

MAX_TRUST_FILE = 1 << 20
_TOP = {"root", "keys", "rules", "revoked"}


@dataclass(frozen=True)
class KeyEntry:
    public: PublicKey
    name: str | None = None
    delegated: bool = False  # known from the delegations statement, not the local file


@dataclass
class TrustPolicy:
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    root_keys: list[str] = field(default_factory=list)
    root_threshold: int = 1
    delegations: DelegationsStatement | None = None  # the one applied by with_delegations
    _base: "TrustPolicy | None" = field(default=None, repr=False, compare=False)  # the file's own policy

    # --- reading ---------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str) -> "TrustPolicy":
        """Read and check a trust file.

        Raises:
            TrustPolicyInvalid: unreadable, not TOML, or a key that does not check (named in the message).
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_TRUST_FILE + 1)
        except OSError as e:
            raise TrustPolicyInvalid(f"{path}: cannot read the trust file: {e.strerror or e}") from None
        if len(data) > MAX_TRUST_FILE:
            raise TrustPolicyInvalid(f"{path}: larger than {MAX_TRUST_FILE} bytes; not a trust file")
        return cls.loads(data, str(path))

    @classmethod
    def loads(cls, data: bytes | str, where: str = "trust.toml") -> "TrustPolicy":
        try:
            raw = tomllib.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TrustPolicyInvalid(f"{where}: not valid TOML: {e}") from None
        return _parse(raw, where)

    # --- what applies ------------------------------------------------------------

    def rules_for(self, artifact: str, channel: str | None = None) -> list[tuple[int, Rule]]:
        """The rules (with their index) whose globs match artifact (and channel, when given)."""
        return [(i, r) for i, r in enumerate(self.rules)
                if any(fnmatch.fnmatchcase(artifact, g) for g in r.artifacts)
                and (channel is None or any(fnmatch.fnmatchcase(channel, g) for g in r.channels))]

    def public(self, keyid: str) -> PublicKey | None:
        entry = self.keys.get(keyid)
        return entry.public if entry else None

    # --- editing -----------------------------------------------------------------

    def add(self, pub: PublicKey, artifacts, channels=("*",), threshold: int | None = None,
            name: str | None = None) -> Rule:
        """Trust `pub` for artifacts (and channels): it joins the rule with exactly these globs,
        or a new rule. `threshold` (None: keep the rule's, 1 for a new rule) must not exceed
        the rule's keys. Returns the rule as it is now."""
        artifacts, channels = _check_globs(artifacts, "artifacts"), _check_globs(channels or ("*",), "channels")
        self._editable()
        self._add_key(pub, name)
        for i, r in enumerate(self.rules):
            if r.artifacts == artifacts and r.channels == channels:
                keys = r.keys if pub.keyid in r.keys else r.keys + (pub.keyid,)
                self.rules[i] = _rule(artifacts, channels, keys, r.threshold if threshold is None else threshold)
                return self.rules[i]
        rule = _rule(artifacts, channels, (pub.keyid,), 1 if threshold is None else threshold)
        self.rules.append(rule)
        return rule

    def add_root(self, pub: PublicKey, threshold: int | None = None, name: str | None = None) -> None:
        """Make `pub` a root key (it may sign delegations); `threshold` of the root keys must sign."""
        self._editable()
        self._add_key(pub, name)
        if pub.keyid not in self.root_keys:
            self.root_keys.append(pub.keyid)
        if threshold is not None:
            if not 1 <= threshold <= len(self.root_keys):
                raise TrustPolicyInvalid(f"root.threshold: must be from 1 to {len(self.root_keys)} (the root keys)")
            self.root_threshold = threshold

    def revoke(self, key: str | PublicKey) -> str:
        """Revoke a key (a PublicKey or its keyid): nothing it signs is accepted. Returns the keyid."""
        kid = key.keyid if isinstance(key, PublicKey) else key
        if not is_keyid(kid):
            raise TrustPolicyInvalid(f"revoked: {str(kid)[:80]!r} is not a keyid (64 lowercase hex)")
        self._editable()
        self.revoked.add(kid)
        return kid

    def _add_key(self, pub: PublicKey, name: str | None) -> None:
        old = self.keys.get(pub.keyid)
        self.keys[pub.keyid] = KeyEntry(pub, name if name is not None else (old.name if old else None))

    def _editable(self) -> None:
        if self._base is not None:
            raise TrustPolicyInvalid("an effective policy (with delegations) cannot be edited; edit base()")

    # --- writing -----------------------------------------------------------------

    def to_toml(self) -> str:
        """The file's own part (not what delegations added) as TOML, in the documented order."""
        if self._base is not None:
            return self._base.to_toml()
        q = _toml_string
        lines = ["# Fabric trust policy (docs/trust.md)",
                 f"revoked = [{', '.join(q(k) for k in sorted(self.revoked))}]", ""]
        if self.root_keys:
            lines += ["[root]", f"keys = [{', '.join(q(k) for k in self.root_keys)}]",
                      f"threshold = {self.root_threshold}", ""]
        for kid, entry in self.keys.items():
            lines += [f"[keys.{kid}]", f"public = {q(entry.public.b64)}"]
            if entry.name is not None:
                lines.append(f"name = {q(entry.name)}")
            lines.append("")
        for r in self.rules:
            lines += ["[[rules]]", f"artifacts = [{', '.join(q(g) for g in r.artifacts)}]",
                      f"channels = [{', '.join(q(g) for g in r.channels)}]",
                      f"keys = [{', '.join(q(k) for k in r.keys)}]", f"threshold = {r.threshold}", ""]
        return "\n".join(lines)

    def save(self, path: Path | str) -> None:
        """Write the file atomically (a temporary file in the same folder, fsync, rename)."""
        path = Path(path)
        text = self.to_toml()
        TrustPolicy.loads(text, str(path))  # never write what load would refuse
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def to_json(self) -> dict:
        """The effective policy, for `fabric trust show --json` and status pages."""
        return {"root": {"keys": list(self.root_keys), "threshold": self.root_threshold},
                "keys": {k: {"public": e.public.b64, "name": e.name, "delegated": e.delegated,
                             "revoked": k in self.revoked} for k, e in self.keys.items()},
                "rules": [dict(r.to_json(), delegated=i >= len(self.base().rules)) for i, r in enumerate(self.rules)],
                "revoked": sorted(self.revoked),
                "delegations": None if self.delegations is None else {
                    "version": self.delegations.version, "expires": self.delegations.to_json()["expires"]}}

    # --- delegations ---------------------------------------------------------------

    def with_delegations(self, stmt: DelegationsStatement) -> "TrustPolicy":
        """The effective policy: this file's rules, keys and revocations plus the statement's.

        A previously applied statement is replaced, not added to."""
        base = self.base()
        keys = dict(base.keys)
        for kid, pub in stmt.keys.items():
            keys.setdefault(kid, KeyEntry(pub, None, delegated=True))
        return replace(base, keys=keys, rules=base.rules + list(stmt.rules), revoked=base.revoked | set(stmt.revoked),
                       root_keys=list(base.root_keys), delegations=stmt, _base=base)

    def to_delegations(self, version: int, expires_in_s: float, *, now: float | None = None) -> DelegationsStatement:
        """This file's rules, their keys and its revocations as delegations statement `version`
        (for a root key to sign: `fabric trust publish`)."""
        base = self.base()
        used = {k for r in base.rules for k in r.keys}
        t = int(time.time() if now is None else now)
        stmt = DelegationsStatement(int(version), t + int(expires_in_s),
                                    {k: e.public for k, e in base.keys.items() if k in used},
                                    tuple(base.rules), tuple(sorted(base.revoked)))
        return DelegationsStatement.from_json(stmt.to_json())  # the checks a verifier makes

    def base(self) -> "TrustPolicy":
        """This policy without any delegations applied (the file as written)."""
        return self if self._base is None else self._base


def _toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes (TOML has the same ones), plus DEL, which TOML
    also wants escaped; characters outside the BMP are written as themselves, not as the
    surrogate pairs of JSON's ASCII escapes (TOML has none)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _rule(artifacts, channels, keys, threshold) -> Rule:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(keys):
        raise TrustPolicyInvalid(f"threshold: must be from 1 to {len(keys)} (the keys of the rule for "
                                 f"{', '.join(artifacts)}); add the other keys first")
    return Rule(tuple(artifacts), tuple(channels), tuple(keys), threshold)


def _check_globs(globs, what: str) -> tuple[str, ...]:
    globs = (globs,) if isinstance(globs, str) else tuple(globs)
    if not globs or not all(isinstance(g, str) and 0 < len(g) <= MAX_GLOB and g.isprintable() for g in globs):
        raise TrustPolicyInvalid(f"{what}: must be a non-empty list of globs (printable, 1-{MAX_GLOB} characters)")
    return globs


class _Check:
    """Typed reads from one table of the trust file; failures name the file and the key path."""

    def __init__(self, raw: object, where: str, prefix: str):
        self.where, self.prefix = where, prefix
        if not isinstance(raw, dict):
            self.fail("", "must be a table")
        self.raw = raw

    def fail(self, key: str, why: str):
        path = f"{self.prefix}{key}" if key else self.prefix.rstrip(".")
        raise TrustPolicyInvalid(f"{self.where}: {path}: {why}")

    def known(self, keys: set[str], hint: dict[str, str] | None = None) -> None:
        for k in self.raw:
            if k not in keys:
                extra = (hint or {}).get(k, "")
                self.fail(k, f"unknown key (known: {', '.join(sorted(keys))}){extra}")

    def keyids(self, key: str, required: bool = True, known: dict | None = None) -> list[str]:
        if key not in self.raw:
            if required:
                self.fail(key, "missing (a list of keyids)")
            return []
        v = self.raw[key]
        if not isinstance(v, list) or not all(isinstance(k, str) for k in v):
            self.fail(key, "must be a list of keyids (strings of 64 lowercase hex)")
        for k in v:
            if not is_keyid(k):
                self.fail(key, f"{k[:80]!r} is not a keyid (64 lowercase hex)")
            if known is not None and k not in known:
                self.fail(key, f"keyid {k} has no [keys.{k[:12]}…] table with its public key")
        if len(set(v)) != len(v):
            self.fail(key, "lists a keyid twice")
        return list(v)

    def threshold(self, count: int) -> int:
        v = self.raw.get("threshold", 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= max(count, 1):
            self.fail("threshold", f"must be an integer from 1 to {count} (the number of keys listed), got {v!r}")
        return v

    def globs(self, key: str, default: list[str] | None = None) -> tuple[str, ...]:
        v = self.raw.get(key, default)
        if v is None:
            self.fail(key, "missing (a list of globs, like [\"llama*\"])")
        try:
            return _check_globs(v if isinstance(v, list) else [None], key)
        except TrustPolicyInvalid:
            self.fail(key, f"must be a non-empty list of globs (strings of 1-{MAX_GLOB} printable characters)")


def _parse(raw: dict, where: str) -> TrustPolicy:
    top = _Check(raw, where, "")
    top.known(_TOP)
    keys: dict[str, KeyEntry] = {}
    ktable = _Check(raw.get("keys", {}), where, "keys.")
    for kid, entry in ktable.raw.items():
        if not is_keyid(kid):
            ktable.fail(kid[:80], "a [keys.<keyid>] table is named by the keyid (64 lowercase hex)")
        e = _Check(entry, where, f"keys.{kid}.")
        e.known({"public", "name"})
        if not isinstance(e.raw.get("public"), str):
            e.fail("public", "missing or not a string (the standard base64 of the 32-byte public key)")
        try:
            pub = PublicKey.from_b64(e.raw["public"])
        except KeyFileInvalid as ex:
            e.fail("public", ex.message)
        if pub.keyid != kid:
            e.fail("public", f"this public key's keyid is {pub.keyid}, not the table's name")
        name = e.raw.get("name")
        if name is not None and (not isinstance(name, str) or not name.isprintable() or len(name) > 128):
            e.fail("name", "must be a printable string of at most 128 characters")
        keys[kid] = KeyEntry(pub, name)
    root_keys, root_threshold = [], 1
    if "root" in raw:
        root = _Check(raw["root"], where, "root.")
        root.known({"keys", "threshold"})
        root_keys = root.keyids("keys", known=keys)
        root_threshold = root.threshold(len(root_keys))
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        top.fail("rules", "must be an array of tables ([[rules]])")
    rules = []
    hint = {"revoked": " (revoked is a top-level key: put it before the first [table])"}
    for i, r in enumerate(rules_raw):
        c = _Check(r, where, f"rules[{i}].")
        c.known({"artifacts", "channels", "keys", "threshold"}, hint)
        rule_keys = c.keyids("keys", known=keys)
        if not rule_keys:
            c.fail("keys", "must list at least one keyid")
        rules.append(Rule(c.globs("artifacts"), c.globs("channels", ["*"]), tuple(rule_keys),
                          c.threshold(len(rule_keys))))
    revoked = top.keyids("revoked", required=False)
    return TrustPolicy(keys, rules, set(revoked), root_keys, root_threshold)


__all__ = ["TrustPolicy", "KeyEntry"]
