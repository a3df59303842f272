"""Reporting up the relay tree: a relay keeps its subtree's reports and forwards them with its own.

A site's children report to it as they would to the origin (`POST /v1/sites/{site}`,
same token rule: a token with `site = "{site}"` in this relay's token file, or admin;
same body bound; `fabric.wire.site_reports`). The relay keeps the last report of each
site below it (the child's own, and those the child relayed), at most
`RELAYED_SITES_MAX` sites, and forgets one that has not been refreshed for `forget_after`
seconds. At each of its own report cycles it sends upstream one aggregated report
(`bodies`): its own status plus every report it keeps, each still attributed to its
site with the relays it passed through (`via`) and its age (`age_s`), split over
bodies of at most `REPORT_MAX` bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from fabric.core.boundedjson import decode as decode_json
from fabric.core.limits import RELAYED_SITES_MAX, REPORT_MAX
from fabric.core.manifest import check_name
from fabric.errors import Forbidden, InvalidInput, PayloadTooLarge, QuotaExceeded
from fabric.wire.protocol import SITES
from fabric.wire.server import principal
from fabric.wire.site_reports import Relayed, report_bodies, split_report

SUBTREE = web.AppKey("subtree", object)


@dataclass
class _Kept:
    via: list[str]  # relays between this site and the reporting one, nearest first
    received: float  # monotonic time the first relay received it
    report: dict


class Subtree:
    """The last report of every site below this one."""

    def __init__(self, site: str, forget_after: float, max_sites: int = RELAYED_SITES_MAX):
        self.site, self.forget_after, self.max_sites = site, forget_after, max_sites
        self.kept: dict[str, _Kept] = {}

    def take(self, sender: str, own: dict | None, relayed: list[Relayed]) -> None:
        """Keep `sender`'s own report and those it relayed (a report of this site is ignored)."""
        now = time.monotonic()
        self._expire(now)
        items = ([(sender, _Kept([], now, own))] if own is not None else []) + \
            [(r.site, _Kept([sender, *r.via], now - r.age_s, r.report)) for r in relayed]
        for site, kept in items:
            if site == self.site or self.site in kept.via:
                continue
            if site not in self.kept and len(self.kept) >= self.max_sites:
                raise QuotaExceeded(f"reports of {self.max_sites} sites are kept at relay {self.site} already")
            self.kept[site] = kept

    def _expire(self, now: float) -> None:
        for site in [s for s, k in self.kept.items() if now - k.received > self.forget_after]:
            del self.kept[site]

    def bodies(self, own: dict) -> list[dict]:
        """The bodies of this cycle's report upstream: `own` and every kept report."""
        now = time.monotonic()
        self._expire(now)
        entries = [Relayed(site, k.via, 0.0, k.report, 0).to_json(k.via, now - k.received)
                   for site, k in sorted(self.kept.items())]
        return report_bodies(own, entries)


async def _report(request: web.Request) -> web.Response:
    """A child's report (with those it relays): kept here, sent upstream at the next cycle."""
    site = check_name("site", request.match_info["site"])
    p = principal(request)
    if not p.speaks_for(site):
        raise Forbidden(f"token {p.name!r} may not report for site {site!r}")
    if request.content_length is not None and request.content_length > REPORT_MAX:
        raise PayloadTooLarge(f"a site report of {request.content_length} bytes; at most {REPORT_MAX}")
    raw = bytearray()
    while block := await request.content.read(REPORT_MAX + 1 - len(raw)):
        raw += block
        if len(raw) > REPORT_MAX:
            raise PayloadTooLarge(f"a site report of more than {REPORT_MAX} bytes")
    body = decode_json(bytes(raw), what="site report")
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    own, relayed = split_report(body)
    request.app[SUBTREE].take(site, None if own is None else dict(own, site=site), relayed)
    return web.json_response({"ok": True})


def report_routes(app: web.Application, subtree: Subtree) -> None:
    app[SUBTREE] = subtree
    app.router.add_post(f"{SITES}/{{site}}", _report)
