"""The push-hook receiver: S3-compatible stores tell it about new objects; it publishes checkpoints.

    fabric hook --listen 127.0.0.1:7100 --config hook.toml

Routes (docs/hooks.md):

    POST /events        an event envelope (AWS/Ceph Records, SNS, MinIO, SeaweedFS filer)
    GET  /checkpoints   what the hook knows of each checkpoint (token required)
    GET  /metrics       queue depth, lag, failures (Prometheus)
    GET  /livez         the process is up
    GET  /readyz        the queue is writable and the worker is running

`POST /events` checks the token in constant time (401 and nothing queued when it is
wrong or missing), parses the envelope (`fabric.hook.envelopes`), drops what no rule
watches, and commits the rest to the durable queue (`fabric.hook.queue`) before it
answers 200. Ignored events (tests, deletes, folders, multipart parts, system paths,
unknown envelopes) also get 200, with a log line, so a store never retries them
forever; a body that is not JSON gets 400. The worker (`fabric.hook.publisher`) runs in
a thread, woken by each accepted event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fabric.errors import FabricError, Unauthorized
from fabric.hook.config import HookConfig
from fabric.hook.envelopes import Envelope, MalformedEvent, parse
from fabric.hook.queue import Queue
from fabric.hook.sns import is_loopback_url, verify
from fabric.hook.publisher import HookMetrics, Worker
from fabric.logs import get_logger
from fabric.wire.server import run_until_signalled

log = get_logger("hook")
CONFIG = web.AppKey("config", HookConfig)
QUEUE = web.AppKey("queue", Queue)
WORKER = web.AppKey("worker", Worker)
METRICS = web.AppKey("metrics", HookMetrics)
WAKE = web.AppKey("wake", asyncio.Event)
TASK = web.AppKey("task", asyncio.Task)
MAX_BODY = 32 << 20  # a SeaweedFS entry lists every chunk of a file: big files make big events


def check_token(expected: str, authorization: str | None) -> None:
    """Accept `Bearer <token>`, or Basic auth whose password is the token (SNS endpoints
    can carry only user:password). Constant time: both sides are hashed, then compared."""
    presented = ""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            presented = value.strip()
        elif scheme.lower() == "basic":
            try:
                presented = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                presented = ""
    ok = hmac.compare_digest(hashlib.sha256(presented.encode()).digest(),
                             hashlib.sha256(expected.encode()).digest())
    if not presented or not ok:
        raise Unauthorized("missing or invalid token" if presented else "missing bearer token")


def create_app(cfg: HookConfig, *, worker: Worker | None = None, start_worker: bool = True) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[CONFIG] = cfg
    app[METRICS] = worker.metrics if worker else HookMetrics()
    app[QUEUE] = worker.queue if worker else Queue(cfg.queue)
    app[WORKER] = worker or Worker(cfg, app[QUEUE], app[METRICS])
    app[WAKE] = asyncio.Event()
    r = app.router
    r.add_post("/events", receive)
    r.add_get("/checkpoints", checkpoints)
    r.add_get("/metrics", metrics)
    r.add_get("/livez", livez)
    r.add_get("/readyz", readyz)
    if start_worker:
        app.cleanup_ctx.append(_worker_ctx)
    app.on_cleanup.append(_close)
    return app


async def _close(app: web.Application) -> None:
    await asyncio.to_thread(app[WORKER].close)
    app[QUEUE].close()


# --- receiving ---------------------------------------------------------------------------------

async def receive(request: web.Request) -> web.Response:
    app = request.app
    cfg, m = app[CONFIG], app[METRICS]
    try:
        check_token(cfg.token, request.headers.get("Authorization"))
    except Unauthorized as e:
        m.events.labels("unauthorized").inc()
        log.warning("event refused: bad token", remote=request.remote)
        return _error(e)
    body = await request.read()
    try:
        env = parse(body)
    except MalformedEvent as e:
        m.events.labels("malformed").inc()
        log.warning("event refused: malformed JSON", remote=request.remote, bytes=len(body), error=e.message)
        return _error(e)
    if env.sns is not None:
        refused = await _check_sns(app, env)
        if refused is not None:
            return refused
    worker: Worker = app[WORKER]
    events, ignored = [], list(env.ignored)
    for ev in env.events:
        if worker.watched(ev.bucket, ev.key):
            events.append(ev)
        else:
            ignored.append((f"{ev.bucket}/{ev.key}", "no rule watches this key"))
    queued, duplicates = await asyncio.to_thread(app[QUEUE].add, events)
    if queued:
        app[WAKE].set()
    m.events.labels("queued").inc(queued)
    m.events.labels("duplicate").inc(duplicates)
    m.events.labels("ignored").inc(len(ignored))
    for what, why in ignored:
        log.info("event ignored", envelope=env.kind, what=what, why=why)
    if queued or duplicates:
        log.info("events accepted", envelope=env.kind, queued=queued, duplicates=duplicates,
                 keys=[f"{e.bucket}/{e.key}" for e in events][:10])
    return web.json_response({"queued": queued, "duplicates": duplicates, "ignored": len(ignored),
                              "envelope": env.kind})


async def _check_sns(app: web.Application, env: Envelope) -> web.Response | None:
    """Verify an SNS message (when configured) and confirm subscriptions; a response refuses."""
    cfg, msg = app[CONFIG], env.sns
    if cfg.sns.verify:
        try:
            verify(msg, cfg.sns.cert_dir, cfg.sns.topics)
        except FabricError as e:
            app[METRICS].events.labels("unverified").inc()
            app[METRICS].failures.labels("sns").inc()
            log.warning("SNS message refused", topic=msg.get("TopicArn"), error=e.message)
            return _error(e)
    if env.kind == "sns-confirm":
        await _confirm(app, msg)
        return web.json_response({"confirmed": True, "envelope": env.kind})
    return None


async def _confirm(app: web.Application, msg: dict) -> None:
    url = str(msg.get("SubscribeURL", ""))
    if not is_loopback_url(url):
        log.warning("SNS subscription needs confirming by hand (the hook contacts no other host)",
                    topic=msg.get("TopicArn"), subscribe_url=url)
        return
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(url) as resp:
                log.info("SNS subscription confirmed", topic=msg.get("TopicArn"), status=resp.status)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        app[METRICS].failures.labels("sns").inc()
        log.warning("SNS subscription confirmation failed", subscribe_url=url, error=repr(e))


def _error(e: FabricError) -> web.Response:
    return web.json_response(e.to_json(), status=e.http_status)


# --- status and probes -------------------------------------------------------------------------------

async def checkpoints(request: web.Request) -> web.Response:
    try:
        check_token(request.app[CONFIG].token, request.headers.get("Authorization"))
    except Unauthorized as e:
        return _error(e)
    rows = await asyncio.to_thread(request.app[QUEUE].checkpoints)
    return web.json_response({"checkpoints": rows})


async def metrics(request: web.Request) -> web.Response:
    try:
        check_token(request.app[CONFIG].token, request.headers.get("Authorization"))
    except Unauthorized as e:
        return _error(e)
    m = request.app[METRICS]
    stats = await asyncio.to_thread(request.app[QUEUE].stats, time.time())
    m.depth.set(stats["depth"])
    m.lag.set(stats["lag"])
    m.oldest_waiting.set(stats["oldest_waiting"])
    for state in ("waiting", "published", "failed"):
        m.checkpoints.labels(state).set(stats["checkpoints"].get(state, 0))
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def livez(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    task = request.app.get(TASK)
    running = task is not None and not task.done()
    writable = await asyncio.to_thread(request.app[QUEUE].writable)
    ok = running and writable
    return web.json_response({"ready": ok, "worker": running, "queue": writable}, status=200 if ok else 503)


# --- the worker task ------------------------------------------------------------------------------------

async def _worker_ctx(app: web.Application):
    app[TASK] = asyncio.create_task(_work(app))
    yield
    app[TASK].cancel()
    try:
        await app[TASK]
    except asyncio.CancelledError:
        pass


async def _work(app: web.Application) -> None:
    worker, wake = app[WORKER], app[WAKE]
    while True:
        wake.clear()
        try:
            delay = await asyncio.to_thread(worker.step)
        except Exception as e:  # noqa: BLE001 - the worker must outlive any one bad step
            app[METRICS].failures.labels("worker").inc()
            log.error("worker step failed", error=repr(e))
            delay = 1.0
        try:
            await asyncio.wait_for(wake.wait(), timeout=min(max(delay, 0.02), 5.0))
        except asyncio.TimeoutError:
            pass


def run_hook(cfg: HookConfig) -> None:
    log.info("hook starting", rules=len(cfg.rules), queue=str(cfg.queue),
             target=cfg.origin or cfg.store, s3=cfg.s3.endpoint)
    asyncio.run(run_until_signalled(create_app(cfg), cfg.listen, None, "hook"))
