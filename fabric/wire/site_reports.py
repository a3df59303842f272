"""Site reports with relayed ones: the body of `POST /v1/sites/{site}` (docs/protocol.md).

A site's report is a JSON object. A relay's report may carry the reports of the sites
below it (`relayed`), each attributed to its site, so the origin hears from its direct
children only and still knows every site. Both the relays (`agents.site.reports`) and
the origin (`fabric.origin.app`) read bodies with `split_report` and relays write them
with `report_bodies`:

    {"ready": true, "channels": [...],                  the sender's own report
     "relayed": [{"site": "edge-7", "via": ["mid-2"],   reports of sites below the sender:
                  "age_s": 1.5, "ready": true, ...}],   `via` the relays between the sender and
                                                        that site, nearest the sender first;
                                                        `age_s` seconds since a relay received it
     "relayed_only": true}                              optional: no own report in this body
                                                        (a further body of one report cycle)

Every body is at most `REPORT_MAX` bytes; a relay splits its subtree's reports over as
many bodies as that takes, the first one with its own report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fabric.core.limits import REPORT_MAX
from fabric.core.manifest import check_name
from fabric.errors import InvalidInput

MAX_VIA = 32  # relays between a sender and a relayed site
MAX_AGE = 86400.0  # seconds: an older relayed report is refused
_FIELDS = ("relayed", "relayed_only")
_ENTRY_FIELDS = ("site", "via", "age_s")


@dataclass
class Relayed:
    """One relayed report: `report` without its routing fields, `via` as sent, `age_s`."""

    site: str
    via: list[str]
    age_s: float
    report: dict
    size: int  # its JSON bytes, as it would be re-sent

    def to_json(self, via: list[str], age_s: float) -> dict:
        return {"site": self.site, "via": via, "age_s": round(age_s, 3), **self.report}


def split_report(body: dict) -> tuple[dict | None, list[Relayed]]:
    """A report body's own report (None for `relayed_only`) and its relayed reports.

    Raises `InvalidInput` for a `relayed` that is not a list of objects with a valid
    `site`, a `via` list of at most `MAX_VIA` site names and a finite `age_s` from 0 to
    `MAX_AGE`."""
    relayed = body.get("relayed", [])
    only = body.get("relayed_only", False)
    if not isinstance(relayed, list):
        raise InvalidInput("'relayed' must be a list of site reports")
    if not isinstance(only, bool):
        raise InvalidInput("'relayed_only' must be true or false")
    entries = [_entry(e, i) for i, e in enumerate(relayed)]
    own = None if only else {k: v for k, v in body.items() if k not in _FIELDS}
    return own, entries


def _entry(e: object, i: int) -> Relayed:
    where = f"relayed[{i}]"
    if not isinstance(e, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    site = e.get("site")
    if not isinstance(site, str):
        raise InvalidInput(f"{where}.site must be a site name")
    check_name("site", site)
    via, age = e.get("via", []), e.get("age_s", 0.0)
    if not isinstance(via, list) or len(via) > MAX_VIA or not all(isinstance(v, str) for v in via):
        raise InvalidInput(f"{where}.via must be a list of at most {MAX_VIA} site names")
    for v in via:
        check_name("site", v)
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age <= MAX_AGE:
        raise InvalidInput(f"{where}.age_s must be a number of seconds from 0 to {MAX_AGE:g}")
    report = {k: v for k, v in e.items() if k not in _ENTRY_FIELDS + _FIELDS}
    return Relayed(site, list(via), float(age), report, len(json.dumps(report)))


def report_bodies(own: dict, relayed: list[dict], limit: int = REPORT_MAX) -> list[dict]:
    """The bodies that carry `own` and every entry of `relayed` (already `Relayed.to_json`),
    each at most `limit` bytes of JSON; an entry that alone passes the limit is left out."""
    bodies: list[dict] = []
    current, size = dict(own, relayed=[]), len(json.dumps(own)) + 16
    for entry in relayed:
        n = len(json.dumps(entry)) + 2
        if n + 64 > limit:
            continue
        if size + n > limit:
            bodies.append(current)
            current, size = {"relayed_only": True, "relayed": []}, 40
        current["relayed"].append(entry)
        size += n
    bodies.append(current)
    for b in bodies:
        if not b["relayed"]:
            del b["relayed"]
    return bodies
