"""docs/formats.md "Signed statements" "Test vectors": the page's bytes are what the code makes and accepts.

Each vector block is a fenced block whose info string says `vector=NAME`; this test reads
them all, rebuilds each from the stated inputs (the key's seed, the statement's fields
parsed from its payload) and compares byte for byte, and verifies each envelope with
a policy that trusts the test key. A change to the code's encoding or the page's
vectors fails here, so the two cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fabric.trust import Envelope, Key, Verifier, canonical, sign
from fabric.trust.envelope import PAYLOAD_TYPE, decode_canonical, pae
from fabric.trust.statements import ChannelStatement, DelegationsStatement, VersionStatement, parse_statement
from helpers.trust import policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "formats.md"
_VECTOR = re.compile(r"^```\w+ vector=(\S+)\n(.*?)\n^```", re.S | re.M)
VECTORS = dict(_VECTOR.findall(DOC.read_text(encoding="utf-8")))
KINDS = ("version", "channel", "delegations")


def _key_block() -> dict[str, str]:
    return dict(re.findall(r"^(\w[\w ()]*):\s+(\S+)$", VECTORS["key"], re.M))


def test_the_page_has_every_vector():
    assert {"key"} | {f"{k}-{part}" for k in KINDS for part in ("payload", "pae", "sig", "envelope")} <= set(VECTORS)


def test_the_key_vector_is_the_seed_0_to_31():
    block = _key_block()
    assert bytes.fromhex(block["seed"]) == bytes(range(32))
    key = Key.from_seed(bytes.fromhex(block["seed"]))
    assert (key.public.raw.hex(), key.public.b64, key.keyid) == (block["public"], block["base64"], block["keyid"])


@pytest.mark.parametrize("kind", KINDS)
def test_each_statement_vector_is_what_the_code_makes(kind):
    key = Key.from_seed(bytes.fromhex(_key_block()["seed"]))
    payload = VECTORS[f"{kind}-payload"].encode("utf-8")
    stmt = parse_statement(decode_canonical(payload, "vector"))
    assert type(stmt) is {"version": VersionStatement, "channel": ChannelStatement,
                          "delegations": DelegationsStatement}[kind]
    assert canonical(stmt) == payload  # the fields re-encode to exactly the page's bytes
    assert pae(PAYLOAD_TYPE, payload) == VECTORS[f"{kind}-pae"].encode("utf-8")
    env = sign(stmt, [key])
    assert env.signatures[0].sig.hex() == VECTORS[f"{kind}-sig"]
    assert env.to_bytes() == VECTORS[f"{kind}-envelope"].encode("utf-8")
    assert Envelope.from_bytes(env.to_bytes()).statement == stmt
    stated = re.search(rf"`digest` is `(sha256:[0-9a-f]{{64}})`\):\n\n```json vector={kind}-envelope",
                       DOC.read_text(encoding="utf-8"))
    assert stated and stated.group(1) == env.digest


def test_the_vector_envelopes_verify_under_a_policy_that_trusts_the_test_key():
    key = Key.from_seed(bytes(range(32)))
    ch = parse_statement(decode_canonical(VECTORS["channel-payload"].encode(), "vector"))
    v = Verifier(policy((["tiny*"], [key]), root=[key]), now=lambda: ch.signed_at + 60)
    version = v.verify_version(VECTORS["version-envelope"].encode(), "tiny", "v2", ch.manifest)
    assert version.keyids == (key.keyid,)
    assert v.verify_channel(VECTORS["channel-envelope"].encode(), "tiny", "prod").sequence == 1
    assert v.verify_delegations(VECTORS["delegations-envelope"].encode()).version == 1
