"""fabric.hook.app: the push-hook receiver against a real SeaweedFS, publishing into a local store.

One `weed mini` serves the module, its filer webhook pointed at a fixed loopback port
where each test starts its own receiver (in this process) with its own bucket, queue
and store. Tests that need the store to misbehave (stopped, throttled) bring their own.
Tests that drive the hook with their own events use `quiet-*` buckets (the filer sends
nothing for them) and turn the periodic listing off, so only their events count.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig

from fabric.errors import ConfigError
from fabric.config import parse_duration
from fabric.hook.config import HookConfig
from fabric.store.registry import Registry
from fabric.store.store import open_store
from fabric.pull import materialize

from helpers.files import safetensors_bytes
from helpers.http import request
from helpers.origin import parse_metrics
from helpers.s3 import HookServer, ThrottlingProxy, Weed, free_port, hook_config
from helpers.wait import wait_until

TOKEN = "hook-secret-2f9a"
FIXTURES = Path(__file__).parent / "fixtures" / "events"
MULTIPART = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
PORT = free_port()


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    # the filer sends events for ckpt-* buckets only: the quiet-* buckets get just the events a test posts
    with Weed(tmp_path_factory.mktemp("weed"), webhook=(f"http://127.0.0.1:{PORT}/events", TOKEN),
              path_prefixes=["/buckets/ckpt-"]) as w:
        yield w


@pytest.fixture
def bucket(weed):
    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    weed.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(weed):
    return weed.client()


def start_hook(tmp_path: Path, weed: Weed, bucket: str, **kw) -> HookServer:
    kw.setdefault("endpoint", weed.endpoint)
    cfg = HookConfig.load(hook_config(tmp_path, port=PORT, bucket=bucket, **kw))
    return HookServer(cfg)


def post(hook: HookServer, body, token: str | None = TOKEN, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(hook.url, "POST", "/events", data, token=token or "",
                   headers={"Content-Type": "application/json", **(headers or {})})


def registry(tmp_path: Path) -> Registry:
    return Registry(open_store(tmp_path / "store", create=False))  # the hook creates it


def channel_version(tmp_path: Path, artifact: str, channel: str = "latest"):
    try:
        return registry(tmp_path).channel(artifact, channel).version
    except Exception:  # noqa: BLE001 - not there yet
        return None


def queued_events(tmp_path: Path) -> list[tuple]:
    db = sqlite3.connect(tmp_path / "queue.db")
    try:
        return db.execute("SELECT key, state FROM events ORDER BY id").fetchall()
    finally:
        db.close()


def metrics(hook: HookServer) -> dict[str, float]:
    return parse_metrics(request(hook.url, "GET", "/metrics", token=TOKEN).body.decode())


def aws_event(bucket: str, key: str, etag: str | None, size: int = 1, seq: str = "00A1") -> dict:
    """An AWS-shaped record, as another notifier (or SNS) would deliver it; the key URL-encoded."""
    from urllib.parse import quote_plus
    obj = {"key": quote_plus(key, safe="/"), "size": size, "sequencer": seq}
    if etag:
        obj["eTag"] = etag
    return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": bucket}, "object": obj}}]}


def etag_of(s3, bucket: str, key: str) -> str:
    return s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


# --- configuration ---------------------------------------------------------------------------------

BASE = {"listen": "127.0.0.1:7100", "token": "hook-token-0123456789", "store": "/tmp/s",
        "rule": [{"bucket": "b", "prefix": "runs/{run}/step-{step}/", "artifact": "{run}",
                  "version": "step-{step}", "complete": "dcp"}]}


def _with(**changes) -> dict:
    cfg = json.loads(json.dumps(BASE))
    rule = changes.pop("rule", None)
    if rule:
        cfg["rule"][0].update(rule)
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


@pytest.mark.parametrize("raw, key", [
    (_with(listen="nowhere"), "listen"),
    (_with(token=None), "token"),
    (_with(store=None), "origin"),
    (_with(origin="http://o:7000"), "origin"),
    (_with(store=None, origin="http://o:7000"), "origin_token"),
    (_with(store=None, origin="ftp://o", origin_token="x"), "origin"),
    (_with(rule=None, colour="blue"), "colour"),
    (_with(rescan_interval="soon"), "rescan_interval"),
    (_with(s3={"endpoint": "http://x", "password": "p"}), "s3: password"),
    (_with(rule={"complete": "dpc"}), "rule[0]: complete"),
    (_with(rule={"complete": "quiet:later"}), "rule[0]: complete"),
    (_with(rule={"prefix": "runs/{run}/step-{step}"}), "rule[0]: prefix"),
    (_with(rule={"prefix": "runs/{run}/{run}/"}), "rule[0]: prefix"),
    (_with(rule={"artifact": "{model}"}), "rule[0]: artifact"),
    (_with(rule={"version": "step {step}"}), "rule[0]: version"),
    (_with(rule={"channel": "bad/channel"}), "rule[0]: channel"),
    (_with(rule={"bucket": None}), "rule[0]: bucket"),
    ({**_with(), "rule": []}, "rule"),
])
def test_config_errors_name_the_key(raw, key):
    raw["rule"] = [{k: v for k, v in r.items() if v is not None} for r in raw.get("rule", [])]
    with pytest.raises(ConfigError) as e:
        HookConfig.from_dict(raw, "hook.toml")
    assert f"hook.toml: {key}" in e.value.message, e.value.message


def test_fabric_hook_refuses_a_bad_config_at_start_up(tmp_path):
    from helpers.origin import fabric
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "127.0.0.1:7100"\ntoken = "hook-token-0123456789"\nstore = "s"\n[[rule]]\nbucket = "b"\n'
                   'prefix = "runs/{run}/"\nartifact = "{run}"\nversion = "v"\ncomplete = "dpc"\n')
    p = fabric("hook", "--config", bad, timeout=60)
    assert p.returncode == 2  # a bad config is a usage error (fabric.cli.exits)
    assert "error[invalid_config]: bad.toml: rule[0]: complete: unknown completion 'dpc'" in p.stderr


def test_config_rules_match_and_name_checkpoints(tmp_path):
    cfg = HookConfig.from_dict(_with(rule={"complete": "quiet:1.5m"}), "hook.toml", base=tmp_path)
    rule = cfg.rules[0]
    assert rule.complete == "quiet" and rule.quiet == 90 and rule.literal_prefix == "runs/"
    assert rule.match("runs/llama/step-100/shard 0.distcp") == (
        "runs/llama/step-100/", {"run": "llama", "step": "100"}, "shard 0.distcp")
    assert rule.match("runs/llama/latest_checkpointed_iteration.txt") is None
    assert rule.names({"run": "llama", "step": "100"}) == ("llama", "step-100")
    assert cfg.queue == tmp_path / "hook-queue.db"
    assert [parse_duration(d) for d in ("500ms", "30s", "2m", "1h", 7)] == [0.5, 30, 120, 3600, 7]


# --- the receiver's edge ----------------------------------------------------------------------------

def test_wrong_or_missing_token_is_401_and_nothing_is_queued(tmp_path, weed, bucket):
    with start_hook(tmp_path, weed, bucket) as hook:
        body = aws_event(bucket, "runs/a/step-1/.metadata", "abc")
        for token in ("wrong", "", TOKEN + "x", TOKEN[:-1]):
            r = post(hook, body, token=token)
            assert r.status == 401 and r.json()["code"] == "unauthorized"
        assert post(hook, body, token=None, headers={"Authorization": "Basic " + base64.b64encode(
            b"sns:wrong").decode()}).status == 401
        assert queued_events(tmp_path) == []
        assert metrics(hook)['fabric_hook_events_total{result="unauthorized"}'] == 5
        # SNS can only send user:password: the password is the token
        basic = base64.b64encode(f"sns:{TOKEN}".encode()).decode()
        assert post(hook, body, token=None, headers={"Authorization": f"Basic {basic}"}).status == 200
        assert len(queued_events(tmp_path)) == 1


def test_malformed_json_is_400_and_odd_envelopes_are_200(tmp_path, weed, bucket):
    with start_hook(tmp_path, weed, bucket) as hook:
        r = post(hook, b"{not json")
        assert r.status == 400 and r.json()["code"] == "malformed_event"
        for name in ("aws-test-event.json", "seaweedfs-directory.json", "seaweedfs-multipart-part.json",
                     "seaweedfs-system.json", "seaweedfs-delete.json", "seaweedfs-uploads-cleanup.json"):
            r = post(hook, (FIXTURES / name).read_bytes())
            assert r.status == 200 and r.json()["queued"] == 0 and r.json()["ignored"] == 1, name
        r = post(hook, {"what": "is this"})
        assert r.status == 200 and r.json() == {"queued": 0, "duplicates": 0, "ignored": 1, "envelope": "unknown"}
        r = post(hook, aws_event("another-bucket", "runs/a/step-1/.metadata", "abc"))
        assert r.status == 200 and r.json()["ignored"] == 1  # no rule watches that bucket
        assert queued_events(tmp_path) == []
        m = metrics(hook)
        assert m['fabric_hook_events_total{result="malformed"}'] == 1
        assert m["fabric_hook_queue_depth"] == 0
        assert request(hook.url, "GET", "/livez").status == 200
        assert request(hook.url, "GET", "/readyz").json() == {"ready": True, "worker": True, "queue": True}
        assert request(hook.url, "GET", "/checkpoints").status == 401
        r = request(hook.url, "GET", "/metrics")  # the shared edge: a token everywhere but the probes
        assert r.status == 401 and r.json()["code"] == "unauthorized"
        r = post(hook, b"[" * ((32 << 20) + 1))
        assert r.status == 413 and r.json()["code"] == "payload_too_large"
        assert metrics(hook)['fabric_http_requests_total{route="/events",status="413"}'] == 1


# --- checkpoints through the filer webhook -------------------------------------------------------------

def test_dcp_checkpoint_with_multipart_and_odd_names_is_published(tmp_path, weed, bucket, s3):
    big = os.urandom(20_000_000)
    (tmp_path / "shard.bin").write_bytes(big)
    files = {"__0_0.distcp": None, "sub dir/a b+c%d é.txt": b"odd name", "extra/state.json": b'{"step": 7}'}
    with start_hook(tmp_path, weed, bucket) as hook:
        prefix = "runs/llama/step-7/"
        s3.upload_file(str(tmp_path / "shard.bin"), bucket, prefix + "__0_0.distcp", Config=MULTIPART)
        for rel, data in files.items():
            if data is not None:
                s3.put_object(Bucket=bucket, Key=prefix + rel, Body=data)
        assert etag_of(s3, bucket, prefix + "__0_0.distcp").endswith("-4")  # it went multipart
        # nothing is published before the .metadata lands
        wait_until(lambda: any(k.endswith("state.json") for k, _ in queued_events(tmp_path)), 20,
                   what="the webhook's events")
        assert channel_version(tmp_path, "llama") is None
        s3.put_object(Bucket=bucket, Key=prefix + ".metadata", Body=b"dcp metadata")
        wait_until(lambda: channel_version(tmp_path, "llama") == "step-7", 30, what="the publish")
        reg = registry(tmp_path)
        m = reg.manifest("llama", "step-7")
        assert sorted(f.path for f in m.files) == sorted([".metadata", "__0_0.distcp", "extra/state.json",
                                                          "sub dir/a b+c%d é.txt"])
        assert m.metadata["source"] == f"s3://{bucket}/{prefix}"
        materialize(reg.store, m, tmp_path / "out")
        assert (tmp_path / "out" / "__0_0.distcp").read_bytes() == big
        assert (tmp_path / "out" / "sub dir" / "a b+c%d é.txt").read_bytes() == b"odd name"
        cps = request(hook.url, "GET", "/checkpoints", token=TOKEN).json()["checkpoints"]
        assert [(c["artifact"], c["version"], c["state"], c["promoted"]) for c in cps] == [
            ("llama", "step-7", "published", 1)]
        assert not any(".uploads" in k for k, _ in queued_events(tmp_path))  # parts never reach the queue


def test_safetensors_index_waits_for_every_shard(tmp_path, weed, bucket, s3):
    rules = [{"prefix": "hf/{model}/{rev}/", "artifact": "{model}", "version": "{rev}", "channel": "prod",
              "complete": "safetensors-index"}]
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    with start_hook(tmp_path, weed, bucket, rules=rules):
        s3.put_object(Bucket=bucket, Key="hf/tiny/r1/model.safetensors.index.json", Body=json.dumps(index).encode())
        s3.put_object(Bucket=bucket, Key="hf/tiny/r1/model-00001-of-00002.safetensors", Body=b"not really")
        wait_until(lambda: len(queued_events(tmp_path)) == 2, 20, what="two events")
        cps = wait_until(lambda: [c for c in _checkpoints(tmp_path) if c["error"]], 10, what="an evaluation")
        assert "model-00002-of-00002" in cps[0]["error"] and channel_version(tmp_path, "tiny", "prod") is None
        s3.put_object(Bucket=bucket, Key="hf/tiny/r1/model-00002-of-00002.safetensors", Body=b"either")
        # not safetensors at all: the publish fails, and says why
        cp = wait_until(lambda: [c for c in _checkpoints(tmp_path) if c["state"] == "failed"], 20)
        assert "invalid_safetensors" in cp[0]["error"]
        # the trainer rewrites the shards: new objects make the hook try again
        for i, name in enumerate(("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
            body = safetensors_bytes([(f"t{i}", np.full((64, 64), i, dtype=np.float32))])
            s3.put_object(Bucket=bucket, Key=f"hf/tiny/r1/{name}", Body=body)
        wait_until(lambda: channel_version(tmp_path, "tiny", "prod") == "r1", 20)
        assert {t.name for t in registry(tmp_path).manifest("tiny", "r1").tensors} == {"t0", "t1"}


def test_megatron_tracker_completes_the_iteration_it_names(tmp_path, weed, bucket, s3):
    rules = [{"prefix": "mega/{run}/iter_{iter}/", "artifact": "{run}", "version": "iter-{iter}",
              "channel": "latest", "complete": "megatron"}]
    with start_hook(tmp_path, weed, bucket, rules=rules):
        s3.put_object(Bucket=bucket, Key="mega/gpt/iter_0000100/mp_rank_00/model_optim_rng.pt", Body=b"w100")
        s3.put_object(Bucket=bucket, Key="mega/gpt/iter_0000200/mp_rank_00/model_optim_rng.pt", Body=b"w200")
        wait_until(lambda: len(queued_events(tmp_path)) == 2, 20, what="two events")
        s3.put_object(Bucket=bucket, Key="mega/gpt/latest_checkpointed_iteration.txt", Body=b"100")
        wait_until(lambda: channel_version(tmp_path, "gpt") == "iter-0000100", 20)
        assert [c["state"] for c in _checkpoints(tmp_path)] == ["published", "waiting"]
        s3.put_object(Bucket=bucket, Key="mega/gpt/latest_checkpointed_iteration.txt", Body=b"200")
        wait_until(lambda: channel_version(tmp_path, "gpt") == "iter-0000200", 20)


def test_marker_and_quiet_rules(tmp_path, weed, bucket, s3):
    rules = [{"prefix": "m/{run}/{step}/", "artifact": "{run}", "version": "{step}", "channel": "latest",
              "complete": "marker:_SUCCESS"},
             {"prefix": "q/{run}/{step}/", "artifact": "{run}", "version": "{step}", "channel": "latest",
              "complete": "quiet:1s"}]
    with start_hook(tmp_path, weed, bucket, rules=rules):
        s3.put_object(Bucket=bucket, Key="m/mark/s1/weights.bin", Body=b"w")
        s3.put_object(Bucket=bucket, Key="q/calm/s1/weights.bin", Body=b"w")
        wait_until(lambda: channel_version(tmp_path, "calm") == "s1", 20, what="the quiet period")
        assert channel_version(tmp_path, "mark") is None
        s3.put_object(Bucket=bucket, Key="m/mark/s1/_SUCCESS", Body=b"")
        wait_until(lambda: channel_version(tmp_path, "mark") == "s1", 20)
        assert sorted(f.path for f in registry(tmp_path).manifest("mark", "s1").files) == ["_SUCCESS", "weights.bin"]


def _checkpoints(tmp_path: Path) -> list[dict]:
    db = sqlite3.connect(tmp_path / "queue.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM checkpoints ORDER BY prefix")]
    finally:
        db.close()


# --- events that lie, repeat or come late ------------------------------------------------------------------

def test_events_for_gone_or_changed_objects_wait_for_the_truth(tmp_path, weed, s3):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"  # the webhook is off for this one: we send every event
    s3.create_bucket(Bucket=bucket)
    with start_hook(tmp_path, weed, bucket, rescan="0") as hook:
        key = "runs/a/step-1/.metadata"
        s3.put_object(Bucket=bucket, Key=key, Body=b"old")
        old = etag_of(s3, bucket, key)
        s3.put_object(Bucket=bucket, Key=key, Body=b"new")
        assert post(hook, aws_event(bucket, key, old)).json()["queued"] == 1
        assert post(hook, aws_event(bucket, "runs/a/step-1/never there", "123")).json()["queued"] == 1
        wait_until(lambda: {s for _, s in queued_events(tmp_path)} == {"superseded", "gone"}, 10)
        assert _checkpoints(tmp_path) == [] and channel_version(tmp_path, "a") is None
        assert post(hook, aws_event(bucket, key, etag_of(s3, bucket, key))).json()["queued"] == 1
        wait_until(lambda: channel_version(tmp_path, "a") == "step-1", 20)


def test_duplicate_and_out_of_order_events_publish_once(tmp_path, weed, s3):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    with start_hook(tmp_path, weed, bucket, rescan="0") as hook:
        p = "runs/b/step-2/"
        s3.put_object(Bucket=bucket, Key=p + "shard 1.distcp", Body=b"shard")
        s3.put_object(Bucket=bucket, Key=p + ".metadata", Body=b"meta")
        meta = aws_event(bucket, p + ".metadata", etag_of(s3, bucket, p + ".metadata"), seq="00B2")
        shard = aws_event(bucket, p + "shard 1.distcp", etag_of(s3, bucket, p + "shard 1.distcp"), seq="00B1")
        assert post(hook, meta).json()["queued"] == 1  # the last object's event first
        assert post(hook, meta).json() == {"queued": 0, "duplicates": 1, "ignored": 0, "envelope": "records"}
        wait_until(lambda: channel_version(tmp_path, "b") == "step-2", 20)
        assert post(hook, shard).json()["queued"] == 1  # the first object's event, late
        wait_until(lambda: [s for _, s in queued_events(tmp_path)] == ["done", "late"], 10)
        m = registry(tmp_path).manifest("b", "step-2")
        assert sorted(f.path for f in m.files) == [".metadata", "shard 1.distcp"]
        assert len(registry(tmp_path).channel("b", "latest").history) == 1
        assert metrics(hook)['fabric_hook_events_total{result="duplicate"}'] == 1


def test_a_later_checkpoint_keeps_the_channel_when_an_earlier_one_completes_after_it(tmp_path, weed, s3):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    with start_hook(tmp_path, weed, bucket, rescan="0") as hook:
        for step in ("1", "2"):
            s3.put_object(Bucket=bucket, Key=f"runs/c/step-{step}/w", Body=step.encode())
        s3.put_object(Bucket=bucket, Key="runs/c/step-2/.metadata", Body=b"m2")
        post(hook, aws_event(bucket, "runs/c/step-2/.metadata", etag_of(s3, bucket, "runs/c/step-2/.metadata")))
        wait_until(lambda: channel_version(tmp_path, "c") == "step-2", 20)
        import time
        time.sleep(1.1)  # S3 times have one-second resolution
        s3.put_object(Bucket=bucket, Key="runs/c/step-1/.metadata", Body=b"m1")  # step 1 completes last
        post(hook, aws_event(bucket, "runs/c/step-1/.metadata", etag_of(s3, bucket, "runs/c/step-1/.metadata")))
        wait_until(lambda: len([c for c in _checkpoints(tmp_path) if c["state"] == "published"]) == 2, 20)
        # completing later makes step-1 the newest checkpoint: the channel follows completion order
        assert channel_version(tmp_path, "c") == "step-1"


def test_listing_catches_events_the_store_dropped(tmp_path, weed, s3):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"  # no event is ever sent for this bucket
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="runs/d/step-3/w", Body=b"w")
    s3.put_object(Bucket=bucket, Key="runs/d/step-3/.metadata", Body=b"m")
    with start_hook(tmp_path, weed, bucket, rescan="1s"):
        wait_until(lambda: channel_version(tmp_path, "d") == "step-3", 20, what="the listing")
        s3.put_object(Bucket=bucket, Key="runs/d/step-4/w", Body=b"w")
        s3.put_object(Bucket=bucket, Key="runs/d/step-4/.metadata", Body=b"m")
        wait_until(lambda: channel_version(tmp_path, "d") == "step-4", 20, what="the next listing")


# --- the store misbehaves -------------------------------------------------------------------------------------

def test_store_down_events_keep_queueing_and_publish_after_restart(tmp_path):
    with Weed(tmp_path / "weed") as own:
        s3 = own.client()
        s3.create_bucket(Bucket="ckpt")
        keys = ["runs/e/step-5/w1", "runs/e/step-5/w 2", "runs/e/step-5/.metadata"]
        for k in keys:
            s3.put_object(Bucket="ckpt", Key=k, Body=k.encode())
        etags = [etag_of(s3, "ckpt", k) for k in keys]
        with start_hook(tmp_path, own, "ckpt", rescan="0") as hook:
            own.stop()
            for k, e in zip(keys, etags):
                r = post(hook, aws_event("ckpt", k, e))
                assert r.status == 200 and r.json()["queued"] == 1  # accepted while the store is down
            wait_until(lambda: metrics(hook).get('fabric_hook_failures_total{stage="head"}', 0) >= 3, 20)
            m = metrics(hook)
            assert m["fabric_hook_queue_depth"] == 3 and m["fabric_hook_lag_seconds"] > 0
            assert channel_version(tmp_path, "e") is None
            own.start()
            wait_until(lambda: channel_version(tmp_path, "e") == "step-5", 40, what="the publish after restart")
            # every event is processed: those still backing off when the publish happened find it done
            wait_until(lambda: {s for _, s in queued_events(tmp_path)} <= {"done", "late"}, 10)
            assert metrics(hook)["fabric_hook_queue_depth"] == 0


def test_throttled_store_still_publishes(tmp_path, weed, s3):
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for k in ("runs/f/step-6/w", "runs/f/step-6/.metadata"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    with ThrottlingProxy(weed.endpoint, throttle=6) as proxy:
        with start_hook(tmp_path, weed, bucket, endpoint=proxy.url, rescan="0") as hook:
            post(hook, aws_event(bucket, "runs/f/step-6/.metadata", etag_of(s3, bucket, "runs/f/step-6/.metadata")))
            wait_until(lambda: channel_version(tmp_path, "f") == "step-6", 40)
        assert proxy.throttled == 6


# --- SNS -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sns_signer(tmp_path_factory):
    """A self-made 'SNS' certificate in a cert_dir, and a function that signs messages with its key."""
    crypto = pytest.importorskip("cryptography")  # noqa: F841
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.x509.oid import NameOID
    from fabric.hook.sns import string_to_sign

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_dir = tmp_path_factory.mktemp("sns-certs")
    cert_name = "SimpleNotificationService-test0001.pem"
    (cert_dir / cert_name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def sign(msg: dict, version: str = "2") -> dict:
        msg = dict(msg, SignatureVersion=version,
                   SigningCertURL=f"https://sns.us-east-1.amazonaws.com/{cert_name}")
        algo = hashes.SHA256() if version == "2" else hashes.SHA1()
        msg["Signature"] = base64.b64encode(key.sign(string_to_sign(msg), padding.PKCS1v15(), algo)).decode()
        return msg
    return cert_dir, sign


def test_sns_signatures_are_checked_and_loopback_subscriptions_confirmed(tmp_path, weed, s3, sns_signer):
    from aiohttp import web
    cert_dir, sign = sns_signer
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="runs/g/step-1/.metadata", Body=b"m")
    confirmed = []

    class Confirmer(HookServer):  # a loopback "SNS" that records the confirmation GET
        async def _start(self):
            app = web.Application()

            async def confirm(request):
                confirmed.append(dict(request.query))
                return web.Response(text="<ConfirmSubscriptionResponse/>")
            app.router.add_get("/confirm", confirm)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    sns_port = free_port()
    extra = f'[sns]\nverify = true\ncert_dir = "{cert_dir}"\ntopics = ["arn:aws:sns:us-east-1:1:ckpt"]\n'
    cfg_path = hook_config(tmp_path, port=PORT, bucket=bucket, endpoint=weed.endpoint, rescan="0")
    cfg_path.write_text(cfg_path.read_text().replace("[s3]", extra + "[s3]", 1))
    with HookServer(HookConfig.load(cfg_path)) as hook, Confirmer(None, port=sns_port):
        base = {"Type": "SubscriptionConfirmation", "MessageId": "m1", "Token": "tok",
                "TopicArn": "arn:aws:sns:us-east-1:1:ckpt", "Message": "confirm me",
                "Timestamp": "2026-11-20T10:00:00.000Z"}
        far = sign(dict(base, SubscribeURL="https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"))
        assert post(hook, far).status == 200 and confirmed == []  # never contacts other hosts
        near = sign(dict(base, SubscribeURL=f"http://127.0.0.1:{sns_port}/confirm?Token=tok"), version="1")
        assert post(hook, near).json()["confirmed"] is True
        assert confirmed == [{"Token": "tok"}]
        record = aws_event(bucket, "runs/g/step-1/.metadata", etag_of(s3, bucket, "runs/g/step-1/.metadata"))
        note = sign({"Type": "Notification", "MessageId": "m2", "TopicArn": "arn:aws:sns:us-east-1:1:ckpt",
                     "Subject": "Amazon S3 Notification", "Message": json.dumps(record),
                     "Timestamp": "2026-11-20T10:00:01.000Z"})
        forged = dict(note, Message=note["Message"].replace("step-1", "step-9"))
        assert post(hook, forged).status == 403
        other_topic = sign(dict(note, TopicArn="arn:aws:sns:us-east-1:1:other"))
        assert post(hook, other_topic).status == 403
        unknown_cert = dict(note, SigningCertURL="https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem")
        assert post(hook, unknown_cert).status == 403
        evil_host = dict(note, SigningCertURL="https://evil.example.com/SimpleNotificationService-test0001.pem")
        assert post(hook, evil_host).status == 403
        assert queued_events(tmp_path) == []
        assert post(hook, note).json()["queued"] == 1
        wait_until(lambda: channel_version(tmp_path, "g") == "step-1", 20)
