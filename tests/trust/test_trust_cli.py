"""`fabric key generate` and `fabric trust add|root|revoke|show`, run as the real `fabric` command."""

from __future__ import annotations

import json
import os
import stat

from fabric.trust import TrustPolicy, Verifier, generate_key, load_private_key, sign
from fabric.trust.statements import VersionStatement
from helpers.cli import cli_json, run_cli
from helpers.trust import MANIFEST_A


def test_key_generate_writes_a_private_key_mode_0600_and_never_overwrites_it(tmp_path):
    out = cli_json("key", "generate", "ci", "--out", tmp_path / "keys")
    key_path, pub_path = tmp_path / "keys" / "ci.key", tmp_path / "keys" / "ci.pub"
    assert out == {"key": str(key_path), "public": str(pub_path), "keyid": load_private_key(key_path).keyid}
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    before = key_path.read_bytes()
    again = run_cli("key", "generate", "ci", "--out", tmp_path / "keys")
    assert again.returncode == 7 and "error[destination_exists]" in again.stderr
    assert key_path.read_bytes() == before


def test_trust_add_root_revoke_and_show_build_a_file_the_verifier_uses(tmp_path):
    keys = tmp_path / "keys"
    ids = {n: load_private_key(generate_key(n, keys)[0]).keyid for n in ("ci", "release", "root")}
    trust = tmp_path / "site" / "trust.toml"
    trust.parent.mkdir()
    added = cli_json("trust", "add", trust, "--key", keys / "ci.pub", "--artifacts", "llama*")
    assert added["rule"] == {"artifacts": ["llama*"], "channels": ["*"], "keys": [ids["ci"]], "threshold": 1}
    two = cli_json("trust", "add", trust, "--key", keys / "release.pub", "--artifacts", "llama*", "--threshold", "2")
    assert two["rule"]["keys"] == [ids["ci"], ids["release"]] and two["rule"]["threshold"] == 2
    cli_json("trust", "root", trust, "--key", keys / "root.pub", "--threshold", "1")
    cli_json("trust", "add", trust, "--key", keys / "ci.pub", "--artifacts", "bert", "--channels", "staging",
             "--name", "ci-bert")
    shown = cli_json("trust", "show", trust)
    assert shown["root"] == {"keys": [ids["root"]], "threshold": 1}
    assert [r["artifacts"] for r in shown["rules"]] == [["llama*"], ["bert"]]
    assert shown["keys"][ids["ci"]]["name"] == "ci-bert" and shown["keys"][ids["release"]]["name"] == "release"

    # the file works: both keys are needed for llama*, ci alone for bert:staging
    v = Verifier(TrustPolicy.load(trust))
    ci, release = load_private_key(keys / "ci.key"), load_private_key(keys / "release.key")
    stmt = VersionStatement("llama3", "v1", MANIFEST_A)
    assert v.verify_version(sign(stmt, [ci, release]).to_bytes(), "llama3", "v1", MANIFEST_A).rule == 0

    revoked = cli_json("trust", "revoke", trust, "--key", ids["release"])
    assert revoked["revoked"] == ids["release"]
    human = run_cli("trust", "show", trust)
    assert human.returncode == 0 and "REVOKED" in human.stdout and "bert" in human.stdout
    assert ids["release"] in TrustPolicy.load(trust).revoked


def test_trust_errors_name_the_bad_key_and_use_the_documented_exit_codes(tmp_path):
    generate_key("ci", tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nartifacts = ["x"]\nkeys = ["%s"]\nthreshold = 0\n' % ("0" * 64))
    out = cli_json("trust", "show", bad, expect_rc=2)
    assert out["error"]["code"] == "trust_policy_invalid" and "rules[0].keys" in out["error"]["message"]
    before = bad.read_bytes()
    p = run_cli("trust", "add", bad, "--key", tmp_path / "ci.pub", "--artifacts", "x")
    assert p.returncode == 2 and "error[trust_policy_invalid]" in p.stderr and bad.read_bytes() == before
    p = run_cli("trust", "add", tmp_path / "t.toml", "--key", tmp_path / "ci.key", "--artifacts", "x", "--json")
    assert p.returncode == 2 and json.loads(p.stdout)["error"]["code"] == "key_file_invalid"
    assert not (tmp_path / "t.toml").exists()
