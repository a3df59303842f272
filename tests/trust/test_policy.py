"""fabric/trust/policy.py: the trust file — loading with errors that name the key, edits, atomic saves, delegations."""

from __future__ import annotations

import os

import pytest

from fabric.errors import TrustPolicyInvalid
from fabric.trust import DelegationsStatement, TrustPolicy
from fabric.trust.statements import Rule
from helpers.trust import seed_key

K1, K2, K3, ROOT = seed_key(1), seed_key(2), seed_key(3), seed_key(9)


def _file(tmp_path, text: str):
    p = tmp_path / "trust.toml"
    p.write_text(text)
    return p


def _keys(*keys) -> str:
    return "".join(f'[keys.{k.keyid}]\npublic = "{k.public.b64}"\nname = "k"\n\n' for k in keys)


def test_a_written_policy_loads_back_the_same(tmp_path):
    p = TrustPolicy()
    p.add(K1.public, ["llama*"], name="ci")
    p.add(K2.public, ["llama*"], threshold=2, name="release \"two\"")
    p.add(K3.public, ["bert", "bert-*"], ["staging", "prod"])
    p.add_root(ROOT.public, name="root")
    p.revoke(seed_key(7).keyid)
    path = tmp_path / "trust.toml"
    p.save(path)
    back = TrustPolicy.load(path)
    assert back.rules == [Rule(("llama*",), ("*",), (K1.keyid, K2.keyid), 2),
                          Rule(("bert", "bert-*"), ("staging", "prod"), (K3.keyid,), 1)]
    assert back.root_keys == [ROOT.keyid] and back.revoked == {seed_key(7).keyid}
    assert back.keys[K2.keyid].name == 'release "two"' and back.keys[K1.keyid].public == K1.public
    assert back.to_toml() == p.to_toml()
    assert [f for f in os.listdir(tmp_path) if f != "trust.toml"] == []  # no temporary file left


def test_add_extends_the_rule_with_the_same_globs_and_checks_the_threshold():
    p = TrustPolicy()
    with pytest.raises(TrustPolicyInvalid, match="threshold"):
        p.add(K1.public, ["llama*"], threshold=2)  # one key cannot meet 2
    p = TrustPolicy()
    p.add(K1.public, ["llama*"])
    rule = p.add(K2.public, ["llama*"], threshold=2)
    assert rule.keys == (K1.keyid, K2.keyid) and rule.threshold == 2
    assert p.add(K1.public, ["llama*"]).threshold == 2  # re-adding keeps the threshold
    assert len(p.add(K3.public, ["llama*"], ["prod"]).keys) == 1 and len(p.rules) == 2
    assert [i for i, _ in p.rules_for("llama3", "prod")] == [0, 1]
    assert [i for i, _ in p.rules_for("llama3", "dev")] == [0]
    assert p.rules_for("bert") == [] and p.rules_for("Llama3") == []  # globs are case-sensitive


BAD = {
    "rules[0].threshold": (lambda: _keys(K1) + f'[[rules]]\nartifacts = ["x"]\nkeys = ["{K1.keyid}"]\nthreshold = 2\n'),
    "rules[0].keys": (lambda: _keys(K1) + f'[[rules]]\nartifacts = ["x"]\nkeys = ["{K2.keyid}"]\n'),
    "rules[0].artifacts": (lambda: _keys(K1) + f'[[rules]]\nartifacts = "x"\nkeys = ["{K1.keyid}"]\n'),
    "rules[0].channels": (lambda: _keys(K1) + f'[[rules]]\nartifacts = ["x"]\nchannels = []\nkeys = ["{K1.keyid}"]\n'),
    "rules[0].revoked": (lambda: _keys(K1) + f'[[rules]]\nartifacts = ["x"]\nkeys = ["{K1.keyid}"]\nrevoked = []\n'),
    f"keys.{K1.keyid}.public": (lambda: f'[keys.{K1.keyid}]\npublic = "{K2.public.b64}"\n'),
    f"keys.{K2.keyid}.public": (lambda: f'[keys.{K2.keyid}]\npublic = "AAAA"\n'),
    f"keys.{K1.keyid}.colour": (lambda: _keys(K1).replace('name = "k"', 'colour = "red"')),
    "keys.ci": (lambda: '[keys.ci]\npublic = "x"\n'),
    "root.keys": (lambda: _keys(K1) + '[root]\nkeys = ["' + K2.keyid + '"]\n'),
    "root.threshold": (lambda: _keys(K1) + '[root]\nkeys = ["' + K1.keyid + '"]\nthreshold = 0\n'),
    "revoked": (lambda: 'revoked = ["abc"]\n'),
    "rule": (lambda: 'rule = []\n'),
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_trust_file_that_does_not_check_is_refused_naming_the_key(tmp_path, key):
    with pytest.raises(TrustPolicyInvalid) as e:
        TrustPolicy.load(_file(tmp_path, BAD[key]()))
    assert e.value.code == "trust_policy_invalid"
    assert e.value.message.startswith(f"{tmp_path / 'trust.toml'}: {key}: "), e.value.message


def test_a_trust_file_that_is_not_toml_or_missing_is_refused_with_where(tmp_path):
    with pytest.raises(TrustPolicyInvalid, match=r"not valid TOML: .*line 2"):
        TrustPolicy.load(_file(tmp_path, "[root]\nkeys = [1 2]\n"))
    with pytest.raises(TrustPolicyInvalid, match="cannot read"):
        TrustPolicy.load(tmp_path / "missing.toml")
    with pytest.raises(TrustPolicyInvalid, match="top-level key"):
        TrustPolicy.load(_file(tmp_path, BAD["rules[0].revoked"]()))


def test_with_delegations_adds_keys_rules_and_revocations_and_replaces_the_previous_statement():
    local = TrustPolicy()
    local.add(K1.public, ["llama*"])
    local.add_root(ROOT.public)
    d1 = DelegationsStatement(1, 2 ** 40, {K2.keyid: K2.public}, (Rule(("bert",), ("*",), (K2.keyid,), 1),),
                              (K1.keyid,))
    eff = local.with_delegations(d1)
    assert [i for i, _ in eff.rules_for("bert")] == [1] and eff.revoked == {K1.keyid}
    assert eff.keys[K2.keyid].delegated and not eff.keys[K1.keyid].delegated
    assert local.revoked == set() and len(local.rules) == 1  # the file's policy is unchanged
    d2 = DelegationsStatement(2, 2 ** 40, {K3.keyid: K3.public}, (Rule(("gpt*",), ("*",), (K3.keyid,), 1),), ())
    eff2 = eff.with_delegations(d2)
    assert eff2.rules_for("bert") == [] and eff2.revoked == set() and K2.keyid not in eff2.keys
    assert eff2.to_toml() == local.to_toml()  # saving never writes what delegations said
    with pytest.raises(TrustPolicyInvalid):
        eff2.add(K2.public, ["x"])


def test_to_delegations_is_the_files_rules_keys_and_revocations():
    p = TrustPolicy()
    p.add(K1.public, ["llama*"])
    p.add_root(ROOT.public)
    p.revoke(K3.keyid)
    d = p.to_delegations(5, 3600, now=1000)
    assert (d.version, d.expires, set(d.keys), d.revoked) == (5, 4600, {K1.keyid}, (K3.keyid,))
    assert d.rules == tuple(p.rules)


def test_the_trust_md_example_loads_and_its_code_table_names_every_refusal():
    import re
    from pathlib import Path

    from fabric import errors
    text = (Path(__file__).resolve().parents[2] / "docs" / "trust.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"^```toml\n(.*?)^```", text, re.S | re.M)
    p = TrustPolicy.loads(example, "trust.md")
    assert [r.threshold for r in p.rules] == [2, 1] and p.rules[1].channels == ("staging",)
    assert len(p.root_keys) == 1 and len(p.revoked) == 1 and p.keys[p.rules[0].keys[1]].name == "release"
    codes = {c.code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SignatureError)}
    codes |= {"trust_policy_invalid", "key_file_invalid"}
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    assert codes - {"signature_refused"} <= listed, codes - listed


def test_names_and_globs_of_any_printable_text_survive_a_save_and_others_are_refused(tmp_path):
    p = TrustPolicy()
    p.add(K1.public, ["😀*", 'a"b\\c', "é[xy]"], name='n😀é"\\')
    p.save(tmp_path / "t.toml")
    back = TrustPolicy.load(tmp_path / "t.toml")
    assert back.rules[0].artifacts == ("😀*", 'a"b\\c', "é[xy]") and back.keys[K1.keyid].name == 'n😀é"\\'
    for bad in ("a\x7f", "a\x01", "tab\tname"):
        q = TrustPolicy()
        q.add(K1.public, ["x"], name=bad)
        with pytest.raises(TrustPolicyInvalid, match=rf"keys\.{K1.keyid}\.name"):
            q.save(tmp_path / "u.toml")
        assert not (tmp_path / "u.toml").exists()
