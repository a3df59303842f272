"""The origin's bounds on what clients leave with it, and its sweep of orphaned uploads.

Three things a client can make the origin keep, each bounded (docs/protocol.md, "Limits"):

* **uncommitted uploads**: `UploadQuota` counts, per token, the bytes of the chunks
  it uploaded that no version it or anyone committed since names; an upload past
  `upload_quota` is refused (`quota_exceeded`, 507). Each chunk counts at least
  `CHARGE_MIN` bytes, so the bookkeeping is bounded too. A chunk's charge lapses after
  `orphan_grace`, when the orphan sweep may collect it. The counts live in memory: a
  restarted origin starts from zero, and the sweep still collects what was left.
* **orphaned chunks**: `orphan_sweeps` runs `fabric.gc.gc` with every version kept
  every `orphan_interval` seconds, deleting chunks and manifests that no version
  references and that are older than `orphan_grace` (fenced against commits, as any gc).
* **site reports**: `SiteReports` keeps each site's last report, at most `REPORT_MAX`
  bytes (413 `payload_too_large` above) and `REPORTS_TOTAL` bytes for all sites (507).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from fabric.core.boundedjson import decode as decode_json
from fabric.core.limits import REPORT_MAX  # noqa: F401  (also a relay's bound: agents.site.reports)
from fabric.errors import FabricError, GcRunning, InvalidInput, PayloadTooLarge, QuotaExceeded
from fabric.gc import gc
from fabric.logs import get_logger
from fabric.store.store import Store

log = get_logger("origin")
CHARGE_MIN = 64 << 10  # the least an uploaded chunk counts against its token's quota
REPORTS_TOTAL = 64 << 20  # the bodies of every site's last report, together
MAX_SITES = 10_000  # sites with a report kept


@dataclass(frozen=True)
class OriginLimits:
    """The origin's bounds (`fabric origin` flags). `orphan_interval` 0: no orphan sweep."""

    upload_quota: int = 256 * 10**9  # uncommitted upload bytes per token ("256G")
    orphan_grace: float = 3600.0  # seconds an unreferenced upload is kept for its commit
    orphan_interval: float = 3600.0  # seconds between orphan sweeps

    def __post_init__(self):
        if self.upload_quota < CHARGE_MIN:
            raise InvalidInput(f"the upload quota must be at least {CHARGE_MIN} bytes")
        if self.orphan_grace < 0 or self.orphan_interval < 0:
            raise InvalidInput("the orphan grace and interval must not be negative")


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.refused = Counter("fabric_origin_quota_refusals", "Requests refused by a limit, by limit",
                               ["limit"], registry=registry)
        self.uncommitted = Gauge("fabric_origin_uncommitted_upload_bytes",
                                 "Bytes uploaded that no committed version names yet (as charged), all tokens",
                                 registry=registry)
        self.sweeps = Counter("fabric_origin_orphan_sweeps", "Orphan sweeps, by outcome", ["outcome"],
                              registry=registry)
        self.swept = Counter("fabric_origin_orphan_chunks_deleted", "Orphaned chunks the sweeps deleted",
                             registry=registry)
        self.report_bytes = Gauge("fabric_origin_site_report_bytes", "Bytes of the site reports kept",
                                  registry=registry)


class UploadQuota:
    """Per token: the chunks it uploaded that no commit has named since, and their charge."""

    def __init__(self, limits: OriginLimits, metrics: QuotaMetrics):
        self.limits, self.metrics = limits, metrics
        self._pending: dict[str, OrderedDict[str, tuple[int, float]]] = {}
        self._bytes: dict[str, int] = {}

    def used(self, token: str) -> int:
        self._expire(token)
        return self._bytes.get(token, 0)

    def charge(self, token: str, chunk_id: str, size: int) -> None:
        """Count an uploaded chunk against `token`; QuotaExceeded (before it is stored) past the quota."""
        self._expire(token)
        pending = self._pending.setdefault(token, OrderedDict())
        if chunk_id in pending:
            return
        cost, used = max(size, CHARGE_MIN), self._bytes.get(token, 0)
        if used + cost > self.limits.upload_quota:
            self.metrics.refused.labels("upload_quota").inc()
            raise QuotaExceeded(f"token {token!r} has {used} bytes of uploads no version names yet "
                                f"(at most {self.limits.upload_quota}): commit a version, or wait "
                                f"{self.limits.orphan_grace:.0f}s for them to be collected")
        pending[chunk_id] = (cost, time.monotonic())
        self._bytes[token] = used + cost
        self.metrics.uncommitted.inc(cost)

    def settle(self, chunk_ids) -> None:
        """A version naming these chunks was committed: they are no longer anyone's uncommitted uploads."""
        ids = set(chunk_ids)
        for token, pending in self._pending.items():
            for cid in ids & pending.keys():
                self._drop(token, cid)

    def _expire(self, token: str) -> None:
        pending = self._pending.get(token)
        cutoff = time.monotonic() - self.limits.orphan_grace
        while pending and next(iter(pending.values()))[1] < cutoff:
            self._drop(token, next(iter(pending)))  # past its grace: the orphan sweep's, not the quota's

    def _drop(self, token: str, chunk_id: str) -> None:
        cost, _ = self._pending[token].pop(chunk_id)
        self._bytes[token] -= cost
        self.metrics.uncommitted.dec(cost)


UPLOADS = web.AppKey("uploads", UploadQuota)


class SiteReports:
    """The last report of each site, bounded in size, count and total bytes."""

    def __init__(self, reports: dict, metrics: QuotaMetrics):
        self.reports, self.metrics = reports, metrics
        self._sizes: dict[str, int] = {}

    async def read(self, request: web.Request) -> tuple[dict, int]:
        """The report in `request`'s body, and its size; 413 above `REPORT_MAX`."""
        if request.content_length is not None and request.content_length > REPORT_MAX:
            raise self._too_large(request.content_length)
        raw = bytearray()
        while block := await request.content.read(REPORT_MAX + 1 - len(raw)):  # a body without a length too
            raw += block
            if len(raw) > REPORT_MAX:
                raise self._too_large(len(raw))
        raw = bytes(raw)
        body = decode_json(raw, what="site report")
        if not isinstance(body, dict):
            raise InvalidInput("request body must be a JSON object")
        return body, len(raw)

    def _too_large(self, n: int) -> PayloadTooLarge:
        self.metrics.refused.labels("report_size").inc()
        return PayloadTooLarge(f"a site report of {n} bytes; at most {REPORT_MAX}")

    def admit(self, site: str, size: int) -> None:
        """Check that keeping a report of `size` bytes for `site` stays within the bounds; record it."""
        if site not in self.reports and len(self.reports) >= MAX_SITES:
            self.metrics.refused.labels("sites").inc()
            raise QuotaExceeded(f"reports of {MAX_SITES} sites are kept already")
        total = sum(self._sizes.values()) - self._sizes.get(site, 0) + size
        if total > REPORTS_TOTAL:
            self.metrics.refused.labels("reports_total").inc()
            raise QuotaExceeded(f"the site reports kept would take {total} bytes (at most {REPORTS_TOTAL})")
        self._sizes[site] = size
        self.metrics.report_bytes.set(total)


REPORTS = web.AppKey("reports", SiteReports)


async def orphan_sweeps(store: Store, limits: OriginLimits, metrics: QuotaMetrics) -> None:
    """Every `orphan_interval` seconds, collect what no version references (until cancelled)."""
    while True:
        await asyncio.sleep(limits.orphan_interval)
        try:
            report = await asyncio.to_thread(gc, store, keep=None, grace=limits.orphan_grace)
        except GcRunning:
            metrics.sweeps.labels("skipped").inc()  # another gc is sweeping: it collects them
            continue
        except FabricError as e:
            metrics.sweeps.labels("failed").inc()
            log.warning("orphan sweep failed", error=e.code, message=e.message)
            continue
        metrics.sweeps.labels("ok").inc()
        metrics.swept.inc(report.chunks_deleted)
        if report.chunks_deleted or report.manifests_deleted:
            log.info("orphans collected", chunks=report.chunks_deleted, manifests=report.manifests_deleted,
                     bytes=report.bytes_freed)


def sweeper(store: Store, limits: OriginLimits, metrics: QuotaMetrics):
    """A cleanup context running `orphan_sweeps` for the app's life (none with interval 0)."""
    async def ctx(_app: web.Application):
        task = asyncio.create_task(orphan_sweeps(store, limits, metrics)) if limits.orphan_interval else None
        yield
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return ctx
