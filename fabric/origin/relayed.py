"""The reports a relay forwards for the sites below it, kept beside the direct ones.

A relay's `POST /v1/sites/{relay}` may carry its subtree's reports (`relayed`,
`fabric.wire.site_reports`). The origin keeps each under its own site, adding `via`
(the sending relay, then the relays it named, nearest the origin first) and
`received` (now less the report's `age_s`), so `GET /v1/sites` and the status page
show every site and tell a relayed report (`via` present) from a direct one (no `via`).
A relay speaks for its subtree: the origin takes its word for them, except that a
site's own direct report younger than `DIRECT_WINS` seconds is never replaced by a
relayed one. The bounds of all reports (`fabric.origin.quotas.SiteReports`) hold for
relayed ones too: a relayed report past them is dropped and counted, not an error.
"""

from __future__ import annotations

import time
from typing import Callable

from fabric.errors import QuotaExceeded
from fabric.origin.quotas import SiteReports
from fabric.wire.site_reports import Relayed

DIRECT_WINS = 30.0  # seconds a direct report outranks relayed ones for its site


def keep_relayed(sites: dict, reports: SiteReports, sender: str, relayed: list[Relayed],
                 changed: Callable[[str, dict | None, dict], None]) -> int:
    """Keep `sender`'s relayed reports in `sites`; `changed(site, previous, new)` for each kept.
    Returns how many were dropped (a fresh direct report, or a bound)."""
    now, dropped = time.time(), 0
    for r in relayed:
        held = sites.get(r.site)
        if r.site == sender or (held is not None and "via" not in held and now - held["received"] < DIRECT_WINS):
            dropped += 1
            continue
        try:
            reports.admit(r.site, r.size)
        except QuotaExceeded:
            dropped += 1
            continue
        sites[r.site] = dict(r.report, site=r.site, via=[sender, *r.via], received=now - r.age_s)
        changed(r.site, held, sites[r.site])
    return dropped
