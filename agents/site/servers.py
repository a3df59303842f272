"""Servers as rollout members: the agent itself plays the worker for each `[[servers]]` block.

A vLLM, SGLang or Triton/KServe server cannot register or long-poll; the agent does it for
it. Each configured server becomes a `Worker` of the site's `Rollout` (id = its name, `mode` =
its kind, `server` = its kind, URL, model and last load record), held alive while the agent
runs, and a `ServerMember` task acts on its assignments through the server's adapter
(`agents.serving`):

* a `join`, `canary` or `rollout` assignment: `adapter.load(version, folder, previous)`, the
  folder being the site's `versions/<artifact>/<version>` (each version in its own folder);
* a `revert`: `adapter.restore(previous)`: loaded again when the failed load changed the
  server, else only checked.

Its report goes through `Rollout.report` like any worker's, so the canary, the rejection,
the revert of every member that changed, and newest-activation-wins are the rollout's own
(agents/site/rollout.py). A load in progress is never cut off: a newer assignment waits for
it, then wins. `seconds_to_new_answers` counts from the activation (the rollout's start).
"""

from __future__ import annotations

import asyncio
import time

from fabric.errors import FabricError, ServingError
from fabric.logs import get_logger

from agents.serving import build_adapter
from agents.serving.base import LoadRecord, ServerAdapter, ServerConfig

log = get_logger("servers")


class ServerMember:
    """One configured server, driven as a member of `rollout`."""

    def __init__(self, rollout, cfg: ServerConfig, adapter: ServerAdapter | None = None):
        self.rollout = rollout
        self.cfg = cfg
        self.adapter = adapter or build_adapter(cfg)
        if getattr(self.adapter, "wants_manifests", False):  # the vLLM extension's manifest diff
            self.adapter.manifests = self._manifest
        self.done = 0  # the seq of the last assignment acted on

    @property
    def worker(self):
        return self.rollout.workers.get(self.cfg.name)

    async def register(self) -> None:
        """Join the rollout as a worker serving what the server reports now."""
        from agents.site.rollout import Worker

        try:
            serving = await self.adapter.serving()
        except Exception as e:  # noqa: BLE001 - a server that cannot say joins as serving nothing known
            log.warning("server cannot say what it serves", server=self.cfg.name, error=repr(e))
            serving = None
        w = Worker(self.cfg.name, self.cfg.artifact, owner=None, mode=self.cfg.kind, serving=serving)
        followed = self.rollout.site.channels.get(self.cfg.artifact)
        w.channel = followed.channel if followed else None
        w.polls = 1  # held by this task: never dead while the agent runs
        w.server = {"kind": self.cfg.kind, "url": self.cfg.url, "model": self.cfg.model, "record": None}
        self.rollout.workers[w.id] = w
        self.rollout._join(w)
        log.info("server joined", server=w.id, kind=self.cfg.kind, url=self.cfg.url, serving=serving)

    async def run(self) -> None:
        """Act on each newest assignment, for the agent's life."""
        await self.register()
        try:
            while True:
                w = self.worker
                a = w.assignment if w is not None else None
                if a is None or a.seq <= self.done:
                    if w is not None:
                        w.seen()
                        w.changed.clear()
                        try:
                            await asyncio.wait_for(w.changed.wait(), 1.0)
                        except asyncio.TimeoutError:
                            pass
                    else:
                        await asyncio.sleep(1.0)
                    continue
                self.done = a.seq
                try:
                    await self._act(w, a)
                except Exception as e:  # noqa: BLE001 - the member outlives a bug, and says so
                    log.error("server member failed", server=self.cfg.name, seq=a.seq, error=repr(e))
                    self.rollout.report(w.id, {"seq": a.seq, "version": a.version, "ok": False,
                                               "error": f"server_error: the agent failed: {e!r}", "serving": None})
        finally:
            await self.adapter.close()

    async def _act(self, w, a) -> None:
        layout = self.rollout.site.layout
        version = a.version
        if version is None:
            rec = LoadRecord(None, ok=True, mode="nothing to serve")
        elif a.role == "revert":
            rec = await self._guard(self.adapter.restore((version, layout.version_dir(a.artifact, version))))
        elif version == w.serving:
            rec = LoadRecord(version, ok=True, mode="already serving")
        else:
            previous = None
            if w.serving is not None and layout.version_dir(a.artifact, w.serving).is_dir():
                previous = (w.serving, layout.version_dir(a.artifact, w.serving))
            log.info("server load", server=w.id, version=version, role=a.role, previous=w.serving)
            rec = await self._guard(self.adapter.load(version, layout.version_dir(a.artifact, version), previous))
        if rec.ok and version is not None:
            rec.seconds_to_new_answers = round(time.time() - self._activated(a), 4)
        serving = version if rec.ok else (None if rec.changed else w.serving)
        w.server["record"] = rec.to_json()
        self.rollout.report(w.id, {"seq": a.seq, "version": version, "previous": a.previous, "ok": rec.ok,
                                   "error": rec.error, "serving": serving, "mode": rec.mode,
                                   "pause_ms": rec.pause_ms, "bytes_read": rec.bytes_read,
                                   "seconds": rec.seconds_to_new_answers})

    async def _guard(self, load) -> LoadRecord:
        try:
            return await load
        except FabricError as e:  # an adapter should return a failed record; never let one stop the member
            return LoadRecord(None, ok=False, changed=True).fail(e)
        except Exception as e:  # noqa: BLE001 - a bug in an adapter must not end the task
            log.error("adapter failed", server=self.cfg.name, error=repr(e))
            return LoadRecord(None, ok=False, changed=True).fail(ServingError(f"adapter error: {e!r}"))

    def _manifest(self, version: str):
        """The manifest of `version` of the server's artifact, if the site holds it (blocking)."""
        try:
            return self.rollout.site.registry.manifest(self.cfg.artifact, version)
        except FabricError:
            return None

    def _activated(self, a) -> float:
        ro = self.rollout.rollouts.get(a.artifact)
        return ro.started if ro is not None and ro.version == a.version else a.at


def start_members(rollout, servers: tuple[ServerConfig, ...]) -> list:
    """The coroutines that drive each configured server (started with the agent's tasks)."""
    return [ServerMember(rollout, cfg).run() for cfg in servers]
