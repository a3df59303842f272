"""The reference worker: a small torch model served over HTTP, hot-swapped under load.

    fabric worker demo --agent http://127.0.0.1:7070 --artifact demo-mlp --channel prod --listen 127.0.0.1:8100
    fabric worker demo --make-weights v1/ --seed 1                  # a version to publish
    fabric worker demo --make-weights v2/ --seed 2 --base v1/ --change 0.25

The model (`DemoModel`) is a 4-layer MLP, 256 -> 512 -> 512 -> 512 -> 64, float32,
about 3.3 MB. The worker registers with the site agent through `agents.worker.hotloader.HotLoader`,
starts serving once its first version has loaded, and keeps serving across swaps:

    POST /infer    {"input": [[...256 floats], ...]} or an empty body (a fixed input)
                   -> {"output": [[...64 floats], ...], "version": "v2", "worker": "w1"}
    GET  /status   -> {"worker", "version", "mode", "requests", "failed", "loads": [...]}
    GET  /livez

Its health check is a golden input (the fixed one): the output must be finite, so a
version with NaN weights (`--make-weights DIR --nan`) fails its canary.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch
from aiohttp import web
from safetensors.torch import load_file, save_file

from agents.worker.hotloader import HotLoader

from fabric.logs import get_logger
from fabric.wire.server import run_until_signalled

log = get_logger("worker-demo")
DIMS = (256, 512, 512, 512, 64)
INPUT_SEED = 7
LOADER = web.AppKey("loader", HotLoader)
COUNTS = web.AppKey("counts", dict)


class DemoModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(DIMS, DIMS[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


def fixed_input(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, DIMS[0], generator=torch.Generator().manual_seed(INPUT_SEED))


def model_from(folder: str | Path) -> DemoModel:
    """A DemoModel holding the weights of a version folder (tests compare against it)."""
    m = DemoModel()
    m.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return m.eval()


def make_weights(dest: str | Path, seed: int, *, base: str | Path | None = None, change: float = 1.0,
                 nan: bool = False) -> Path:
    """Write a version of DemoModel's weights (`model.safetensors`) into `dest`.

    Without `base`, every tensor comes from `seed`. With `base`, the first
    `ceil(change * tensors)` tensors (in name order) get new values from `seed` and
    the rest keep the base's bytes, as after a partial fine-tune. `nan` poisons one
    tensor, so the version fails the golden-input health check.
    """
    gen = torch.Generator().manual_seed(seed)
    fresh = {k: (torch.randn(v.shape, generator=gen) * 0.05).contiguous()
             for k, v in DemoModel().state_dict().items()}
    if base is not None:
        tensors = load_file(str(Path(base) / "model.safetensors"))
        names = sorted(tensors)
        for name in names[:max(1, round(change * len(names)))]:
            tensors[name] = fresh[name]
    else:
        tensors = fresh
    if nan:
        tensors["layers.3.bias"] = torch.full_like(tensors["layers.3.bias"], float("nan"))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"model": "fabric-demo-mlp", "seed": str(seed)})
    (dest / "config.json").write_text(json.dumps({"dims": DIMS, "seed": seed}) + "\n")
    return dest


# --- the HTTP worker ---------------------------------------------------------------------

def create_app(loader: HotLoader) -> web.Application:
    app = web.Application()
    app[LOADER], app[COUNTS] = loader, {"requests": 0, "failed": 0}
    app.router.add_post("/infer", _infer)
    app.router.add_get("/status", _status)
    app.router.add_get("/livez", _livez)
    return app


def _run(loader: HotLoader, x: torch.Tensor) -> tuple[list, str | None]:
    with torch.inference_mode(), loader.serving() as live:
        if live.version is None:
            return [], None
        return live.module(x).tolist(), live.version


async def _infer(request: web.Request) -> web.Response:
    counts, loader = request.app[COUNTS], request.app[LOADER]
    counts["requests"] += 1
    raw = await request.read()
    try:
        x = torch.tensor(json.loads(raw)["input"], dtype=torch.float32) if raw.strip() else fixed_input()
        if x.dim() != 2 or x.shape[1] != DIMS[0]:
            raise ValueError(f"input must be [batch, {DIMS[0]}]")
    except (ValueError, KeyError, TypeError) as e:
        counts["failed"] += 1
        return web.json_response({"code": "invalid_input", "message": str(e)}, status=422)
    output, version = await asyncio.to_thread(_run, loader, x)
    if version is None:
        counts["failed"] += 1
        return web.json_response({"code": "not_ready", "message": "no version loaded yet"}, status=503)
    return web.json_response({"output": output, "version": version, "worker": loader.worker_id})


async def _livez(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _status(request: web.Request) -> web.Response:
    loader = request.app[LOADER]
    return web.json_response({"worker": loader.worker_id, "version": loader.version, "mode": loader.live.mode,
                              "registered": loader.registered, **request.app[COUNTS], "loads": loader.reports})


def run_worker(*, agent: str, artifact: str, channel: str | None, listen: str, mode: str = "in-place",
               token: str | None = None, worker_id: str | None = None, poll_s: float = 15.0,
               slow_load: float = 0.0, health_timeout: float = 10.0) -> None:
    """Serve DemoModel on `listen`, hot-loading what the agent assigns, until SIGTERM."""
    from fabric import logs, tracing
    logs.bind("worker")
    tracing.setup("fabric-worker")
    torch.manual_seed(0)
    loads = {"n": 0}

    def before_load(version: str) -> None:  # --slow-load: every swap after the first load
        loads["n"] += 1
        if slow_load and loads["n"] > 1:
            log.info("slow load (demo knob)", version=version, sleep_s=slow_load)
            time.sleep(slow_load)

    loader = HotLoader(agent, artifact, channel, DemoModel().eval(), mode=mode, token=token, worker_id=worker_id,
                       poll_s=poll_s, golden_input=fixed_input(), health_timeout=health_timeout,
                       before_load=before_load)

    async def main() -> None:
        loader.start()
        try:
            await run_until_signalled(create_app(loader), listen, None, f"worker {loader.worker_id}")
        finally:
            await asyncio.to_thread(loader.stop)
    asyncio.run(main())
