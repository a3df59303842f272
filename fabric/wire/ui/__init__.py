"""The live status page: a small static page every Fabric server can serve at `/ui/`.

`ui_routes(app, role=..., status=..., events=...)` adds

    GET /ui                the page's address without its slash: a redirect to /ui/
    GET /ui/               index.html
    GET /ui/{asset}        app.js, style.css, and ui.json (what the page reads: the role,
                           its status path, its event stream path or none)

The files are package data (`fabric/wire/ui/static/`), with no build step. They are
public, like the probes (the edge, `fabric.wire.server`, lets `/ui` through without a
token) and hold no data: the page asks for a token, keeps it in sessionStorage and
reads the token-protected API with it — at the origin `GET /v1/sites` and the event
stream `GET /v1/events` (read with fetch(), since EventSource sends no headers), at a
site agent its own `GET /v1/site`, polled. Every string the page shows comes from
reports, which are hostile input: it builds its DOM with textContent only, and the
answers carry a Content-Security-Policy that allows no inline script and no other
origin. README "Status page" shows it; tests/e2e/test_status_page.py drives it in a
headless Chromium.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from fabric.wire.protocol import UI

STATIC = Path(__file__).with_name("static")
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ROLES = ("origin", "site")


def ui_routes(app: web.Application, *, role: str, status: str, events: str | None = None) -> None:
    """Serve the status page on `app`.

    Args:
        role: "origin" (the page shows every site's report and the relay tree) or "site"
            (the page shows this agent's own status).
        status: the path the page reads its data from (`/v1/sites` or `/v1/site`).
        events: the server-sent event stream the page follows for live updates; without
            one the page polls `status` every second.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    config = json.dumps({"role": role, "status": status, "events": events}).encode()
    files = {name: (STATIC / name).read_bytes() for name in ("index.html", *ASSETS)}

    async def redirect(_request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(f"{UI}/")

    async def index(_request: web.Request) -> web.Response:
        return web.Response(body=files["index.html"], content_type="text/html", charset="utf-8", headers=HEADERS)

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        if name == "ui.json":
            return web.Response(body=config, content_type="application/json", headers=HEADERS)
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=files[name], content_type=ASSETS[name], charset="utf-8", headers=HEADERS)

    app.router.add_get(UI, redirect)
    app.router.add_get(f"{UI}/", index)
    app.router.add_get(f"{UI}/{{asset}}", asset)


def is_public(path: str) -> bool:
    """Whether `path` is one of the page's files, which need no token."""
    return path == UI or path.startswith(f"{UI}/")
