"""`fabric key generate` and `fabric trust add|root|revoke|show`: signing keys and the trust file.

A thin layer over `fabric.trust` (docs/trust.md "The CLI"): `key generate` writes a key
pair, the `trust` commands create, extend and print a trust policy file. Each edit
reads the file (a missing FILE starts empty), applies one change and writes it back
atomically; a file that does not check is refused, never rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fabric.cli.options import JsonOpt
from fabric.cli.output import emit, errors, esc, out, table
from fabric.trust.keys import generate_key, is_keyid, load_private_key, load_public_key
from fabric.trust.policy import TrustPolicy

key_app = typer.Typer(no_args_is_help=True, help="Signing keys (Ed25519) for signed versions.")
trust_app = typer.Typer(no_args_is_help=True, help="Trust policy files: which keys a site or client trusts, for what.")

FileArg = typer.Argument(..., help="The trust policy file (TOML; created when missing).")
PubOpt = typer.Option(..., "--key", help="The public key: a NAME.pub file (or its PEM or base64 text).")
ThresholdOpt = typer.Option(None, "--threshold", min=1, help="How many of the rule's keys must sign (k of n).")
NameOpt = typer.Option(None, "--name", help="A name for the key, shown in messages (default: the file's stem).")


@key_app.command("generate")
def key_generate(name: str = typer.Argument(..., help="The key's name: writes NAME.key and NAME.pub."),
                 out_dir: Path = typer.Option(..., "--out", help="The folder to write them into."),
                 as_json: bool = JsonOpt):
    """Write a new Ed25519 key pair: DIR/NAME.key (private, mode 0600) and DIR/NAME.pub."""
    with errors(as_json):
        key_path, pub_path = generate_key(name, out_dir)
        kid = load_private_key(key_path).keyid
        emit({"key": str(key_path), "public": str(pub_path), "keyid": kid}, as_json,
             lambda: out.print(f"wrote {esc(key_path)} (private, mode 0600) and {esc(pub_path)}\nkeyid {kid}",
                               highlight=False))


def _load(path: Path) -> TrustPolicy:
    return TrustPolicy.load(path) if path.exists() else TrustPolicy()


def _pub(value: str):
    return load_public_key(value)  # a .pub file's path, or the key's PEM or base64 text


def _default_name(value: str, name: Optional[str]) -> Optional[str]:
    if name is not None:
        return name
    try:
        return Path(value).stem if Path(value).is_file() else None
    except OSError:  # PEM text given as --key: no such file (or a name too long for one)
        return None


@trust_app.command("add")
def trust_add(file: Path = FileArg, key: str = PubOpt,
              artifacts: List[str] = typer.Option(..., "--artifacts", help="Artifact glob (repeat for more), e.g. 'llama*'."),
              channels: Optional[List[str]] = typer.Option(None, "--channels", help="Channel glob (repeat; default '*')."),
              threshold: Optional[int] = ThresholdOpt, name: Optional[str] = NameOpt, as_json: bool = JsonOpt):
    """Trust KEY for the artifacts (and channels) matching the globs; creates FILE when missing."""
    with errors(as_json):
        policy, pub = _load(file), _pub(key)
        rule = policy.add(pub, artifacts, channels or ["*"], threshold=threshold, name=_default_name(key, name))
        policy.save(file)
        emit({"file": str(file), "keyid": pub.keyid, "rule": rule.to_json()}, as_json,
             lambda: out.print(f"{esc(file)}: trusts {pub.keyid[:16]}… for {esc(', '.join(rule.artifacts))} "
                               f"(channels {esc(', '.join(rule.channels))}; {rule.threshold} of {len(rule.keys)} keys)",
                               highlight=False))


@trust_app.command("root")
def trust_root(file: Path = FileArg, key: str = PubOpt, threshold: Optional[int] = ThresholdOpt,
               name: Optional[str] = NameOpt, as_json: bool = JsonOpt):
    """Make KEY a root key: delegations it signs add, rotate and revoke publisher keys."""
    with errors(as_json):
        policy, pub = _load(file), _pub(key)
        policy.add_root(pub, threshold=threshold, name=_default_name(key, name))
        policy.save(file)
        emit({"file": str(file), "keyid": pub.keyid, "root": {"keys": policy.root_keys,
                                                               "threshold": policy.root_threshold}}, as_json,
             lambda: out.print(f"{esc(file)}: root key {pub.keyid[:16]}… ({policy.root_threshold} of "
                               f"{len(policy.root_keys)} root keys sign delegations)", highlight=False))


@trust_app.command("revoke")
def trust_revoke(file: Path = FileArg,
                 key: str = typer.Option(..., "--key", help="The key to revoke: a NAME.pub file, its text, or its keyid."),
                 as_json: bool = JsonOpt):
    """Revoke a key: nothing it signs is accepted any more, in any rule or as root."""
    with errors(as_json):
        policy = _load(file)
        kid = policy.revoke(key if is_keyid(key) else _pub(key))
        policy.save(file)
        emit({"file": str(file), "revoked": kid}, as_json,
             lambda: out.print(f"{esc(file)}: revoked {kid}", highlight=False))


@trust_app.command("show")
def trust_show(file: Path = typer.Argument(..., help="The trust policy file."), as_json: bool = JsonOpt):
    """Print a trust policy: its root keys, keys, rules and revoked keys."""
    with errors(as_json):
        policy = TrustPolicy.load(file)
        doc = policy.to_json()

        def human():
            def label(kid):
                entry = policy.keys.get(kid)
                return f"{entry.name} ({kid[:16]}…)" if entry and entry.name else f"{kid[:16]}…"
            if policy.root_keys:
                out.print(f"root: {policy.root_threshold} of "
                          f"{', '.join(esc(label(k)) + (' REVOKED' if k in policy.revoked else '') for k in policy.root_keys)}",
                          highlight=False)
            rows = [{"rule": str(i), "artifacts": list(r.artifacts), "channels": list(r.channels),
                     "threshold": f"{r.threshold} of {len(r.keys)}",
                     "keys": [label(k) + (" REVOKED" if k in policy.revoked else "") for k in r.keys]}
                    for i, r in enumerate(policy.rules)]
            if rows:
                table(["rule", "artifacts", "channels", "threshold", "keys"], rows)
            else:
                out.print("no rules: this policy trusts no key for any artifact", highlight=False)
            if policy.revoked:
                out.print(f"revoked: {', '.join(sorted(policy.revoked))}", highlight=False)
        emit({"file": str(file), **doc}, as_json, human)
