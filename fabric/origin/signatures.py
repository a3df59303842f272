"""The origin's signature routes: it stores and serves signed statements, and verifies none.

    GET  /v1/artifacts/{a}/versions/{v}/signature    the version's envelope (scope pull)
    PUT  /v1/artifacts/{a}/versions/{v}/signature    keep an envelope, merged with the one held (scope publish)
    GET  /v1/trust                                   the newest delegations envelope (scope pull)
    PUT  /v1/trust                                   keep a newer delegations envelope (scope admin)

The origin holds no publisher keys: it checks what needs none (the envelope parses, is
canonical, names this version and its manifest; a delegations version goes up) in
`fabric.store.signatures`, and passes envelopes on byte for byte. Channel statements
travel with the channel move (`fabric.origin.app.move_channel`). docs/protocol.md
specifies each route.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from fabric.core.limits import MAX_STATEMENT_BYTES
from fabric.core.manifest import check_name
from fabric.errors import Forbidden, PayloadTooLarge, SignatureNotFound, TrustNotFound
from fabric.logs import get_logger
from fabric.store.registry import Registry
from fabric.wire.protocol import ARTIFACTS, ENVELOPE, TRUST
from fabric.wire.server import principal

log = get_logger("origin")


def signature_routes(app: web.Application, registry: web.AppKey) -> None:
    """Add the signature and trust routes; `registry` is the app's key of the origin's `Registry`."""
    path = f"{ARTIFACTS}/{{artifact}}/versions/{{version}}/signature"

    async def get_signature(request: web.Request) -> web.Response:
        artifact, version = _names(request, "pull", "publish")
        reg: Registry = request.app[registry]
        data = await asyncio.to_thread(reg.signature, artifact, version)
        if data is None:
            raise SignatureNotFound(f"{artifact}@{version} has no signature")
        return web.Response(body=data, content_type=ENVELOPE)

    async def put_signature(request: web.Request) -> web.Response:
        artifact, version = _names(request, "publish")
        reg: Registry = request.app[registry]
        held = await asyncio.to_thread(reg.put_signature, artifact, version, await read_statement(request))
        log.info("version signed", artifact=artifact, version=version, by=principal(request).name)
        return web.Response(body=held, content_type=ENVELOPE)

    async def get_trust(request: web.Request) -> web.Response:
        principal(request).require("pull")
        data = await asyncio.to_thread(request.app[registry].trust)
        if data is None:
            raise TrustNotFound("the origin holds no delegations (fabric trust publish)")
        return web.Response(body=data, content_type=ENVELOPE)

    async def put_trust(request: web.Request) -> web.Response:
        p = principal(request)
        if not p.admin:
            raise Forbidden(f"token {p.name!r} may not publish delegations: that takes an admin token")
        version = await asyncio.to_thread(request.app[registry].put_trust, await read_statement(request))
        log.info("delegations published", version=version, by=p.name)
        return web.json_response({"version": version})

    r = app.router
    r.add_get(path, get_signature)
    r.add_put(path, put_signature)
    r.add_get(TRUST, get_trust)
    r.add_put(TRUST, put_trust)


def _names(request: web.Request, *scopes: str) -> tuple[str, str]:
    artifact = check_name("artifact", request.match_info["artifact"])
    principal(request).require_any(scopes, artifact)
    return artifact, check_name("version", request.match_info["version"])


async def read_statement(request: web.Request) -> bytes:
    """The request's body, an envelope: refused (413) past MAX_STATEMENT_BYTES before more is read."""
    over = f"a signed statement is at most MAX_STATEMENT_BYTES ({MAX_STATEMENT_BYTES} bytes)"
    if request.content_length is not None and request.content_length > MAX_STATEMENT_BYTES:
        raise PayloadTooLarge(f"{over}; this one says {request.content_length}")
    body = bytearray()
    while piece := await request.content.read(MAX_STATEMENT_BYTES + 1 - len(body)):
        body += piece
        if len(body) > MAX_STATEMENT_BYTES:
            raise PayloadTooLarge(over)
    return bytes(body)
