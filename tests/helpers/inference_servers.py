"""Small stand-ins for vLLM and SGLang: each documented endpoint the adapters use, with faults.

vLLM and SGLang need a GPU; these aiohttp servers implement the HTTP surface Fabric drives
(docs/serving.md cites the source each follows) so the adapters and the rollout can be tested
against real sockets:

* vLLM (`VLLM_SERVER_DEV_MODE=1`): `POST /pause?mode=`, `POST /resume`, `GET /is_paused`,
  `POST /collective_rpc` {"method", "args", "kwargs", "timeout"} -> {"results": [one per
  worker]}, `GET /health`, `POST /v1/completions` (held while paused, as vLLM holds new
  generation requests). `collective_rpc` runs `reload_weights(weights_path=…)` or, when built
  with `extension=True`, Fabric's `FabricWorkerExtension.fabric_load_changed` for real on a
  small torch module (the way vLLM's executor does: `getattr(worker, method)(**kwargs)`).
* SGLang: `POST /update_weights_from_disk` {"model_path", "weight_version",
  "abort_all_requests", "load_format"} -> 200 {"success": true, "message", "num_paused_requests"}
  or 400 {"success": false, …} keeping the old weights; `GET /model_info` {"weight_version", …}
  (`legacy=True`: no weight_version there, `GET /get_weight_version` instead), `GET /health`,
  `POST /v1/completions` (held while an update runs).

A "model" answers every completion with the text of `answer.txt` in the folder it loaded.
Faults (`server.faults`, a set of names, switchable while it runs):

    pause_hangs     vLLM /pause never answers
    load_hangs      the load call never answers (a timeout)
    load_5xx        the load call answers 500 (vLLM: the worker raised; SGLang: it crashed mid-way)
    update_fails    SGLang answers success false and keeps its old weights
    unreadable      the server cannot read the folder (vLLM 500, SGLang success false)
    wrong_version   SGLang reports another weight_version; vLLM's extension names another folder
    health_5xx      completions answer 500

`down`: `ServerThread.stop()` closes the port (connection refused).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from aiohttp import web

from .ports import free_port

HANG_S = 3600.0  # a hang, unless the test sets `server.hang_s` (then it gives up with a 500 after it)


class InferenceServer:
    def __init__(self, kind: str, *, model: str = "tiny", token: str | None = None, workers: int = 1,
                 extension: bool = False, legacy: bool = False, initial: Path | None = None):
        assert kind in ("vllm", "sglang")
        self.kind, self.model, self.token, self.workers = kind, model, token, workers
        self.extension, self.legacy = extension, legacy
        self.faults: set[str] = set()
        self.hang_s = HANG_S
        self.folder: Path | None = None
        self.answer = "(no weights)"
        self.weight_version = "default"  # SGLang's own default
        self.loads: list[str] = []  # every folder it was asked to load, in order
        self.requests: list[str] = []  # "METHOD /path" of every request
        self.paused_for: list[float] = []  # seconds of each pause (vLLM) or update (SGLang)
        self._resumed = asyncio.Event()
        self._lock: asyncio.Lock | None = None
        self._paused_at: float | None = None
        self.ext_workers = [] if not extension else [_extension_worker() for _ in range(workers)]
        if initial is not None:
            self._take(initial)

    # --- the model -----------------------------------------------------------------

    def _take(self, folder: Path) -> None:
        self.answer = (Path(folder) / "answer.txt").read_text()
        self.folder = Path(folder)

    def _readable(self, folder: str) -> bool:
        return "unreadable" not in self.faults and (Path(folder) / "answer.txt").is_file()

    # --- the app --------------------------------------------------------------------

    def app(self) -> web.Application:
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._lock = asyncio.Lock()
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/health", self._health)
        r.add_post("/v1/completions", self._completions)
        if self.kind == "vllm":
            r.add_post("/pause", self._pause)
            r.add_post("/resume", self._resume)
            r.add_get("/is_paused", self._is_paused)
            r.add_post("/collective_rpc", self._collective_rpc)
        else:
            r.add_post("/update_weights_from_disk", self._update)
            r.add_get("/model_info", self._model_info)
            if self.legacy:
                r.add_get("/get_weight_version", self._get_weight_version)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _is_paused(self, request: web.Request) -> web.Response:
        return web.json_response({"is_paused": not self._resumed.is_set()})

    async def _get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.requests.append(f"{request.method} {request.path}")
        guarded = request.path.startswith("/v1") or self.kind == "sglang"  # vLLM's --api-key guards /v1 only
        if self.token and guarded and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self._resumed.wait()  # vLLM: held while paused
        async with self._lock:  # SGLang: held while an update runs
            pass
        if "health_5xx" in self.faults:
            return web.json_response({"error": {"message": "engine dead"}}, status=500)
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": f"model {body.get('model')!r} does not exist"}},
                                     status=404)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": self.model,
                                  "choices": [{"index": 0, "text": self.answer, "finish_reason": "length"}]})

    # --- vLLM ------------------------------------------------------------------------

    async def _pause(self, request: web.Request) -> web.Response:
        if request.query.get("mode", "abort") not in ("abort", "wait", "keep"):
            return web.json_response({"error": "bad mode"}, status=400)
        if "pause_hangs" in self.faults:
            await asyncio.sleep(self.hang_s)
            return web.Response(status=500, text="gave up")
        self._resumed.clear()
        self._paused_at = time.monotonic()
        return web.json_response({"status": "paused"})

    async def _resume(self, request: web.Request) -> web.Response:
        if self._paused_at is not None:
            self.paused_for.append(time.monotonic() - self._paused_at)
            self._paused_at = None
        self._resumed.set()
        return web.json_response({"status": "resumed"})

    async def _collective_rpc(self, request: web.Request) -> web.Response:
        body = await request.json()
        method, kwargs = body.get("method"), body.get("kwargs", {})
        if method is None:
            return web.json_response({"detail": "Missing 'method' in request body"}, status=400)
        folder = kwargs.get("weights_path") or kwargs.get("folder")
        if folder:
            self.loads.append(folder)
        if "load_hangs" in self.faults:
            await asyncio.sleep(self.hang_s)
            return web.Response(status=500, text="gave up")
        if "load_5xx" in self.faults:
            return web.Response(status=500, text="Internal Server Error")
        if folder and not self._readable(folder):
            return web.Response(status=500, text=f"FileNotFoundError: cannot read {folder}")
        if method == "reload_weights":
            self._take(Path(folder))
            return web.json_response({"results": [None] * self.workers})
        if not self.ext_workers or not hasattr(self.ext_workers[0], method):
            return web.Response(status=500, text=f"AttributeError: 'Worker' object has no attribute '{method}'")
        results = [await asyncio.to_thread(getattr(w, method), **kwargs) for w in self.ext_workers]
        if "wrong_version" in self.faults:
            results = [dict(r, folder=str(self.folder)) for r in results]
        else:
            self._take(Path(folder))
        return web.json_response({"results": results})

    # --- SGLang ------------------------------------------------------------------------

    async def _update(self, request: web.Request) -> web.Response:
        body = await request.json()
        folder = body.get("model_path")
        self.loads.append(folder)
        async with self._lock:
            t0 = time.monotonic()
            try:
                if "load_hangs" in self.faults:
                    await asyncio.sleep(self.hang_s)
                    return web.Response(status=500, text="gave up")
                if "load_5xx" in self.faults:
                    return web.Response(status=500, text="Internal Server Error")
                if "update_fails" in self.faults or not self._readable(folder):
                    return web.json_response({"success": False, "num_paused_requests": 0, "message":
                                              f"Failed to get weights iterator: {folder}. "
                                              "Rolled back to the latest model weights."}, status=400)
                self._take(Path(folder))
                wanted = body.get("weight_version")
                self.weight_version = "stale" if "wrong_version" in self.faults else (wanted or self.weight_version)
                await asyncio.sleep(0.02)
                return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                          "num_paused_requests": 0})
            finally:
                self.paused_for.append(time.monotonic() - t0)

    async def _model_info(self, request: web.Request) -> web.Response:
        info = {"model_path": str(self.folder), "tokenizer_path": str(self.folder), "is_generation": True}
        if not self.legacy:
            info["weight_version"] = self.weight_version
        return web.json_response(info)


def _extension_worker():
    """A stand-in vLLM worker with Fabric's extension mixed in, as --worker-extension-cls does."""
    from agents.serving.vllm_extension import FabricWorkerExtension

    from .tiny_vllm_model import TinyModel

    class Worker(FabricWorkerExtension):
        def __init__(self):
            self.model_runner = type("Runner", (), {})()
            self.model_runner.model = TinyModel()

    return Worker()


class ServerThread:
    """An `InferenceServer` on 127.0.0.1, served from its own event loop in a daemon thread."""

    def __init__(self, server: InferenceServer, port: int | None = None):
        self.server = server
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"{self.server.kind}-{self.port}")
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"
        return self

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def up():
            self._runner = web.AppRunner(self.server.app())
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._loop.run_until_complete(up())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """Close the port (a later request is refused) and end the thread."""
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            fut.result(10)
        except Exception:  # noqa: BLE001 - a handler still hanging is cancelled with the loop
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
