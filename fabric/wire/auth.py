"""Tokens: who may do what to which artifacts.

A token file (TOML) lists bearer tokens:

    [[token]]
    name = "site-fra"          # who this is (a site, a publisher); shown in logs
    secret = "…"               # or secret_sha256 = "<hex>", so the file need not hold secrets
    scopes = ["pull"]          # any of: pull, publish, admin
    artifacts = ["llama-*"]    # glob patterns (fnmatch); default ["*"]
    site = "site-fra"          # optional: the site this token reports for (POST /v1/sites/{site})

A presented token is hashed once (SHA-256) and looked up by that hash: the time taken
does not grow with the file (a relay's or an origin's token file names every site below
it, and every request is checked), and what timing could tell is at most something about
a hash of the secret, never the secret. Secrets are never
logged; only the token's name is.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fabric.config import MIN_SECRET, read_toml
from fabric.core.manifest import check_name
from fabric.errors import ConfigError, Forbidden, InvalidName, Unauthorized

SCOPES = ("pull", "publish", "admin")
_ENTRY_KEYS = {"name", "secret", "secret_sha256", "scopes", "artifacts", "site"}


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    artifacts: tuple[str, ...]
    site: str | None = None  # the site this token speaks for (its reports), if any

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def may(self, scope: str, artifact: str | None = None) -> bool:
        if scope not in self.scopes and not self.admin:
            return False
        return artifact is None or any(fnmatch.fnmatchcase(artifact, p) for p in self.artifacts)

    def require(self, scope: str, artifact: str | None = None) -> None:
        self.require_any((scope,), artifact)

    def require_any(self, scopes: tuple[str, ...], artifact: str | None = None) -> None:
        """Forbidden unless the token may do one of `scopes` (on `artifact`, if given)."""
        if not any(self.may(s, artifact) for s in scopes):
            what = f" on artifact {artifact!r}" if artifact else ""
            raise Forbidden(f"token {self.name!r} lacks the {' or '.join(map(repr, scopes))} scope{what}")

    def speaks_for(self, site: str) -> bool:
        """May this token report for `site`: its own (the entry's `site`), or any as admin."""
        return self.admin or self.site == site


def visible_report(p: Principal, report: dict) -> dict:
    """What of a site's report (its `/v1/site` status, as sent to `POST /v1/sites/{site}`)
    token `p` may read: all of it as admin; else the parts about artifacts it may pull."""
    if p.admin:
        return report
    out = dict(report)
    for key in ("channels", "workers", "rollouts"):
        if isinstance(report.get(key), list):
            out[key] = [r for r in report[key] if isinstance(r, dict) and p.may("pull", str(r.get("artifact")))]
    if isinstance(report.get("pins"), list):
        out["pins"] = [k for k in report["pins"] if isinstance(k, str) and p.may("pull", k.split("@", 1)[0])]
    if isinstance(report.get("bad"), dict):
        out["bad"] = {k: v for k, v in report["bad"].items() if p.may("pull", k.split("@", 1)[0])}
    return out


class Authenticator(Protocol):
    """What a server's edge (`fabric.wire.server.base_app`) asks who is calling: a
    `TokenTable`, or a role's own rule (the push hook's single token)."""

    def authenticate(self, authorization: str | None) -> Principal: ...


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    sha256: bytes


class TokenTable:
    def __init__(self, entries: list[_Entry]):
        self._by_hash = {e.sha256: e.principal for e in entries}  # two entries with one secret: the last

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenTable":
        return cls.from_dict(read_toml(path, "token file"), str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "tokens") -> "TokenTable":
        unknown = set(data) - {"token"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (want [[token]] tables)")
        raw = data.get("token", [])
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: no [[token]] entries")
        entries = [_parse_entry(e, f"{where}: token[{i}]") for i, e in enumerate(raw)]
        names = [e.principal.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: two tokens share a name")
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `Authorization: Bearer …` header value."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing bearer token (send Authorization: Bearer <token>)")
        # surrogateescape: a header that is not UTF-8 arrives with lone surrogates; hash its bytes
        # (a strict encode would raise, answer 500 and log the presented token in the error)
        token = authorization[len("Bearer "):].strip().encode("utf-8", "surrogateescape")
        found = self._by_hash.get(hashlib.sha256(token).digest())
        if found is None:
            raise Unauthorized("invalid token")
        return found


def _parse_entry(e: object, where: str) -> _Entry:
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(e) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = e.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: must be a non-empty string")
    scopes = e.get("scopes")
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise ConfigError(f"{where}.scopes: must be a non-empty list of {', '.join(SCOPES)}")
    patterns = e.get("artifacts", ["*"])
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{where}.artifacts: must be a list of glob patterns")
    site = e.get("site")
    if site is not None:
        try:
            check_name("site", site)
        except InvalidName as err:
            raise ConfigError(f"{where}.site: {err.message}") from None
    return _Entry(Principal(name, frozenset(scopes), tuple(patterns), site), _secret_hash(e, where))


def _secret_hash(e: dict, where: str) -> bytes:
    if ("secret" in e) == ("secret_sha256" in e):
        raise ConfigError(f"{where}: give exactly one of secret or secret_sha256")
    if "secret" in e:
        secret = e["secret"]
        if not isinstance(secret, str) or len(secret) < MIN_SECRET:
            raise ConfigError(f"{where}.secret: must be a string of at least {MIN_SECRET} characters")
        return hashlib.sha256(secret.encode()).digest()
    try:
        digest = bytes.fromhex(e["secret_sha256"])
    except (TypeError, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ConfigError(f"{where}.secret_sha256: must be 64 hex digits")
    return digest
