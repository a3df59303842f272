"""Encoding a new version's deltas before the first site asks: an origin warms its frame cache.

Sites that hold a version and pull the next one get its changed chunks as deltas
encoded in `full` mode, and the sender keeps those frames (`fabric.wire.framecache`):
every site after the first gets them without codec time. `Warmer` makes the first
site one of those too. It follows the origin's event log (`fabric.wire.events`), which
carries this origin's commits and channel moves and, over a store shared with other
origins, theirs (`fabric.origin.peers`): for a new version it encodes the version's
chunks against its parent (the manifest's `parent`: the version its publisher
started from, the channel's or the artifact's latest); for a promote, the channel's
version against the one before it in the channel's history; for a stage, the staged
version against the channel's. When the origin starts, it does the same for the
channels' versions (`STARTUP_JOBS`, the channels moved last). It plans each as a fetch
from a site holding the base would (`fabric.wire.chunks`: the plan of
`plan_references`, every encoding, the serving zstd level) and puts the frames in the
app's cache (docs/encodings.md, "Encoded once"). A job reads at most its two manifests
and one channel.

Only chunks with a reference are warmed (the deltas: a chunk without one goes to the
first site as it goes today, and a relay sends such chunks stored anyway), and only
chunks the base version lacks (a site holding the base never asks for those).
Jobs run one at a time in one worker thread, in the order asked, so warming uses at
most one core of the origin's; a frame the cache holds, or that a request is
encoding, is skipped, and a request that wants a frame the warmer is encoding waits
for it (the cache's `claim`). A job stops once it has put half of the cache's budget,
leaving the rest to what requests encode. Nothing is warmed when the cache
keeps nothing or the encode mode is pinned to `stored` (no request would send a kept
frame it did not ask for). A failure (a manifest or chunk gone, a store error) ends
that job with a log line (any other exception too: warming never stops for good); the
fetches encode for themselves, as before.

Metrics: `fabric_frames_warmed_total` (frames put in the cache), `fabric_frame_warm_cpu_seconds_total`
(the codec's CPU time for them) and `fabric_frame_warm_jobs` (jobs queued or running; 0: the
cache is as warm as it gets).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from fabric.core.codec import Encoding
from fabric.core.manifest import Manifest
from fabric.core.refplan import plan_references
from fabric.errors import FabricError
from fabric.logs import get_logger
from fabric.store.registry import Registry
from fabric.store.store import Store
from fabric.wire.chunks import RequestPlan, encode_kept
from fabric.wire.events import EventLog
from fabric.wire.framecache import FrameCache

log = get_logger("warming")
STARTUP_JOBS = 4  # jobs queued when an origin starts: the channels moved most recently
_QUEUE = 64  # jobs queued at most; a burst of commits beyond it drops the oldest waiting job


@dataclass(frozen=True)
class Job:
    artifact: str
    version: str  # the version sites will fetch
    base: str | None = None  # the version they hold; None: found when the job runs (`_base`)
    channel: str | None = None  # for None bases: the channel that moved (else the manifest's parent)


class Warmer:
    """Warm `cache` with the deltas of versions in `registry`'s store, one job at a time."""

    def __init__(self, registry: Registry, cache: FrameCache, metrics_registry: CollectorRegistry, *,
                 enabled: bool = True):
        self.registry, self.cache, self.enabled = registry, cache, enabled and cache.budget > 0
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()
        self.warmed = Counter("fabric_frames_warmed", "Delta frames encoded ahead of the first fetch "
                              "(fabric.wire.warming)", registry=metrics_registry)
        self.cpu = Counter("fabric_frame_warm_cpu_seconds", "CPU seconds the warming encodes took "
                           "(fabric.wire.warming)", registry=metrics_registry)
        self.pending = Gauge("fabric_frame_warm_jobs", "Frame warming jobs queued or running",
                             registry=metrics_registry)
        self.pending.set(1 if self.enabled else 0)  # the start-up jobs, until `run` has listed them

    def add(self, job: Job) -> None:
        """Queue a job (no-op when warming is off, or when its base is its version)."""
        if not self.enabled or job.base == job.version:
            return
        if job in self._jobs:
            return
        if len(self._jobs) >= _QUEUE:
            del self._jobs[1]  # the oldest waiting one (the first is running)
        self._jobs.append(job)
        self.pending.set(len(self._jobs))
        self._wake.set()

    def saw(self, event: dict) -> None:
        """Queue the job an event of the origin's log calls for (a new version, a promote, a stage)."""
        kind, artifact, action = event.get("type"), event.get("artifact"), event.get("action")
        if not isinstance(artifact, str):
            return
        if kind == "version" and isinstance(event.get("version"), str):
            self.add(Job(artifact, event["version"]))
        elif kind == "channel" and action in ("promote", "stage") and isinstance(event.get("channel"), str):
            version = event.get("staged") if action == "stage" else event.get("version")
            if isinstance(version, str):
                self.add(Job(artifact, version, channel=event["channel"]))

    async def follow(self, events: EventLog) -> None:
        """Call `saw` for every event appended to `events` from now on, until cancelled."""
        after = events.seq
        while not events.closed:
            await events.wait(after, 60.0)
            new, _ = events.since(after)
            for event in new:
                self.saw(event)
            if new:
                after = new[-1]["seq"]

    async def run(self) -> None:
        """Queue the start-up jobs (`STARTUP_JOBS`), then run jobs as they come until cancelled."""
        if not self.enabled:
            return
        try:
            for job in await asyncio.to_thread(self._startup_jobs):
                self.add(job)
        except (FabricError, OSError) as e:
            log.warning("start-up warming skipped", code=getattr(e, "code", "io_error"), error=str(e))
        self.pending.set(len(self._jobs))
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs:
                job = self._jobs[0]
                try:
                    n, size = await self.warm(job)
                    if n:
                        log.info("frames warmed", artifact=job.artifact, version=job.version, base=job.base,
                                 frames=n, bytes=size)
                except (FabricError, OSError) as e:
                    log.warning("warming failed", artifact=job.artifact, version=job.version,
                                code=getattr(e, "code", "io_error"), error=str(e))
                except Exception as e:  # noqa: BLE001 - a bug, or the codec on bytes it cannot take: this job only
                    log.error("warming failed", artifact=job.artifact, version=job.version,
                              code="internal", error=f"{type(e).__name__}: {e}")
                finally:
                    if self._jobs and self._jobs[0] == job:
                        self._jobs.pop(0)
                    self.pending.set(len(self._jobs))

    def _startup_jobs(self) -> list[Job]:
        """Each channel's version against the one before it (and a staged version against the
        channel's), the `STARTUP_JOBS` most recently moved; one listing and a read per channel."""
        moved = []
        for artifact in self.registry.artifacts():
            for ch in self.registry.channels(artifact):
                at = max((e.get("at", "") for e in ch.history), default="")
                if len(ch.stack) >= 2:
                    moved.append((at, Job(artifact, ch.stack[-1], ch.stack[-2])))
                if ch.staged_version and ch.version and ch.staged_version != ch.version:
                    moved.append(((ch.staged or {}).get("at", at), Job(artifact, ch.staged_version, ch.version)))
        moved.sort(key=lambda aj: aj[0], reverse=True)
        return list(dict.fromkeys(job for _, job in moved))[:STARTUP_JOBS]

    async def warm(self, job: Job) -> tuple[int, int]:
        """Encode `job`'s deltas into the cache; (frames put, their payload bytes)."""
        prepared = await asyncio.to_thread(self._plan, job)
        if prepared is None:
            return 0, 0
        store, plan, ids = prepared
        put = size = 0
        for cid in ids:
            if size >= self.cache.budget // 2:
                break
            k = plan.key(cid)
            if self.cache.get(k) is not None or not self.cache.claim(k):
                continue  # kept already, or a request is encoding it
            frame = None
            try:
                frame, seconds = await asyncio.to_thread(encode_kept, store, cid, plan)
                self.cpu.inc(seconds)
            finally:
                self.cache.release(k, frame)
            if frame is not None:
                put, size = put + 1, size + len(frame[2])
                self.warmed.inc()
        return put, size

    def _base(self, job: Job, target: Manifest) -> str | None:
        """The version the sites hold that will fetch `job`'s (blocking)."""
        if job.base is not None:
            return job.base
        if job.channel is None:
            return target.parent
        ch = self.registry.channel(job.artifact, job.channel)
        if ch.staged_version == job.version:
            return ch.version
        return ch.stack[-2] if len(ch.stack) >= 2 and ch.stack[-1] == job.version else None

    def _plan(self, job: Job) -> tuple[Store, RequestPlan, list[str]] | None:
        """The plan a fetch from a site holding the base would get, and the chunks to warm (blocking);
        None when there is no base (a first version) or it is the version itself."""
        reg = self.registry
        target = reg.manifest(job.artifact, job.version)
        base = self._base(job, target)
        if base is None or base == job.version:
            return None
        held = reg.manifest(job.artifact, base)
        hints = plan_references(target, [held])
        plan = RequestPlan(hints, frozenset(Encoding))
        have = set(held.chunk_ids())
        ids = [cid for cid in dict.fromkeys(target.chunk_ids()) if cid not in have and plan.hint(cid).reference]
        return reg.store, plan, ids


def warming(key: web.AppKey, events: web.AppKey):
    """A cleanup context: the app's `Warmer` (under `key`) runs while the app runs, following
    the app's event log (under `events`)."""
    async def ctx(app: web.Application):
        warmer: Warmer = app[key]
        tasks = [asyncio.create_task(warmer.run())]
        if warmer.enabled:
            tasks.append(asyncio.create_task(warmer.follow(app[events])))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return ctx
