"""The status page's files (fabric.wire.ui) on a real origin app and a site agent's app:
public, with their security headers, and nothing else under /ui is served or leaks data;
the origin raises a `site` event when a report changes, and only then."""

from __future__ import annotations

import asyncio
import json

from aiohttp.test_utils import TestClient, TestServer

from fabric.origin.app import create_app
from fabric.store.store import open_store
from fabric.wire.auth import TokenTable

SECRET = "ui-test-secret-5a1e8c0d3f7b2946"  # site fra's token
OTHER = "ui-test-other-0c4d7e1f9a2b6358"  # a pull token of no site
AUTH = {"Authorization": f"Bearer {SECRET}"}


def origin_app(tmp_path):
    tokens = TokenTable.from_dict({"token": [{"name": "fra", "secret": SECRET, "scopes": ["pull"], "site": "fra"},
                                             {"name": "other", "secret": OTHER, "scopes": ["pull"]}]})
    return create_app(open_store(tmp_path / "store"), tokens)


def run(app, go):
    async def main():
        async with TestClient(TestServer(app)) as client:
            return await go(client)
    return asyncio.run(main())


def test_the_page_is_public_with_its_headers_and_the_data_still_needs_a_token(tmp_path):
    async def go(client):
        page = await client.get("/ui/")
        assert page.status == 200 and page.content_type == "text/html"
        html = await page.text()
        assert '<script src="app.js"' in html and 'id="token"' in html
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        js = await client.get("/ui/app.js")
        assert js.status == 200 and js.content_type == "text/javascript"
        source = await js.text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, sink  # report strings reach the DOM as text only
        css = await client.get("/ui/style.css")
        assert css.status == 200 and css.content_type == "text/css"
        config = await client.get("/ui/ui.json")
        assert await config.json() == {"role": "origin", "status": "/v1/sites", "events": "/v1/events"}
        bare = await client.get("/ui", allow_redirects=False)
        assert bare.status == 301 and bare.headers["Location"] == "/ui/"
        for path in ("/ui/../v1/sites", "/ui/index.html.bak", "/ui/static", "/ui/__init__.py"):
            r = await client.get(path)
            assert r.status in (401, 404), (path, r.status)  # never a file, never data without a token
        assert (await client.get("/uix")).status == 401  # only /ui and below is public
        assert (await client.get("/v1/sites")).status == 401
        assert (await client.get("/v1/sites", headers=AUTH)).status == 200
    run(origin_app(tmp_path), go)


def test_a_site_agent_serves_the_same_page_fed_by_its_own_status(tmp_path):
    from agents.site.agent import SiteAgent
    from agents.site.app import create_app as agent_app
    from agents.site.config import SiteConfig
    cfg = SiteConfig.from_dict({"site": "fra", "data": str(tmp_path / "site"), "listen": "127.0.0.1:0",
                                "origin": "http://127.0.0.1:9", "token": "t" * 32, "follow": ["demo-mlp:prod"]},
                               "site.toml", tmp_path)
    app = agent_app(SiteAgent(cfg))

    async def go(client):
        assert (await client.get("/ui/")).status == 200
        assert await (await client.get("/ui/ui.json")).json() == {"role": "site", "status": "/v1/site", "events": None}
        status = await (await client.get("/v1/site", headers={"Authorization": "Bearer " + "t" * 32})).json()
        assert status["upstream"] == "origin" and status["rollouts"] == [] and status["fetched"] == {}
    run(app, go)


def test_a_report_raises_a_site_event_when_it_changes_and_not_when_only_its_clocks_move(tmp_path):
    report = {"ready": True, "at": 1.0, "channels": [{"artifact": "m", "channel": "prod", "active": "v1"}],
              "workers": [{"worker": "w1", "serving": "v1", "seen_s_ago": 0.1}]}

    async def go(client):
        async def post(body):
            r = await client.post("/v1/sites/fra", json=body, headers=AUTH)
            assert r.status == 200
        await post(report)  # the first: an event
        await post(dict(report, at=2.0, workers=[{"worker": "w1", "serving": "v1", "seen_s_ago": 0.6}]))  # clocks only
        await post(dict(report, at=3.0, channels=[{"artifact": "m", "channel": "prod", "active": "v2"}]))  # changed
        return await read_events(client, AUTH, 3), await read_events(client, {"Authorization": f"Bearer {OTHER}"}, 1)

    mine, others = run(origin_app(tmp_path), go)
    assert mine[0]["seq"] == 2  # hello: two events in the log
    assert [(e["type"], e["site"], e["seq"]) for e in mine[1:]] == [("site", "fra", 1), ("site", "fra", 2)]
    assert others[0]["seq"] == 2 and others[1:] == []  # a token that may not read fra's report sees no event of it


async def read_events(client, headers: dict, count: int) -> list[dict]:
    """The data of the first `count` events of the stream from the start (waiting a little for more)."""
    resp = await client.get("/v1/events", params={"after": 0}, headers=headers)
    text = ""
    try:
        while text.count("\n\n") < count + 1:
            text += (await asyncio.wait_for(resp.content.readany(), 0.5 if text.count("\n\n") >= count else 5)).decode()
    except asyncio.TimeoutError:
        pass
    resp.close()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
