"""agents.site.retention: what a site keeps, by count and under disk pressure."""

from __future__ import annotations

import os
import subprocess

from prometheus_client import CollectorRegistry

from agents.site.config import Retention
from agents.site.layout import Layout, SiteState
from agents.site.metrics import AgentMetrics
from agents.site.retention import Pruner
from fabric.store.registry import Registry
from fabric.store.store import open_store


class FullDisk(Layout):
    """A site's layout on a disk that stays 95% full whatever is pruned (the host's disk)."""

    def disk_usage(self) -> float:
        return 0.95


class RoomyDisk(Layout):
    """A site's layout on a disk half full: retention by count alone, however full the host's is."""

    def disk_usage(self) -> float:
        return 0.5


def _site(tmp_path, layout_cls=RoomyDisk, also_keep=lambda artifact: set()):
    layout = layout_cls(tmp_path / "data")
    registry = Registry(open_store(layout.store_dir))
    for v in ("v1", "v2", "v3", "v4"):
        layout.version_dir("m", v).mkdir(parents=True)
    pruner = Pruner(layout, registry, Retention(keep=3), ["m"], AgentMetrics(CollectorRegistry()),
                    also_keep=also_keep)
    return layout, pruner


def test_keeps_the_last_n_activated_and_the_active_one(tmp_path):
    layout, pruner = _site(tmp_path)
    layout.activate("m", "v4")
    pruner.prune(SiteState(history={"m": ["v1", "v2", "v3", "v4"]}))
    assert layout.materialised("m") == ["v2", "v3", "v4"]


def test_a_full_disk_prunes_to_the_active_one_but_never_what_a_rollout_may_revert_to(tmp_path):
    # v4 was just activated and its canary is loading; v3, the version a rejection reverts to,
    # must survive the disk pressure (it did not: a rejected canary found its rollback target gone)
    layout, pruner = _site(tmp_path, FullDisk, also_keep=lambda artifact: {"v3", "v4"})
    layout.activate("m", "v4")
    pruner.prune(SiteState(history={"m": ["v1", "v2", "v3", "v4"]}))
    assert layout.materialised("m") == ["v3", "v4"]

    layout, pruner = _site(tmp_path / "no-rollout", FullDisk)
    layout.activate("m", "v4")
    pruner.prune(SiteState(history={"m": ["v1", "v2", "v3", "v4"]}))
    assert layout.materialised("m") == ["v4"]


def test_disk_usage_is_what_df_reports(tmp_path):
    # used / (used + available): blocks the host holds back (reserved, or beyond a quota) are
    # neither, so a disk df calls 22% full is not read as 68% full
    layout = Layout(tmp_path / "data")
    df = subprocess.run(["df", "--output=pcent", str(layout.data)], capture_output=True, text=True, check=True)
    pcent = int(df.stdout.splitlines()[1].strip().rstrip("%"))
    assert abs(layout.disk_usage() * 100 - pcent) <= 1.5, (layout.disk_usage(), df.stdout)


# --- one copy per site: a pruned folder's files are packs ------------------------------------------

def _packed_site(tmp_path, rng):
    """A site whose store holds v1 and v2 (whose `w.bin` share their first 300 kB), built as a
    site builds them: each version folder's files linked into the store as packs. v2 was built
    first, then v1 (as a staged or re-deployed version would be), so the shared chunks live in
    v1's files."""
    import asyncio

    from fabric.pull import Sink, pull
    from helpers.files import random_bytes, write_tree
    from helpers.store import publish_local

    layout = RoomyDisk(tmp_path / "data")
    store = open_store(layout.store_dir)
    registry = Registry(store)
    shared = random_bytes(rng, 300_000)
    for v in ("v1", "v2"):
        publish_local(store, write_tree(tmp_path / "src" / v, {"w.bin": shared + random_bytes(rng, 200_000)}),
                      "m", v)
    for v in ("v2", "v1"):
        result = asyncio.run(pull(store, registry.manifest("m", v), Sink.site_version(layout.version_dir("m", v))))
        assert result.packed
    return layout, store, registry


def _pack_inodes(store):
    return {os.stat(store.backend.path(i.key)).st_ino for i in store.iter_packs()}


def _folder_inodes(layout, version):
    return {p.stat().st_ino for p in layout.version_dir("m", version).rglob("*.bin")}


def test_pruning_a_folder_moves_the_kept_versions_chunks_out_of_its_files(tmp_path, rng):
    layout, store, registry = _packed_site(tmp_path, rng)
    shared_ids = set(registry.manifest("m", "v1").chunk_ids()) & set(registry.manifest("m", "v2").chunk_ids())
    assert shared_ids and {store.pack_ref(c).pack for c in shared_ids} <= {
        i.key for i in store.iter_packs() if os.stat(store.backend.path(i.key)).st_ino in _folder_inodes(layout, "v1")}
    layout.activate("m", "v2")
    pruner = Pruner(layout, registry, Retention(keep=1, high_watermark=1.0, low_watermark=1.0), ["m"],
                    AgentMetrics(CollectorRegistry()))
    report = pruner._prune_to(SiteState(history={"m": ["v2"]}), keep=1, grace=0)
    assert layout.materialised("m") == ["v2"] and registry.versions("m") == ["v2"]
    assert report.packs_deleted >= 1  # v1's file: nothing points into it any more
    # What the store keeps in packs is v2's files, nothing else: v1's bytes are freed.
    assert _pack_inodes(store) == _folder_inodes(layout, "v2")
    for cid in registry.manifest("m", "v2").chunk_ids():
        assert store.get_chunk(cid)  # verified, from v2's files


def test_a_kept_version_without_a_folder_gets_copies_of_its_chunks(tmp_path, rng):
    import shutil

    from agents.site.retention import release_packs
    from fabric import gc as gc_mod

    layout, store, registry = _packed_site(tmp_path, rng)
    v1_packs = {i.key for i in store.iter_packs()
                if os.stat(store.backend.path(i.key)).st_ino in _folder_inodes(layout, "v1")}
    shutil.rmtree(layout.version_dir("m", "v2"))  # v2 stays in the registry, but has no folder here
    registry.delete_version("m", "v1")
    moved = release_packs(registry, layout, [("m", "v1")])
    layout.remove_version("m", "v1")
    assert moved >= 1  # the shared chunks, whose only place was v1's files
    gc_mod.gc(store, keep=10 ** 9, grace=0)
    assert v1_packs and not v1_packs & {i.key for i in store.iter_packs()}  # v1's files are freed
    for cid in registry.manifest("m", "v2").chunk_ids():
        assert store.get_chunk(cid)  # the shared ones from copies of the store's own
