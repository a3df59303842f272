"""The CLI's hints for signature refusals (fabric/cli/output.py HINTS): every refusal code
has one, and a refused `fabric verify` prints it under the error line, exit 6."""

from __future__ import annotations

from fabric import errors
from fabric.cli.output import HINTS
from fabric.trust import TrustPolicy

from helpers.cli import run_cli
from helpers.files import write_tree
from helpers.trust import key_files


def test_every_signature_refusal_code_has_a_hint():
    def codes(cls):
        for sub in cls.__subclasses__():
            yield sub.code
            yield from codes(sub)
    refusals = set(codes(errors.SignatureError))
    assert {"unsigned", "unknown_key", "key_out_of_scope", "sequence_rollback"} <= refusals
    assert refusals - set(HINTS) == set()
    assert "key_file_invalid" in HINTS


def test_a_refused_verify_exits_6_with_the_code_and_its_hint(tmp_path):
    _, ci_key, _ = key_files(tmp_path / "keys", "ci")
    stranger, _, _ = key_files(tmp_path / "keys", "stranger")
    src = write_tree(tmp_path / "src", {"w.bin": b"\x01" * 5000})
    store = tmp_path / "store"
    p = run_cli("publish", src, "-a", "sig-hint", "--version", "v1", "--sign-key", ci_key, store=store)
    assert p.returncode == 0, p.stderr
    policy = TrustPolicy()
    policy.add(stranger.public, ["sig-*"])
    policy.save(tmp_path / "trust.toml")
    p = run_cli("verify", "sig-hint@v1", "--trust", tmp_path / "trust.toml", store=store)
    lines = p.stderr.splitlines()
    assert p.returncode == 6 and lines[0].startswith("error[unknown_key]: "), p.stderr
    assert lines[1] == f"  hint: {HINTS['unknown_key']}"
