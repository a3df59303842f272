"""The site agent's Prometheus metrics (served at `/metrics` by `agents.site.app`).

The metrics are made with the agent and count from the start; `register` adds them to
the registry an app serves (`create_app` does), so an agent built without an app (a
test's) needs no checks before it counts. Names follow Prometheus's conventions:
counters end in `_total` (prometheus_client adds it), gauges never do, durations are
`_seconds` histograms. deploy/observability/ alerts on them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from fabric.transfer import SyncStats

# a deploy moves from a few KB (one changed tensor) to many GB (a first sync)
_DEPLOY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class AgentMetrics:
    def __init__(self, registry=None):
        self.fetched: dict[str, int] = {}  # chunk payload bytes fetched, by source URL, as by_source counts
        self.active = Gauge("fabric_agent_active_version", "1 for each artifact's active version",
                            ["artifact", "version"], registry=registry)
        self.sync_done = Gauge("fabric_agent_sync_bytes_done", "Bytes fetched for the version in progress",
                               ["artifact"], registry=registry)
        self.sync_expected = Gauge("fabric_agent_sync_bytes_expected", "Bytes of the version in progress",
                                   ["artifact"], registry=registry)
        self.by_source = Counter("fabric_agent_bytes_by_source", "Chunk payload bytes fetched, by source",
                                 ["source"], registry=registry)
        self.bad_chunks = Counter("fabric_agent_bad_chunks", "Chunks refused: they failed verification, by source",
                                  ["source"], registry=registry)
        self.deploys = Counter("fabric_agent_deploys", "Deploys by outcome (activated, failed, refused)", ["outcome"],
                               registry=registry)
        self.deploy_seconds = Histogram("fabric_agent_deploy_seconds", "Time to deploy a version, by outcome",
                                        ["outcome"], buckets=_DEPLOY_BUCKETS, registry=registry)
        self.activation_seconds = Histogram("fabric_agent_activation_seconds",
                                            "Time to flip current/<artifact> to a fetched version and record it",
                                            registry=registry)
        self.canary_rejections = Counter("fabric_agent_canary_rejections",
                                         "Versions this site rejected because their canary failed", ["artifact"],
                                         registry=registry)
        self.disk = Gauge("fabric_agent_disk_used_ratio", "Fraction of the data disk in use", registry=registry)
        self.high_watermark = Gauge("fabric_agent_disk_high_watermark_ratio",
                                    "retention.high_watermark: above it the agent keeps fewer old versions",
                                    registry=registry)
        # signed versions (agents.site.trust)
        self.signature_refusals = Counter("fabric_agent_signature_refusals",
                                          "Signed statements refused by the trust policy, by error code", ["code"],
                                          registry=registry)
        self.statement_expiry = Gauge("fabric_agent_channel_statement_expiry_timestamp_seconds",
                                      "When the channel statement this site accepted last expires (Unix time)",
                                      ["artifact", "channel"], registry=registry)
        self.channel_stale = Gauge("fabric_agent_channel_stale",
                                   "1 while the channel's accepted statement has expired (its version keeps serving)",
                                   ["artifact", "channel"], registry=registry)
        self.channel_trust = Gauge("fabric_agent_channel_trust",
                                   "1 for the channel's trust state (verified, unsigned, stale, refused)",
                                   ["artifact", "channel", "state"], registry=registry)
        self.seal_fallbacks = Counter("fabric_agent_seal_fallbacks",
                                      "Worker loads that checked bytes with BLAKE3 because the site seal was "
                                      "missing, malformed, stale, incomplete or did not match", ["reason"],
                                      registry=registry)
        self.stagings = Counter("fabric_agent_stagings", "Staging pulls by outcome (held, failed, refused)",
                                ["outcome"], registry=registry)
        self.staged = Gauge("fabric_agent_staged_version", "1 for each artifact's staged version held here, "
                            "not active (agents.site.staging)", ["artifact", "version"], registry=registry)
        self._all = [self.stagings, self.staged, self.seal_fallbacks, self.active, self.sync_done, self.sync_expected, self.by_source, self.bad_chunks, self.deploys,
                     self.deploy_seconds, self.activation_seconds, self.canary_rejections, self.disk,
                     self.high_watermark, self.signature_refusals, self.statement_expiry, self.channel_stale,
                     self.channel_trust]

    def register(self, registry) -> None:
        """Serve these metrics from `registry` (a `prometheus_client.CollectorRegistry`)."""
        for metric in self._all:
            registry.register(metric)

    def count_sources(self, stats: SyncStats) -> None:
        """Bytes and bad chunks by source, for our own deploys and for pull-through alike."""
        for src, n in stats.bytes_by_source.items():
            self.by_source.labels(src).inc(n)
            self.fetched[src] = self.fetched.get(src, 0) + n  # the status report's per-link counters
        for src, n in stats.bad_chunks_by_source.items():
            self.bad_chunks.labels(src).inc(n)

    def count_deploy(self, outcome: str, seconds: float | None = None) -> None:
        self.deploys.labels(outcome).inc()
        if seconds is not None:
            self.deploy_seconds.labels(outcome).observe(seconds)

    def count_seal_fallback(self, reason: str) -> None:
        known = ("missing", "malformed", "stale", "incomplete", "mismatch")  # agents.worker.sealcheck.REASONS
        self.seal_fallbacks.labels(reason if reason in known else "other").inc()

    def count_rejection(self, artifact: str) -> None:
        self.canary_rejections.labels(artifact).inc()

    def set_active(self, active: dict[str, str | None]) -> None:
        """`active`: artifact -> its active version (None: none)."""
        self.active.clear()
        for artifact, version in active.items():
            if version:
                self.active.labels(artifact, version).set(1)
