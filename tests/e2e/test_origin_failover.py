"""Two real `fabric origin` processes on one real SeaweedFS bucket, site agents split between them.

Named after what they prove: a move made through one origin reaches a site that follows
the other within seconds (the store's move log, not the sites' 300 s re-sync); a site
whose origin is killed fails over to the other and still deploys the next version; and
an origin started again on the bucket shows every site's last report at once (reports
kept in the store), including the sites that reported only to the other origin.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from fabric.publish import publish
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, OriginProcess, write_token_file
from helpers.s3 import SUITE_BUCKET
from helpers.wait import wait_until


def _origin(tmp_path: Path, tokens: Path, store: str, name: str, env: dict) -> OriginProcess:
    o = OriginProcess(tmp_path, tokens, tmp_path / f"{name}.log")
    o.store, o.env = store, dict(env)  # an s3:// URL, passed as is; the gateway's AWS_* settings
    return o


def _agent(tmp_path: Path, site: str, origins: list[str]) -> AgentProcess:
    return AgentProcess(tmp_path, site, origins[0], origins=origins, follow=["m:prod"], sync={"resync_interval": 300})


def _publish(origin: OriginProcess, src: Path, version: str) -> float:
    """Publish `version` and promote it to prod through `origin`; the time the promote returned."""
    with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
        publish(src, artifact="m", version=version, target=RemoteTarget(so))
        so.promote("m", version, "prod")
    return time.monotonic()


def _target(agent: AgentProcess) -> str | None:
    try:
        return next(c["target"] for c in agent.status()["channels"] if c["artifact"] == "m")
    except (OSError, AssertionError):
        return None


def _until_target(agent: AgentProcess, version: str, since: float, timeout: float = 30.0) -> float:
    wait_until(lambda: _target(agent) == version, timeout=timeout, interval=0.02,
               what=f"{agent.site} targets m@{version}")
    return time.monotonic() - since


def _sites(origin: OriginProcess) -> dict[str, dict]:
    r = request(origin.url, "GET", "/v1/sites", token=ADMIN_SECRET, timeout=5)
    assert r.status == 200, r
    return {s["site"]: s for s in r.json()["sites"]}


def test_origins_on_one_bucket_share_moves_fail_over_and_keep_reports(tmp_path, suite_weed):
    store = f"s3://{SUITE_BUCKET}/failover-{uuid.uuid4().hex[:8]}"
    tokens = write_token_file(tmp_path / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    a = _origin(tmp_path, tokens, store, "origin-a", suite_weed.env).start()
    b = _origin(tmp_path, tokens, store, "origin-b", suite_weed.env).start()
    src = tmp_path / "model"
    src.mkdir()
    agents = []
    try:
        (src / "weights.bin").write_bytes(os.urandom(200_000))
        _publish(a, src, "v1")
        agents = [_agent(tmp_path, "edge-a", [a.url, b.url]).start(),  # prefers A
                  _agent(tmp_path, "edge-b", [b.url, a.url]).start()]  # prefers B
        edge_a, edge_b = agents
        for agent in agents:
            agent.wait_active("m", "v1", timeout=30)

        # a move through A reaches the site on B through the move log (its re-sync is 300 s away)
        (src / "weights.bin").write_bytes(os.urandom(200_000))
        moved = _publish(a, src, "v2")
        cross, same = _until_target(edge_b, "v2", moved), _until_target(edge_a, "v2", moved)
        print(f"\npublish through origin A: site on B targets it after {cross:.3f} s, site on A after {same:.3f} s")
        assert cross < 5.0
        for agent in agents:
            agent.wait_active("m", "v2", timeout=30)
        assert b.counter("fabric_origin_move_log_entries_total{direction=\"read\"}") >= 2  # v2's commit and move

        # A dies: its site fails over to B and deploys what is published through B
        wait_until(lambda: {"edge-a", "edge-b"} <= set(_sites(b)), timeout=40,
                   what="both sites' reports at B (edge-a's from the store: B re-reads it every 15 s)")
        a.kill()
        killed = time.monotonic()
        (src / "weights.bin").write_bytes(os.urandom(200_000))
        moved = _publish(b, src, "v3")
        failover = _until_target(edge_a, "v3", moved, timeout=40)
        edge_a.wait_active("m", "v3", timeout=40)
        edge_b.wait_active("m", "v3", timeout=40)
        print(f"origin A killed: its site targets v3 {failover:.3f} s after the publish through B, "
              f"active {time.monotonic() - killed:.3f} s after the kill")
        assert failover < 10.0  # B's own event, not the 30 s return to the preferred origin nor a re-sync
        wait_until(lambda: _sites(b).get("edge-a", {}).get("channels", [{}])[0].get("active") == "v3",
                   timeout=20, what="edge-a's report of v3 at B")
        time.sleep(3.0)  # B writes a changed report within 2 s

        # the sites stop, both origins die, A alone comes back: every site's last report is there at once
        for agent in agents:
            agent.stop()
        b.kill()
        a.restart()
        shown = _sites(a)
        assert {"edge-a", "edge-b"} <= set(shown), shown.keys()
        for site in ("edge-a", "edge-b"):  # edge-b only ever reported to B
            assert shown[site]["channels"][0]["active"] == "v3"
    finally:
        for agent in agents:
            agent.stop()
        for o in (a, b):
            o.stop()


@pytest.fixture(autouse=True)
def _quick(request):
    """The whole test is meant to stay well under a minute on a loaded 2-core machine."""
    t0 = time.monotonic()
    yield
    print(f"took {time.monotonic() - t0:.1f} s")
