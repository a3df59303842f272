"""The origin as a real process: its routes, every kind of bad input, and its event stream.

Every bad request must get the right status and a JSON `{"code", "message"}` body, leave
the store as it was, and leave the origin healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest

from fabric.core import digest
from fabric.core.codec import Encoding

from fabric.wire import frames as wire
from fabric.wire import protocol
from fabric.wire.client import OriginClient
from fabric.core.manifest import FileEntry, Manifest
from fabric.store.registry import now_rfc3339

from helpers.http import Session, raw_exchange, request
from helpers.origin import ADMIN_SECRET, PUBLISH_SECRET, PULL_SECRET, fabric_json, start_origin

UNKNOWN_TAG = max(Encoding) + 1  # the first tag no version of the codec has defined yet


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    o = start_origin(tmp_path_factory.mktemp("origin"))
    yield o
    o.stop()


@pytest.fixture
def s(origin):
    sess = Session(origin.url, PUBLISH_SECRET)
    yield sess
    sess.close()


def blob(tag: str, n: int = 3000) -> tuple[str, bytes]:
    data = (tag.encode() * (n // len(tag) + 1))[:n]
    return digest.digest(data), data


def upload(s: Session, *blobs: tuple[str, bytes]):
    stream = wire.encode_stream([wire.chunk_frame(cid, 0, len(d), d) for cid, d in blobs])
    return s.request("POST", "/v1/chunks/upload", stream, headers={"Content-Type": protocol.CHUNK_STREAM})


def manifest_for(artifact: str, version: str, *blobs: tuple[str, bytes]) -> Manifest:
    files = tuple(FileEntry(f"f{i}.bin", len(d), 0o644, ((cid, len(d)),)) for i, (cid, d) in enumerate(blobs))
    return Manifest(artifact=artifact, version=version, created=now_rfc3339(), files=files)


def put_manifest(s: Session, m: Manifest, artifact=None, version=None):
    return s.request("PUT", f"/v1/artifacts/{artifact or m.artifact}/versions/{version or m.version}",
                     m.canonical())


def stored(origin, cid: str) -> bool:
    h = digest.hex_of(cid)
    return (origin.store / "chunks" / h[:2] / h).exists()


def assert_error(r, status: int, code: str) -> dict:
    assert r.status == status, (r.status, r.body[:300])
    err = r.error()
    assert err["code"] == code, err
    return err


def assert_healthy(origin):
    assert request(origin.url, "GET", "/livez").status == 200
    assert origin.alive()


# --- the happy path ------------------------------------------------------------------------------------

def test_publish_and_read_back_through_the_routes(origin, s):
    a, b = blob("alpha"), blob("beta")
    r = upload(s, a, b)
    assert r.status == 200 and r.json() == {"stored": 2, "bytes": len(a[1]) + len(b[1])}
    m = manifest_for("routes", "v1", a, b)
    r = put_manifest(s, m)
    assert r.status == 201 and r.json() == {"artifact": "routes", "version": "v1", "manifest_id": m.id}
    assert put_manifest(s, m).status == 201  # committing the same thing again is a no-op

    r = s.request("GET", "/v1/artifacts/routes/versions/v1")
    assert r.status == 200 and r.headers["x-fabric-manifest-id"] == m.id == digest.digest(r.body)
    assert Manifest.from_bytes(r.body) == m
    versions = s.request("GET", "/v1/artifacts/routes/versions").json()["versions"]
    assert [(v["version"], v["manifest_id"]) for v in versions] == [("v1", m.id)]
    assert "routes" in s.request("GET", "/v1/artifacts").json()["artifacts"]

    r = s.request("POST", "/v1/artifacts/routes/channels/prod", {"action": "promote", "version": "v1"})
    assert r.status == 200 and r.json()["version"] == "v1"
    chans = s.request("GET", "/v1/artifacts/routes/channels").json()["channels"]
    assert [(c["channel"], c["version"]) for c in chans] == [("prod", "v1")]


def test_version_exists_with_other_content_is_409(origin, s):
    a, c = blob("one"), blob("two")
    upload(s, a, c)
    assert put_manifest(s, manifest_for("clash", "v1", a)).status == 201
    r = put_manifest(s, manifest_for("clash", "v1", c))
    assert_error(r, 409, "version_exists")
    got = Manifest.from_bytes(s.request("GET", "/v1/artifacts/clash/versions/v1").body)
    assert got.files[0].chunks[0][0] == a[0]  # the first one stands


def test_channel_errors(origin, s):
    a = blob("chan")
    upload(s, a)
    put_manifest(s, manifest_for("chans", "v1", a))
    assert_error(s.request("POST", "/v1/artifacts/chans/channels/prod", {"action": "promote", "version": "v7"}),
                 404, "version_not_found")
    assert_error(s.request("POST", "/v1/artifacts/chans/channels/prod", {"action": "rollback"}),
                 422, "invalid_input")
    assert_error(s.request("POST", "/v1/artifacts/chans/channels/prod", {"action": "delete"}), 422, "invalid_input")
    assert_error(s.request("POST", "/v1/artifacts/chans/channels/prod", {"action": "promote", "version": ["v1"]}),
                 422, "invalid_name")
    assert_error(s.request("GET", "/v1/artifacts/chans/channels/nope"), 404, "channel_not_found")
    assert_error(s.request("GET", "/v1/artifacts/nope/versions/v1"), 404, "artifact_not_found")
    assert_error(s.request("GET", "/v1/artifacts/chans/versions/v9"), 404, "version_not_found")


# --- bad JSON ---------------------------------------------------------------------------------------------

JSON_ROUTES = [("POST", "/v1/chunks/has"), ("POST", "/v1/chunks/fetch"),
               ("POST", "/v1/artifacts/m/channels/prod")]


@pytest.mark.parametrize("method, path", JSON_ROUTES)
@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"ids"', b"null", b"{" * 100_000,
                                  b"[" * 50_000 + b"]" * 50_000, b'{"ids": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"])
def test_malformed_json_is_422(origin, s, method, path, body):
    r = s.request(method, path, body, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_input")


@pytest.mark.parametrize("path", ["/v1/chunks/has", "/v1/chunks/fetch"])
@pytest.mark.parametrize("ids, code", [
    ({"ids": "blake3:" + "0" * 64}, "invalid_input"),
    ({"idz": []}, "invalid_input"),
    ({"ids": ["blake3:xyz"]}, "invalid_chunk_id"),
    ({"ids": ["blake3:" + "A" * 64]}, "invalid_chunk_id"),
    ({"ids": ["sha256:" + "0" * 64]}, "invalid_chunk_id"),
    ({"ids": ["blake3:" + "0" * 63]}, "invalid_chunk_id"),
    ({"ids": [None]}, "invalid_chunk_id"),
    ({"ids": [["blake3:" + "0" * 64]]}, "invalid_chunk_id"),
])
def test_bad_chunk_ids_are_422(origin, s, path, ids, code):
    assert_error(s.request("POST", path, ids), 422, code)


@pytest.mark.parametrize("path", ["/v1/chunks/has", "/v1/chunks/fetch"])
def test_too_many_ids_is_413(origin, s, path):
    ids = [digest.digest(i.to_bytes(4, "big")) for i in range(protocol.MAX_IDS + 1)]
    err = assert_error(s.request("POST", path, {"ids": ids}), 413, "payload_too_large")
    assert str(protocol.MAX_IDS) in err["message"]
    assert s.request("POST", "/v1/chunks/has", {"ids": ids[:protocol.MAX_IDS]}).status == 200  # the limit itself is fine


def test_oversized_json_body_is_413(origin, s):
    body = json.dumps({"ids": [], "pad": "x" * (protocol.MAX_JSON + 1000)}).encode()
    big_manifest = b'{"format": "' + b"x" * (protocol.MAX_JSON + 10) + b'"}'
    answered = 0
    for method, path, data in (("POST", "/v1/chunks/has", body), ("POST", "/v1/artifacts/m/channels/prod", body),
                               ("PUT", "/v1/artifacts/big/versions/v1", big_manifest)):
        try:
            r = s.request(method, path, data)
        except (BrokenPipeError, ConnectionResetError):  # the server may stop reading early
            s.close()
            continue
        assert_error(r, 413, "payload_too_large")
        answered += 1
    assert answered >= 1
    assert_healthy(origin)
    assert s.request("GET", "/v1/artifacts/big/versions").json()["versions"] == []


# --- uploads --------------------------------------------------------------------------------------------

def test_upload_whose_bytes_do_not_match_the_id_is_422_and_not_stored(origin, s):
    cid, data = blob("honest")
    _, other = blob("liar")
    stream = wire.encode_stream([wire.chunk_frame(cid, 0, len(other), other)])
    before = origin.counter("fabric_chunks_received_total")
    assert_error(s.request("POST", "/v1/chunks/upload", stream), 422, "corrupt_chunk")
    assert not stored(origin, cid)
    assert s.request("POST", "/v1/chunks/has", {"ids": [cid]}).json() == {"missing": [cid]}
    assert origin.counter("fabric_chunks_received_total") == before
    # the right bytes under that id are then accepted
    assert upload(s, (cid, data)).status == 200 and stored(origin, cid)


@pytest.mark.parametrize("make, code", [
    (lambda cid, d: b"garbage, not a chunk stream", "bad_frame"),
    (lambda cid, d: wire.encode_stream([wire.missing_frame(cid)]), "bad_frame"),
    (lambda cid, d: wire.encode_stream([wire.chunk_frame(cid, 0, len(d) + 1, d)]), "bad_frame"),  # raw size lies
    (lambda cid, d: wire.encode_stream([wire.chunk_frame(cid, UNKNOWN_TAG, len(d), d)]), "corrupt_chunk"),  # unknown encoding
    (lambda cid, d: wire.encode_stream([wire.chunk_frame(cid, 1, len(d), d)]), "bad_frame"),  # not zstd
    (lambda cid, d: protocol.MAGIC + b"\x01" + wire.id_bytes(cid) + b"\x00" + (1 << 30).to_bytes(4, "big")
     + (1 << 30).to_bytes(4, "big"), "bad_frame"),  # sizes out of range
])
def test_malformed_uploads_are_422_and_store_nothing(origin, s, make, code):
    cid, data = blob(f"malformed-{code}-{make.__code__.co_firstlineno}")
    r = s.request("POST", "/v1/chunks/upload", make(cid, data))
    assert_error(r, 422, code)
    assert not stored(origin, cid)


def test_upload_without_end_frame_is_422_and_keeps_only_whole_verified_chunks(origin, s):
    cid, data = blob("no-end-frame")
    r = s.request("POST", "/v1/chunks/upload", protocol.MAGIC + wire.chunk_frame(cid, 0, len(data), data))
    assert_error(r, 422, "bad_frame")
    if stored(origin, cid):  # a complete, verified frame before the break may be kept: it is whole
        assert fetch_one(origin, cid) == data


def fetch_one(origin, cid: str) -> bytes:
    # admin: a chunk no version names yet is shown to admin tokens only (protocol.md, scopes)
    r = request(origin.url, "POST", "/v1/chunks/fetch", {"ids": [cid]}, token=ADMIN_SECRET)
    assert r.status == 200

    async def parse():
        return [f async for f in wire.FrameReader(wire.bytes_reader(r.body))]
    (frame,) = asyncio.run(parse())
    return wire.decode_frame(frame)


def test_zstd_bomb_upload_is_refused(origin, s):
    header = (0xFD2FB528).to_bytes(4, "little") + b"\xe0" + (1 << 40).to_bytes(8, "little")
    bomb = header + (1 | (1 << 1) | ((128 << 10) << 3)).to_bytes(3, "little") + b"\0"
    cid = digest.digest(b"bomb")
    r = s.request("POST", "/v1/chunks/upload", wire.encode_stream([wire.chunk_frame(cid, 1, 0, bomb)]))
    assert_error(r, 422, "bad_frame")
    assert_healthy(origin)


def _tmp_files(origin) -> list[str]:
    tmp = origin.store / "tmp"
    return os.listdir(tmp) if tmp.exists() else []


def test_truncated_upload_stores_nothing_partial_and_origin_stays_healthy(origin, s):
    whole_id, whole = blob("complete-frame", 50_000)
    cut_id, cut = blob("cut-mid-payload", 200_000)
    partial = wire.chunk_frame(cut_id, 0, len(cut), cut)[:100_000]
    body = protocol.MAGIC + wire.chunk_frame(whole_id, 0, len(whole), whole) + partial
    head = (f"POST /v1/chunks/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {PUBLISH_SECRET}\r\n"
            f"Content-Type: {protocol.CHUNK_STREAM}\r\nContent-Length: {len(body) + 500_000}\r\n\r\n").encode()
    uploads = _upload_requests(origin)
    raw_exchange("127.0.0.1", origin.port, head + body, read=False)  # connection closed mid-body
    assert_healthy(origin)
    # the handler ends (and is counted) only once its store threads are done; an fsync can
    # take seconds while the disk flushes other tests' data
    deadline = time.monotonic() + 60
    while _upload_requests(origin) == uploads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _upload_requests(origin) == uploads + 1
    assert not stored(origin, cut_id)
    assert _tmp_files(origin) == []
    assert s.request("POST", "/v1/chunks/has", {"ids": [cut_id]}).json() == {"missing": [cut_id]}
    # a chunk stored from a stream that later broke is whole and correct (it was verified)
    if stored(origin, whole_id):
        assert fetch_one(origin, whole_id) == whole
    report = fabric_json("fsck", "--store", origin.store)
    assert report["ok"] and report["bad_chunks"] == []


def _upload_requests(origin) -> float:
    return sum(v for k, v in origin.metrics().items()
               if k.startswith('fabric_http_requests_total{route="/v1/chunks/upload"'))


def test_truncated_json_body_leaves_origin_healthy(origin):
    body = json.dumps({"ids": [digest.digest(b"x")]}).encode()
    head = (f"POST /v1/chunks/has HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_SECRET}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode()
    raw_exchange("127.0.0.1", origin.port, head + body[:10], read=False)
    with socket.create_connection(("127.0.0.1", origin.port)) as sock:  # and one that just dangles, then goes
        sock.sendall(head)
    assert_healthy(origin)


def test_slowloris_style_request_does_not_block_others(origin, s):
    head = (f"POST /v1/chunks/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_SECRET}\r\n"
            f"Content-Length: 1000000\r\n\r\n").encode() + protocol.MAGIC
    with socket.create_connection(("127.0.0.1", origin.port)) as sock:
        sock.sendall(head)
        t0 = time.monotonic()
        assert s.request("GET", "/v1/artifacts").status == 200
        assert time.monotonic() - t0 < 2


# --- manifests -------------------------------------------------------------------------------------------

def test_manifest_naming_chunks_the_origin_lacks_is_409_and_commits_nothing(origin, s):
    have, lack = blob("have"), blob("lack-this-one")
    upload(s, have)
    m = manifest_for("partial", "v1", have, lack)
    err = assert_error(put_manifest(s, m), 409, "missing_chunks")
    assert "1 chunk" in err["message"]
    assert_error(s.request("GET", "/v1/artifacts/partial/versions/v1"), 404, "artifact_not_found")
    assert not (origin.store / "manifests" / digest.hex_of(m.id)[:2] / f"{digest.hex_of(m.id)}.json").exists()
    assert "partial" not in s.request("GET", "/v1/artifacts").json()["artifacts"]
    upload(s, lack)  # once the chunk is there, the same manifest commits
    assert put_manifest(s, m).status == 201


@pytest.mark.parametrize("url_artifact, url_version", [("mismatch", "v2"), ("other-name", "v1")])
def test_manifest_whose_url_and_body_disagree_is_422(origin, s, url_artifact, url_version):
    a = blob("mismatch")
    upload(s, a)
    m = manifest_for("mismatch", "v1", a)
    err = assert_error(put_manifest(s, m, url_artifact, url_version), 422, "invalid_manifest")
    assert "URL says" in err["message"]
    assert s.request("GET", f"/v1/artifacts/{url_artifact}/versions/{url_version}").status == 404
    assert s.request("GET", "/v1/artifacts/mismatch/versions/v1").status == 404  # nor under the body's name


@pytest.mark.parametrize("body", [b"{}", b"not json", b'{"format": "fabric.manifest/1", "artifact": "m"}',
                                  b'{"format": "fabric.manifest/1", "artifact": "m", "version": "v1", '
                                  b'"created": "x", "files": [{"path": "../etc/passwd", "size": 0, '
                                  b'"mode": 420, "chunks": []}]}'])
def test_malformed_manifest_is_422(origin, s, body):
    r = s.request("PUT", "/v1/artifacts/m/versions/v1", body)
    assert r.status == 422 and r.error()["code"] in ("invalid_manifest", "invalid_name")


def test_manifest_nested_too_deeply_or_with_lone_surrogates_is_422(origin, s):
    deep = b'{"format": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert_error(s.request("PUT", "/v1/artifacts/m/versions/v1", deep), 422, "invalid_manifest")
    a = blob("surrogate")
    upload(s, a)
    obj = manifest_for("surrogates", "v1", a).to_json()
    obj["metadata"] = {"note": "\ud800"}  # valid JSON ("\\ud800"), but no UTF-8 form
    err = assert_error(s.request("PUT", "/v1/artifacts/surrogates/versions/v1", json.dumps(obj).encode()),
                       422, "invalid_manifest")
    assert "surrogate" in err["message"]
    assert s.request("GET", "/v1/artifacts/surrogates/versions").json()["versions"] == []


@pytest.mark.parametrize("path", ["/v1/artifacts/-bad/versions", "/v1/artifacts/m/versions/.hidden",
                                  "/v1/artifacts/m%20x/channels", "/v1/artifacts/" + "a" * 200 + "/versions"])
def test_invalid_names_in_urls_are_422(origin, s, path):
    assert_error(s.request("GET", path), 422, "invalid_name")


# --- routing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nothing-here", 404, "not_found"),
    ("GET", "/v2/artifacts", 404, "not_found"),
    ("POST", "/livez/more", 404, "not_found"),
    ("DELETE", "/v1/artifacts", 405, "method_not_allowed"),
    ("GET", "/v1/chunks/upload", 405, "method_not_allowed"),
])
def test_unknown_routes_are_json_errors(origin, s, method, path, status, code):
    assert_error(s.request(method, path), status, code)


def test_errors_are_counted_by_code_and_never_500(origin, s):
    s.request("POST", "/v1/chunks/has", {"ids": ["nope"]})
    m = origin.metrics()
    assert m['fabric_errors_total{code="invalid_chunk_id"}'] >= 1
    assert not any(k.startswith("fabric_errors_total") and '"internal"' in k for k in m)
    assert not any('status="500"' in k and v > 0 for k, v in m.items())
    assert "unhandled error" not in origin.log_text()


# --- events ---------------------------------------------------------------------------------------------

def test_events_announce_versions_and_channel_moves(tmp_path):
    o = start_origin(tmp_path)

    async def go():
        async with OriginClient(o.url, PUBLISH_SECRET) as c, OriginClient(o.url, PULL_SECRET) as follower:
            stream = follower.events()
            kind, hello = await asyncio.wait_for(anext(stream), 10)
            assert kind == "hello" and hello["seq"] == 0 and hello["complete"] is True
            assert isinstance(hello["epoch"], str) and len(hello["epoch"]) >= 8

            a = blob("evented")
            await c.upload([(a[0], 0, len(a[1]), a[1])])
            m = manifest_for("ev", "v1", a)
            mid = await c.commit(m)
            await c.promote("ev", "v1", "prod")
            kind1, e1 = await asyncio.wait_for(anext(stream), 10)
            kind2, e2 = await asyncio.wait_for(anext(stream), 10)
            await stream.aclose()
            assert (kind1, e1["artifact"], e1["version"], e1["manifest_id"], e1["seq"]) == ("version", "ev", "v1", mid, 1)
            assert (kind2, e2["channel"], e2["version"], e2["action"], e2["seq"]) == ("channel", "prod", "v1", "promote", 2)

            # a follower resuming after seq 1 gets only what came later
            resumed = follower.events(after=1)
            kind, hello2 = await asyncio.wait_for(anext(resumed), 10)
            assert hello2["epoch"] == hello["epoch"] and hello2["seq"] == 2
            kind, e = await asyncio.wait_for(anext(resumed), 10)
            await resumed.aclose()
            assert (kind, e["seq"]) == ("channel", 2)
            return hello["epoch"]

    try:
        epoch = asyncio.run(go())
        o.restart()

        async def after_restart():
            async with OriginClient(o.url, PULL_SECRET) as follower:
                stream = follower.events(after=2)
                kind, hello = await asyncio.wait_for(anext(stream), 10)
                await stream.aclose()
                return kind, hello
        kind, hello = asyncio.run(after_restart())
        assert kind == "hello" and hello["epoch"] != epoch and hello["seq"] == 0  # a new epoch: re-sync
    finally:
        o.stop()


def test_events_need_a_pull_token_and_a_valid_after(origin):
    assert_error(request(origin.url, "GET", "/v1/events"), 401, "unauthorized")
    assert_error(request(origin.url, "GET", "/v1/events?after=abc", token=PULL_SECRET), 422, "invalid_input")
    assert_error(request(origin.url, "GET", "/v1/events?after=-1", token=PULL_SECRET), 422, "invalid_input")
    assert_error(request(origin.url, "GET", "/v1/events?after=" + "9" * 5000, token=PULL_SECRET),
                 422, "invalid_input")
