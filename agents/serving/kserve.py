"""The v2 model repository adapter: Triton and KServe, with explicit model control.

One load is (docs/serving.md "Triton and KServe")

    lay out   <repository>/<model>/<n>/ -> the site's version folder   (agents/serving/v2_repository.py)
    POST /v2/repository/models/<model>/load          -> 200: the server took it (a refusal: it kept the old)
    GET  /v2/models/<model>/versions/<n>/ready       (Triton)   -> 200
    GET  /v2/models/<model>/ready                    (KServe)   -> 200 {"ready": true}
    POST /v2/models/<model>/infer                    the golden request: `model_version` must be the
                                                     version asked (Triton's <n>, mapped back), and the
                                                     answer (`outputs.0.data` unless `field` says) must
                                                     match `expect` within `tolerance`

Both servers swap the model only once the new one is loaded, and keep the old one when
a reload fails, so requests never pause; the adapter measures it anyway: while a load
is in flight a probe sends the golden request every `probe_interval` seconds, and the
record's `pause_ms` is the longest gap between two answers, `seconds_to_new_answers`
the time until the first answer from the new version. A restore lays the previous
version out again (or keeps its folder, still there), removes every other, and loads.

`[servers.options]`: `repository` (required: the folder the server was started with,
on a filesystem the agent shares), `template` (a folder whose entries are linked into
every version folder, such as a Triton python backend's `model.py`), `probe_interval`.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from fabric.errors import ConfigError, FabricError, HealthCheckFailed, ServerRefused, ServerWrongVersion, ServingError

from agents.serving import v2_repository
from agents.serving.base import LoadRecord, ServerConfig
from agents.serving.http import HttpAdapter, folder_bytes, log

_OPTIONS = {"repository", "template", "probe_interval"}
_POLICY = re.compile(r"version_policy\s*:?\s*\{\s*(all|specific|latest\s*:?\s*\{\s*num_versions\s*:\s*(\d+))")


class KserveAdapter(HttpAdapter):
    health_field = "outputs.0.data"

    def __init__(self, cfg: ServerConfig):
        super().__init__(cfg)
        self.kind = cfg.kind
        where = f"site.toml: servers {cfg.name}: options"
        unknown = set(cfg.extras) - _OPTIONS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_OPTIONS)})")
        if not isinstance(cfg.extras.get("repository"), str) or not cfg.extras["repository"]:
            raise ConfigError(f"{where}: repository: required, the model repository folder the server serves")
        self.model_dir = Path(cfg.extras["repository"]) / cfg.model
        template = cfg.extras.get("template")
        self.template = Path(template) if isinstance(template, str) and template else None
        interval = cfg.extras.get("probe_interval", 0.02)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.001 <= interval <= 10:
            raise ConfigError(f"{where}: probe_interval: a number of seconds in [0.001, 10], got {interval!r}")
        self.probe_interval = float(interval)
        self.health_path = f"/v2/models/{cfg.model}/infer"

    def health_request(self) -> dict:
        return dict(self.config.health.request) if self.config.health else {}

    # --- the protocol -----------------------------------------------------------------

    async def load(self, version: str, folder: Path, previous: tuple[str, Path] | None) -> LoadRecord:
        rec = LoadRecord(version, ok=False, mode="repository_load")
        self.last = rec
        try:
            await asyncio.to_thread(self._check_policy)
            n = await self._repo(v2_repository.lay_out, self.model_dir, version, folder, self.template)
            rec.bytes_read = await asyncio.to_thread(folder_bytes, folder)
            await self._load_measured(rec, version, n)
        except FabricError as e:
            log.warning("v2 load failed", server=self.name, version=version, error=e.message)
            if previous is None:
                await self._forget(version, rec.changed)
            return rec.fail(e)
        rec.ok, self.loaded = True, version
        try:
            keep = {n}
            if previous is not None:
                p = await self._repo(v2_repository.find, self.model_dir, *previous)
                keep |= {p} if p is not None else set()
            await self._repo(v2_repository.keep_only, self.model_dir, keep)
        except FabricError as e:  # it serves the new version; old folders stay until the next load
            log.warning("v2 layout not pruned", server=self.name, version=version, error=e.message)
        return rec

    async def restore(self, previous: tuple[str, Path]) -> LoadRecord:
        """Lay `previous` out again (its folder, if still there), drop every other, and load it."""
        version, folder = previous
        rec = LoadRecord(version, ok=False, mode="repository_load")
        try:
            n = await self._repo(v2_repository.find, self.model_dir, version, folder)
            if n is None:
                n = await self._repo(v2_repository.lay_out, self.model_dir, version, folder, self.template)
                rec.bytes_read = await asyncio.to_thread(folder_bytes, folder)
            await self._repo(v2_repository.keep_only, self.model_dir, {n})
            await self._load_measured(rec, version, n)
        except FabricError as e:
            log.warning("v2 restore failed", server=self.name, version=version, error=e.message)
            return rec.fail(e)
        rec.ok, self.loaded = True, version
        return rec

    async def check(self, version: str) -> None:
        """The golden v2 infer request: answered by `version`, and matching `expect` when recorded."""
        h = self.config.health
        if h is None:
            await self._ready(None, self.config.timeouts.health_s)
            return
        try:
            body = await self._infer(self.config.timeouts.health_s)
        except FabricError as e:
            raise HealthCheckFailed(f"server {self.name}: the health request on {version} failed: "
                                    f"{e.code}: {e.message}") from None
        reported = await self._reported(body)
        if reported is not None and reported != version:
            raise ServerWrongVersion(f"server {self.name}: asked to serve {version}, its answer says "
                                     f"model_version {body.get('model_version')!r} ({reported})")
        self._compare(body, version)

    async def serving(self) -> str | None:
        """The version the golden answer names (or, without a health request, Triton's newest ready version)."""
        try:
            if self.config.health is not None:
                return await self._reported(await self._infer(self.config.timeouts.health_s))
            _, meta = await self.client.call("GET", f"/v2/models/{self.config.model}",
                                             timeout=self.config.timeouts.health_s)
            versions = [v for v in (meta.get("versions") or []) if str(v).isdigit()] if isinstance(meta, dict) else []
            return await self._name(str(max(versions, key=int))) if versions else None
        except (FabricError, ValueError, TypeError):
            return None

    # --- the steps ----------------------------------------------------------------------

    async def _repo(self, fn, *args):
        """A repository layout step, in a thread; a folder it cannot read or write is a refusal."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (OSError, ValueError) as e:
            what = getattr(e, "filename", None) or self.model_dir
            raise ServerRefused(f"server {self.name}: the v2 repository layout failed at {what}: "
                                f"{getattr(e, 'strerror', None) or e}") from None

    async def _load_measured(self, rec: LoadRecord, version: str, n: int) -> None:
        """POST the load with the probe running, wait until ready, run the golden request."""
        probe = _Probe(self, version)
        task = asyncio.create_task(probe.run())
        try:
            try:
                await self.client.call("POST", f"/v2/repository/models/{self.config.model}/load", json={},
                                       timeout=self.config.timeouts.load_s)
            except ServerRefused:
                raise  # both servers keep the model they had when a load fails
            except ServingError as e:
                if type(e) is not ServingError:  # a timeout or a lost connection: what it holds is unknown
                    rec.changed = True
                raise
            rec.changed = True
            await self._ready(n, self.config.timeouts.load_s)
            await self.check(version)
            if probe.first_new is None:
                probe.first_new = time.monotonic()  # the golden request just answered from it
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            rec.pause_ms = probe.pause_ms()
            if probe.first_new is not None:
                rec.seconds_to_new_answers = round(probe.first_new - probe.t0, 4)

    async def _ready(self, n: int | None, timeout: float) -> None:
        path = (f"/v2/models/{self.config.model}/versions/{n}/ready" if self.kind == "triton" and n is not None
                else f"/v2/models/{self.config.model}/ready")
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.client.call("GET", path, timeout=max(0.01, deadline - time.monotonic()))
                return
            except (ServerRefused, ServingError) as e:
                if type(e) not in (ServerRefused, ServingError) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    async def _infer(self, timeout: float) -> dict:
        _, body = await self.client.call("POST", self.health_path, json=self.health_request(), timeout=timeout)
        if not isinstance(body, dict):
            raise ServingError(f"server {self.name}: the v2 infer answer is not a JSON object: {str(body)[:200]!r}")
        return body

    async def _reported(self, body: dict) -> str | None:
        v = body.get("model_version")
        return await self._name(str(v)) if v not in (None, "") else None

    async def _name(self, reported: str) -> str:
        """A `model_version` as a Fabric version: Triton's numbers map through the repository index."""
        if not reported.isdigit():
            return reported
        try:
            index = await asyncio.to_thread(v2_repository.read_index, self.model_dir)
        except (OSError, ValueError):
            return reported  # no index to read: the number is all it says
        return index.versions.get(int(reported), reported)

    def _check_policy(self) -> None:
        try:
            text = (self.model_dir / "config.pbtxt").read_text()
        except FileNotFoundError:
            return
        except OSError as e:
            raise ServerRefused(f"server {self.name}: cannot read {self.model_dir / 'config.pbtxt'}: {e}") from None
        m = _POLICY.search(re.sub(r"#[^\n]*", "", text))
        if m and (m.group(2) is None or int(m.group(2)) != 1):
            raise ServerRefused(f"server {self.name}: {self.model_dir / 'config.pbtxt'} has a version_policy other "
                                f"than latest {{ num_versions: 1 }}: the agent serves one version at a time")

    async def _forget(self, version: str, changed: bool) -> None:
        """A first load failed: nothing to go back to, so the bad version must not stay laid out (or loaded)."""
        try:
            await self._repo(v2_repository.keep_only, self.model_dir, set())
        except FabricError as e:
            log.warning("v2 layout not removed", server=self.name, version=version, error=e.message)
        if changed:
            try:
                await self.client.call("POST", f"/v2/repository/models/{self.config.model}/unload", json={},
                                       timeout=self.config.timeouts.load_s)
            except FabricError as e:
                log.warning("v2 unload failed", server=self.name, version=version, error=e.message)


class _Probe:
    """The golden request (or the ready route) in a loop while a load runs: gaps and the first new answer."""

    def __init__(self, adapter: KserveAdapter, version: str):
        self.adapter, self.version = adapter, version
        self.t0 = time.monotonic()
        self.answers: list[float] = []
        self.first_new: float | None = None

    async def run(self) -> None:
        a = self.adapter
        while True:
            try:
                if a.config.health is not None:
                    body: Any = await a._infer(a.config.timeouts.health_s)
                    if self.first_new is None and await a._reported(body) == self.version:
                        self.first_new = time.monotonic()
                else:
                    await a._ready(None, 0.01)
                self.answers.append(time.monotonic())
            except FabricError:
                pass  # a model not loaded yet, or between versions: the gap shows it
            await asyncio.sleep(a.probe_interval)

    def pause_ms(self) -> float:
        marks = [self.t0, *self.answers, time.monotonic()] if self.answers else [self.t0, time.monotonic()]
        return round(max(b - a for a, b in zip(marks, marks[1:])) * 1000, 1)
