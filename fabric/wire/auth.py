"""Tokens: who may do what to which artifacts.

A token file (TOML) lists bearer tokens:

    [[token]]
    name = "site-fra"          # who this is (a site, a publisher); shown in logs
    secret = "…"               # or secret_sha256 = "<hex>", so the file need not hold secrets
    scopes = ["pull"]          # any of: pull, publish, admin
    artifacts = ["llama-*"]    # glob patterns (fnmatch); default ["*"]

A presented token is hashed once and compared with every entry's hash in constant
time, so neither a match nor its position leaks through timing. Secrets are never
logged; only the token's name is.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fabric.config import MIN_SECRET, read_toml
from fabric.errors import ConfigError, Forbidden, Unauthorized

SCOPES = ("pull", "publish", "admin")
_ENTRY_KEYS = {"name", "secret", "secret_sha256", "scopes", "artifacts"}


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    artifacts: tuple[str, ...]

    def may(self, scope: str, artifact: str | None = None) -> bool:
        if scope not in self.scopes and "admin" not in self.scopes:
            return False
        return artifact is None or any(fnmatch.fnmatchcase(artifact, p) for p in self.artifacts)

    def require(self, scope: str, artifact: str | None = None) -> None:
        if not self.may(scope, artifact):
            what = f" on artifact {artifact!r}" if artifact else ""
            raise Forbidden(f"token {self.name!r} lacks the {scope!r} scope{what}")


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
        self._entries = entries

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
        presented = hashlib.sha256(token).digest()
        found = None
        for entry in self._entries:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(presented, entry.sha256):
                found = entry.principal
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
    return _Entry(Principal(name, frozenset(scopes), tuple(patterns)), _secret_hash(e, where))


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
