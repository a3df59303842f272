"""The vLLM adapter: its dev-mode endpoints (`VLLM_SERVER_DEV_MODE=1`, docs/serving.md "vLLM").

One load is

    POST /pause?mode=wait                    drain in-flight requests, hold new ones
    POST /collective_rpc                     {"method": "reload_weights", "kwargs": {"weights_path": FOLDER}}
                                             or, with options.extension = true, Fabric's worker extension:
                                             {"method": "fabric_load_changed", "kwargs": {"folder": FOLDER,
                                              "previous": PREVIOUS_FOLDER}}  (agents.serving.vllm_extension)
    POST /resume                             always, once a pause was sent (even one that timed out)
    POST /v1/completions                     the golden request, on the new weights

The health request runs after /resume: a paused vLLM holds every generation request until it
resumes, so a golden request sent while paused would wait for the resume it precedes. A version
that fails it has served the requests of that window; the rollout then rejects it and this
server loads the previous version again (`restore`). vLLM keeps no version name of its own:
`serving()` is what this adapter last loaded, and with the extension every worker's answer names
the folder it loaded, checked against the one asked for.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Callable

from fabric.core.manifest import Manifest, diff

from fabric.errors import ConfigError, FabricError, ServingError, ServerWrongVersion

from agents.serving.base import LoadRecord, ServerConfig
from agents.serving.http import HttpAdapter, folder_bytes, log

EXTENSION_METHOD = "fabric_load_changed"  # agents.serving.vllm_extension.FabricWorkerExtension
PAUSE_MODES = ("wait", "keep", "abort")


class VllmAdapter(HttpAdapter):
    kind = "vllm"
    wants_manifests = True  # agents.site.servers sets `manifests`: version -> Manifest, for the diff

    def __init__(self, cfg: ServerConfig):
        super().__init__(cfg)
        self.manifests: Callable[[str], Manifest | None] | None = None
        where = f"site.toml: servers {cfg.name}: options"
        unknown = set(cfg.extras) - {"extension", "pause_mode"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: extension, pause_mode)")
        self.extension = cfg.extras.get("extension", False)
        if not isinstance(self.extension, bool):
            raise ConfigError(f"{where}: extension: must be true or false")
        self.pause_mode = cfg.extras.get("pause_mode", "wait")
        if self.pause_mode not in PAUSE_MODES:
            raise ConfigError(f"{where}: pause_mode: must be one of {', '.join(PAUSE_MODES)}, got {self.pause_mode!r}")

    async def serving(self) -> str | None:
        return self.loaded

    async def load(self, version: str, folder: Path, previous: tuple[str, Path] | None) -> LoadRecord:
        changed = await self._changed(version, previous) if self.extension and previous else None
        use_extension = self.extension and previous is not None and changed != "whole"
        rec = LoadRecord(version, ok=False, mode="changed_tensors" if use_extension else "reload_weights")
        self.last = rec
        t = self.config.timeouts
        paused_at = None
        try:
            try:
                paused_at = time.monotonic()
                await self.client.call("POST", "/pause", params={"mode": self.pause_mode}, timeout=t.pause_s)
                rec.changed = True  # from here on the weights may differ from what it served
                if use_extension:
                    rec.bytes_read = await self._load_changed(version, folder, previous[1], changed)
                else:
                    await self.client.call("POST", "/collective_rpc", timeout=t.load_s, json={
                        "method": "reload_weights", "kwargs": {"weights_path": str(folder)}, "timeout": t.load_s})
                    rec.bytes_read = await asyncio.to_thread(folder_bytes, folder)
            finally:
                if paused_at is not None:
                    await self._resume(rec)
                    rec.pause_ms = round((time.monotonic() - paused_at) * 1000, 1)
            await self.check(version)
        except FabricError as e:
            log.warning("vllm load failed", server=self.name, version=version, error=e.message)
            return rec.fail(e)
        rec.ok, self.loaded = True, version
        return rec

    async def _resume(self, rec: LoadRecord) -> None:
        try:
            await self.client.call("POST", "/resume", timeout=self.config.timeouts.pause_s)
        except FabricError as e:
            if rec.error is None:
                raise
            log.warning("vllm resume failed", server=self.name, error=e.message)

    async def _changed(self, version: str, previous: tuple[str, Path]) -> str | None:
        """The manifest diff as the extension's `changed` argument (a JSON string of `file:tensor`),
        "whole" when only a whole reload fits (a tensor removed), None without manifests."""
        if self.manifests is None:
            return None
        old, new = await asyncio.gather(asyncio.to_thread(self.manifests, previous[0]),
                                        asyncio.to_thread(self.manifests, version))
        if old is None or new is None:
            return None
        d = diff(old, new)
        return "whole" if d.tensors_removed else json.dumps(list(d.tensors_changed))

    async def _load_changed(self, version: str, folder: Path, previous: Path, changed: str | None) -> int:
        t = self.config.timeouts
        kwargs = {"folder": str(folder), "previous": str(previous)}
        if changed is not None:
            kwargs["changed"] = changed
        _, body = await self.client.call("POST", "/collective_rpc", timeout=t.load_s, json={
            "method": EXTENSION_METHOD, "kwargs": kwargs, "timeout": t.load_s})
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise ServingError(f"server {self.name}: {EXTENSION_METHOD} answered {str(body)[:200]!r}, not one "
                               "result per worker (is --worker-extension-cls "
                               "agents.serving.vllm_extension.FabricWorkerExtension set?)")
        for r in results:
            if r.get("folder") != str(folder):
                raise ServerWrongVersion(f"server {self.name}: a worker loaded {r.get('folder')!r}, not {folder}")
        return sum(int(r.get("bytes_read") or 0) for r in results)
