"""Site reports that outlive the origin process and are shared by the origins of one store.

The origin keeps each site's last report in memory (`fabric.origin.quotas.SiteReports`
bounds them) and, through `StoredReports`, in its store (`fabric.store.reports`:
`sites/<site>.json`):

* **writing**: a report whose substance changed (the same test as for a `site` event:
  anything but its clock readings) is written within `report_save` seconds; one that
  only changed its clocks at most every `RESTORE_AGE` seconds. So a site costs the
  store about one write per `RESTORE_AGE`, however often it reports.
* **loading**: at start the origin reads every stored report (younger than `FORGET`;
  older ones are deleted) into memory, within the same bounds as a posted one.
* **refreshing**: every `report_refresh` seconds it lists `sites/` and reads the reports
  whose objects changed since its last listing (but of sites that reported here in that
  time: what this origin holds of them is the newest), keeping one only where it is newer
  (`received`) than the one held: so `GET /v1/sites` at any origin shows the sites that
  report to the others, a few seconds late, and a site that fails over from one origin
  to another keeps its report. A site whose report changed raises a `site` event.

A failed store write or read is logged and counted
(`fabric_origin_site_report_store_errors_total{op}`), never a report's error.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from fabric.errors import FabricError, QuotaExceeded
from fabric.logs import get_logger
from fabric.origin.quotas import SiteReports
from fabric.store import reports as stored
from fabric.store.store import Store

log = get_logger("origin")
RESTORE_AGE = 60.0  # seconds: the stored copy of a report that only changed its clocks is at most this old
READERS = 16  # stored reports read at once
FORGET = 7 * 86400.0  # seconds: a stored report older than this is not loaded, and deleted


class StoredReports:
    """The reports in `sites` (site -> report, as `GET /v1/sites` shows them), kept in `store` too."""

    def __init__(self, store: Store, sites: dict, reports: SiteReports, registry: CollectorRegistry, *,
                 save: float = 2.0, refresh: float = 15.0,
                 changed: Callable[[str], None] = lambda site: None):
        self.store, self.sites, self.reports = store, sites, reports
        self.save, self.refresh, self.changed = save, refresh, changed
        self._dirty: dict[str, bool] = {}  # site -> whether its substance changed since it was written
        self._written: dict[str, float] = {}  # site -> monotonic time of its last write
        self._listed: dict[str, tuple[int, float]] = {}  # site -> (size, mtime) at the last listing
        self._here: dict[str, float] = {}  # site -> when a report of it last came here (Unix seconds)
        self.errors = Counter("fabric_origin_site_report_store_errors", "Site report writes or reads "
                              "in the store that failed", ["op"], registry=registry)

    def touched(self, site: str, substance: bool) -> None:
        """`site`'s report was replaced in memory; `substance`: more than its clocks changed."""
        self._dirty[site] = self._dirty.get(site, False) or substance
        self._here[site] = time.time()

    def _due(self) -> list[str]:
        now = time.monotonic()
        return [s for s, substance in self._dirty.items()
                if now - self._written.get(s, -1e9) >= (self.save if substance else RESTORE_AGE)]

    async def flush(self, *, everything: bool = False) -> int:
        """Write the reports that are due (`everything`: every changed one); how many."""
        due = list(self._dirty) if everything else self._due()
        batch = [(s, self.sites[s]) for s in due if s in self.sites]
        for s in due:
            self._dirty.pop(s, None)
            self._written[s] = time.monotonic()
        if batch:
            await asyncio.to_thread(self._write, batch)
        return len(batch)

    def _write(self, batch: list[tuple[str, dict]]) -> None:
        for site, report in batch:
            try:
                stored.put_report(self.store, site, report)
            except FabricError as e:
                self.errors.labels("write").inc()
                log.warning("site report not stored", site=site, error=e.code, message=e.message[:200])

    async def load(self) -> int:
        """Read the stored reports newer than those held; how many were taken."""
        try:
            found = await asyncio.to_thread(self._read_changed)
        except FabricError as e:
            self.errors.labels("read").inc()
            log.warning("stored site reports unreadable", error=e.code, message=e.message[:200])
            return 0
        taken = 0
        for site, report, size in found:
            held = self.sites.get(site)
            if held is not None and held.get("received", 0) >= report["received"]:
                continue
            try:
                self.reports.admit(site, size)
            except QuotaExceeded:
                continue
            self.sites[site] = report
            self._dirty.pop(site, None)
            taken += 1
            self.changed(site)
        return taken

    def _read_changed(self) -> list[tuple[str, dict, int]]:
        """(site, report, size) of the stored reports whose objects changed since the last listing
        (read `READERS` at a time: an origin with thousands of sites starts in seconds)."""
        now, wanted = time.time(), []
        for site, info in stored.listed(self.store):
            if self._listed.get(site) == (info.size, info.mtime):
                continue
            self._listed[site] = (info.size, info.mtime)
            if now - self._here.get(site, 0.0) < self.refresh:
                continue  # it reports here: what is held is the newest (that object is most likely ours)
            wanted.append((site, info))
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            got = list(pool.map(lambda item: stored.get_report(self.store, *item), wanted))
        out = []
        for (site, info), report in zip(wanted, got):
            if report is None:
                continue
            if now - report["received"] > FORGET:
                stored.delete_report(self.store, site)
                continue
            out.append((site, report, info.size))
        return out

    async def run(self) -> None:
        """Write what is due every `save` seconds and re-read the store every `refresh`, until cancelled."""
        next_refresh = time.monotonic() + self.refresh
        while True:
            await asyncio.sleep(min(self.save, 1.0))
            await self.flush()
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self.refresh
                await self.load()


def keeping(key: web.AppKey):
    """A cleanup context: the stored reports loaded at start, kept while the app runs, and
    every changed one written at shutdown."""
    async def ctx(app: web.Application):
        reports: StoredReports = app[key]
        await reports.load()
        task = asyncio.create_task(reports.run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reports.flush(everything=True)
    return ctx
