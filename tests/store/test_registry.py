"""fabric.store.registry: versions (created once), channels (a promote/rollback stack), CAS."""

from __future__ import annotations

import threading

import pytest

from fabric.core import digest
from fabric.errors import (ArtifactNotFound, ChannelNotFound, InvalidInput, InvalidName, MissingChunks,
                           VersionExists, VersionNotFound)
from fabric.core.manifest import FileEntry, Manifest
from fabric.store.registry import now_rfc3339, parse_ref


def _manifest(store, artifact, version, payload: bytes = b"", *, created=None, metadata=None) -> Manifest:
    files = ()
    if payload:
        cid = digest.digest(payload)
        store.put_chunk(cid, payload)
        files = (FileEntry("f.bin", len(payload), 0o644, ((cid, len(payload)),)),)
    return Manifest(artifact=artifact, version=version, created=created or now_rfc3339(),
                    files=files, metadata=metadata or {})


def _commit(registry, artifact, version, payload=b"", **kw) -> str:
    return registry.commit(_manifest(registry.store, artifact, version, payload, **kw))


# --- versions --------------------------------------------------------------------------------

def test_commit_and_read_back(registry):
    mid = _commit(registry, "llama", "v1", b"weights")
    assert registry.manifest_id("llama", "v1") == mid
    m = registry.manifest("llama", "v1")
    assert (m.artifact, m.version, m.id) == ("llama", "v1", mid)
    assert registry.artifacts() == ["llama"] and registry.versions("llama") == ["v1"]


def test_commit_refuses_a_manifest_whose_chunks_are_missing(registry, store):
    payload = b"never uploaded"
    cid = digest.digest(payload)
    m = Manifest("llama", "v1", now_rfc3339(), (FileEntry("f", len(payload), 0o644, ((cid, len(payload)),)),))
    with pytest.raises(MissingChunks, match="1 chunk"):
        registry.commit(m)
    assert registry.artifacts() == [] and not store.has_manifest(m.id)
    assert not list(store.backend.list("gc/intents/"))  # nor the intent of the (fenced) commit


def test_same_content_again_is_a_no_op_different_content_is_version_exists(registry):
    mid = _commit(registry, "llama", "v1", b"weights", created="2026-01-01T00:00:00.000000Z")
    # the same files, published again later (a new `created`): fine, same version
    assert _commit(registry, "llama", "v1", b"weights", created="2026-02-01T00:00:00.000000Z") == mid
    with pytest.raises(VersionExists, match="llama@v1 already exists"):
        _commit(registry, "llama", "v1", b"other weights")
    with pytest.raises(VersionExists):
        _commit(registry, "llama", "v1", b"weights", metadata={"step": "2"})
    assert registry.manifest_id("llama", "v1") == mid


def test_unknown_artifact_and_version(registry):
    with pytest.raises(ArtifactNotFound, match="ghost"):
        registry.manifest_id("ghost", "v1")
    _commit(registry, "llama", "v1")
    with pytest.raises(VersionNotFound, match="no version 'v9'") as e:
        registry.manifest("llama", "v9")
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ArtifactNotFound):
        registry.resolve("ghost")
    with pytest.raises(ChannelNotFound, match="llama:prod"):
        registry.resolve("llama", channel="prod")
    with pytest.raises(InvalidName):
        registry.versions("../x")


def test_versions_sort_by_creation_and_latest(registry):
    _commit(registry, "a", "zeta", created="2026-01-01T00:00:00.000000Z")
    _commit(registry, "a", "alpha", created="2026-01-03T00:00:00.000000Z")
    _commit(registry, "a", "mid", created="2026-01-02T00:00:00.000000Z")
    assert registry.versions("a") == ["zeta", "mid", "alpha"]
    assert registry.latest("a") == "alpha" and registry.resolve("a") == "alpha"
    assert registry.resolve("a", version="zeta") == "zeta"


# --- channels ----------------------------------------------------------------------------------

def test_promote_rollback_is_a_stack(registry):
    for v in ("v1", "v2", "v3"):
        _commit(registry, "m", v)
        assert registry.promote("m", v, "prod").version == v
    assert registry.resolve("m", channel="prod") == "v3"
    assert registry.rollback("m", "prod").version == "v2"
    assert registry.rollback("m", "prod").version == "v1"
    with pytest.raises(InvalidInput, match="no earlier version"):
        registry.rollback("m", "prod")
    ch = registry.channel("m", "prod")
    assert ch.version == "v1"
    assert [(e["action"], e["version"]) for e in ch.history] == [
        ("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2"), ("rollback", "v1")]
    assert all(e["at"].endswith("Z") for e in ch.history)
    # promoting after rollbacks pushes on top of what is left
    registry.promote("m", "v3", "prod")
    assert registry.rollback("m", "prod").version == "v1"


def test_promote_needs_an_existing_version_and_writes_nothing_otherwise(registry):
    _commit(registry, "m", "v1")
    with pytest.raises(VersionNotFound):
        registry.promote("m", "v2", "prod")
    with pytest.raises(ChannelNotFound):
        registry.channel("m", "prod")
    with pytest.raises(InvalidName):
        registry.promote("m", "v1", "bad/channel")
    with pytest.raises(InvalidInput, match="no earlier version"):
        registry.rollback("m", "never-promoted")


def test_channels_are_per_artifact(registry):
    _commit(registry, "a", "v1")
    _commit(registry, "b", "v1")
    registry.promote("a", "v1", "prod")
    registry.promote("a", "v1", "canary")
    assert sorted(c.name for c in registry.channels("a")) == ["canary", "prod"]
    assert registry.channels("b") == []


def test_unreadable_channel_is_a_clear_error(registry, store):
    _commit(registry, "m", "v1")
    store.cas_ref("m/channels/prod", b"{not json", None)
    with pytest.raises(InvalidInput, match="m:prod is unreadable"):
        registry.channel("m", "prod")


def test_concurrent_promotes_lose_no_update(registry):
    threads, per_thread = 16, 6
    versions = [[f"t{t}-v{i}" for i in range(per_thread)] for t in range(threads)]
    for vs in versions:
        for v in vs:
            _commit(registry, "m", v)
    errors = []
    start = threading.Barrier(threads)

    def worker(vs):
        start.wait()
        try:
            for v in vs:
                registry.promote("m", v, "prod")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=worker, args=(vs,)) for vs in versions]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    history = registry.channel("m", "prod").history
    assert len(history) == threads * per_thread
    assert sorted(e["version"] for e in history) == sorted(v for vs in versions for v in vs)
    # each thread's promotes appear in the order it made them
    for vs in versions:
        assert [e["version"] for e in history if e["version"] in vs] == vs


@pytest.mark.parametrize("ref, want", [
    ("llama", ("llama", None, None)),
    ("llama@v1.2", ("llama", "v1.2", None)),
    ("llama:prod", ("llama", None, "prod")),
])
def test_parse_ref(ref, want):
    assert parse_ref(ref) == want


@pytest.mark.parametrize("ref", ["", "llama@", ":prod", "a/b", "llama@v1@v2"])
def test_parse_ref_rejects(ref):
    with pytest.raises(InvalidName):
        parse_ref(ref)
