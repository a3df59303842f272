"""The live status page (`/ui/`) in a real headless Chromium, against real processes.

An origin, a hub agent and an edge agent under it (a topology file says so) follow a
channel; the page, logged in with a token, shows both sites on their active version and
the relay tree origin → hub → edge; when v2 is published it updates to v2 without a
reload (the channel move arrives on the event stream); a wrong token is refused with a
message; a staged version shows as held at both sites while they serve the old one;
hostile strings in a report stay text; the edge agent's own `/ui/` shows its
site. Screenshots are kept under test-artifacts/status-page/ (the path is printed).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from fabric.publish import publish
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.browser import Chromium, chromium_path
from helpers.files import random_bytes
from helpers.http import request
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, start_origin

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="needs Debian's chromium (`make test` installs it with apt-get)")

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "status-page"
ARTIFACT = "ui-model"
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def publish_version(origin_url: str, folder: Path, version: str) -> None:
    with SyncOrigin(origin_url, PUBLISH_SECRET) as so:
        publish(folder, artifact=ARTIFACT, target=RemoteTarget(so), version=version, channel="prod")


def make_version(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(random_bytes(np.random.default_rng(seed), 1 << 20))
    (folder / "config.json").write_text(json.dumps({"seed": seed}) + "\n")
    return folder


def field(site: str, name: str) -> str:
    """JS: the text of a site card's field, or null."""
    return f"((document.querySelector('[data-site=\"{site}\"] [data-field=\"{name}\"]') || {{}}).textContent ?? null)"


def write_topology(path: Path, origin_url: str, hub: AgentProcess, edge: AgentProcess) -> Path:
    path.write_text(f'[origin]\nurl = "{origin_url}"\n\n'
                    f'[[site]]\nname = "hub"\nregion = "eu"\nupstream = "origin"\nurl = "{hub.url}"\n\n'
                    f'[[site]]\nname = "edge-a"\nregion = "eu"\nupstream = "hub"\nurl = "{edge.url}"\n')
    return path


def test_status_page_shows_the_tree_follows_a_publish_live_and_refuses_a_wrong_token(tmp_path):
    origin = start_origin(tmp_path / "origin", DEFAULT_TOKENS + [dict(t, site=t["name"]) for t in SITE_TOKENS])
    follow = [f"{ARTIFACT}:prod"]
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=follow, tokens=origin.tokens,
                       topology=tmp_path / "topology.toml")
    edge = AgentProcess(tmp_path, "edge-a", origin.url, follow=follow, tokens=origin.tokens,
                        topology=tmp_path / "topology.toml")
    write_topology(tmp_path / "topology.toml", origin.url, hub, edge)
    agents = [hub, edge]
    try:
        for a in agents:
            a.start()
        publish_version(origin.url, make_version(tmp_path / "src" / "v1", 1), "v1")
        for a in agents:
            a.wait_active(ARTIFACT, "v1")
        asyncio.run(drive(tmp_path, origin, hub, edge))
    finally:
        for a in agents:
            a.stop()
        origin.stop()
    print(f"status page screenshots: {SHOTS}")


async def drive(tmp_path: Path, origin, hub: AgentProcess, edge: AgentProcess) -> None:
    async with Chromium(tmp_path / "chromium.log") as b:
        await b.navigate(f"{origin.url}/ui/")
        await b.wait_for("!document.getElementById('login').hidden && document.getElementById('main').hidden",
                         what="the login form")

        # A wrong token: refused, with the server's reason; no data shown.
        await b.type_into("#token", "not-a-token-of-this-origin")
        await b.click("#login button")
        error = await b.wait_for("document.getElementById('login-error').textContent", what="the login error")
        assert "refused" in error and "401" in error, error
        assert await b.evaluate("document.getElementById('main').hidden") is True
        assert await b.evaluate("sessionStorage.getItem('fabric-token')") is None
        await b.screenshot(SHOTS / "01-wrong-token.png")

        # An admin token (it reads every site's report): both sites on v1, the tree origin → hub → edge-a.
        await b.type_into("#token", ADMIN_SECRET)
        await b.click("#login button")
        for site in ("hub", "edge-a"):
            await b.wait_for(f"{field(site, 'active')} === 'v1'", what=f"{site} active on v1")
        assert await b.evaluate("sessionStorage.getItem('fabric-token')") == ADMIN_SECRET
        assert await b.evaluate("!!document.querySelector('[data-node=\"origin\"] [data-node=\"hub\"] "
                                "[data-node=\"edge-a\"]')"), "the tree does not nest edge-a under the hub"
        await b.wait_for("document.getElementById('conn').dataset.state === 'live'", what="the live stream")
        await b.wait_for("!!document.querySelector('[data-site=\"edge-a\"] [data-link=\"hub\"]')",
                         what="edge-a's link from the hub")  # it fetched v1 through its upstream
        await b.screenshot(SHOTS / "02-v1.png")

        # v2, live: the same document (no reload) shows it, and the channel move came on the stream.
        await b.evaluate("window.__same_page = 'yes'")
        publish_version(origin.url, make_version(tmp_path / "src" / "v2", 2), "v2")
        for site in ("hub", "edge-a"):
            await b.wait_for(f"{field(site, 'active')} === 'v2'", timeout=45, what=f"{site} active on v2")
        assert await b.evaluate("window.__same_page") == "yes", "the page reloaded"
        await b.wait_for(f"document.getElementById('events').textContent.includes('{ARTIFACT}:prod → v2 (promote)')",
                         what="the channel move, from the event stream")
        await b.screenshot(SHOTS / "03-v2-live.png")

        # v3 staged (preheat): both sites fetch and hold it while they serve v2; the page counts them.
        with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
            publish(make_version(tmp_path / "src" / "v3", 3), artifact=ARTIFACT, target=RemoteTarget(so), version="v3")
            so.stage(ARTIFACT, "v3", "prod")
        held = f"document.querySelector('[data-staged=\"{ARTIFACT}:prod@v3\"] [data-field=\"held\"]')"
        await b.wait_for(f"({held} || {{}}).textContent === 'held at 2 of 2'", timeout=45,
                         what="v3 held at both sites")
        assert "ui-model:prod stages v3 (serving v2)" in await b.evaluate("document.getElementById('events').textContent")
        for site in ("hub", "edge-a"):
            assert await b.evaluate(field(site, "staged")) == "v3 held"
            assert await b.evaluate(field(site, "active")) == "v2"  # staged, not activated
        await b.screenshot(SHOTS / "04-v3-staged.png")

        # A report is hostile input: its strings are text, never markup.
        evil = {"ready": True, "upstream": HOSTILE, "channels": [{"artifact": HOSTILE, "channel": "prod",
                                                                   "active": HOSTILE, "error": HOSTILE}]}
        r = request(origin.url, "POST", "/v1/sites/evil", evil, token=ADMIN_SECRET)
        assert r.status == 200, r
        await b.wait_for(f"{field('evil', 'active')} === {json.dumps(HOSTILE)}", what="the hostile report, as text")
        assert await b.evaluate("document.querySelectorAll('img').length") == 0
        assert await b.evaluate("window.__pwned") is None
        await b.screenshot(SHOTS / "05-hostile-report.png")

        # The edge agent's own page: its site, fed by its /v1/site (another origin: log in again).
        await b.navigate(f"{edge.url}/ui/")
        await b.type_into("#token", SITE_SECRETS["edge-a"])
        await b.click("#login button")
        await b.wait_for(f"{field('edge-a', 'active')} === 'v2'", what="the agent's page on v2")
        assert await b.evaluate("document.querySelectorAll('[data-site]').length") == 1
        assert "hub" in await b.evaluate("document.getElementById('tree').textContent")
        await b.screenshot(SHOTS / "06-agent-page.png")
        assert b.problems == [], b.problems  # no exception, no CSP refusal
