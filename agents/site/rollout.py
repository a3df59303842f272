"""Rollout: the site agent's side of hot-loading — the worker registry, canaries, reports.

Terms (docs/hotload.md has the full picture and the wire examples):

* a *worker* is an inference process that registered with this agent for one
  artifact (`agents.worker.hotloader.HotLoader` does it). It long-polls for its *assignment*
  (the version it should serve) and reports how each load went. Each poll is also
  its heartbeat: a worker with no poll in flight and none for `2 * poll + 1`
  seconds (its own poll wait) is *dead*, and rollouts carry on without it.
* an *assignment* names a version, the folder it is materialised in and its manifest;
  assignments carry a sequence number (`seq`); a worker acts on the newest it has seen.
* a *rollout* starts when the agent activates a version: the version goes to one
  worker first (the *canary*); only when the canary reports it healthy does it go
  to the others. If the canary fails or times out, the version is marked bad at
  this site, `current/<artifact>` flips back to the previous version and every
  worker is (re)assigned that one. A newer activation cancels the rollout in
  progress (newest wins; a worker loads one version at a time).

Workers talk to the agent's own HTTP API (routes below). Every route needs `pull` on the
worker's artifact, and a worker id belongs to the token that registered it: only that
token (or an admin one) may poll, report for, re-register or deregister it; the list
shows only workers and rollouts of artifacts the token may pull. This module imports no
torch, and `agents.worker.hotloader` imports its wire definitions from here.

    POST   /v1/site/workers                          register {"worker", "artifact", ...}
    GET    /v1/site/workers                          workers and rollouts (status)
    GET    /v1/site/workers/{id}/assignment?after=S  long-poll for an assignment newer than S
    POST   /v1/site/workers/{id}/report              how a load went
    DELETE /v1/site/workers/{id}                     deregister (clean shutdown)
    GET    /v1/site/manifests/{artifact}/{version}   a manifest this site holds

Length: the registry, the rollout engine and the worker routes share one state (workers,
assignments, rollouts) and its invariants; split, each part would reach into the others.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from fabric.errors import Conflict, Forbidden, InvalidInput, NotFound
from fabric import tracing
from fabric.logs import get_logger
from fabric.core.manifest import check_name
from fabric.wire.protocol import MANIFESTS, WORKERS  # the paths, shared with agents.worker.hotloader
from fabric.wire.auth import Principal
from fabric.wire.server import principal, read_json

from agents.site.fields import MAX_POLL_S, MIN_POLL_S  # noqa: F401 - the rollout wire's limits, named here too
from agents.site.fields import count as _int, poll_wait as _poll, scalar as _scalar, version_or_none as _version_or_none

log = get_logger("rollout")

# --- the rollout protocol's limits and fields ----------------------------------------------------

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
REPORT_FIELDS = ("version", "previous", "ok", "error", "serving", "mode", "pause_ms", "bytes_read",
                 "bytes_changed", "tensors_changed", "seconds", "verify_s", "copy_s", "catch_up_s", "check_ms",
                 "verified", "seal_fallback")


def check_worker_id(worker: object) -> str:
    if not isinstance(worker, str) or not _WORKER_ID.match(worker):
        raise InvalidInput(f"invalid worker id {worker!r}: use 1-128 letters, digits, '.', '_', ':' or '-'")
    return worker


def dead_after(poll_s: float) -> float:
    """Seconds without a poll after which a worker that polls every `poll_s` is dead."""
    return 2 * poll_s + 1.0


@dataclass(frozen=True)
class RolloutOptions:
    canary_timeout: float = 600.0  # the canary must report within this, or the version is rejected
    load_timeout: float = 600.0  # any other worker: past this it is marked failed, the rollout goes on
    forget_after: float = 600.0  # dead workers leave the status after this


class Site(Protocol):
    """What a rollout needs from the site agent (agents.site.agent.SiteAgent provides it)."""

    registry: Any  # .manifest(artifact, version) -> Manifest
    layout: Any  # .version_dir(artifact, version), .active(artifact)
    channels: dict  # artifact -> ChannelStatus (.channel)

    async def reject_version(self, artifact: str, version: str, previous: str | None, reason: str) -> None: ...


# --- state ---------------------------------------------------------------------------------

@dataclass
class Assignment:
    seq: int
    artifact: str
    version: str | None  # None: nothing to serve (the only version was rejected)
    role: str  # "join", "canary", "rollout", "revert"
    previous: str | None = None
    at: float = field(default_factory=time.time)
    traceparent: str | None = None  # the deploy span that assigned it: the worker's load span's parent


@dataclass
class Worker:
    id: str
    artifact: str
    owner: str | None = None  # the name of the token that registered it (None: registered in-process)
    channel: str | None = None
    mode: str | None = None
    poll_s: float = 15.0
    serving: str | None = None
    assignment: Assignment | None = None
    report: dict | None = None  # the last report, whatever its seq
    result: dict | None = None  # the report answering `assignment`, once it arrives
    polls: int = 0  # polls in flight
    last_seen: float = field(default_factory=time.monotonic)
    registered: float = field(default_factory=time.time)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a new assignment for the poll
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # `result` arrived
    server: dict | None = None  # a [[servers]] member (agents.site.servers): kind, url, model, last record

    def seen(self) -> None:
        self.last_seen = time.monotonic()

    @property
    def dead(self) -> bool:
        return self.polls == 0 and time.monotonic() - self.last_seen > dead_after(self.poll_s)

    @property
    def state(self) -> str:
        if self.dead:
            return "dead"
        a = self.assignment
        if a is None or a.version == self.serving:
            return "serving" if self.serving else "idle"
        if self.result is not None and not self.result.get("ok"):
            return "failed"
        return "loading"

    def to_json(self) -> dict:
        a = self.assignment
        return {"worker": self.id, "artifact": self.artifact, "channel": self.channel, "mode": self.mode,
                "serving": self.serving, "assigned": a.version if a else None, "role": a.role if a else None,
                "seq": a.seq if a else 0, "state": self.state, "server": self.server,
                "seen_s_ago": round(time.monotonic() - self.last_seen, 1), "last_report": self.report}


@dataclass
class RolloutState:
    artifact: str
    version: str
    previous: str | None
    phase: str = "canary"  # canary -> rolling -> done | rejected | superseded
    canary: str | None = None
    error: str | None = None
    failed: list[str] = field(default_factory=list)  # workers that failed after the canary passed
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


# --- the rollout engine ----------------------------------------------------------------------

class Rollout:
    """Worker registry and per-artifact canary rollouts for one site agent."""

    def __init__(self, site: Site, options: RolloutOptions | None = None):
        self.site = site
        self.options = options or RolloutOptions()
        self.workers: dict[str, Worker] = {}
        self.rollouts: dict[str, RolloutState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._seq = 0

    # --- activation ----------------------------------------------------------------------

    async def on_activated(self, artifact: str, version: str, previous: str | None) -> None:
        """The site activated `version`: start its rollout, cancelling any in progress."""
        old = self._tasks.pop(artifact, None)
        if old is not None and not old.done():
            old.cancel()
            try:
                await old
            except asyncio.CancelledError:
                pass
        ro = RolloutState(artifact, version, previous)
        self.rollouts[artifact] = ro
        self._tasks[artifact] = asyncio.get_running_loop().create_task(self._run(ro))

    async def _run(self, ro: RolloutState) -> None:
        try:
            if not await self._canary(ro):
                return
            ro.phase = "rolling"
            rest = [w for w in self._live(ro.artifact) if w.serving != ro.version]
            results = await asyncio.gather(*(self._assign_and_wait(w, ro, "rollout", self.options.load_timeout)
                                             for w in rest))
            ro.failed = [w.id for w, (outcome, _) in zip(rest, results) if outcome != "ok"]
            ro.phase, ro.finished = "done", time.time()
            log.info("rollout done", artifact=ro.artifact, version=ro.version, workers=len(rest) + 1,
                     failed=ro.failed)
        except asyncio.CancelledError:
            ro.phase, ro.finished = "superseded", time.time()
            raise

    async def _canary(self, ro: RolloutState) -> bool:
        """Load the version on one worker; True once one is healthy (or none is there)."""
        while True:
            pending = [w for w in self._live(ro.artifact) if w.serving != ro.version]
            if not pending:
                return True
            canary = pending[0]
            ro.canary = canary.id
            log.info("canary", artifact=ro.artifact, version=ro.version, worker=canary.id)
            outcome, error = await self._assign_and_wait(canary, ro, "canary", self.options.canary_timeout)
            if outcome == "ok":
                return True
            if outcome in ("dead", "reassigned"):  # gone or restarted: not the version's fault
                log.warning("canary lost; picking another", artifact=ro.artifact, worker=canary.id, why=outcome)
                continue
            await self._reject(ro, f"canary {canary.id}: {error}")
            return False

    async def _reject(self, ro: RolloutState, reason: str) -> None:
        ro.phase, ro.error, ro.finished = "rejected", reason, time.time()
        log.error("version failed its canary; rolling back", artifact=ro.artifact, version=ro.version,
                  previous=ro.previous, reason=reason)
        await self.site.reject_version(ro.artifact, ro.version, ro.previous, reason)
        for w in self._live(ro.artifact):
            if w.serving == ro.version or (w.assignment and w.assignment.version == ro.version):
                self._assign(w, ro.previous, "revert", previous=ro.version)

    async def _assign_and_wait(self, w: Worker, ro: RolloutState, role: str, timeout: float) -> tuple[str, str]:
        """Assign the version to `w` and wait: ("ok" | "failed" | "timeout" | "dead" | "reassigned", why)."""
        a = self._assign(w, ro.version, role, previous=ro.previous)
        deadline = time.monotonic() + timeout
        while True:
            if w.assignment is not a:
                return "reassigned", "the worker was given another assignment"
            if w.result is not None:
                if w.result.get("ok") and w.serving == ro.version:
                    return "ok", ""
                return "failed", w.result.get("error") or f"reported ok={w.result.get('ok')}, serving {w.serving}"
            if w.dead:
                return "dead", "the worker stopped polling"
            if time.monotonic() > deadline:
                log.warning("worker did not report in time", worker=w.id, version=ro.version, timeout_s=timeout)
                return "timeout", f"no report within {timeout:g}s"
            try:
                await asyncio.wait_for(w.answered.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    def _assign(self, w: Worker, version: str | None, role: str, previous: str | None = None) -> Assignment:
        self._seq += 1
        w.assignment = Assignment(self._seq, w.artifact, version, role, previous, traceparent=tracing.traceparent())
        w.result = None
        w.answered.clear()
        w.changed.set()
        return w.assignment

    def in_use(self, artifact: str) -> set[str]:
        """Versions retention must keep whatever its count says: what any worker serves or is
        assigned, and the version an unfinished rollout would revert to (called from a thread:
        it reads snapshots of the dicts)."""
        versions: set[str | None] = set()
        for w in list(self.workers.values()):
            if w.artifact == artifact:
                versions |= {w.serving, w.assignment.version if w.assignment else None}
        ro = self.rollouts.get(artifact)
        if ro is not None and ro.phase in ("canary", "rolling"):
            versions |= {ro.version, ro.previous}
        versions.discard(None)
        return versions  # type: ignore[return-value]

    def _live(self, artifact: str) -> list[Worker]:
        return sorted((w for w in self.workers.values() if w.artifact == artifact and not w.dead),
                      key=lambda w: w.id)

    def _stable(self, artifact: str) -> str | None:
        """What a worker that joins now should serve: never a version still in its canary."""
        ro = self.rollouts.get(artifact)
        if ro is not None and ro.phase == "canary":
            return ro.previous
        return self.site.layout.active(artifact)

    # --- worker requests -------------------------------------------------------------------

    def register(self, body: dict, p: Principal | None = None) -> dict:
        """Register (or re-register) a worker. `p`, the calling token, needs `pull` on the
        artifact and, for an id already registered, must be the token that holds it (or an admin)."""
        wid = check_worker_id(body.get("worker"))
        artifact = check_name("artifact", body.get("artifact"))
        if p is not None:
            p.require("pull", artifact)
            if wid in self.workers:
                self.owned(wid, p)
        channel = body.get("channel")
        followed = self.site.channels.get(artifact)
        if followed is None:
            raise NotFound(f"this site does not follow artifact {artifact!r}")
        if channel is not None and channel != followed.channel:
            raise Conflict(f"this site serves {artifact}:{followed.channel}, not {artifact}:{channel}")
        w = self.workers.get(wid)
        if w is None or w.artifact != artifact:
            w = self.workers[wid] = Worker(wid, artifact, owner=p.name if p else None)
        w.channel, w.mode = channel or followed.channel, _scalar(body.get("mode"), "mode")
        w.serving = _version_or_none(body.get("serving"))
        w.poll_s = _poll(body.get("poll_s", w.poll_s))
        w.seen()
        self._join(w)
        log.info("worker registered", worker=wid, artifact=artifact, serving=w.serving, mode=w.mode)
        return {"worker": wid, "artifact": artifact, "channel": w.channel, "poll_s": w.poll_s,
                "dead_after_s": dead_after(w.poll_s)}

    def _join(self, w: Worker) -> None:
        target = self._stable(w.artifact)
        if target and target != w.serving:
            self._assign(w, target, "join")
        elif w.assignment is None or w.assignment.version != w.serving:
            w.assignment = None

    def worker(self, wid: str) -> Worker:
        w = self.workers.get(wid)
        if w is None:
            raise NotFound(f"no worker {wid!r} registered here (register again)")
        return w

    def owned(self, wid: str, p: Principal) -> Worker:
        """The worker `wid`, if token `p` may act for it: the token that registered it, while it
        may still pull the artifact, or an admin token; else Forbidden."""
        w = self.worker(wid)
        if not p.admin and (w.owner != p.name or not p.may("pull", w.artifact)):
            raise Forbidden(f"worker {wid!r} was registered by another token")
        return w

    async def poll(self, request: web.Request, wid: str) -> dict:
        w = self.owned(wid, principal(request))
        after = _int(request.query.get("after", "0"), "after")
        wait = _poll(request.query.get("wait", w.poll_s))
        was_dead = w.dead
        w.poll_s = wait
        if "serving" in request.query:
            w.serving = _version_or_none(request.query["serving"])
        w.polls += 1
        w.seen()
        try:
            if was_dead:
                log.info("worker is back", worker=wid)
                self._join(w)
            deadline = time.monotonic() + wait
            while not (w.assignment and w.assignment.seq > after):
                left = deadline - time.monotonic()
                if left <= 0 or request.transport is None or request.transport.is_closing():
                    return {"assignment": None}
                w.changed.clear()
                try:
                    await asyncio.wait_for(w.changed.wait(), min(left, 0.5))
                except asyncio.TimeoutError:
                    pass
            return {"assignment": await self._assignment_body(w.assignment)}
        finally:
            w.polls -= 1
            w.seen()

    async def _assignment_body(self, a: Assignment) -> dict:
        body = {"seq": a.seq, "artifact": a.artifact, "version": a.version, "role": a.role,
                "previous": a.previous, "path": None, "manifest": None, "traceparent": a.traceparent}
        if a.version is not None:
            m = await asyncio.to_thread(self.site.registry.manifest, a.artifact, a.version)
            body["path"] = str(self.site.layout.version_dir(a.artifact, a.version))
            body["manifest"] = m.to_json()
        return body

    def report(self, wid: str, body: dict) -> dict:
        w = self.worker(wid)
        w.seen()
        rep = {k: _scalar(body.get(k), k) for k in REPORT_FIELDS}
        rep["seq"] = _int(body.get("seq", 0), "seq")
        rep["at"] = time.time()
        w.report = rep
        if isinstance(rep["seal_fallback"], str) and rep["seal_fallback"]:  # the site seal failed this worker
            self.site.metrics.count_seal_fallback(rep["seal_fallback"])
        if "serving" in body:
            w.serving = _version_or_none(body.get("serving"))
        if w.assignment is not None and rep["seq"] == w.assignment.seq:
            w.result = rep
            w.answered.set()
        (log.info if rep["ok"] else log.warning)("worker report", worker=wid, **{k: rep[k] for k in REPORT_FIELDS})
        return {"ok": True}

    def deregister(self, wid: str) -> None:
        w = self.workers.pop(wid, None)
        if w is not None:
            w.answered.set()  # a rollout waiting on it sees it gone (dead) next tick
            w.polls, w.last_seen = 0, float("-inf")
            log.info("worker left", worker=wid)

    # --- status --------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """One row per worker (dead ones for a while), for SiteAgent.status()["workers"]
        (the HTTP list shows a token only those of artifacts it may pull)."""
        now = time.monotonic()
        for wid, w in list(self.workers.items()):
            if w.dead and now - w.last_seen > self.options.forget_after:
                del self.workers[wid]
        return [w.to_json() for w in sorted(self.workers.values(), key=lambda w: (w.artifact, w.id))]

    def rollouts_json(self) -> list[dict]:
        return [ro.to_json() for ro in self.rollouts.values()]

    # --- HTTP ------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post(WORKERS, self._h_register)
        r.add_get(WORKERS, self._h_list)
        r.add_get(WORKERS + "/{worker}/assignment", self._h_poll)
        r.add_post(WORKERS + "/{worker}/report", self._h_report)
        r.add_delete(WORKERS + "/{worker}", self._h_deregister)
        r.add_get(MANIFESTS + "/{artifact}/{version}", self._h_manifest)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, _app) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _h_register(self, request: web.Request) -> web.Response:
        return web.json_response(self.register(await read_json(request), principal(request)))

    async def _h_list(self, request: web.Request) -> web.Response:
        p = principal(request)
        p.require("pull")
        return web.json_response({"workers": [w for w in self.status() if p.may("pull", w["artifact"])],
                                  "rollouts": [r for r in self.rollouts_json() if p.may("pull", r["artifact"])]})

    async def _h_poll(self, request: web.Request) -> web.Response:
        return web.json_response(await self.poll(request, request.match_info["worker"]))

    async def _h_report(self, request: web.Request) -> web.Response:
        wid = self.owned(request.match_info["worker"], principal(request)).id
        return web.json_response(self.report(wid, await read_json(request)))

    async def _h_deregister(self, request: web.Request) -> web.Response:
        wid = request.match_info["worker"]
        if wid in self.workers:
            self.owned(wid, principal(request))
        self.deregister(wid)
        return web.json_response({"ok": True})

    async def _h_manifest(self, request: web.Request) -> web.Response:
        artifact = check_name("artifact", request.match_info["artifact"])
        version = check_name("version", request.match_info["version"])
        principal(request).require("pull", artifact)
        m = await asyncio.to_thread(self.site.registry.manifest, artifact, version)
        return web.Response(body=m.canonical(), content_type="application/json")

