"""Keys, trust policies and signed statements for tests (fabric/trust).

`seed_key(n)` is a deterministic Ed25519 key (seed = 32 bytes of value n), so tests
need no key files unless they test them; `key_files` writes a real pair with
`generate_key`. `policy` builds a TrustPolicy from (artifact globs, keys, threshold,
channel globs) tuples; `signed_version` / `signed_channel` make envelope bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

from fabric.trust import (ChannelStatement, Key, TrustPolicy, VersionStatement, generate_key, load_private_key,
                          sign)

MANIFEST_A = "blake3:" + "a" * 64
MANIFEST_B = "blake3:" + "b" * 64


def seed_key(n: int) -> Key:
    """A deterministic key: its seed is 32 bytes of value n (0-255)."""
    return Key.from_seed(bytes([n]) * 32)


def key_files(folder: Path, name: str) -> tuple[Key, Path, Path]:
    """A real key pair written by `generate_key`: (the loaded key, NAME.key, NAME.pub)."""
    key_path, pub_path = generate_key(name, folder)
    return load_private_key(key_path), key_path, pub_path


def policy(*rules, root: list[Key] = (), root_threshold: int | None = None, revoked: list[Key] = ()) -> TrustPolicy:
    """A policy with one rule per `(artifacts, keys[, threshold[, channels]])` tuple."""
    p = TrustPolicy()
    for rule in rules:
        artifacts, keys = rule[0], rule[1]
        threshold = rule[2] if len(rule) > 2 else None
        channels = rule[3] if len(rule) > 3 else ["*"]
        for k in keys:
            p.add(k.public, artifacts, channels, name=f"k{k.keyid[:4]}")
        if threshold is not None:
            p.add(keys[0].public, artifacts, channels, threshold=threshold)
    for k in root:
        p.add_root(k.public)
    if root_threshold is not None:
        p.root_threshold = root_threshold
    for k in revoked:
        p.revoke(k.keyid)
    return p


def signed_version(keys: list[Key], artifact: str = "llama3", version: str = "v1",
                   manifest: str = MANIFEST_A) -> bytes:
    return sign(VersionStatement(artifact, version, manifest), keys).to_bytes()


def channel_statement(artifact: str = "llama3", channel: str = "prod", version: str = "v1",
                      manifest: str = MANIFEST_A, sequence: int = 1, expires_in: float = 3600,
                      action: str = "promote", now: float | None = None) -> ChannelStatement:
    t = int(time.time() if now is None else now)
    return ChannelStatement(artifact, channel, version, manifest, action, sequence, t + int(expires_in), t)


def signed_channel(keys: list[Key], **kw) -> bytes:
    return sign(channel_statement(**kw), keys).to_bytes()
