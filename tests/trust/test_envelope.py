"""fabric/trust/envelope.py: canonical JSON, DSSE PAE, envelope parsing (every malformed form), merge, digest."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.core.limits import MAX_STATEMENT_BYTES
from fabric.errors import SignatureError, StatementMalformed, StatementMismatch, StatementNotCanonical
from fabric.trust import Envelope, Verifier, VersionStatement, canonical, digest, sign
from fabric.trust.envelope import MAX_SIGNATURES, PAYLOAD_TYPE, decode_canonical, pae
from helpers.trust import MANIFEST_A, MANIFEST_B, policy, seed_key

K1, K2 = seed_key(1), seed_key(2)


def _env(keys=(K1,), **kw) -> Envelope:
    return sign(VersionStatement(kw.get("artifact", "llama3"), kw.get("version", "v1"), MANIFEST_A, 1796180000),
                list(keys))


def test_canonical_json_sorts_keys_drops_spaces_and_keeps_utf8():
    assert canonical({"b": [1, True, "é"], "a": {"z": 0, "y": "\n"}}) == \
        '{"a":{"y":"\\n","z":0},"b":[1,true,"é"]}'.encode()


@pytest.mark.parametrize("value", [1.5, None, -1, 2 ** 53, {"é": 1}, {1: 1}, "\ud800", b"x", (1,)])
def test_canonical_json_refuses_values_outside_the_allowed_set(value):
    with pytest.raises(StatementMalformed):
        canonical({"x": value})


@pytest.mark.parametrize("text", ['{"b":1,"a":2}', '{"a": 1}', '{"a":"\\u00e9"}', '{"a":1,"a":1}', '{"a":1}\n',
                                  '{"a":1.0}', '{"a":"\\/"}'])
def test_reading_refuses_json_that_is_not_its_own_canonical_encoding(text):
    with pytest.raises(StatementMalformed):  # StatementNotCanonical, or malformed for the float
        decode_canonical(text.encode(), "x")
    assert decode_canonical(b'{"a":1,"b":"\\u0001"}', "x") == {"a": 1, "b": "\x01"}


def test_pae_is_dsse_v1():
    # the DSSE specification's example (github.com/secure-systems-lab/dsse, protocol.md)
    assert pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_an_envelope_round_trips_through_its_canonical_bytes():
    env = _env((K2, K1))
    data = env.to_bytes()
    assert data == canonical(json.loads(data))
    back = Envelope.from_bytes(data)
    assert back == env and back.keyids == sorted([K1.keyid, K2.keyid])
    assert back.statement == VersionStatement("llama3", "v1", MANIFEST_A, 1796180000)
    assert Envelope.from_json(json.loads(data)) == env
    assert all(K.public.verify(s.sig, pae(PAYLOAD_TYPE, env.payload))
               for K, s in zip(sorted([K1, K2], key=lambda k: k.keyid), back.signatures))


def _mutate(change) -> bytes:
    obj = json.loads(_env().to_bytes())
    change(obj)
    return canonical(obj)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


MALFORMED = {
    "truncated": lambda: _env().to_bytes()[:-7],
    "empty": lambda: b"",
    "not json": lambda: b"\xff\xfe",
    "a list": lambda: b"[]",
    "extra field": lambda: _mutate(lambda o: o.update(x="1")),
    "missing field": lambda: _mutate(lambda o: o.pop("signatures")),
    "payload type": lambda: _mutate(lambda o: o.update(payloadType="application/json")),
    "payload bad base64": lambda: _mutate(lambda o: o.update(payload=o["payload"][:-3] + "!")),
    "payload base64 unpadded": lambda: _mutate(lambda o: o.update(payload=o["payload"].rstrip("="))),
    "payload urlsafe base64": lambda: _mutate(lambda o: o.update(payload=_b64(b'{"a":"\xff\xfe?"}').replace("/", "_"))),
    "payload not a statement": lambda: _mutate(lambda o: o.update(payload=_b64(b'{"a":1}'))),
    "sig bad base64": lambda: _mutate(lambda o: o["signatures"][0].update(sig="***")),
    "sig too short": lambda: _mutate(lambda o: o["signatures"][0].update(sig=_b64(b"x" * 63))),
    "keyid uppercase": lambda: _mutate(lambda o: o["signatures"][0].update(keyid=K1.keyid.upper())),
    "signature extra field": lambda: _mutate(lambda o: o["signatures"][0].update(x="y")),
    "repeated keyid": lambda: _mutate(lambda o: o["signatures"].append(dict(o["signatures"][0]))),
    "too many signatures": lambda: _mutate(lambda o: o.update(signatures=[
        {"keyid": seed_key(i).keyid, "sig": _b64(b"s" * 64)} for i in range(MAX_SIGNATURES + 1)])),
    "oversize": lambda: b" " * (MAX_STATEMENT_BYTES + 1),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_envelopes_are_refused_with_statement_malformed(case):
    data = MALFORMED[case]()
    with pytest.raises(StatementMalformed):
        Envelope.from_bytes(data).statement  # noqa: B018 (parsing the payload is part of reading it)


def test_an_oversize_envelope_is_refused_before_it_is_parsed():
    big = _env().to_bytes() + b" " * MAX_STATEMENT_BYTES
    with pytest.raises(StatementMalformed, match="more than the 65536"):
        Envelope.from_bytes(big)


def test_non_canonical_envelopes_and_payloads_are_refused():
    env = _env()
    with pytest.raises(StatementNotCanonical):
        Envelope.from_bytes(json.dumps(env.to_json(), indent=1).encode())
    spaced = json.dumps(env.statement.to_json(), sort_keys=True).encode()  # ", " and ": " separators
    obj = env.to_json()
    obj["payload"] = _b64(spaced)
    with pytest.raises(StatementNotCanonical):
        Envelope.from_bytes(canonical(obj))


def test_merge_unions_signatures_by_keyid_and_refuses_another_statement():
    a, b = _env((K1,)), _env((K2,))
    merged = a.merge(b)
    assert merged.keyids == sorted([K1.keyid, K2.keyid]) and merged.payload == a.payload
    assert merged.merge(a) == merged
    assert digest(merged.to_bytes()) == digest(a.to_bytes()) == a.digest
    with pytest.raises(StatementMismatch):
        a.merge(_env((K1,), version="v2"))
    assert digest(_env(version="v2")) != a.digest


def test_sign_refuses_a_statement_a_verifier_would_refuse():
    with pytest.raises(StatementMalformed):
        sign({"_type": "fabric.version/v1", "artifact": "x"}, [K1])
    with pytest.raises(StatementMalformed):
        sign(VersionStatement("llama3", "v1", MANIFEST_B), [])


# --- generated inputs: canonical round trips, and hostile envelopes raise only refusals ---------------

_values = st.recursive(
    st.booleans() | st.integers(0, 2 ** 53 - 1) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text("abc_Z", max_size=4), inner, max_size=4),
    max_leaves=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2 ** 60) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
_FIELDS = st.sampled_from(["payload", "payloadType", "signatures", "keyid", "sig", "_type", "artifact",
                           "version", "manifest", "sequence", "keys", "rules", "public", "threshold"])
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@_SETTINGS
@given(_values)
def test_canonical_bytes_decode_to_the_same_value(value):
    data = canonical({"v": value})
    assert decode_canonical(data, "x") == {"v": value}


def _envelope_obj() -> dict:
    return json.loads(_env((K1, K2)).to_bytes())


@_SETTINGS
@given(st.data())
def test_any_change_to_an_envelope_is_accepted_only_if_it_still_verifies_and_raises_only_refusals(data):
    v = Verifier(policy((["llama*"], [K1, K2], 2)))
    obj = _envelope_obj()
    statement = json.loads(base64.b64decode(obj["payload"]))
    where = data.draw(st.sampled_from(["envelope", "signature", "statement"]))
    target = {"envelope": obj, "signature": obj["signatures"][0], "statement": statement}[where]
    key = data.draw(st.sampled_from(sorted(target)) | _FIELDS)
    if data.draw(st.booleans()):
        target[key] = data.draw(_json)
    else:
        target.pop(key, None)
    obj["payload"] = _b64(json.dumps(statement, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8", "surrogatepass"))
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(blob)))
        blob = blob[:cut] + data.draw(st.binary(max_size=3)) + blob[cut + 1:]
    try:
        got = v.verify_version(blob, "llama3", "v1", MANIFEST_A)
    except SignatureError:
        return
    assert got.statement == VersionStatement("llama3", "v1", MANIFEST_A, 1796180000)  # only the true statement passes
