"""The origin's own gauges: how each site that reports to it is doing.

Set just before each /metrics answer (`refresh`), from the sites' last reports
(`POST /v1/sites/{site}`) and the registry's channels:

* `fabric_origin_site_report_age_seconds{site}`: seconds since the site last reported
  (a site that stopped reporting keeps ageing: deploy/observability alerts on it);
* `fabric_origin_site_version_stale{site,artifact,channel}`: 1 while the version the site
  reports active is not the one its channel points at here, else 0.

The shared server counters (`fabric.wire.server.Metrics`) sit beside them.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge

from fabric.errors import FabricError
from fabric.store.registry import Registry


class OriginMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.report_age = Gauge("fabric_origin_site_report_age_seconds", "Seconds since the site last reported",
                                ["site"], registry=registry)
        self.stale = Gauge("fabric_origin_site_version_stale",
                           "1 while the site's active version is not its channel's version here",
                           ["site", "artifact", "channel"], registry=registry)

    async def refresh(self, sites: dict[str, dict], registry: Registry) -> None:
        """Set the gauges from `sites` (site -> last report) and the channels in `registry`."""
        now = time.time()
        reports = list(sites.values())
        wanted = await asyncio.to_thread(_channel_versions, registry, reports)
        self.report_age.clear()
        self.stale.clear()
        for report in reports:
            self.report_age.labels(report["site"]).set(max(0.0, now - report["received"]))
            for ch in _channels(report):
                key = (ch["artifact"], ch["channel"])
                if key in wanted:
                    self.stale.labels(report["site"], *key).set(int(ch.get("active") != wanted[key]))


def _channels(report: dict) -> list[dict]:
    chans = report.get("channels")
    if not isinstance(chans, list):
        return []
    return [c for c in chans if isinstance(c, dict) and isinstance(c.get("artifact"), str)
            and isinstance(c.get("channel"), str)]


def _channel_versions(registry: Registry, reports: list[dict]) -> dict[tuple[str, str], str | None]:
    """(artifact, channel) -> the version it points at, for every channel a site reports. In a thread."""
    out: dict[tuple[str, str], str | None] = {}
    for report in reports:
        for ch in _channels(report):
            key = (ch["artifact"], ch["channel"])
            if key not in out:
                try:
                    out[key] = registry.channel(*key).version
                except (FabricError, OSError):
                    continue  # not a channel here (any more): nothing to compare with
    return out
