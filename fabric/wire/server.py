"""What every Fabric HTTP server shares: errors, auth, metrics, probes, chunk serving.

The origin (`fabric.origin.app`), the site agents' relays and the push hook
(`fabric.hook.app`) build their apps with `base_app`, which installs one middleware that:

* authenticates the bearer token (except on the probes) and puts the `Principal`
  on the request,
* turns every `FabricError` into a JSON `{"code", "message"}` response with the
  error's HTTP status (and anything unexpected into a 500 that leaks nothing),
* counts requests, errors and latency for `/metrics`.

`chunk_routes` serves "which of these do you have" and batched chunk downloads
from a `Store`; reads run in threads so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import zstandard
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from fabric.wire import delta

from fabric.core import digest

from fabric.wire import frames as wire
from fabric.wire.auth import Authenticator, Principal
from fabric.errors import ChunkNotFound, FabricError, InvalidInput, PayloadTooLarge
from fabric.logs import get_logger
from fabric.store.store import TAG_ZSTD, Store, StoredFile

log = get_logger("server")
PUBLIC = {"/livez", "/readyz"}  # the health probes; everything else, /metrics too, needs a token
_READ_AHEAD = 3  # stored chunks read ahead of the one being sent


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        r = self.registry
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
        self.chunks_in = Counter("fabric_chunks_received", "Chunks received and stored", registry=r)


STORE = web.AppKey("store", Store)
TOKENS = web.AppKey("tokens", Authenticator)
METRICS = web.AppKey("metrics", Metrics)
ON_ERROR = web.AppKey("on_error", Callable)  # sees each FabricError the edge answers (base_app)
PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def json_error(e: FabricError) -> web.Response:
    return web.json_response(wire.error_body(e), status=e.http_status)


@web.middleware
async def _edge(request: web.Request, handler):
    metrics: Metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    t0 = time.monotonic()
    status = 500
    try:
        if request.path not in PUBLIC:
            request[PRINCIPAL] = request.app[TOKENS].authenticate(request.headers.get("Authorization"))
        resp = await handler(request)
        status = resp.status
        return resp
    except FabricError as e:
        status = e.http_status
        metrics.errors.labels(e.code).inc()
        if ON_ERROR in request.app:
            request.app[ON_ERROR](request, e)
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
        return web.json_response({"code": "internal", "message": "internal server error"}, status=500)
    finally:
        metrics.requests.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(time.monotonic() - t0)


def base_app(*, tokens: Authenticator, store: Store | None = None,
             ready: Callable[[], Awaitable[bool | dict]] | None = None, metrics: Metrics | None = None,
             refresh_metrics: Callable[[], Awaitable[None]] | None = None,
             on_error: Callable[[web.Request, FabricError], None] | None = None,
             max_body: int = wire.MAX_JSON) -> web.Application:
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

    async def metrics_page(request):
        if refresh_metrics is not None:
            await refresh_metrics()
        body = generate_latest(request.app[METRICS].registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("request body is not valid JSON") from None
    except RecursionError:  # the decoder gives up on deep nesting ([[[[…]]]]) this way
        raise InvalidInput("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


def read_ids(body: dict) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise InvalidInput("'ids' must be a list of chunk ids")
    if len(ids) > wire.MAX_IDS:
        raise PayloadTooLarge(f"{len(ids)} ids in one request; at most {wire.MAX_IDS}")
    return [digest.check_id(i) for i in ids]


# --- chunk serving (origin and relays) ------------------------------------------------

ChunkGetter = Callable[[str], Awaitable[bytes | None]]  # stored bytes (tag + payload) or None


def store_getter(store: Store) -> ChunkGetter:
    async def get(chunk_id: str) -> bytes | None:
        try:
            return await asyncio.to_thread(store.get_chunk_stored, chunk_id)
        except ChunkNotFound:
            return None
    return get


Prepare = Callable[[web.Request, list[str]], Awaitable[None]]


def chunk_routes(app: web.Application, get: ChunkGetter | None = None, prepare: Prepare | None = None) -> None:
    """Add POST /v1/chunks/has and /v1/chunks/fetch, serving from `get` (default: the store).

    `prepare`, if given, sees each fetch's ids before any is served: a relay uses it
    to start fetching the ones it lacks from upstream (pull-through).
    """
    get = get or store_getter(app[STORE])

    async def has(request: web.Request) -> web.Response:
        _require_any(request, "pull", "publish")
        ids = read_ids(await read_json(request))
        store: Store = request.app[STORE]
        missing = await asyncio.to_thread(store.missing, ids)
        return web.json_response({"missing": missing}, headers={delta.ENCODINGS_HEADER: ",".join(delta.ENCODINGS)})

    async def fetch(request: web.Request) -> web.StreamResponse:
        _require_any(request, "pull")
        body = await read_json(request)
        ids = read_ids(body)
        if prepare:
            await prepare(request, ids)
        # delta fields (docs/encodings.md, Negotiation): encode per chunk; else stored forms
        p, store = principal(request), request.app[STORE]
        plan = await delta.plan_for_request(store, body, may=lambda a: p.may("pull", a))
        policy = delta.policy_for((p.name, request.remote), workers=min(_READ_AHEAD, os.cpu_count() or 1)) if plan else None
        if plan and prepare is None and store.local and policy.choose() == delta.Mode.STORED:
            plan = None  # the link outruns the codec: this batch goes out stored, zero-copy
        read = delta.serving_getter(get, store, plan, policy) if plan else get
        metrics: Metrics = request.app[METRICS]
        resp = web.StreamResponse(headers={"Content-Type": wire.CHUNK_STREAM})
        length = await _stream_length(store, ids) if prepare is None and plan is None else None
        if length is not None:
            resp.content_length = length  # no chunked encoding: frames go out as they are
        await resp.prepare(request)
        await resp.write(wire.MAGIC)
        if length is not None and store.local:
            metrics.fetches.labels("sendfile").inc()
            await _sendfile_frames(request, resp, store, ids, metrics, policy)  # stored forms, zero-copy
        else:
            metrics.fetches.labels("encoded" if plan else "stored").inc()
            await _send_frames(resp, ids, read, plan, policy, metrics)
        await resp.write(wire.end_frame(len(ids)))
        await resp.write_eof()
        return resp

    app.router.add_post(f"{wire.API}/chunks/has", has)
    app.router.add_post(f"{wire.API}/chunks/fetch", fetch)


async def _send_frames(resp: web.StreamResponse, ids: list[str], read, plan, policy, metrics: Metrics) -> None:
    """One frame per id from `read` (stored bytes, or (tag, raw size, payload) under a delta plan)."""
    reads = [asyncio.ensure_future(read(cid)) for cid in ids[:_READ_AHEAD]]
    try:
        for i, cid in enumerate(ids):
            stored = await reads[i]
            if i + _READ_AHEAD < len(ids):
                reads.append(asyncio.ensure_future(read(ids[i + _READ_AHEAD])))
            if stored is None:
                metrics.chunks_missing.inc()
                await resp.write(wire.missing_frame(cid))
                continue
            if plan:
                tag, raw_size, payload = stored
            else:
                tag, payload = stored[0], memoryview(stored)[1:]
                raw_size = _raw_size(tag, payload)
            t0 = time.perf_counter()
            await resp.write(wire.chunk_header(cid, tag, raw_size, len(payload)))
            await resp.write(payload)
            if plan:
                policy.wrote(len(payload), time.perf_counter() - t0)
            metrics.chunks_out.inc()
            metrics.bytes_out.inc(len(payload))
    finally:
        for r in reads:
            r.cancel()


async def _sendfile_frames(request: web.Request, resp: web.StreamResponse, store: Store, ids: list[str],
                           metrics: Metrics, policy: delta.EncodePolicy | None = None) -> None:
    """Frames whose payloads the kernel copies straight from the chunk files (sendfile).

    Only for a local store serving stored forms, where the response length is known.
    The time each send takes goes to `policy`, which thus notices a link getting slower.
    """
    loop = asyncio.get_running_loop()
    for cid in ids:
        opened = await asyncio.to_thread(_open_chunk, store, cid)
        if opened is None:
            metrics.chunks_missing.inc()
            await resp.write(wire.missing_frame(cid))
            continue
        stored, raw_size = opened
        try:
            await resp.write(wire.chunk_header(cid, stored.tag, raw_size, stored.size))
            if request.transport is None:
                raise ConnectionResetError("client went away")
            t0 = time.perf_counter()
            await loop.sendfile(request.transport, stored.file, stored.offset, stored.size)
            if policy:
                policy.wrote(stored.size, time.perf_counter() - t0)
                policy.encoded(delta.Mode.STORED, raw_size, stored.size, 0.0)
        finally:
            stored.file.close()
        metrics.chunks_out.inc()
        metrics.bytes_out.inc(stored.size)


def _open_chunk(store: Store, chunk_id: str) -> tuple[StoredFile, int] | None:
    """The file and range of a stored chunk's payload, and its raw size; None if absent. In a thread."""
    stored = store.open_stored(chunk_id)
    if stored is None:
        return None
    if stored.tag == TAG_ZSTD:
        return stored, _raw_size(stored.tag, memoryview(os.pread(stored.file.fileno(), 32, stored.offset)))
    return stored, stored.size


async def _stream_length(store: Store, ids: list[str]) -> int | None:
    """The exact size of the chunk stream for `ids`, if the store can tell without reading.

    Knowing it lets the response carry a Content-Length instead of chunked encoding,
    which would copy every payload once more on its way out.
    """
    sizes = await asyncio.to_thread(store.stored_sizes, ids)
    if sizes is None:
        return None
    frames = sum(wire.missing_frame_size() if n is None else wire.chunk_frame_size(n - 1) for n in sizes)
    return len(wire.MAGIC) + frames + wire.end_frame_size()


def _raw_size(tag: int, payload: memoryview) -> int:
    if tag == TAG_ZSTD:
        size = zstandard.frame_content_size(payload)
        return size if size >= 0 else 0
    return len(payload)


def _require_any(request: web.Request, *scopes: str) -> None:
    p = principal(request)
    if not any(p.may(s) for s in scopes):
        p.require(scopes[0])


# --- running a server -------------------------------------------------------------------

async def serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None
                ) -> web.AppRunner:
    """Start `app` listening; returns the runner (call `await runner.cleanup()` to stop)."""
    runner = web.AppRunner(app, access_log=None)
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


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


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
    get_logger(what).info(f"{what} listening", host=host, port=bound_port(runner), tls=tls is not None)
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
        get_logger(what).info(f"{what} stopping")
        notifier.notify("STOPPING=1")
        watchdog.cancel()
        await runner.cleanup()
