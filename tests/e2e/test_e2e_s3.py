"""End to end with real processes: SeaweedFS, `fabric hook`, `fabric origin` on an S3 store, `fabric agent`.

Named after what they prove: a checkpoint written to a bucket becomes the active
version at a site; two origins on one bucket serve and publish as one; a hook killed
between acknowledging and publishing publishes after its restart; `fabric publish
s3://…` streams a bucket prefix without a local copy and notices objects that change.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.errors import SourceChanged
from fabric.publish import LocalTarget, publish
from fabric.store.registry import Registry
from fabric.s3source import list_sources
from fabric.store.store import open_store

from helpers.agent import SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.origin import (DEFAULT_TOKENS, PUBLISH_SECRET, OriginProcess, fabric, fabric_json, free_port,
                            tree_digest, write_token_file)
from helpers.s3 import HookProcess, Weed, hook_config
from helpers.wait import wait_until

TOKEN = "hook-secret-2f9a"
HOOK_PORT = free_port()


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    with Weed(tmp_path_factory.mktemp("weed"), webhook=(f"http://127.0.0.1:{HOOK_PORT}/events", TOKEN),
              path_prefixes=["/buckets/ckpt-"]) as w:
        yield w


@pytest.fixture
def aws_env(weed, monkeypatch):
    """Children (origin, CLI) find the endpoint and credentials in the standard AWS variables."""
    for k, v in weed.env.items():
        monkeypatch.setenv(k, v)
    return weed.env


@pytest.fixture
def tokens(tmp_path) -> Path:
    return write_token_file(tmp_path / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)


def s3_origin(tmp_path: Path, tokens: Path, store: str, name: str) -> OriginProcess:
    origin = OriginProcess(tmp_path, tokens, tmp_path / f"{name}.log")
    origin.store = store  # an s3:// URL, passed as is (a Path would fold its '//')
    return origin


def test_checkpoint_written_to_a_bucket_becomes_active_at_a_site(tmp_path, weed, aws_env, tokens):
    bucket, store = f"ckpt-{uuid.uuid4().hex[:8]}", f"s3://fabric-origin/{uuid.uuid4().hex[:8]}"
    s3 = weed.client()
    s3.create_bucket(Bucket=bucket)
    with s3_origin(tmp_path, tokens, store, "origin") as origin:
        cfg = hook_config(tmp_path, port=HOOK_PORT, bucket=bucket, endpoint=weed.endpoint,
                          origin=(origin.url, PUBLISH_SECRET), token=TOKEN)
        with HookProcess(cfg, HOOK_PORT) as hook, \
                AgentProcess(tmp_path, "solo", origin.url, follow=["llama:latest"]) as agent:
            src = tmp_path / "ckpt"
            (src / "sub dir").mkdir(parents=True)
            (src / "__0_0.distcp").write_bytes(os.urandom(20_000_000))
            (src / "sub dir" / "optim state+1.pt").write_bytes(os.urandom(300_000))
            (src / ".metadata").write_bytes(b"torch dcp metadata")
            prefix = "runs/llama/step-1200/"
            cfg_mp = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
            for rel in ("__0_0.distcp", "sub dir/optim state+1.pt", ".metadata"):  # .metadata last, as DCP does
                s3.upload_file(str(src / rel), bucket, prefix + rel, Config=cfg_mp)
            agent.wait_active("llama", "step-1200", timeout=60)
            got = tree_digest(agent.data / "current" / "llama")
            want = tree_digest(src)
            assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
            cps = request(hook.url, "GET", "/checkpoints", token=TOKEN).json()["checkpoints"]
            assert [(c["version"], c["state"]) for c in cps] == [("step-1200", "published")]
        # the origin's store is the bucket: a second look, from the bucket itself, agrees
        reg = Registry(open_store(store, s3=weed.options, create=False))
        assert reg.channel("llama", "latest").version == "step-1200"


def test_two_origins_on_one_bucket_serve_and_publish_as_one(tmp_path, weed, aws_env, tokens):
    store = f"s3://fabric-origin/{uuid.uuid4().hex[:8]}"
    a = s3_origin(tmp_path, tokens, store, "origin-a").start()
    b = s3_origin(tmp_path, tokens, store, "origin-b").start()
    try:
        src = tmp_path / "model"
        src.mkdir()
        (src / "weights.bin").write_bytes(os.urandom(3_000_000))
        (src / "config.json").write_text('{"layers": 2}')
        fabric_json("publish", src, "--artifact", "m", "--version", "v1", "--origin", a.url, "--token", PUBLISH_SECRET)
        out = fabric_json("pull", "m@v1", tmp_path / "pulled", "--origin", b.url, "--token", PUBLISH_SECRET,
                          "--store", tmp_path / "local")
        assert out["version"] == "v1"
        assert tree_digest(tmp_path / "pulled") == tree_digest(src)
        for i in range(10):  # versions committed through both origins
            with SyncOrigin((a, b)[i % 2].url, PUBLISH_SECRET) as so:
                publish(src / "config.json", artifact="m", version=f"c{i}", target=RemoteTarget(so),
                        metadata={"i": str(i)})
        errors = []

        def mover(url: str, versions: list[str]):
            try:
                with SyncOrigin(url, PUBLISH_SECRET) as so:
                    for v in versions:
                        so.promote("m", v, "prod")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        plan = {a.url: [f"c{i}" for i in range(0, 10, 2)], b.url: [f"c{i}" for i in range(1, 10, 2)]}
        threads = [threading.Thread(target=mover, args=item) for item in plan.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for origin in (a, b):
            history = request(origin.url, "GET", "/v1/artifacts/m/channels/prod", token=PUBLISH_SECRET).json()["history"]
            assert sorted(e["version"] for e in history) == sorted(f"c{i}" for i in range(10))
            for versions in plan.values():  # each mover's moves, in its order
                assert [e["version"] for e in history if e["version"] in versions] == versions
    finally:
        a.stop()
        b.stop()


def test_hook_killed_after_acknowledging_publishes_after_restart(tmp_path, weed, tokens):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"  # no filer events: this test sends its own
    s3 = weed.client()
    s3.create_bucket(Bucket=bucket)
    keys = ["runs/k/step-9/w.bin", "runs/k/step-9/.metadata"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=os.urandom(1000))
    origin_port, hook_port = free_port(), free_port()
    cfg = hook_config(tmp_path, port=hook_port, bucket=bucket, endpoint=weed.endpoint, rescan="0",
                      origin=(f"http://127.0.0.1:{origin_port}", PUBLISH_SECRET), token=TOKEN)
    hook = HookProcess(cfg, hook_port).start()
    try:  # the origin is not up yet: the hook acknowledges, queues, and cannot publish
        for k in keys:
            etag = s3.head_object(Bucket=bucket, Key=k)["ETag"].strip('"')
            body = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                 "s3": {"bucket": {"name": bucket}, "object": {"key": k, "eTag": etag}}}]}
            r = request(hook.url, "POST", "/events", json.dumps(body).encode(), token=TOKEN)
            assert r.status == 200 and r.json()["queued"] == 1
        wait_until(lambda: "checkpoint publish failed" in hook.log_text(), 20, what="a failed publish")
        hook.kill()  # SIGKILL: no chance to flush anything
    finally:
        hook.kill()
    with OriginProcess(tmp_path / "origin-store", tokens, tmp_path / "origin.log", port=origin_port) as origin:
        with HookProcess(cfg, hook_port):
            def channel():
                r = request(origin.url, "GET", "/v1/artifacts/k/channels/latest", token=PUBLISH_SECRET)
                return r.status == 200 and r.json()["version"] == "step-9"
            wait_until(channel, 30, what="the publish after restart")


def test_publish_from_a_bucket_streams_objects_and_notices_changes(tmp_path, weed, aws_env):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"
    s3 = weed.client()
    s3.create_bucket(Bucket=bucket)
    big = os.urandom(12_000_000)
    (tmp_path / "big").write_bytes(big)
    s3.upload_file(str(tmp_path / "big"), bucket, "exp/ckpt-1200/shard.bin",
                   Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
    s3.put_object(Bucket=bucket, Key="exp/ckpt-1200/a dir/b+c.json", Body=b'{"x": 1}')
    s3.put_object(Bucket=bucket, Key="exp/ckpt-1200/", Body=b"")  # a folder marker is not a file
    out = fabric_json("publish", f"s3://{bucket}/exp/ckpt-1200/", "--artifact", "exp", "--version", "1200",
                      "--store", tmp_path / "store")
    assert out["files"] == 2 and out["bytes"] == len(big) + 8
    reg = Registry(open_store(tmp_path / "store", create=False))
    assert sorted(f.path for f in reg.manifest("exp", "1200").files) == ["a dir/b+c.json", "shard.bin"]
    fabric_json("pull", "exp@1200", tmp_path / "out", "--store", tmp_path / "store")
    assert (tmp_path / "out" / "shard.bin").read_bytes() == big
    # the explicit endpoint flag works too, and a missing prefix is a clear error
    env_less = fabric("publish", f"s3://{bucket}/nothing-here/", "--artifact", "exp", "--store", tmp_path / "store",
                      "--s3-endpoint", weed.endpoint)
    assert env_less.returncode == 2 and "holds no objects" in env_less.stderr
    # an object overwritten between listing and reading: SourceChanged, nothing committed
    sources = list_sources(f"s3://{bucket}/exp/ckpt-1200/", s3=weed.options)
    s3.put_object(Bucket=bucket, Key="exp/ckpt-1200/a dir/b+c.json", Body=b'{"x": 2}')
    with pytest.raises(SourceChanged, match="b\\+c.json changed"):
        publish(sources, artifact="exp", version="1201", target=LocalTarget(open_store(tmp_path / "store")))
    assert reg.versions("exp") == ["1200"]
