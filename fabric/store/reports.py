"""Site reports kept in the store, so they outlive an origin process and are shared by the
origins of one store (docs/formats.md "sites/<site>.json"):

    sites/<site>.json    the last report an origin kept for the site, as `GET /v1/sites` shows it

Each object is one JSON object (the report with `site`, `received` and, for a relayed one,
`via`), at most `STORED_MAX` bytes; the last writer wins. Who writes when is the origin's
(`fabric.origin.sitereports`). Blocking I/O: async callers run these in threads.
"""

from __future__ import annotations

import json
from typing import Iterator

from fabric.core.boundedjson import decode as decode_json
from fabric.core.limits import REPORT_MAX
from fabric.core.manifest import check_name
from fabric.errors import FabricError, NotFound
from fabric.store.backend import ObjectInfo
from fabric.store.store import Store

PREFIX = "sites/"
STORED_MAX = REPORT_MAX + (8 << 10)  # a report and what the origin adds (site, received, via)


def report_key(site: str) -> str:
    return f"{PREFIX}{check_name('site', site)}.json"


def put_report(store: Store, site: str, report: dict) -> int:
    """Keep `report` as `site`'s; the bytes written."""
    data = json.dumps(report, sort_keys=True).encode()
    store.backend.put(report_key(site), data)
    return len(data)


def listed(store: Store) -> Iterator[tuple[str, ObjectInfo]]:
    """(site, info) of every stored report."""
    for info in store.backend.list(PREFIX):
        name = info.key[len(PREFIX):]
        if name.endswith(".json") and "/" not in name:
            try:
                yield check_name("site", name[:-len(".json")]), info
            except FabricError:
                continue


def get_report(store: Store, site: str, info: ObjectInfo | None = None) -> dict | None:
    """`site`'s stored report, or None (absent, too large, or not a report of that site)."""
    if info is not None and info.size > STORED_MAX:
        return None
    try:
        raw = store.backend.get(report_key(site))
        if len(raw) > STORED_MAX:
            return None
        report = decode_json(raw, what=f"stored report of {site}")
    except (NotFound, FabricError):
        return None
    ok = (isinstance(report, dict) and report.get("site") == site
          and isinstance(report.get("received"), (int, float)) and not isinstance(report.get("received"), bool))
    return report if ok else None


def delete_report(store: Store, site: str) -> None:
    store.backend.delete(report_key(site))
