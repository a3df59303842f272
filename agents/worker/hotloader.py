"""The hot-loader: keep a torch module serving the version its site agent assigns.

An inference process imports this module (with `agents.worker.live`, the only ones of
Fabric's that import torch) and wraps its model:

    loader = HotLoader("http://127.0.0.1:7070", "llama-8b", "prod", model,
                       mode="double-buffered", golden_input=x0).start()
    ...
    with loader.serving() as live:      # in the request path
        y = live.module(x)              # live.version names the weights that computed y

`agents.worker.live.LiveModule` owns the weights and loads only the tensors that changed
(in place or double-buffered; pinned, pipelined copies on CUDA). `HotLoader` connects
it to the site agent (agents/site/rollout.py is the other side; docs/hotload.md the protocol): it registers, long-polls
for assignments (the poll is its heartbeat and continues while a load runs), loads
the newest one, and reports how it went.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Callable
from urllib.parse import quote, urlencode

import torch

from fabric import tracing
from fabric.wire.client import OriginClient
from fabric.errors import FabricError, InvalidInput, NotFound
from fabric.logs import get_logger
from fabric.core.manifest import Manifest

from agents.worker.live import (DTYPES, MODES, HealthCheck, HealthCheckFailed, LiveModule, LoadReport, Served,
                   TensorMismatch, RWLock, verify_tensors)
from fabric.wire.protocol import MANIFESTS, WORKERS

__all__ = ["HotLoader", "LiveModule", "LoadReport", "Served", "HealthCheck", "HealthCheckFailed",
           "TensorMismatch", "verify_tensors", "DTYPES", "MODES", "RWLock"]
log = get_logger("worker")


# --- the agent connection ---------------------------------------------------------------------

class HotLoader:
    """Serve the version the site agent assigns: register, long-poll, load, report.

    Args:
        agent_url: the local site agent, e.g. "http://127.0.0.1:7070".
        artifact, channel: what this worker serves (the agent checks it follows them;
            channel None: whichever it follows).
        module: the model; see `LiveModule` for mode, health_check, golden_input,
            golden_output, tolerance, health_timeout, version, verify and strict.
        token: bearer token for the agent (`pull` scope).
        worker_id: stable name in the agent's status (default host-pid).
        poll_s: long-poll wait; the agent counts the worker dead after 2*poll_s+1 s of silence.
        before_load: called with the version about to load, in the loading thread,
            before any file is read (demos use it to slow a load down).
    """

    def __init__(self, agent_url: str, artifact: str, channel: str | None, module: torch.nn.Module, *,
                 mode: str = "in-place", token: str | None = None, worker_id: str | None = None,
                 poll_s: float = 15.0, before_load: Callable[[str], None] | None = None, **live_options):
        self.agent_url, self.artifact, self.channel = agent_url.rstrip("/"), artifact, channel
        self.live = LiveModule(module, mode=mode, **live_options)
        if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or not 0 < poll_s < 3600:
            raise InvalidInput(f"poll_s must be a number of seconds in (0, 3600), got {poll_s!r}")  # NaN too
        self.token, self.poll_s, self.before_load = token, float(poll_s), before_load
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.reports: list[dict] = []  # every load's report, oldest first
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._changed = threading.Condition()
        self._pending: dict | None = None  # the newest assignment seen
        self._after = 0
        self.registered = False

    # --- the request side ----------------------------------------------------------------

    def serving(self):
        """`with loader.serving() as live: y = live.module(x)` (see LiveModule.serving)."""
        return self.live.serving()

    @property
    def version(self) -> str | None:
        return self.live.version

    def wait_for(self, version: str, timeout: float = 30.0) -> bool:
        """Block until `version` serves (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.live.version != version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "HotLoader":
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="fabric-hotload",
                                        daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "HotLoader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop, self._stopping, self._wake = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        self._started.set()
        client = OriginClient(self.agent_url, self.token, connections=4)
        tasks = [asyncio.create_task(self._poll_loop(client)), asyncio.create_task(self._load_loop(client))]
        try:
            await self._stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.registered:
                try:
                    await asyncio.wait_for(client.call("DELETE", f"{WORKERS}/{quote(self.worker_id)}"), 3)
                except (FabricError, asyncio.TimeoutError):
                    pass
            await client.close()

    async def _poll_loop(self, client: OriginClient) -> None:
        backoff = 0.2
        while True:
            try:
                if not self.registered:
                    await client.call("POST", WORKERS, {
                        "worker": self.worker_id, "artifact": self.artifact, "channel": self.channel,
                        "serving": self.live.version, "mode": self.live.mode, "poll_s": self.poll_s})
                    self.registered, self._after = True, 0
                    log.info("registered with the agent", agent=self.agent_url, worker=self.worker_id,
                             artifact=self.artifact, serving=self.live.version)
                query = {"after": self._after, "wait": self.poll_s}
                if self.live.version:
                    query["serving"] = self.live.version
                body = await client.call("GET", f"{WORKERS}/{quote(self.worker_id)}/assignment?{urlencode(query)}")
                a = body.get("assignment")
                if a:
                    self._after, self._pending = a["seq"], a
                    self._wake.set()
                backoff = 0.2
            except NotFound:
                if not self.registered:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                self.registered = False  # the agent restarted or forgot us: register again
            except FabricError as e:
                log.warning("agent unreachable", agent=self.agent_url, error=e.message, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _load_loop(self, client: OriginClient) -> None:
        handled = None
        while True:
            await self._wake.wait()
            self._wake.clear()
            a = self._pending
            if a is None or a is handled:
                continue
            handled = a
            await self._ensure_base_manifest(client)
            with tracing.span("worker.load", parent=a.get("traceparent"), worker=self.worker_id,
                              artifact=self.artifact, version=a.get("version")):  # a child of the deploy
                rep = await asyncio.to_thread(self._apply, a)
            body = dict(rep, seq=a["seq"], serving=self.live.version)
            self.reports.append(body)
            with self._changed:
                self._changed.notify_all()
            await self._report(client, body)
            if self._pending is not a:
                self._wake.set()

    async def _ensure_base_manifest(self, client: OriginClient) -> None:
        v = self.live.version
        if v is None or self.live.manifest is not None:
            return
        try:
            raw = await client.call("GET", f"{MANIFESTS}/{quote(self.artifact)}/{quote(v)}")
            self.live.set_manifest(Manifest.from_json(raw))
        except FabricError as e:
            log.warning("no manifest for the serving version; the next load reads every tensor",
                        version=v, error=e.message)

    def _apply(self, a: dict) -> dict:
        """Load one assignment (in a thread); never raises: the report says what happened."""
        version = a.get("version")
        current = self.live.version
        if version is None or version == current:
            return LoadReport(current, current, self.live.mode).to_json()
        t0 = time.perf_counter()
        try:
            if self.before_load is not None:
                self.before_load(version)
            manifest = Manifest.from_json(a.get("manifest"))
            if (manifest.artifact, manifest.version) != (self.artifact, version):
                raise InvalidInput(f"assignment names {self.artifact}@{version}, its manifest "
                                   f"{manifest.artifact}@{manifest.version}")
            rep = self.live.load(a["path"], manifest)
            log.info("version loaded", worker=self.worker_id, **rep.to_json())
            return rep.to_json()
        except HealthCheckFailed as e:
            rep = e.report or LoadReport(version, current, self.live.mode, ok=False)
            rep.ok, rep.error = False, f"{e.code}: {e.message}"
        except FabricError as e:
            rep = LoadReport(version, current, self.live.mode, ok=False, error=f"{e.code}: {e.message}")
        except Exception as e:  # noqa: BLE001 - a worker must survive a bad load and say so
            rep = LoadReport(version, current, self.live.mode, ok=False, error=f"internal: {e!r}")
        rep.seconds = time.perf_counter() - t0
        log.error("load failed; the previous weights keep serving", version=version, serving=current,
                  error=rep.error)
        return rep.to_json()

    async def _report(self, client: OriginClient, body: dict) -> None:
        for attempt in range(5):
            try:
                await client.call("POST", f"{WORKERS}/{quote(self.worker_id)}/report", body)
                return
            except NotFound:
                return  # forgotten: registering again tells the agent what we serve
            except FabricError as e:
                log.warning("report failed", error=e.message, attempt=attempt + 1)
                await asyncio.sleep(0.2 * 2 ** attempt)
