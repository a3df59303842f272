"""The origin's signed statements, against a real origin process: version envelopes
(`…/versions/{v}/signature`), channel statements in the move's compare-and-swap, and the
delegations envelope (`/v1/trust`). The origin holds no keys: it checks shape, names,
manifest ids and sequences, and passes envelopes on byte for byte.
"""

from __future__ import annotations

import json

import pytest

from fabric.core import digest
from fabric.core.manifest import FileEntry, Manifest
from fabric.store.registry import now_rfc3339
from fabric.trust import ChannelStatement, DelegationsStatement, Key, VersionStatement, sign
from fabric.wire import frames, protocol

from helpers.http import Session
from helpers.origin import ADMIN_SECRET, PULL_SECRET, PUBLISH_SECRET, start_origin

K1, K2 = Key.from_seed(b"1" * 32), Key.from_seed(b"2" * 32)
NOW = 1_800_000_000  # statements' times (the origin does not check them)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    o = start_origin(tmp_path_factory.mktemp("origin-sigs"))
    yield o
    o.stop()


@pytest.fixture(scope="module")
def s(origin):
    sess = Session(origin.url, PUBLISH_SECRET)
    yield sess
    sess.close()


def commit(s: Session, artifact: str, version: str) -> str:
    """Upload one chunk and commit a version of it; its manifest id."""
    data = f"{artifact}-{version} ".encode() * 200
    cid = digest.digest(data)
    stream = frames.encode_stream([frames.chunk_frame(cid, 0, len(data), data)])
    assert s.request("POST", "/v1/chunks/upload", stream, headers={"Content-Type": protocol.CHUNK_STREAM}).status == 200
    m = Manifest(artifact=artifact, version=version, created=now_rfc3339(),
                 files=(FileEntry("w.bin", len(data), 0o644, ((cid, len(data)),)),))
    assert s.request("PUT", f"/v1/artifacts/{artifact}/versions/{version}", m.canonical()).status == 201
    return m.id


def assert_error(r, status: int, code: str) -> None:
    assert r.status == status, (r.status, r.body[:300])
    assert r.error()["code"] == code, r.body[:300]


def version_env(artifact, version, mid, *keys, signed_at=NOW) -> bytes:
    return sign(VersionStatement(artifact, version, mid, signed_at), list(keys or [K1])).to_bytes()


def channel_env(artifact, channel, version, mid, action, seq, key=K1) -> dict:
    return sign(ChannelStatement(artifact, channel, version, mid, action, seq, NOW + 3600, NOW), [key]).to_json()


def sig_path(artifact, version):
    return f"/v1/artifacts/{artifact}/versions/{version}/signature"


def put_sig(s, artifact, version, data: bytes, token=None):
    return s.request("PUT", sig_path(artifact, version), data, token=token,
                     headers={"Content-Type": protocol.ENVELOPE})


def test_a_version_envelope_is_kept_and_served_byte_for_byte(s, origin):
    mid = commit(s, "sig-a", "v1")
    assert_error(s.request("GET", sig_path("sig-a", "v1")), 404, "signature_not_found")
    env = version_env("sig-a", "v1", mid)
    r = put_sig(s, "sig-a", "v1", env)
    assert r.status == 200 and r.body == env
    got = s.request("GET", sig_path("sig-a", "v1"), token=PULL_SECRET)
    assert got.status == 200 and got.body == env
    assert got.headers["content-type"].startswith(protocol.ENVELOPE)
    assert (origin.store / "sigs" / "sig-a" / "versions" / "v1").read_bytes() == env
    assert_error(s.request("GET", sig_path("sig-a", "nope")), 404, "version_not_found")


def test_a_cosignature_merges_and_another_statement_conflicts(s):
    mid = commit(s, "sig-b", "v1")
    assert put_sig(s, "sig-b", "v1", version_env("sig-b", "v1", mid, K1)).status == 200
    r = put_sig(s, "sig-b", "v1", version_env("sig-b", "v1", mid, K2))
    assert r.status == 200
    keyids = {sg["keyid"] for sg in json.loads(r.body)["signatures"]}
    assert keyids == {K1.keyid, K2.keyid}
    assert s.request("GET", sig_path("sig-b", "v1")).body == r.body
    other = version_env("sig-b", "v1", mid, K2, signed_at=NOW + 1)  # another payload
    assert_error(put_sig(s, "sig-b", "v1", other), 409, "conflict")
    assert s.request("GET", sig_path("sig-b", "v1")).body == r.body  # unchanged


def test_bad_version_envelopes_are_refused_with_their_codes(s):
    mid = commit(s, "sig-c", "v1")
    other = commit(s, "sig-c", "v2")
    cases = [
        (version_env("sig-c", "v1", other), 422, "statement_mismatch"),  # another manifest
        (version_env("sig-c", "v2", other), 422, "statement_mismatch"),  # another version
        (version_env("sig-x", "v1", mid), 422, "statement_mismatch"),  # another artifact
        (version_env("sig-c", "v1", mid).replace(b",", b", ", 1), 422, "statement_not_canonical"),
        (version_env("sig-c", "v1", mid)[:-9], 422, "statement_malformed"),  # truncated
        (json.dumps(channel_env("sig-c", "prod", "v1", mid, "promote", 1), sort_keys=True,
                    separators=(",", ":")).encode(), 422, "statement_malformed"),  # a channel statement
        (b"x" * (70 << 10), 413, "payload_too_large"),
    ]
    for body, status, code in cases:
        assert_error(put_sig(s, "sig-c", "v1", body), status, code)
    assert_error(s.request("GET", sig_path("sig-c", "v1")), 404, "signature_not_found")
    assert_error(put_sig(s, "sig-c", "v1", version_env("sig-c", "v1", mid), token=PULL_SECRET), 403, "forbidden")


def test_a_channel_statement_moves_with_the_channel_and_must_match_the_move(s):
    m1, m2 = commit(s, "sig-d", "v1"), commit(s, "sig-d", "v2")
    path = "/v1/artifacts/sig-d/channels/prod"
    st1 = channel_env("sig-d", "prod", "v1", m1, "promote", 1)
    r = s.request("POST", path, {"action": "promote", "version": "v1", "statement": st1})
    assert r.status == 200, r.body
    got = s.request("GET", path, token=PULL_SECRET).json()
    assert got["statement"] == st1 and got["sequence"] == 1 and got["version"] == "v1"
    refused = [
        (channel_env("sig-d", "prod", "v1", m1, "promote", 2), 422, "statement_mismatch"),  # another version
        (channel_env("sig-d", "prod", "v2", m1, "promote", 2), 422, "statement_mismatch"),  # another manifest
        (channel_env("sig-d", "canary", "v2", m2, "promote", 2), 422, "statement_mismatch"),  # another channel
        (channel_env("sig-d", "prod", "v2", m2, "rollback", 2), 422, "statement_mismatch"),  # another action
        (channel_env("sig-d", "prod", "v2", m2, "promote", 1), 409, "conflict"),  # a replayed sequence
        (channel_env("sig-d", "prod", "v2", m2, "promote", 3), 409, "conflict"),  # a skipped one
        ({"payload": "e30=", "payloadType": "x", "signatures": []}, 422, "statement_malformed"),
        ("not an envelope", 422, "statement_malformed"),
    ]
    for st, status, code in refused:
        assert_error(s.request("POST", path, {"action": "promote", "version": "v2", "statement": st}), status, code)
    assert s.request("GET", path).json() == got  # nothing moved
    st2 = channel_env("sig-d", "prod", "v2", m2, "promote", 2)
    assert s.request("POST", path, {"action": "promote", "version": "v2", "statement": st2}).status == 200
    st3 = channel_env("sig-d", "prod", "v1", m1, "rollback", 3)
    r = s.request("POST", path, {"action": "rollback", "statement": st3})
    assert r.status == 200 and r.json()["version"] == "v1" and r.json()["sequence"] == 3
    # an unsigned move drops the statement and keeps the sequence, so the next signed one is 4
    assert s.request("POST", path, {"action": "promote", "version": "v2"}).status == 200
    got = s.request("GET", path).json()
    assert "statement" not in got and got["sequence"] == 3
    st4 = channel_env("sig-d", "prod", "v1", m1, "promote", 4)
    assert s.request("POST", path, {"action": "promote", "version": "v1", "statement": st4}).status == 200


def test_delegations_go_up_only_and_only_with_an_admin_token(s, origin):
    assert_error(s.request("GET", "/v1/trust"), 404, "trust_not_found")

    def deleg(version: int) -> bytes:
        stmt = DelegationsStatement(version, NOW + 86400, {K2.keyid: K2.public}, (), ())
        return sign(stmt, [K1]).to_bytes()
    hdrs = {"Content-Type": protocol.ENVELOPE}
    assert_error(s.request("PUT", "/v1/trust", deleg(1), headers=hdrs), 403, "forbidden")
    r = s.request("PUT", "/v1/trust", deleg(2), token=ADMIN_SECRET, headers=hdrs)
    assert r.status == 200 and r.json() == {"version": 2}
    for v in (1, 2):
        assert_error(s.request("PUT", "/v1/trust", deleg(v), token=ADMIN_SECRET, headers=hdrs), 409, "conflict")
    bad = version_env("sig-a", "v1", "blake3:" + "0" * 64)
    assert_error(s.request("PUT", "/v1/trust", bad, token=ADMIN_SECRET, headers=hdrs), 422, "statement_malformed")
    got = s.request("GET", "/v1/trust", token=PULL_SECRET)
    assert got.status == 200 and got.body == deleg(2)
    assert s.request("PUT", "/v1/trust", deleg(3), token=ADMIN_SECRET, headers=hdrs).json() == {"version": 3}
