"""Retention: which versions a site keeps, and collecting the rest.

A site keeps the last `retention.keep` versions it activated, plus the active one, the
pinned ones, the ones its channels stage (`agents.site.staging`) and the ones its workers
serve, are assigned or would revert to (`agents.site.rollout`), both through `also_keep`; it
removes the other materialised folders and registry entries, then collects the chunks
no kept version needs (`fabric.gc`). Above the high watermark of disk use it keeps fewer
versions, one step at a time, until use falls below the low watermark (or only the
active, pinned, staged and in-use ones remain): a rollback target is never pruned under it.

Everything here is blocking file I/O: `prune` runs in a thread, on a snapshot of the
site's state taken on the event loop.
"""

from __future__ import annotations

from typing import Callable, Iterable

from fabric import gc as gc_mod
from fabric.logs import get_logger
from fabric.store.registry import Registry

from agents.site.config import Retention
from agents.site.layout import Layout, SiteState
from agents.site.metrics import AgentMetrics

log = get_logger("agent")


def kept_versions(state: SiteState, layout: Layout, artifact: str, keep: int) -> set[str]:
    """The last `keep` versions activated, the pinned ones and the active one."""
    kept = set(state.history.get(artifact, [])[-keep:])
    kept |= {p.split("@", 1)[1] for p in state.pins if p.startswith(artifact + "@")}
    active = layout.active(artifact)
    if active:
        kept.add(active)
    return kept


class Pruner:
    """Drops what a site's retention does not keep. Its methods block: call them in a thread."""

    def __init__(self, layout: Layout, registry: Registry, retention: Retention, followed: Iterable[str],
                 metrics: AgentMetrics, also_keep: Callable[[str], set[str]] = lambda artifact: set()):
        self.layout, self.registry, self.retention = layout, registry, retention
        self.followed, self.metrics = set(followed), metrics
        self.also_keep = also_keep  # staged and in-use versions: kept whatever the watermark says

    def prune(self, state: SiteState) -> gc_mod.GcReport:
        """Drop versions beyond retention, then chunks nothing kept needs (`state`: a snapshot)."""
        r = self.retention
        keep = r.keep
        report = self._prune_to(state, keep, grace=300)
        if self.layout.disk_usage() > r.high_watermark:
            while keep > 1 and self.layout.disk_usage() > r.low_watermark:
                keep -= 1
                report = self._prune_to(state, keep, grace=0)
            log.info("disk above high watermark: pruned", keep=keep, disk_used=round(self.layout.disk_usage(), 3))
        self.metrics.disk.set(self.layout.disk_usage())
        return report

    def _prune_to(self, state: SiteState, keep: int, grace: float) -> gc_mod.GcReport:
        for artifact in set(self.registry.artifacts()) | self.followed:
            kept = kept_versions(state, self.layout, artifact, keep) | self.also_keep(artifact)
            for version in set(self.layout.materialised(artifact)) - kept:
                self.layout.remove_version(artifact, version)
                log.info("version pruned", artifact=artifact, version=version)
            for version in set(self.registry.versions(artifact)) - kept:
                self.registry.delete_version(artifact, version)
        return gc_mod.gc(self.registry.store, keep=10 ** 9, grace=grace)
