"""fabric.hook.envelopes: every envelope shape, parsed from recorded or documented bodies (tests/fixtures/events/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabric.errors import MalformedEvent
from fabric.hook.envelopes import ObjectEvent, parse

FIXTURES = Path(__file__).parent / "fixtures" / "events"


def _load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# file → (envelope kind, [(bucket, key, etag, size)], ignored reasons)
EXPECTED = {
    "seaweedfs-create.json": ("seaweedfs", [("ckpt", "runs/r1/step-10/small.txt", "5d41402abc4b2a76b9719d911017c592", 5)], []),
    "seaweedfs-create-odd-key.json": ("seaweedfs", [("ckpt", "runs/r1/step-10/a b+c%d é.txt",
                                                     "498c381ba18fc1be2160719e3e0a7c45", 5)], []),
    "seaweedfs-multipart-complete.json": ("seaweedfs", [("ckpt", "runs/r1/step-10/big.bin",
                                                         "be4c5b124f30f3e9517459611a7b72dc-4", 20000000)], []),
    "seaweedfs-update.json": ("seaweedfs", [("ckpt", "runs/r1/step-10/small.txt", "6e809cbda0732ac4845916a59016f954", 6)], []),
    "seaweedfs-copy.json": ("seaweedfs", [("ckpt", "runs/r1/step-10/.metadata", "498c381ba18fc1be2160719e3e0a7c45", 5)], []),
    "seaweedfs-multipart-part.json": ("seaweedfs", [], ["multipart upload part"]),
    "seaweedfs-uploads-cleanup.json": ("seaweedfs", [], ["deleted"]),
    "seaweedfs-delete.json": ("seaweedfs", [], ["deleted"]),
    "seaweedfs-directory.json": ("seaweedfs", [], ["directory"]),
    "seaweedfs-system.json": ("seaweedfs", [], ["system path"]),
    "seaweedfs-bucket.json": ("seaweedfs", [], ["bucket entry"]),
    "aws-put.json": ("records", [("ckpt", "runs/llama/step-1200/model-00001-of-00002.safetensors",
                                  "be4c5b124f30f3e9517459611a7b72dc-4", 20000000)], []),
    "aws-batch.json": ("records", [("ckpt", "runs/llama/step-1200/sub dir/a b+c%d é.txt",
                                    "498c381ba18fc1be2160719e3e0a7c45", 5)], ["deleted", "folder marker"]),
    "aws-test-event.json": ("test", [], ["a store's connectivity test"]),
    "ceph-put.json": ("records", [("ckpt", "runs/llama/step-1200/.metadata", "0f343b0931126a20f133d67c2b018a3b", 1536)], []),
    "minio-put.json": ("minio", [("ckpt", "runs/llama/step-1200/model.safetensors.index.json",
                                  "6a0b9c2cba0f7a1b1f3b5d6e7f801234", 23817)], []),
    "sns-notification.json": ("records", [("ckpt", "runs/llama/step-1200/model-00001-of-00002.safetensors",
                                           "be4c5b124f30f3e9517459611a7b72dc-4", 20000000)], []),
    "sns-subscription-confirmation.json": ("sns-confirm", [], []),
}


def test_every_fixture_has_an_expectation():
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses_to_the_expected_events(name):
    kind, events, reasons = EXPECTED[name]
    env = parse(_load(name))
    assert env.kind == kind
    assert [(e.bucket, e.key, e.etag, e.size) for e in env.events] == events
    assert [why for _, why in env.ignored] == reasons
    assert (env.sns is not None) == name.startswith("sns-")


def test_record_fields_source_version_and_sequencer():
    (ev,) = parse(_load("aws-put.json")).events
    assert ev.source == "aws" and ev.name == "ObjectCreated:Put"
    assert ev.version_id == "096fKKXTRTtl3on89fVO.nfljtsv6qko" and ev.sequencer == "0055AED6DCD90281E5"
    (ceph,) = parse(_load("ceph-put.json")).events
    assert ceph.source == "ceph" and ceph.version_id is None  # Ceph sends "" for unversioned buckets
    (minio,) = parse(_load("minio-put.json")).events
    assert minio.source == "minio" and minio.name == "s3:ObjectCreated:Put"


def test_dedup_key_prefers_version_then_etag():
    a = ObjectEvent("aws", "b", "k", 1, "e1", "v1", "s1")
    assert a.dedup == ObjectEvent("aws", "b", "k", 1, "e2", "v1", "s2").dedup  # same version: same event
    assert ObjectEvent("aws", "b", "k", 1, "e1").dedup != ObjectEvent("aws", "b", "k", 1, "e2").dedup
    assert ObjectEvent("aws", "b", "k", 1, "e1").dedup != ObjectEvent("aws", "b", "k2", 1, "e1").dedup
    seaweed = [parse(_load(n)).events[0] for n in ("seaweedfs-create.json", "seaweedfs-update.json")]
    assert seaweed[0].dedup != seaweed[1].dedup  # an overwrite is a new event


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"Records": [}'])
def test_malformed_json_is_an_error(body):
    with pytest.raises(MalformedEvent) as e:
        parse(body)
    assert e.value.http_status == 400


@pytest.mark.parametrize("body, why", [
    (b"[1, 2]", "not a JSON object"),
    (b'{"hello": "world"}', "unknown envelope"),
    (b'{"Records": "nope"}', None),
    (b'{"Records": [{"eventName": "ObjectCreated:Put"}]}', "malformed record"),
    (b'{"Records": [{"eventName": "ObjectAccessed:Get", "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}}]}',
     "not an object-created event"),
    (b'{"key": "/topics/.system/log/x", "event_type": "create", "message": {"new_entry": {"name": "x"}}}',
     "not under /buckets/"),
    (b'{"Type": "Notification", "TopicArn": "arn", "Message": "not json"}', "Message is not JSON"),
])
def test_unknown_or_odd_bodies_are_ignored_not_errors(body, why):
    env = parse(body)
    assert env.events == ()
    if why:
        assert any(why in reason for _, reason in env.ignored), env.ignored


def test_seaweedfs_rename_uses_the_new_path():
    body = json.loads(_load("seaweedfs-create.json"))
    body["event_type"] = "rename"
    body["message"]["new_parent_path"] = "/buckets/ckpt/runs/r1/step-11"
    (ev,) = parse(json.dumps(body).encode()).events
    assert (ev.bucket, ev.key) == ("ckpt", "runs/r1/step-11/small.txt")


def test_seaweedfs_without_s3_etag_falls_back_to_the_md5_attribute():
    body = json.loads(_load("seaweedfs-create.json"))
    del body["message"]["new_entry"]["extended"]["Seaweed-X-Amz-ETag"]
    (ev,) = parse(json.dumps(body).encode()).events
    assert ev.etag == "5d41402abc4b2a76b9719d911017c592"  # base64 md5 "XUFAKrxLKna5cZ2REBfFkg==" as hex


# --- docs/hooks.md: every example is real --------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"


def _blocks(lang: str) -> list[str]:
    import re
    return [body for kind, body in re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.S | re.M) if kind == lang]


def test_every_json_example_in_the_hooks_doc_parses_to_one_event():
    examples = _blocks("json")
    assert len(examples) == 3
    for body in examples:
        env = parse(body.encode())
        assert len(env.events) == 1 and env.events[0].bucket == "ckpt", body
        assert env.events[0].key.startswith("runs/llama/step-1200/")


def test_the_hooks_doc_config_example_loads():
    import tomllib
    from fabric.hook.config import HookConfig
    configs = [b for b in _blocks("toml") if "[[rule]]" in b]
    assert len(configs) == 1
    cfg = HookConfig.from_dict(tomllib.loads(configs[0]), "hooks.md")
    assert [r.complete for r in cfg.rules] == ["dcp", "safetensors-index"]
    assert cfg.origin == "http://origin.internal:7000" and cfg.sns.topics
    seaweed = [b for b in _blocks("toml") if "notification.webhook" in b]
    assert tomllib.loads(seaweed[0])["notification"]["webhook"]["enabled"] is True
