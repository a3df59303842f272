"""The site agent's Prometheus metrics (served at `/metrics` by `agents.site.app`).

The metrics are made with the agent and count from the start; `register` adds them to
the registry an app serves (`create_app` does), so an agent built without an app (a
test's) needs no checks before it counts.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from fabric.transfer import SyncStats


class AgentMetrics:
    def __init__(self, registry=None):
        self.active = Gauge("fabric_agent_active_version", "1 for each artifact's active version",
                            ["artifact", "version"], registry=registry)
        self.sync_done = Gauge("fabric_agent_sync_bytes_done", "Bytes fetched for the version in progress",
                               ["artifact"], registry=registry)
        self.sync_total = Gauge("fabric_agent_sync_bytes_total", "Bytes of the version in progress",
                                ["artifact"], registry=registry)
        self.by_source = Counter("fabric_agent_bytes_by_source", "Chunk payload bytes fetched, by source",
                                 ["source"], registry=registry)
        self.bad_chunks = Counter("fabric_agent_bad_chunks", "Chunks that failed verification, by source",
                                  ["source"], registry=registry)
        self.deploys = Counter("fabric_agent_deploys", "Deploys by outcome", ["outcome"], registry=registry)
        self.disk = Gauge("fabric_agent_disk_used_ratio", "Fraction of the data disk in use", registry=registry)
        self._all = [self.active, self.sync_done, self.sync_total, self.by_source, self.bad_chunks, self.deploys,
                     self.disk]

    def register(self, registry) -> None:
        """Serve these metrics from `registry` (a `prometheus_client.CollectorRegistry`)."""
        for metric in self._all:
            registry.register(metric)

    def count_sources(self, stats: SyncStats) -> None:
        """Bytes and bad chunks by source, for our own deploys and for pull-through alike."""
        for src, n in stats.bytes_by_source.items():
            self.by_source.labels(src).inc(n)
        for src, n in stats.bad_chunks_by_source.items():
            self.bad_chunks.labels(src).inc(n)

    def count_deploy(self, outcome: str) -> None:
        self.deploys.labels(outcome).inc()

    def set_active(self, active: dict[str, str | None]) -> None:
        """`active`: artifact -> its active version (None: none)."""
        self.active.clear()
        for artifact, version in active.items():
            if version:
                self.active.labels(artifact, version).set(1)
