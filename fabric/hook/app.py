"""The push-hook receiver: S3-compatible stores tell it about new objects; it publishes checkpoints.

    fabric hook --listen 127.0.0.1:7100 --config hook.toml

Routes (docs/hooks.md):

    POST /events        an event envelope (AWS/Ceph Records, SNS, MinIO, SeaweedFS filer)
    GET  /checkpoints   what the hook knows of each checkpoint
    GET  /metrics       queue depth, lag, failures (Prometheus)
    GET  /livez         the process is up (no token)
    GET  /readyz        the queue is writable and the worker is running (no token)

This module owns the hook's routes, its token rule and the worker task. The app is
built on the shared server edge (`fabric.wire.server.base_app`), as the origin's and
the agents' are: the edge checks the token (`SenderToken`, in constant time) on every
route but the probes, answers every `FabricError` as JSON `{"code", "message"}` with
its status, and serves the probes and /metrics (the hook's metrics beside the edge's).
`POST /events` with a wrong or missing token gets 401 and nothing is queued; otherwise
it parses the envelope (`fabric.hook.envelopes`), drops what no rule watches, and
commits the rest to the durable queue (`fabric.hook.queue`) before it answers 200.
Ignored events (tests, deletes, folders, multipart parts, system paths, unknown
envelopes) also get 200, with a log line, so a store never retries them forever; a
body that is not JSON gets 400. The worker (`fabric.hook.publisher`) runs in
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

from fabric.errors import FabricError, MalformedEvent, Unauthorized
from fabric.hook.config import HookConfig
from fabric.hook.envelopes import Envelope, parse
from fabric.hook.queue import Queue
from fabric.hook.sns import is_loopback_url, verify
from fabric.hook.publisher import HookMetrics, Worker
from fabric import logs, tracing
from fabric.logs import get_logger
from fabric.wire.auth import Principal
from fabric.wire.server import Metrics, add_metrics_listener, base_app, run_until_signalled

log = get_logger("hook")
CONFIG = web.AppKey("config", HookConfig)
QUEUE = web.AppKey("queue", Queue)
WORKER = web.AppKey("worker", Worker)
HOOK_METRICS = web.AppKey("hook_metrics", HookMetrics)
WAKE = web.AppKey("wake", asyncio.Event)
TASK = web.AppKey("task", asyncio.Task)
MAX_BODY = 32 << 20  # a SeaweedFS entry lists every chunk of a file: big files make big events


class SenderToken:
    """The hook's one token, as the server edge's `Authenticator`.

    Accepts `Bearer <token>`, or Basic auth whose password is the token (SNS endpoints
    can carry only user:password). Constant time: both sides are hashed, then compared.
    """

    SENDER = Principal("event-sender", frozenset({"publish"}), ("*",))

    def __init__(self, token: str):
        self._sha256 = hashlib.sha256(token.encode()).digest()

    def authenticate(self, authorization: str | None) -> Principal:
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
        # surrogateescape: a header that is not UTF-8 is hashed as its bytes, not a 500
        ok = hmac.compare_digest(hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest(),
                                 self._sha256)
        if not presented or not ok:
            raise Unauthorized("missing or invalid token" if presented else "missing bearer token")
        return self.SENDER


def create_app(cfg: HookConfig, *, worker: Worker | None = None, start_worker: bool = True) -> web.Application:
    hook_metrics = worker.metrics if worker else HookMetrics()

    async def ready() -> dict:
        task = app.get(TASK)
        running = task is not None and not task.done()
        writable = await asyncio.to_thread(app[QUEUE].writable)
        return {"ready": running and writable, "worker": running, "queue": writable}

    app = base_app(tokens=SenderToken(cfg.token), ready=ready, metrics=Metrics(registry=hook_metrics.registry),
                   refresh_metrics=lambda: _refresh_metrics(app), on_error=_refused, max_body=MAX_BODY)
    app[CONFIG] = cfg
    app[HOOK_METRICS] = hook_metrics
    app[QUEUE] = worker.queue if worker else Queue(cfg.queue)
    app[WORKER] = worker or Worker(cfg, app[QUEUE], hook_metrics)
    app[WAKE] = asyncio.Event()
    app.router.add_post("/events", receive)
    app.router.add_get("/checkpoints", checkpoints)
    if start_worker:
        app.cleanup_ctx.append(_worker_ctx)
    app.on_cleanup.append(_close)
    return app


async def _close(app: web.Application) -> None:
    await asyncio.to_thread(app[WORKER].close)
    app[QUEUE].close()


# --- receiving ---------------------------------------------------------------------------------

def _refused(request: web.Request, e: FabricError) -> None:
    """Count and log an event the edge refused for its token (the edge answers the 401)."""
    if request.path == "/events" and isinstance(e, Unauthorized):
        request.app[HOOK_METRICS].events.labels("unauthorized").inc()
        log.warning("event refused: bad token", remote=request.remote)


async def receive(request: web.Request) -> web.Response:
    app = request.app
    m = app[HOOK_METRICS]
    body = await request.read()
    try:
        env = parse(body)
    except MalformedEvent as e:
        m.events.labels("malformed").inc()
        log.warning("event refused: malformed JSON", remote=request.remote, bytes=len(body), error=e.message)
        raise
    if env.sns is not None:
        confirmed = await _check_sns(app, env)
        if confirmed is not None:
            return confirmed
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
    """Verify an SNS message (when configured; a FabricError refuses it) and confirm
    subscriptions (the answer, for a confirmation; None for a notification)."""
    cfg, msg = app[CONFIG], env.sns
    if cfg.sns.verify:
        try:
            verify(msg, cfg.sns.cert_dir, cfg.sns.topics)
        except FabricError as e:
            app[HOOK_METRICS].events.labels("unverified").inc()
            app[HOOK_METRICS].failures.labels("sns").inc()
            log.warning("SNS message refused", topic=msg.get("TopicArn"), error=e.message)
            raise
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
        app[HOOK_METRICS].failures.labels("sns").inc()
        log.warning("SNS subscription confirmation failed", subscribe_url=url, error=repr(e))


# --- status (the probes and /metrics are the edge's: base_app) ---------------------------------------

async def checkpoints(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(request.app[QUEUE].checkpoints)
    return web.json_response({"checkpoints": rows})


async def _refresh_metrics(app: web.Application) -> None:
    """Set the queue's gauges from the queue itself, just before /metrics answers."""
    m = app[HOOK_METRICS]
    stats = await asyncio.to_thread(app[QUEUE].stats, time.time())
    m.depth.set(stats["depth"])
    m.lag.set(stats["lag"])
    m.oldest_waiting.set(stats["oldest_waiting"])
    for state in ("waiting", "published", "failed"):
        m.checkpoints.labels(state).set(stats["checkpoints"].get(state, 0))


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
            app[HOOK_METRICS].failures.labels("worker").inc()
            log.error("worker step failed", error=repr(e))
            delay = 1.0
        try:
            await asyncio.wait_for(wake.wait(), timeout=min(max(delay, 0.02), 5.0))
        except asyncio.TimeoutError:
            pass


def run_hook(cfg: HookConfig) -> None:
    logs.bind("hook")
    tracing.setup("fabric-hook")
    log.info("hook starting", rules=len(cfg.rules), queue=str(cfg.queue),
             target=cfg.origin or cfg.store, s3=cfg.s3.endpoint)
    app = create_app(cfg)
    add_metrics_listener(app, cfg.metrics_listen)
    asyncio.run(run_until_signalled(app, cfg.listen, None, "hook"))
