"""fabric.gc and fabric.fsck: keep the right versions, free the rest, find and repair damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.core import digest
from fabric.errors import InvalidInput, VersionNotFound
from fabric.fsck import fsck
from fabric.gc import gc
from fabric.store.registry import Registry
from fabric.store.store import chunk_key, manifest_key

from helpers.files import assert_same_tree, random_bytes, write_tree
from helpers.store import publish_local, pull_local

SHARED_SIZE = 200_000


@pytest.fixture
def five(store, tmp_path, rng):
    """Versions v1..v5 of `m`: a shared file plus one file unique to each version."""
    shared = random_bytes(rng, SHARED_SIZE)
    srcs, unique = {}, {}
    for i in range(1, 6):
        v = f"v{i}"
        srcs[v] = write_tree(tmp_path / "src" / v, {"shared.bin": shared, "unique.bin": random_bytes(rng, 50_000 + i)})
        publish_local(store, srcs[v], "m", v)
        m = Registry(store).manifest("m", v)
        unique[v] = [c for c, _ in next(f for f in m.files if f.path == "unique.bin").chunks]
    return srcs, unique


def test_keep_n_newest_plus_channel_versions(store, tmp_path, five):
    srcs, unique = five
    reg = Registry(store)
    reg.promote("m", "v2", "prod")
    shared_chunks = [c for c, _ in reg.manifest("m", "v5").files[0].chunks]
    r = gc(store, keep=2, grace=0)
    assert sorted(r.versions_deleted) == ["m@v1", "m@v3"]
    assert r.manifests_deleted == 2
    assert r.chunks_deleted == len(unique["v1"]) + len(unique["v3"]) and r.bytes_freed > 100_000
    assert reg.versions("m") == ["v2", "v4", "v5"]
    for v in ("v1", "v3"):
        assert not any(store.has_chunk(c) for c in unique[v])
    for v in ("v2", "v4", "v5"):  # nothing a kept version needs is gone: it still pulls
        assert all(store.has_chunk(c) for c in unique[v])
        pull_local(store, "m", v, tmp_path / "out" / v)
        assert_same_tree(srcs[v], tmp_path / "out" / v)
    assert all(store.has_chunk(c) for c in shared_chunks)
    with pytest.raises(VersionNotFound):
        reg.manifest("m", "v1")
    assert fsck(store).ok
    again = gc(store, keep=2, grace=0)  # idempotent
    assert (again.versions_deleted, again.chunks_deleted, again.manifests_deleted) == ([], 0, 0)


def test_rollback_targets_and_pins_survive(store, five):
    reg = Registry(store)
    reg.promote("m", "v1", "prod")
    reg.promote("m", "v2", "prod")  # v1 stays reachable by rollback
    r = gc(store, keep=1, grace=0, pinned={"m@v3"})
    assert sorted(r.versions_deleted) == ["m@v4"]
    assert reg.versions("m") == ["v1", "v2", "v3", "v5"]
    assert reg.rollback("m", "prod").version == "v1"
    assert fsck(store).ok


def test_dry_run_deletes_nothing(store, five):
    root = Path(store.backend.describe())
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    r = gc(store, keep=1, grace=0, dry_run=True)
    assert len(r.versions_deleted) == 4 and r.chunks_deleted > 0
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before


def test_grace_spares_young_chunks(store, five):
    _, unique = five
    r = gc(store, keep=1, grace=3600)
    assert len(r.versions_deleted) == 4 and r.chunks_deleted == 0
    assert all(store.has_chunk(c) for c in unique["v1"])


def test_orphan_chunks_from_an_unfinished_publish_are_collected(store, five):
    orphan = b"stored, but the publish never committed"
    cid = digest.digest(orphan)
    store.put_chunk(cid, orphan)
    assert gc(store, keep=5, grace=3600).chunks_deleted == 0
    r = gc(store, keep=5, grace=0)
    assert (r.versions_deleted, r.chunks_deleted) == ([], 1) and not store.has_chunk(cid)


def test_chunks_shared_across_artifacts_survive(store, tmp_path, rng):
    common = write_tree(tmp_path / "common", {"w.bin": random_bytes(rng, 300_000)})
    other = write_tree(tmp_path / "other", {"w.bin": random_bytes(rng, 300_000)})
    publish_local(store, common, "a", "v1")
    publish_local(store, common, "b", "v1")
    publish_local(store, other, "a", "v2")
    r = gc(store, keep=1, grace=0)
    assert r.versions_deleted == ["a@v1"] and r.chunks_deleted == 0
    pull_local(store, "b", "v1", tmp_path / "out")
    assert_same_tree(common, tmp_path / "out")


def test_a_version_named_like_a_lock_file_is_kept_by_gc(store, tmp_path, rng):
    src = write_tree(tmp_path / "src", {"w.bin": random_bytes(rng, 100_000)})
    publish_local(store, src, "m", "v1.lock")
    assert Registry(store).versions("m") == ["v1.lock"]
    r = gc(store, keep=1, grace=0)
    assert (r.versions_deleted, r.chunks_deleted, r.manifests_deleted) == ([], 0, 0)
    pull_local(store, "m", "v1.lock", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")
    assert fsck(store).versions == 1


def test_keep_must_be_positive(store):
    with pytest.raises(InvalidInput, match="at least 1"):
        gc(store, keep=0)


# --- fsck ------------------------------------------------------------------------------------------

def test_fsck_clean_store(store, five):
    r = fsck(store)
    assert r.ok and r.versions == 5 and r.manifests == 5
    assert r.chunks == len(list(store.iter_chunks())) > 5
    assert r.to_json()["ok"] is True


def test_fsck_finds_a_corrupt_chunk_and_repair_removes_it(store, five):
    _, unique = five
    bad = unique["v3"][0]
    path = Path(store.backend.describe()) / chunk_key(bad)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    r = fsck(store)
    assert r.bad_chunks == [bad] and not r.ok and path.exists()
    r = fsck(store, repair=True)
    assert r.removed == 1 and not path.exists()
    assert r.bad_versions == ["m@v3: 1 chunk(s) missing"]  # the report says which version needs it


def test_fsck_reports_a_missing_or_damaged_manifest(store, five):
    reg = Registry(store)
    root = Path(store.backend.describe())
    (root / manifest_key(reg.manifest_id("m", "v1"))).unlink()
    (root / manifest_key(reg.manifest_id("m", "v2"))).write_bytes(b"{}")
    store.cas_ref("m/versions/v9", b"not-an-id", None)
    r = fsck(store)
    assert not r.ok and r.bad_chunks == []
    bad = dict(line.split(": ", 1) for line in r.bad_versions)
    assert sorted(bad) == ["m@v1", "m@v2", "m@v9"]
    assert "is not in" in bad["m@v1"] and "does not match" in bad["m@v2"] and "chunk id" in bad["m@v9"]
