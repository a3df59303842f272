"""agents.site.retention: what a site keeps, by count and under disk pressure."""

from __future__ import annotations

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


def _site(tmp_path, layout_cls=Layout, also_keep=lambda artifact: set()):
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
