"""The SGLang adapter: `POST /update_weights_from_disk`, then the weight version, then the golden request.

One load is (docs/serving.md "SGLang")

    POST /update_weights_from_disk   {"model_path": FOLDER, "weight_version": VERSION,
                                      "abort_all_requests": false[, "load_format": …]}
                                     -> 200 {"success": true, "message": …, "num_paused_requests": n}
                                     -> 400 {"success": false, "message": …}: SGLang kept its old weights
    GET  /model_info                 -> {"weight_version": VERSION, …}  (older servers: GET /get_weight_version)
    POST /v1/completions             the golden request

SGLang holds new requests while it updates (and, with `abort_all_requests: false`, lets the
running ones finish first), so the pause is the update call's duration. A refused update leaves
the old weights serving: nothing to undo. A timeout, a 5xx or a wrong version may have changed
them: the previous version is loaded again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fabric.errors import ConfigError, FabricError, ServerRefused, ServerWrongVersion, ServingError

from agents.serving.base import LoadRecord, ServerConfig
from agents.serving.http import HttpAdapter, folder_bytes, log


class SglangAdapter(HttpAdapter):
    kind = "sglang"

    def __init__(self, cfg: ServerConfig):
        super().__init__(cfg)
        where = f"site.toml: servers {cfg.name}: options"
        unknown = set(cfg.extras) - {"load_format"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: load_format)")
        fmt = cfg.extras.get("load_format")
        if fmt is not None and (not isinstance(fmt, str) or not fmt):
            raise ConfigError(f"{where}: load_format: must be a non-empty string (auto, safetensors, …)")

    async def serving(self) -> str | None:
        try:
            return await self._weight_version()
        except FabricError:
            return None

    async def _weight_version(self) -> str | None:
        timeout = self.config.timeouts.health_s
        try:
            _, body = await self.client.call("GET", "/model_info", timeout=timeout)
        except ServerRefused:  # a server older than /model_info's weight_version
            body = {}
        if not isinstance(body, dict) or "weight_version" not in body:
            _, body = await self.client.call("GET", "/get_weight_version", timeout=timeout)
        v = body.get("weight_version") if isinstance(body, dict) else None
        return v if isinstance(v, str) else None

    async def load(self, version: str, folder: Path, previous: tuple[str, Path] | None) -> LoadRecord:
        rec = LoadRecord(version, ok=False, mode="update_weights_from_disk")
        self.last = rec
        body = {"model_path": str(folder), "weight_version": version, "abort_all_requests": False}
        if self.config.extras.get("load_format"):
            body["load_format"] = str(self.config.extras["load_format"])
        t0 = time.monotonic()
        try:
            try:
                _, answer = await self.client.call("POST", "/update_weights_from_disk", json=body,
                                                   timeout=self.config.timeouts.load_s)
            except ServerRefused:
                raise  # SGLang restored its old weights itself
            except FabricError:
                rec.changed = True  # timed out or failed half-way: what it holds is unknown
                raise
            finally:
                rec.pause_ms = round((time.monotonic() - t0) * 1000, 1)
            if not isinstance(answer, dict) or answer.get("success") is not True:
                raise ServerRefused(f"server {self.name}: update_weights_from_disk answered "
                                    f"{str(answer)[:300]!r}")
            rec.changed = True
            rec.bytes_read = await asyncio.to_thread(folder_bytes, folder)
            reported = await self._weight_version()
            if reported != version:
                raise ServerWrongVersion(f"server {self.name}: asked to load {version}, it reports "
                                         f"weight_version {reported!r}")
            await self.check(version)
        except FabricError as e:
            log.warning("sglang load failed", server=self.name, version=version, error=e.message)
            return rec.fail(e)
        except (ValueError, TypeError) as e:  # a body of the wrong shape
            return rec.fail(ServingError(f"server {self.name}: {e}"))
        rec.ok, self.loaded = True, version
        return rec
