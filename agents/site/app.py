"""The site agent's HTTP app and entry point: routes, background tasks, `run_agent`.

    GET    /v1/chunks/...                       the chunk API, as at the origin (relay, pull-through)
    GET    /v1/site                             this site's status (admin; or a token marked as this
                                                site's, for the artifacts it may pull)
    POST   /v1/site/pins                        pin a materialised version (`admin` scope)
    DELETE /v1/site/pins/{artifact}/{version}   unpin it (`admin` scope)
    ...    /v1/site/workers, /v1/site/manifests the hot-load API (`agents.site.rollout`)
    GET    /v1/artifacts/{a}/versions/{v}/signature, GET /v1/trust
                                                the signed statements this site holds, as received
                                                (relay; `agents.site.trust`)
    GET    /v1/events, GET /v1/artifacts[/{a}/versions[/{v}]], GET /v1/artifacts/{a}/channels/{c}
                                                the upstream's events and control reads, re-served
                                                to the sites below (`agents.site.event_relay`)
    POST   /v1/sites/{site}                     a child's report, with its subtree's (`agents.site.reports`)
    GET    /ui/                                 the status page for this site (`fabric.wire.ui`; public files)

Plus the probes and `/metrics` of `fabric.wire.server.base_app`.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from fabric.store.chunk_index import ChunkIndex
from fabric.wire.auth import TokenTable, visible_report
from fabric.wire.chunks import chunk_routes
from fabric.wire.protocol import SITE, SITE_PINS
from fabric import logs, tracing
from fabric.errors import Forbidden
from fabric.wire.ui import ui_routes
from fabric.wire.server import METRICS, add_metrics_listener, base_app, principal, read_json, run_until_signalled

from agents.site.agent import SiteAgent
from agents.site.config import SiteConfig
from agents.site.event_relay import relay_routes
from agents.site.relay import RelaySource
from agents.site.reports import report_routes

AGENT = web.AppKey("agent", SiteAgent)


def create_app(agent: SiteAgent) -> web.Application:
    tokens = TokenTable.from_file(agent.cfg.tokens) if agent.cfg.tokens else _own_token(agent.cfg)

    async def ready() -> bool:
        return agent.ready

    app = base_app(store=agent.store, tokens=tokens, ready=ready)
    app[AGENT] = agent
    agent.metrics.register(app[METRICS].registry)
    index = ChunkIndex(RelaySource(agent.registry, agent.control))  # which child may see which chunk
    chunk_routes(app, index=index, get=agent.relay.get, prepare=agent.relay.prepare, ready=agent.relay.ready,
                 pending=agent.relay.pending, forwarded=agent.forwarded, frame_budget=0)  # a relay encodes nothing
    agent.rollout.add_routes(app)
    agent.trust.routes(app)  # the envelopes it holds, re-served untouched for the sites below
    relay_routes(app, agent.event_relay, agent.reads)  # events and control reads, re-served
    report_routes(app, agent.subtree)  # the children's reports, forwarded with the site's own
    app.router.add_get(SITE, _status)
    app.router.add_post(SITE_PINS, _pin)
    app.router.add_delete(f"{SITE_PINS}/{{artifact}}/{{version}}", _unpin)
    ui_routes(app, role="site", status=SITE)  # the status page (/ui/), polling this site's status
    app.cleanup_ctx.append(_background)
    return app


def _own_token(cfg: SiteConfig) -> TokenTable:
    """Without a token file, the relay trusts only the site's own token (pull and admin)."""
    return TokenTable.from_dict({"token": [{"name": cfg.site, "secret": cfg.token, "scopes": ["pull", "admin"],
                                            "site": cfg.site}]})


async def _status(request: web.Request) -> web.Response:
    """The site's status: all of it for an admin; for a token marked as this site's (`site`
    in the token file), the artifacts it may pull; anyone else is refused."""
    p, agent = principal(request), request.app[AGENT]
    if not p.speaks_for(agent.cfg.site):
        raise Forbidden(f"token {p.name!r} may not read the status of site {agent.cfg.site!r}")
    return web.json_response(visible_report(p, agent.status()))


async def _pin(request: web.Request) -> web.Response:
    principal(request).require("admin")
    body = await read_json(request)
    agent = request.app[AGENT]
    await agent.pin(body.get("artifact"), body.get("version"), True)
    return web.json_response({"pins": sorted(agent.state.pins)})


async def _unpin(request: web.Request) -> web.Response:
    principal(request).require("admin")
    agent = request.app[AGENT]
    await agent.pin(request.match_info["artifact"], request.match_info["version"], False)
    return web.json_response({"pins": sorted(agent.state.pins)})


async def _background(app: web.Application):
    agent = app[AGENT]
    tasks = [asyncio.create_task(coro) for coro in agent.tasks()]
    agent.ready = True
    yield
    agent.ready = False
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await agent.close()


def run_agent(cfg: SiteConfig) -> None:
    logs.bind("agent", site=cfg.site)
    tracing.setup("fabric-agent")

    async def main():
        agent = SiteAgent(cfg)
        app = create_app(agent)
        add_metrics_listener(app, cfg.metrics_listen)
        await run_until_signalled(app, cfg.listen, None, f"agent {cfg.site}")
    asyncio.run(main())
