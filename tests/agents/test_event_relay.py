"""A relay re-serves the control plane: real origin, hub and edge processes on loopback.

The edges follow the hub's event stream, read channels and manifests through it and
report through it, so the origin holds connections from the hub only and still lists
every site; with the hub killed, the edges fall back to the origin (docs/protocol.md
"Relays").
"""

from __future__ import annotations

import time

from helpers.agent import AgentProcess
from helpers.http import request
from helpers.origin import ADMIN_SECRET
from helpers.sockets import holders
from helpers.wait import wait_until

from test_agent import make_model, origin, publish_to, tokens_file  # noqa: F401  (fixtures)


def _sites(origin_url: str) -> dict[str, dict]:
    r = request(origin_url, "GET", "/v1/sites", token=ADMIN_SECRET, timeout=5)
    assert r.status == 200, r
    return {s["site"]: s for s in r.json()["sites"]}


def _sites_when(origin_url: str, what: str, check) -> dict[str, dict]:
    def sites():
        s = _sites(origin_url)
        return s if check(s) else None
    return wait_until(sites, timeout=15, interval=0.1, what=what)


def _active(report: dict) -> str | None:
    return (report.get("channels") or [{}])[0].get("active")


def test_edges_follow_report_and_fetch_through_the_hub_then_fall_back(tmp_path, origin, tokens_file):  # noqa: F811
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=["m:prod"], tokens=tokens_file).start()
    edges = [AgentProcess(tmp_path, name, origin.url, follow=["m:prod"], tokens=tokens_file,
                          upstreams=[hub.url]).start() for name in ("edge-a", "edge-b", "solo")]
    pids = {a.site: a.proc.pid for a in [hub, *edges]}
    try:
        v1 = make_model(tmp_path / "v1", seed=1, tensors=2, size=256 << 10)
        publish_to(origin.url, v1, "m", "v1")
        for a in [hub, *edges]:
            a.wait_active("m", "v1", timeout=30)
        # Every site is listed at the origin; the edges' reports came through the hub.
        sites = _sites_when(origin.url, "every site at the origin",
                            lambda s: all(_active(s.get(n, {})) == "v1" for n in pids))
        assert "via" not in sites["hub"]
        for e in edges:
            assert sites[e.site]["via"] == ["hub"], sites[e.site]
            assert sites[e.site]["received"] > time.time() - 10
        # The edges hold no connection to the origin: their events, reads and reports go to the hub.
        held = holders(origin.port, pids)
        assert held["hub"] >= 1 and all(held[e.site] == 0 for e in edges), held
        assert all(n >= 1 for n in holders(hub.port, {e.site: e.proc.pid for e in edges}).values())
        # A second version reaches the edges through the hub's stream, still without the origin.
        publish_to(origin.url, make_model(tmp_path / "v2", seed=2, tensors=2, size=256 << 10, changed={1}), "m", "v2")
        for a in [hub, *edges]:
            a.wait_active("m", "v2", timeout=30)
        held = holders(origin.port, pids)
        assert all(held[e.site] == 0 for e in edges), held
        # Reports go every report_interval: wait for the hub's report of v2 before it dies,
        # so the report that must stay behind it is known.
        _sites_when(origin.url, "the hub's report of v2", lambda s: _active(s.get("hub", {})) == "v2")

        # The hub dies: the edges follow, read and report at the origin, and still deploy.
        hub.kill()
        wait_until(lambda: all(n >= 1 for n in holders(origin.port, {e.site: e.proc.pid for e in edges}).values()),
                   timeout=15, interval=0.1, what="edges streaming from the origin")
        publish_to(origin.url, make_model(tmp_path / "v3", seed=3, tensors=2, size=256 << 10, changed={0}), "m", "v3")
        for e in edges:
            e.wait_active("m", "v3", timeout=30)
        sites = _sites_when(origin.url, "direct reports from the edges",
                            lambda s: all(_active(s[e.site]) == "v3" and "via" not in s[e.site] for e in edges))
        assert _active(sites["hub"]) == "v2"  # its last report stays, aging
    finally:
        for a in [*edges, hub]:
            a.stop()
