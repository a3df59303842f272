"""What every Fabric HTTP server shares: errors, auth, metrics, probes, starting and stopping.

The origin (`fabric.origin.app`), the site agents' relays and the push hook
(`fabric.hook.app`) build their apps with `base_app`, which installs one middleware that:

* authenticates the bearer token (except on the probes) and puts the `Principal`
  on the request,
* turns every `FabricError` into a JSON `{"code", "message"}` response with the
  error's HTTP status (and anything unexpected into a 500 that leaks nothing),
* counts requests, errors and latency for `/metrics`.

`read_json` reads a request's JSON body; `serve`, `tls_context` and
`run_until_signalled` start a server; `add_metrics_listener` adds a token-free
/metrics listener beside it. Chunk serving is `fabric.wire.chunks`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from fabric.wire import frames as wire
from fabric.core.boundedjson import decode as decode_json
from fabric.wire.auth import Authenticator, Principal
from fabric.wire.connections import GuardedRunner, ServerLimits
from fabric.wire.protocol import MAX_JSON
from fabric.wire.ui import is_public as is_public_page
from fabric.config import parse_listen
from fabric.errors import FabricError, InvalidInput, PayloadTooLarge
from fabric import tracing
from fabric.logs import get_logger
from fabric.store.store import Store

log = get_logger("server")
PUBLIC = {"/livez", "/readyz"}  # the health probes; everything else, /metrics too, needs a token


@dataclass
class Metrics:
    """What every server counts (`fabric_http_*`, chunks, errors, `fabric_build_info`), on
    its role's registry. Prometheus's conventions: counters end in `_total` (the client
    adds it), gauges never do, durations are `_seconds` histograms."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        r = self.registry
        self.build = Gauge("fabric_build_info", "1, labelled with the Fabric version and the Python it runs on",
                           ["version", "python"], registry=r)
        self.build.labels(_version(), platform.python_version()).set(1)
        self.requests = Counter("fabric_http_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("fabric_http_request_seconds", "Request latency", ["route"], registry=r)
        self.errors = Counter("fabric_errors", "Errors returned, by code", ["code"], registry=r)
        self.bytes_out = Counter("fabric_bytes_sent", "Chunk payload bytes sent", registry=r)
        self.bytes_in = Counter("fabric_bytes_received", "Chunk payload bytes received", registry=r)
        self.chunks_out = Counter("fabric_chunks_served", "Chunks served", registry=r)
        self.fetches = Counter("fabric_fetch_responses", "Chunk fetch responses, by how they were sent "
                               "(sendfile: stored forms, zero-copy; stored; encoded: per the encode policy)",
                               ["path"], registry=r)
        self.chunks_missing = Counter("fabric_chunks_missing", "Chunks asked for but not held", registry=r)
        self.frames_reused = Counter("fabric_encoded_frames_reused", "Chunks sent as a frame encoded for an "
                                     "earlier fetch (fabric.wire.framecache: encoded once)", registry=r)
        self.frames_forwarded = Counter("fabric_forwarded_frames", "Chunks a relay sent as the frame its upstream "
                                        "sent it (fabric.wire.framecache.Forwarded)", registry=r)
        self.chunks_in = Counter("fabric_chunks_received", "Chunks received and stored", registry=r)


def _version() -> str:
    try:
        return importlib.metadata.version("edge-fabric")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


STORE = web.AppKey("store", Store)
TOKENS = web.AppKey("tokens", Authenticator)
METRICS = web.AppKey("metrics", Metrics)
ON_ERROR = web.AppKey("on_error", Callable)  # sees each FabricError the edge answers (base_app)
REFRESH_METRICS = web.AppKey("refresh_metrics", Callable)  # awaited before each /metrics answer
PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def json_error(e: FabricError) -> web.Response:
    return web.json_response(wire.error_body(e), status=e.http_status)


def _answer_started(request: web.Request) -> bool:
    """Whether bytes of this request's answer went out already (a stream under way). An error
    then cannot become an error body: a second response written into the first one's body
    left the client waiting for the rest of a chunked answer that never came."""
    writer = request.writer
    return writer is not None and writer.output_size > 0


@web.middleware
async def _edge(request: web.Request, handler):
    metrics: Metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    t0 = time.monotonic()
    status = 500
    try:
        if request.path not in PUBLIC and not is_public_page(request.path):  # the status page's files
            request[PRINCIPAL] = request.app[TOKENS].authenticate(request.headers.get("Authorization"))
        with tracing.incoming(f"http {request.method} {route}", request.headers):  # a hub serving an edge's deploy
            resp = await handler(request)
        status = resp.status
        return resp
    except FabricError as e:
        status = e.http_status
        metrics.errors.labels(e.code).inc()
        if ON_ERROR in request.app:
            request.app[ON_ERROR](request, e)
        if _answer_started(request):
            raise  # too late for an error body: aiohttp closes the connection, the client sees it cut
        return json_error(e)
    except web.HTTPException as e:
        status = e.status
        if e.status == 413:
            return json_error(PayloadTooLarge(f"request body too large ({e.reason})"))
        if e.status in (404, 405):
            code = "not_found" if e.status == 404 else "method_not_allowed"
            return web.json_response({"code": code, "message": f"{request.method} {request.path}: {e.reason}"},
                                     status=e.status)
        raise
    except ConnectionResetError:
        status = 499  # the client went away mid-request: count it as that, not as a server error
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the edge: anything unexpected becomes a 500
        log.error("unhandled error", route=route, error=repr(e))
        metrics.errors.labels("internal").inc()
        if _answer_started(request):
            raise
        return web.json_response({"code": "internal", "message": "internal server error"}, status=500)
    finally:
        metrics.requests.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(time.monotonic() - t0)


def base_app(*, tokens: Authenticator, store: Store | None = None,
             ready: Callable[[], Awaitable[bool | dict]] | None = None, metrics: Metrics | None = None,
             refresh_metrics: Callable[[], Awaitable[None]] | None = None,
             on_error: Callable[[web.Request, FabricError], None] | None = None,
             max_body: int = MAX_JSON) -> web.Application:
    """An app with the shared edge, probes and metrics; callers add their routes.

    Args:
        tokens: who may call: a `TokenTable`, or any `Authenticator` (the hook's single token).
        store: the role's store, if it has one (`STORE`); /readyz then checks its marker.
        ready: what /readyz reports instead: a bool, or a JSON body whose "ready" says 200 or 503.
        metrics: the shared counters, on the role's registry if it has one (default: a new one).
        refresh_metrics: awaited before each /metrics answer (a role setting its gauges).
        on_error: called with each `FabricError` the edge answers (a role counting refusals).
        max_body: the largest request body taken (a 413 `payload_too_large` above it).
    """
    if store is None and ready is None:
        raise ValueError("base_app needs a store or a ready() check for /readyz")
    app = web.Application(middlewares=[_edge], client_max_size=max_body)
    app[TOKENS], app[METRICS] = tokens, metrics or Metrics()
    if store is not None:
        app[STORE] = store
    if on_error is not None:
        app[ON_ERROR] = on_error

    async def livez(_):
        return web.json_response({"ok": True})

    async def readyz(_):
        ok = await ready() if ready else await asyncio.to_thread(store.backend.has, "fabric-store.json")
        body = ok if isinstance(ok, dict) else {"ready": bool(ok)}
        return web.json_response(body, status=200 if body["ready"] else 503)

    if refresh_metrics is not None:
        app[REFRESH_METRICS] = refresh_metrics
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    async def metrics_page(request: web.Request) -> web.Response:
        return await metrics_response(request.app)

    app.router.add_get("/metrics", metrics_page)
    return app


async def metrics_response(app: web.Application) -> web.Response:
    """The Prometheus text of `app`'s registry, its gauges refreshed first."""
    if REFRESH_METRICS in app:
        await app[REFRESH_METRICS]()
    body = generate_latest(app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics_listener(app: web.Application, listen: str | None) -> None:
    """Also serve `app`'s /metrics on `listen` ("HOST:PORT"), without a token, as
    Dragonfly's dfdaemon does; it starts and stops with `app`. The main listener's
    /metrics still needs a token. Nothing without `listen`."""
    if not listen:
        return
    host, port = parse_listen(listen)

    async def page(_request: web.Request) -> web.Response:
        return await metrics_response(app)

    async def listener(_app: web.Application):
        side = web.Application()
        side.router.add_get("/metrics", page)
        runner = await serve(side, host, port)
        log.info("metrics listening", host=host, port=bound_port(runner))
        yield
        await runner.cleanup()

    app.cleanup_ctx.append(listener)


async def read_json(request: web.Request) -> dict:
    """The request's body, a JSON object, through the one bounded decoder (`fabric.core.boundedjson`):
    not UTF-8 or JSON, too deep, a huge integer, NaN or Infinity is a 422 `invalid_input`."""
    body = decode_json(await request.read(), what="request body")
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


# --- running a server -------------------------------------------------------------------

async def serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None,
                limits: ServerLimits | None = None) -> web.AppRunner:
    """Start `app` listening; returns the runner (call `await runner.cleanup()` to stop).

    Every connection gets `limits` (default: the protocol's, with `FABRIC_SERVER_LIMITS`):
    caps per peer and in total, header and body deadlines (`fabric.wire.connections`).
    """
    runner = GuardedRunner(app, limits or ServerLimits.from_env(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    return runner


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise InvalidInput("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


async def run_until_signalled(app: web.Application, listen: str, tls: ssl.SSLContext | None,
                              what: str) -> None:
    """Serve `app` until SIGINT or SIGTERM, logging where it listens.

    Under a systemd `Type=notify` unit it sends READY=1 once the socket is bound,
    WATCHDOG=1 from this loop while it runs, and STOPPING=1 on the way out
    (`fabric.wire.systemd`; nothing without `$NOTIFY_SOCKET`).
    """
    from fabric.wire.systemd import Notifier
    host, port = parse_listen(listen)
    runner = await serve(app, host, port, tls)
    log.info(f"{what} listening", host=host, port=bound_port(runner), tls=tls is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier.from_env()
    notifier.notify("READY=1", f"STATUS={what} listening on {host}:{bound_port(runner)}")
    watchdog = asyncio.create_task(notifier.watchdog())
    try:
        await stop.wait()
    finally:
        log.info(f"{what} stopping")
        notifier.notify("STOPPING=1")
        watchdog.cancel()
        await runner.cleanup()
