"""Who may see what at a real `fabric origin` (issue 13, authorization): chunks are shown
only to tokens that may pull an artifact referencing them, uploads may reference only
such chunks, a publish-only token can publish, site reports are scoped.

One origin serves the module: `secret-model` and `llama-7b` are published with
different bytes; `llama-site` (DEFAULT_TOKENS) may pull and publish `llama-*` only.
"""

from __future__ import annotations

import asyncio

import pytest

from fabric.core import codec
from fabric.core.digest import digest
from fabric.publish import publish
from fabric.wire import frames as wire
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.files import write_tree
from helpers.http import request
from helpers.origin import (ADMIN_SECRET, DEFAULT_TOKENS, LLAMA_SECRET, PUBLISH_SECRET, PULL_SECRET,
                            OriginProcess, start_origin)

pytestmark = pytest.mark.timeout(120)

WRITER_SECRET = "secret-writer-only-7d3a9c1e5b"  # publish on secret-* and nothing else
REPORTER_SECRET = "fra-reporter-secret-2b8e4d6f0a"  # pull on llama-*, marked as site-fra's token
TOKENS = DEFAULT_TOKENS + [
    {"name": "secret-writer", "secret": WRITER_SECRET, "scopes": ["publish"], "artifacts": ["secret-*"]},
    {"name": "fra-reporter", "secret": REPORTER_SECRET, "scopes": ["pull"], "artifacts": ["llama-*"],
     "site": "site-fra"},
]
SECRET_BYTES = b"the secret model's weights, nobody else's " * 200


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("authz")
    o = start_origin(root, TOKENS)
    with SyncOrigin(o.url, PUBLISH_SECRET) as so:
        publish(write_tree(root / "secret", {"w.bin": SECRET_BYTES}), artifact="secret-model",
                target=RemoteTarget(so), version="v1", channel="prod")
        publish(write_tree(root / "llama", {"w.bin": b"llama weights " * 300}), artifact="llama-7b",
                target=RemoteTarget(so), version="v1", channel="prod")
    yield o, root
    o.stop()


def chunk_ids(o: OriginProcess, artifact: str) -> list[str]:
    m = request(o.url, "GET", f"/v1/artifacts/{artifact}/versions/v1", token=PUBLISH_SECRET).json()
    return [cid for f in m["files"] for cid, _ in f["chunks"]]


def fetched(o: OriginProcess, ids: list[str], token: str) -> dict[str, int]:
    """Chunk id -> frame kind (1 chunk, 2 missing) of a fetch's answer."""
    r = request(o.url, "POST", "/v1/chunks/fetch", {"ids": ids}, token=token)
    assert r.status == 200, r

    async def parse():
        return [f async for f in wire.FrameReader(wire.bytes_reader(r.body))]
    return {f.chunk_id: f.kind for f in asyncio.run(parse())}


def missing(o: OriginProcess, ids: list[str], token: str) -> list[str]:
    r = request(o.url, "POST", "/v1/chunks/has", {"ids": ids}, token=token)
    assert r.status == 200, r
    return r.json()["missing"]


def test_a_pull_token_can_neither_fetch_nor_probe_chunks_only_another_artifact_references(lab):
    o, _ = lab
    secret, llama = chunk_ids(o, "secret-model"), chunk_ids(o, "llama-7b")
    assert missing(o, secret, LLAMA_SECRET) == secret  # held, but not shown: missing
    assert set(fetched(o, secret, LLAMA_SECRET).values()) == {wire.FRAME_MISSING}
    assert missing(o, llama, LLAMA_SECRET) == []  # its own artifact's chunks as before
    assert set(fetched(o, llama, LLAMA_SECRET).values()) == {wire.FRAME_CHUNK}
    assert set(fetched(o, secret, PULL_SECRET).values()) == {wire.FRAME_CHUNK}  # pull on every artifact


def test_has_from_a_publisher_counts_only_the_artifacts_it_may_publish_or_pull(lab):
    o, _ = lab
    secret, llama = chunk_ids(o, "secret-model"), chunk_ids(o, "llama-7b")
    assert missing(o, secret + llama, WRITER_SECRET) == llama  # its own artifact's chunks are present


def test_a_publish_only_token_publishes_and_finds_the_parent_version(lab):
    o, root = lab
    with SyncOrigin(o.url, WRITER_SECRET) as so:
        first = publish(write_tree(root / "w1", {"a.bin": b"one " * 500}), artifact="secret-tool",
                        target=RemoteTarget(so), version="v1", channel="prod")
        second = publish(write_tree(root / "w2", {"a.bin": b"two " * 500}), artifact="secret-tool",
                         target=RemoteTarget(so), version="v2", channel="prod")
    assert first.parent is None and second.parent == "v1"
    r = request(o.url, "GET", "/v1/artifacts/secret-tool/versions/v2", token=WRITER_SECRET)
    assert r.status == 403  # reading a manifest still needs pull


def _xor_upload(o: OriginProcess, token: str, reference_id: str, guess: bytes):
    """Upload a chunk xor-encoded against `reference_id`, whose bytes the sender guesses."""
    target = b"attacker chosen bytes " * 100
    target = target[:len(guess)].ljust(len(guess), b"x")
    enc = codec.encode_as("xor", target, reference=guess, reference_id=reference_id)
    body = wire.encode_stream([wire.chunk_frame(digest(target), enc.tag, enc.raw_size, bytes(enc.body))])
    return request(o.url, "POST", "/v1/chunks/upload", body, token=token,
                   headers={"Content-Type": "application/x-fabric-chunks"})


def test_an_upload_may_reference_only_chunks_the_uploader_may_pull(lab):
    o, _ = lab
    (secret_id,) = set(chunk_ids(o, "secret-model"))
    guessed = _xor_upload(o, LLAMA_SECRET, secret_id, SECRET_BYTES)  # a right guess of another artifact's chunk
    absent = _xor_upload(o, LLAMA_SECRET, digest(b"no such chunk"), SECRET_BYTES)
    assert guessed.status == absent.status >= 400
    ga, aa = guessed.error(), absent.error()
    assert ga["code"] == aa["code"] == "reference_mismatch"
    assert ga["message"].replace(secret_id, "ID") == aa["message"].replace(digest(b"no such chunk"), "ID")
    (llama_id,) = set(chunk_ids(o, "llama-7b"))
    assert _xor_upload(o, LLAMA_SECRET, llama_id, b"llama weights " * 300).status == 200  # its own: decoded


def test_a_version_committed_through_another_origin_process_is_served_there(lab, tmp_path):
    o, root = lab
    other = OriginProcess(o.store, o.tokens, tmp_path / "other.log").start()
    try:
        llama = chunk_ids(o, "llama-7b")
        assert set(fetched(other, llama, LLAMA_SECRET).values()) == {wire.FRAME_CHUNK}  # its index is built
        with SyncOrigin(o.url, PUBLISH_SECRET) as so:  # committed through the first process
            publish(write_tree(tmp_path / "v2", {"w.bin": b"llama v2 " * 400}), artifact="llama-7b",
                    target=RemoteTarget(so), version="v2", channel="prod")
        m = request(other.url, "GET", "/v1/artifacts/llama-7b/versions/v2", token=LLAMA_SECRET).json()
        new = [cid for f in m["files"] for cid, _ in f["chunks"]]
        assert set(fetched(other, new, LLAMA_SECRET).values()) == {wire.FRAME_CHUNK}
    finally:
        other.stop()


def test_a_site_reports_only_under_a_token_marked_as_that_sites(lab):
    o, _ = lab
    report = {"site": "site-fra", "channels": [{"artifact": "llama-7b", "channel": "prod", "active": "v1"},
                                               {"artifact": "secret-model", "channel": "prod", "active": "v1"}]}
    r = request(o.url, "POST", "/v1/sites/site-fra", report, token=PULL_SECRET)  # named site-fra, not marked
    assert r.status == 403 and r.error()["code"] == "forbidden"
    assert request(o.url, "POST", "/v1/sites/site-fra", report, token=REPORTER_SECRET).status == 200
    assert request(o.url, "POST", "/v1/sites/other-site", report, token=REPORTER_SECRET).status == 403
    assert request(o.url, "POST", "/v1/sites/other-site", report, token=ADMIN_SECRET).status == 200


def test_site_reports_are_read_by_admins_and_by_each_sites_own_token(lab):
    o, _ = lab
    report = {"channels": [{"artifact": "llama-7b", "channel": "prod"}, {"artifact": "secret-model", "channel": "prod"}]}
    for site in ("site-fra", "other-site"):
        assert request(o.url, "POST", f"/v1/sites/{site}", report, token=ADMIN_SECRET).status == 200
    sites = request(o.url, "GET", "/v1/sites", token=ADMIN_SECRET).json()["sites"]
    assert [s["site"] for s in sites] == ["other-site", "site-fra"] and len(sites[0]["channels"]) == 2
    assert request(o.url, "GET", "/v1/sites", token=PULL_SECRET).json()["sites"] == []
    (own,) = request(o.url, "GET", "/v1/sites", token=REPORTER_SECRET).json()["sites"]
    assert own["site"] == "site-fra" and [c["artifact"] for c in own["channels"]] == ["llama-7b"]
