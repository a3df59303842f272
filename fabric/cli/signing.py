"""`fabric sign`, `fabric verify` and `fabric trust publish`, and the signing and trust options
`publish`, `pull`, `promote` and `rollback` share (`--sign-key`, `--statement-expiry`, `--trust`).

A thin layer over `fabric.signing` (docs/trust.md "The CLI"): `sign` adds a cosignature
to a version (k-of-n rules), `verify` checks a version or a channel against a trust file
the way `fabric pull --trust` does before it fetches any chunk, and `trust publish` signs
the trust file's keys, rules and revocations with root keys as the next delegations
statement and publishes it at the origin (`PUT /v1/trust`). `trust publish` is added to
`fabric trust` (fabric/cli/trust.py's group).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fabric.cli.options import JsonOpt, OriginOpt, StoreOpt, TokenOpt, open_registry
from fabric.cli.output import emit, err, errors, esc, out
from fabric.cli.trust import trust_app
from fabric.config import parse_duration
from fabric.errors import InvalidInput
from fabric.signing import DEFAULT_EXPIRY, Check, Signer, check_ref
from fabric.store.registry import parse_ref
from fabric.trust import Envelope, TrustPolicy, load_private_key, sign as sign_statement

commands = typer.Typer()

SignKeyOpt = typer.Option(None, "--sign-key", envvar="FABRIC_SIGN_KEY",
                          help="Sign with this private key file (NAME.key; or FABRIC_SIGN_KEY): the version "
                               "statement and the channel move.")
ExpiryOpt = typer.Option("7d", "--statement-expiry", envvar="FABRIC_STATEMENT_EXPIRY",
                         help="How long a signed channel move stays valid, e.g. 7d, 12h (or "
                              "FABRIC_STATEMENT_EXPIRY); sites holding an expired one say 'stale'.")
TrustOpt = typer.Option(None, "--trust", envvar="FABRIC_TRUST",
                        help="Verify against this trust policy file before fetching any chunk (or FABRIC_TRUST).")

UNSIGNED_WARNING = ("warning: unsigned: no trust policy (--trust FILE or FABRIC_TRUST): this pull is not "
                    "verified; whoever answers as the origin, or any hop on the way, chooses the bytes")


def expiry_seconds(text: str) -> float:
    try:
        seconds = parse_duration(text, bare_seconds=False)
    except ValueError:
        raise InvalidInput(f"--statement-expiry {text!r}: expected a duration like 7d or 12h") from None
    if seconds < 1:
        raise InvalidInput(f"--statement-expiry {text!r}: must be at least one second")
    return seconds


def signer(sign_key: Optional[str], expiry: str = "7d") -> Signer | None:
    """The `Signer` for `--sign-key` (None without one)."""
    if not sign_key:
        return None
    return Signer([load_private_key(Path(sign_key))], expiry_seconds(expiry) if expiry else DEFAULT_EXPIRY)


def load_trust(trust: Optional[str]) -> TrustPolicy | None:
    return TrustPolicy.load(Path(trust)) if trust else None


def warn_unsigned() -> None:
    err.print(UNSIGNED_WARNING, style="bold yellow", markup=False, highlight=False, soft_wrap=True)


def describe(check: Check, policy: TrustPolicy | None = None) -> None:
    """Print what a check verified: who signed, under which rule, until when."""
    obj = check.to_json()

    def who(keyids) -> str:
        names = []
        for k in keyids:
            entry = policy.keys.get(k) if policy is not None else None
            names.append(f"{k[:16]}…" + (f" ({entry.name})" if entry is not None and entry.name else ""))
        return ", ".join(names) or "-"
    out.print(f"[green]verified[/green] [bold]{esc(check.artifact)}@{esc(check.version)}[/bold] "
              f"{esc(check.manifest_id)}", highlight=False, soft_wrap=True)
    out.print(f"  version statement signed {esc(obj['signed_at'])} by {esc(who(obj['keyids']))}, "
              f"rule {obj['rule']}", highlight=False, soft_wrap=True)
    if check.channel is not None:
        c = obj["channel"]
        out.print(f"  channel {esc(c['channel'])}: {esc(c['action'])} to {esc(c['version'])}, sequence "
                  f"{c['sequence']}, expires {esc(c['expires'])}, signed by {esc(who(c['keyids']))}",
                  highlight=False, soft_wrap=True)
    if check.delegations is not None:
        out.print(f"  with delegations version {check.delegations}", highlight=False, soft_wrap=True)
    for note in check.steps:
        out.print(f"  note: {esc(note)}", highlight=False, soft_wrap=True)


@commands.command()
def verify(ref: str = typer.Argument(..., help="NAME@VERSION, NAME:CHANNEL or NAME (its latest version)."),
           trust: Optional[str] = typer.Option(..., "--trust", envvar="FABRIC_TRUST",
                                               help="The trust policy file (or FABRIC_TRUST)."),
           store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
           token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Check a version (or a channel and its version) against a trust policy, fetching no chunk.

    Prints the keys whose signatures counted, the rule they met and, for a channel, its
    sequence and expiry. A refusal exits 6 with the error's code (unsigned, unknown_key,
    key_revoked, key_out_of_scope, threshold_not_met, statement_expired, statement_mismatch, …).
    """
    with errors(as_json), open_registry(store, origin, token) as reg:
        policy = load_trust(trust)
        artifact, version, channel = parse_ref(ref)
        check = check_ref(reg, policy, artifact, version, channel)
        emit(check.to_json(), as_json, lambda: describe(check, policy))


@commands.command("sign")
def sign_version(ref: str = typer.Argument(..., help="NAME@VERSION: the version to sign."),
                 sign_key: Optional[str] = typer.Option(..., "--sign-key", envvar="FABRIC_SIGN_KEY",
                                                        help="The private key file to sign with (or FABRIC_SIGN_KEY)."),
                 store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
                 token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Add a signature to a version: a cosignature over the statement already held (for a rule
    that needs k of n keys), or the first one. The manifest is read and hashed here, not trusted."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("sign needs NAME@VERSION")
        s = signer(sign_key)
        manifest_id = reg.manifest(artifact, version).id
        held = Envelope.from_bytes(s.sign_version(reg, artifact, version, manifest_id))
        report = {"artifact": artifact, "version": version, "manifest_id": manifest_id,
                  "signed_by": s.keyids, "keyids": held.keyids}
        emit(report, as_json, lambda: out.print(
            f"signed {esc(artifact)}@{esc(version)} with {s.keyids[0][:16]}…; it now carries "
            f"{len(held.keyids)} signature(s)", highlight=False, soft_wrap=True))


@trust_app.command("publish")
def trust_publish(file: Path = typer.Argument(..., help="The trust policy file whose keys, rules and revocations "
                                                    "to delegate."),
                  root_key: List[str] = typer.Option(..., "--root-key", help="A root private key file (repeat "
                                                     "for a root threshold above 1)."),
                  expires: str = typer.Option("365d", "--expires", help="How long the delegations stay valid."),
                  store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
                  token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Sign FILE's keys, rules and revocations with root keys as the next delegations statement
    (version N+1) and publish it at the origin (PUT /v1/trust; an admin token). Sites whose trust
    files name those root keys under [root] apply it: new keys, new rules, revocations."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        policy = TrustPolicy.load(file)
        keys = [load_private_key(Path(k)) for k in root_key]
        roots = set(policy.root_keys)
        if roots and not roots & {k.keyid for k in keys}:
            raise InvalidInput(f"none of the --root-key keys is among {file}'s [root] keys: sites that trust "
                               "those would refuse these delegations")
        try:
            seconds = parse_duration(expires, bare_seconds=False)
        except ValueError:
            raise InvalidInput(f"--expires {expires!r}: expected a duration like 365d") from None
        held = reg.trust()
        previous = Envelope.from_bytes(held).statement.version if held is not None else 0
        stmt = policy.to_delegations(previous + 1, seconds)
        version = reg.put_trust(sign_statement(stmt, keys).to_bytes())
        report = {"version": version, "keys": sorted(stmt.keys), "rules": len(stmt.rules),
                  "revoked": list(stmt.revoked), "signed_by": [k.keyid for k in keys]}
        emit(report, as_json, lambda: out.print(
            f"published delegations version {version}: {len(stmt.keys)} key(s), {len(stmt.rules)} rule(s), "
            f"{len(stmt.revoked)} revoked", highlight=False, soft_wrap=True))
