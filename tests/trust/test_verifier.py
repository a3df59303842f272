"""fabric/trust/verifier.py: every refusal of the threat model, thresholds, sequences, expiry, delegations."""

from __future__ import annotations

import base64
import json
import time

import pytest

from fabric import errors
from fabric.trust import DelegationsStatement, Envelope, TrustState, Verifier, canonical, digest, sign
from fabric.trust.statements import Rule
from helpers.trust import (MANIFEST_A, MANIFEST_B, policy, seed_key, signed_channel,
                           signed_version)

LLAMA, BERT, CO1, CO2, CO3, OTHER, ROOT, ROOT2 = (seed_key(i) for i in (1, 2, 3, 4, 5, 6, 9, 10))
NOW = 1796180000


def _verifier(**kw) -> Verifier:
    p = policy((["llama*"], [LLAMA]), (["bert"], [BERT], 1, ["staging"]), (["gpt*"], [CO1, CO2, CO3], 2), **kw)
    return Verifier(p, now=lambda: NOW)


def _refused(code: str, fn, *args, **kw):
    with pytest.raises(errors.SignatureError) as e:
        fn(*args, **kw)
    assert e.value.code == code, e.value.message
    return e.value


def test_a_version_signed_by_a_key_in_scope_is_verified():
    v = _verifier()
    got = v.verify_version(signed_version([LLAMA]), "llama3", "v1", MANIFEST_A)
    assert got.keyids == (LLAMA.keyid,) and got.rule == 0 and got.statement.manifest == MANIFEST_A
    assert TrustState.VERIFIED == "verified" and {TrustState.UNSIGNED, TrustState.STALE, TrustState.REFUSED} == \
        {"unsigned", "stale", "refused"}


def test_refusals_by_key():
    v = _verifier(revoked=[OTHER])
    _refused("unsigned", v.verify_version, None, "llama3", "v1", MANIFEST_A)
    _refused("unknown_key", v.verify_version, signed_version([seed_key(77)]), "llama3", "v1", MANIFEST_A)
    v.policy.add(OTHER.public, ["llama*"])  # trusted by a rule, and revoked: revocation wins
    _refused("key_revoked", v.verify_version, signed_version([OTHER]), "llama3", "v1", MANIFEST_A)
    e = _refused("key_out_of_scope", v.verify_version, signed_version([LLAMA], artifact="bert"), "bert", "v1",
                 MANIFEST_A)
    assert "bert" in e.message and e.http_status == 403
    _refused("key_out_of_scope", v.verify_version, signed_version([BERT], artifact="llama3"), "llama3", "v1",
             MANIFEST_A)


def test_a_signature_that_does_not_verify_is_refused():
    v = _verifier()
    env = Envelope.from_bytes(signed_version([LLAMA]))
    other = Envelope.from_bytes(signed_version([LLAMA], version="v2"))
    swapped = Envelope(env.payload, other.signatures)  # a real signature, over another statement
    _refused("signature_invalid", v.verify_version, swapped.to_bytes(), "llama3", "v1", MANIFEST_A)
    obj = env.to_json()
    sig = bytearray(base64.b64decode(obj["signatures"][0]["sig"]))
    sig[5] ^= 1
    obj["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    _refused("signature_invalid", v.verify_version, canonical(obj), "llama3", "v1", MANIFEST_A)
    obj["signatures"] = []
    _refused("unsigned", v.verify_version, canonical(obj), "llama3", "v1", MANIFEST_A)


def test_k_of_n_thresholds():
    v = _verifier()
    assert v.verify_version(signed_version([CO1, CO3], artifact="gpt2"), "gpt2", "v1", MANIFEST_A).keyids == \
        tuple(sorted([CO1.keyid, CO3.keyid], key=[CO1.keyid, CO2.keyid, CO3.keyid].index))
    e = _refused("threshold_not_met", v.verify_version, signed_version([CO2], artifact="gpt2"), "gpt2", "v1",
                 MANIFEST_A)
    assert "1 valid signature(s) of the 2" in e.message
    # one good cosigner plus a stranger is still one
    _refused("threshold_not_met", v.verify_version, signed_version([CO2, OTHER], artifact="gpt2"), "gpt2", "v1",
             MANIFEST_A)
    # two envelopes with one signature each merge into one that meets it
    merged = Envelope.from_bytes(signed_version([CO1], artifact="gpt2")).merge(
        Envelope.from_bytes(signed_version([CO2], artifact="gpt2")))
    assert v.verify_version(merged, "gpt2", "v1", MANIFEST_A).rule == 2


def test_mix_and_match_is_refused():
    v = _verifier()
    env = signed_version([LLAMA])
    _refused("statement_mismatch", v.verify_version, env, "llama3", "v1", MANIFEST_B)  # other manifest
    _refused("statement_mismatch", v.verify_version, env, "llama3", "v2", MANIFEST_A)  # other version
    _refused("statement_mismatch", v.verify_version, env, "llama2", "v1", MANIFEST_A)  # other artifact
    ch = signed_channel([LLAMA], now=NOW)
    _refused("statement_mismatch", v.verify_version, ch, "llama3", "v1", MANIFEST_A)  # a channel statement
    _refused("statement_mismatch", v.verify_channel, env, "llama3", "prod")  # a version statement
    _refused("statement_mismatch", v.verify_channel, ch, "llama3", "dev")  # other channel
    _refused("statement_mismatch", v.verify_channel, ch, "llama3", "prod", version="v2")
    _refused("statement_mismatch", v.verify_channel, ch, "llama3", "prod", manifest_id=MANIFEST_B)


def test_channel_scope_sequence_and_expiry():
    v = _verifier()
    assert v.verify_channel(signed_channel([BERT], artifact="bert", channel="staging", now=NOW),
                            "bert", "staging").sequence == 1
    _refused("key_out_of_scope", v.verify_channel, signed_channel([BERT], artifact="bert", now=NOW), "bert", "prod")
    five = signed_channel([LLAMA], sequence=5, now=NOW)
    s = v.verify_channel(five, "llama3", "prod", last_sequence=4, last_digest="sha256:" + "0" * 64)
    assert s.sequence == 5 and s.expires == NOW + 3600
    assert v.verify_channel(five, "llama3", "prod", last_sequence=5, last_digest=digest(five)).sequence == 5
    _refused("sequence_rollback", v.verify_channel, five, "llama3", "prod", last_sequence=6, last_digest="x")
    replay = signed_channel([LLAMA], sequence=5, version="v0", manifest=MANIFEST_B, now=NOW)
    _refused("sequence_rollback", v.verify_channel, replay, "llama3", "prod", last_sequence=5, last_digest=digest(five))
    old = signed_channel([LLAMA], sequence=6, now=NOW - 7200)
    e = _refused("statement_expired", v.verify_channel, old, "llama3", "prod", last_sequence=5)
    assert e.statement.sequence == 6 and e.statement.version == "v1"  # still shows what it said
    _refused("statement_expired", v.verify_channel, signed_channel([LLAMA], expires_in=0, now=NOW), "llama3", "prod")


def test_malformed_envelopes_are_refused_by_the_verifier():
    v = _verifier()
    good = signed_version([LLAMA])
    spaced = Envelope.from_bytes(good).to_json()
    spaced["payload"] = base64.b64encode(json.dumps(json.loads(base64.b64decode(spaced["payload"])),
                                                    sort_keys=True).encode()).decode()
    cases = {"statement_malformed": [good[:-2], good.replace(b'"payload":"', b'"payload":"!'), b"x" * 70000],
             "statement_not_canonical": [canonical(spaced), json.dumps(json.loads(good), indent=2).encode()]}
    for code, envs in cases.items():
        for env in envs:
            _refused(code, v.verify_version, env, "llama3", "v1", MANIFEST_A)


def _delegations(version: int, keys, rules, revoked=(), expires=NOW + 86400) -> DelegationsStatement:
    return DelegationsStatement(version, expires, {k.keyid: k.public for k in keys}, tuple(rules),
                                tuple(k.keyid for k in revoked))


def test_root_delegations_extend_rotate_and_revoke_publisher_keys():
    v = _verifier(root=[ROOT])
    new = seed_key(20)
    _refused("unknown_key", v.verify_version, signed_version([new], artifact="t5"), "t5", "v1", MANIFEST_A)
    # extend: root delegates t5* to a new key, without any site editing its file
    d1 = _delegations(1, [new], [Rule(("t5*",), ("*",), (new.keyid,), 1)])
    v.update_delegations(v.verify_delegations(sign(d1, [ROOT]).to_bytes()))
    assert v.verify_version(signed_version([new], artifact="t5"), "t5", "v1", MANIFEST_A).rule == 3
    # rotate: LLAMA is replaced by LLAMA2 for llama*; versions LLAMA signed before stay verifiable
    # until the revocation, then only LLAMA2's cosignature counts
    llama2 = seed_key(21)
    d2 = _delegations(2, [new, llama2], [Rule(("t5*",), ("*",), (new.keyid,), 1),
                                         Rule(("llama*",), ("*",), (llama2.keyid,), 1)], revoked=[LLAMA])
    v.update_delegations(v.verify_delegations(sign(d2, [ROOT]).to_bytes(), last_version=1))
    _refused("key_revoked", v.verify_version, signed_version([LLAMA]), "llama3", "v1", MANIFEST_A)
    cosigned = Envelope.from_bytes(signed_version([LLAMA])).merge(Envelope.from_bytes(signed_version([llama2])))
    assert v.verify_version(cosigned, "llama3", "v1", MANIFEST_A).keyids == (llama2.keyid,)
    # a replay of the older delegations is refused, and an expired one
    _refused("sequence_rollback", v.verify_delegations, sign(d1, [ROOT]).to_bytes(), last_version=2)
    _refused("statement_expired", v.verify_delegations, sign(_delegations(3, [], [], expires=NOW), [ROOT]).to_bytes(), 2)


def test_delegations_need_the_root_keys_at_their_threshold():
    v = _verifier(root=[ROOT, ROOT2], root_threshold=2)
    d = sign(_delegations(1, [], []), [ROOT]).to_bytes()
    _refused("threshold_not_met", v.verify_delegations, d)
    assert v.verify_delegations(sign(_delegations(1, [], []), [ROOT, ROOT2]).to_bytes()).version == 1
    _refused("key_out_of_scope", v.verify_delegations, sign(_delegations(1, [], []), [LLAMA]).to_bytes())
    _refused("key_out_of_scope", Verifier(policy((["x"], [LLAMA]))).verify_delegations,
             sign(_delegations(1, [], []), [LLAMA]).to_bytes())  # a file without [root] takes none
    revoked_root = _verifier(root=[ROOT], revoked=[ROOT])
    _refused("key_revoked", revoked_root.verify_delegations, sign(_delegations(1, [], []), [ROOT]).to_bytes())
    _refused("statement_mismatch", v.verify_delegations, signed_version([ROOT, ROOT2]))


def test_verification_is_cheap_enough_for_the_activation_path():
    v = _verifier()
    env, ch = signed_version([CO1, CO2], artifact="gpt2"), signed_channel([LLAMA], now=NOW)
    runs = []
    for _ in range(30):
        t = time.perf_counter()
        v.verify_version(env, "gpt2", "v1", MANIFEST_A)
        v.verify_channel(ch, "llama3", "prod")
        runs.append(time.perf_counter() - t)
    assert sorted(runs)[len(runs) // 2] < 0.005  # issue 12: < 5 ms added to an activation
