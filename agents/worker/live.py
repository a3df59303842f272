"""The live weights: bring a torch module from one version to the next, safely.

(The hot-loader that connects this to a site agent is `agents.worker.hotloader.HotLoader`;
the pieces a load uses are beside this module: `buffers` (the lock and a module copy),
`files` (reading and verifying a version's files), `copying` (CPU and CUDA copies).)

Terms:

* `LiveModule` owns the weights: `load(folder, manifest)` brings the module from the
  version it holds to `manifest`'s, reading only the tensors whose chunk ids, dtype
  or shape differ (the manifests' per-tensor index says which), memory-mapped from
  the version folder. Before any weight changes it checks that every tensor fits the
  module (name, shape, dtype) and verifies the byte ranges it will read against the
  manifest's chunk ids, so a bad manifest or a truncated or corrupt file leaves the
  old weights serving. Then it copies, runs the health check (time-limited), and
  either keeps the new weights or restores the old ones.
* modes: `in-place` copies into the live tensors under a lock that requests also
  take (shared), so requests pause for the copy and the check; `double-buffered`
  keeps a second copy of the module, fills and checks it while the first serves,
  then swaps which one new requests get (a reference swap: no request waits, twice
  the memory). Either way a request runs on one version's weights, never a mix.
* on CUDA the bytes go through pinned staging buffers and non-blocking copies on a
  side stream, so reading the file and the host-to-device copy overlap.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

from fabric.errors import (FabricError, HealthCheckFailed, InvalidInput,
                           TensorMismatch)
from fabric.logs import get_logger

from agents.worker.buffers import Buffer, RWLock
from agents.worker.copying import Copier, bytes_of
from agents.worker.files import VersionFiles, old_files, verify_tensors  # noqa: F401 - hotloader re-exports it
from agents.worker.sealcheck import CheckPool, LoadCheck
from agents.worker.fit import DTYPES, ModuleTensors
from fabric.core.manifest import Manifest, TensorEntry


log = get_logger("worker")

__all__ = ["DTYPES", "MODES", "HealthCheck", "LiveModule", "LoadReport", "Served"]
MODES = ("in-place", "double-buffered")
HealthCheck = Callable[[torch.nn.Module], Any]  # raise or return False to fail


@dataclass
class LoadReport:
    version: str | None
    previous: str | None
    mode: str
    ok: bool = True
    error: str | None = None
    tensors_changed: int = 0
    bytes_changed: int = 0  # bytes of the changed tensors
    bytes_read: int = 0  # bytes of the version's files this load read (unique ranges)
    seconds: float = 0.0  # the whole load
    verify_s: float = 0.0
    copy_s: float = 0.0
    catch_up_s: float = 0.0  # double-buffered: bringing the spare buffer to the live version
    check_ms: float = 0.0
    pause_ms: float = 0.0  # in-place: requests could not start; double-buffered: the swap itself
    verified: str | None = None  # how the changed bytes were checked: "seal", "blake3", "off" (None: no bytes)
    seal_fallback: str | None = None  # why some were checked with BLAKE3 instead of the site seal

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        for k in ("seconds", "verify_s", "copy_s", "catch_up_s"):
            d[k] = round(d[k], 6)
        for k in ("check_ms", "pause_ms"):
            d[k] = round(d[k], 4)
        return d


@dataclass(frozen=True)
class Served:
    """What `serving()` yields: the module to run and the version of its weights."""

    module: torch.nn.Module
    version: str | None


# --- the module's weights -------------------------------------------------------------------

class LiveModule:
    """A torch module that keeps serving while new versions of its weights load into it.

    Args:
        module: the model, already on its device.
        mode: "in-place" (short pause, no second copy) or "double-buffered" (no pause, 2x memory).
        health_check: called as `health_check(module)` on the new weights; raising or
            returning False fails the load.
        golden_input: run through the new weights; the output must be finite and, if
            `tolerance` is given, within `tolerance` (relative L2) of `golden_output`, or of
            the output recorded on the previous version when `golden_output` is None.
        health_timeout: seconds; a check still running then fails the load.
        version, manifest: what the module holds now (None: weights of no known version,
            so the first load reads every tensor).
        folder: where that version's files are; in-place mode restores from them if a
            check fails (without it, or once they are gone, it copies the tensors a load
            overwrites into host memory first).
        verify: check the changed tensors' bytes against the manifest before loading.
        seal: check them against the site seal the agent wrote (`agents.worker.sealcheck`)
            where it is there and valid, instead of re-hashing them with BLAKE3.
        strict: every module tensor must be in the version and every version tensor in
            the module (as `load_state_dict(strict=True)`), by the rules of
            `agents.worker.fit` (non-persistent buffers, ties, the model's ignore lists).
        stage_bytes: size of each pinned staging buffer (CUDA).
    """

    def __init__(self, module: torch.nn.Module, *, mode: str = "in-place", health_check: HealthCheck | None = None,
                 golden_input: Any = None, golden_output: torch.Tensor | None = None,
                 tolerance: float | None = None, health_timeout: float = 30.0, version: str | None = None,
                 manifest: Manifest | None = None, folder: str | os.PathLike | None = None,
                 verify: bool = True, strict: bool = True, stage_bytes: int = 32 << 20, seal: bool = True):
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.health_check, self.golden_input, self.golden_output = health_check, golden_input, golden_output
        self.tolerance, self.health_timeout = tolerance, health_timeout
        self.verify, self.strict, self.seal = verify, strict, seal
        version = manifest.version if manifest is not None else version
        folder = Path(folder) if folder is not None and manifest is not None else None
        self._live = Buffer(module, version, manifest, folder=folder)
        self._shadow = Buffer(copy.deepcopy(module), version, manifest) if mode == "double-buffered" else None
        self._rw = RWLock()  # in-place: requests read, a swap writes
        self._mutex = threading.Condition()  # double-buffered: which buffer is live, and its users
        self._load_lock = threading.Lock()  # one load at a time
        self._copy = Copier(stage_bytes)
        self._checks = CheckPool()  # hashing threads and decoded seals, kept between loads
        self._reference: torch.Tensor | None = None  # golden output of the serving weights
        self._spare: torch.Tensor | None = None  # in-place: host buffer for restoring overwritten tensors

    # --- the request side ---------------------------------------------------------------

    @property
    def version(self) -> str | None:
        return self._live.version

    @property
    def manifest(self) -> Manifest | None:
        return self._live.manifest

    @property
    def module(self) -> torch.nn.Module:
        """The module serving now (in double-buffered mode it changes at each swap: use `serving()`)."""
        return self._live.module

    @contextmanager
    def serving(self) -> Iterator[Served]:
        """Run one request: the weights yielded stay one version until the block ends."""
        if self._shadow is None:
            with self._rw.read():
                buf = self._live
                yield Served(buf.module, buf.version)
            return
        with self._mutex:
            buf = self._live
            buf.users += 1
        try:
            yield Served(buf.module, buf.version)
        finally:
            with self._mutex:
                buf.users -= 1
                if buf.users == 0:
                    self._mutex.notify_all()

    def set_manifest(self, manifest: Manifest) -> None:
        """Name the manifest of the version the module already holds (so the next load is a diff)."""
        for buf in (self._live, self._shadow):
            if buf is not None and buf.version == manifest.version and buf.manifest is None:
                buf.manifest = manifest

    # --- loading ----------------------------------------------------------------------------

    def load(self, folder: str | os.PathLike, manifest: Manifest) -> LoadReport:
        """Bring the module to `manifest`'s version, reading only changed tensors from `folder`.

        Raises:
            TensorMismatch: a tensor's name, shape or dtype does not fit the module.
            IntegrityError: a file is missing, has the wrong size or bytes that do not
                match the manifest.
            HealthCheckFailed: the new weights failed the check (the old ones were restored).
        In every case the weights serving before the call still serve.
        """
        with self._load_lock:
            if self._shadow is None:
                return self._load_in_place(Path(folder), manifest)
            return self._load_double(Path(folder), manifest)

    def _load_in_place(self, folder: Path, manifest: Manifest) -> LoadReport:
        t0 = time.perf_counter()
        buf = self._live
        rep = LoadReport(manifest.version, buf.version, self.mode)
        tensors = ModuleTensors(buf.module)
        targets = tensors.targets
        changed = self._plan(buf, tensors, manifest)
        files = VersionFiles(folder, manifest)
        old = old_files(buf, changed)  # the overwritten tensors' bytes, if the old files are there
        try:
            restore = old.pairs(changed, targets) if old else self._backup(changed, targets)
            check = self._verify(files, changed, manifest, targets)
            rep.verify_s = check.seconds
            if any(targets[t.name].is_cuda for t in changed):
                torch.cuda.synchronize()  # the backup's device-to-host copies ran while we verified
            failure, out = None, None
            t_ask = time.perf_counter()
            with self._rw.write():
                try:
                    t1 = time.perf_counter()
                    check.copy(self._copy)  # with a seal, checks what it copies: a mismatch restores
                    rep.copy_s = time.perf_counter() - t1
                    failure, rep.check_ms, out = self._check(buf.module)
                except BaseException:  # restore, whatever broke the copy
                    self._copy(restore())
                    raise
                if failure:
                    self._copy(restore())
                else:
                    buf.version, buf.manifest, buf.dirty, buf.folder = manifest.version, manifest, set(), folder
                rep.pause_ms = (time.perf_counter() - t_ask) * 1e3
            del restore
            check.report(rep)
        finally:
            rep.bytes_read = files.bytes_read
            files.close()
            if old:
                old.close()
        return self._finish(rep, changed, failure, out, t0)

    def _load_double(self, folder: Path, manifest: Manifest) -> LoadReport:
        t0 = time.perf_counter()
        shadow, live = self._shadow, self._live
        rep = LoadReport(manifest.version, live.version, self.mode)
        with self._mutex:  # requests that took this buffer before the last swap finish first
            while shadow.users:
                self._mutex.wait()
        tensors = ModuleTensors(shadow.module)
        targets = tensors.targets
        changed = self._plan(live, tensors, manifest)  # what the new version changes vs what serves
        names = {t.name for t in changed}
        # after a swap the spare holds the version before: bring the tensors it lags in from
        # the live module (memory to memory), except those the file is about to overwrite
        lagging = self._lagging(shadow, live, tensors) - names
        files = VersionFiles(folder, manifest)
        try:
            # verify first, then copy: overlapping the two in threads measured slower on a
            # 16-core GPU host (hashing and copying compete for cores and memory bandwidth)
            check = self._verify(files, changed, manifest, targets)
            rep.verify_s = check.seconds
            shadow.dirty |= lagging | names
            t1 = time.perf_counter()
            source = dict(live.module.state_dict(keep_vars=True))
            with torch.no_grad():
                for name in lagging:
                    targets[name].detach().copy_(source[name].detach())
            rep.catch_up_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            check.copy(self._copy)
            check.report(rep)
            if any(targets[n].is_cuda for n in lagging):
                torch.cuda.synchronize()
            rep.copy_s = time.perf_counter() - t1
        finally:
            rep.bytes_read = files.bytes_read
            files.close()
        failure, rep.check_ms, out = self._check(shadow.module)
        if failure:  # the spare now equals the live weights but for the tensors just read
            shadow.version, shadow.manifest, shadow.dirty = live.version, live.manifest, names
        else:
            shadow.version, shadow.manifest, shadow.dirty = manifest.version, manifest, set()
            t_swap = time.perf_counter()
            with self._mutex:
                self._live, self._shadow = shadow, self._live
            rep.pause_ms = (time.perf_counter() - t_swap) * 1e3
        return self._finish(rep, changed, failure, out, t0)

    def _lagging(self, shadow: Buffer, live: Buffer, tensors: ModuleTensors) -> set[str]:
        """Names of the tensors where the spare buffer differs from the live one."""
        if shadow.version == live.version:
            return set(shadow.dirty)
        if shadow.manifest is not None and live.manifest is not None:
            old = tensors.match(shadow.manifest, self.strict)[0]
            new = tensors.match(live.manifest, self.strict)[0]
            return {n for n, t in new.items() if _differs(old.get(n), t)} | shadow.dirty
        return set(tensors.targets)

    def _backup(self, changed: list[TensorEntry], targets: dict[str, torch.Tensor]):
        """Copies of the tensors an in-place load overwrites, in a host buffer kept between loads.

        Used only when the old version's files are not at hand (weights of no known
        folder). The buffer grows to the largest set of changed tensors seen and is
        reused, so a load does not pay for fresh pages; on CUDA it is pinned.
        Returns a function giving the (source, target) pairs that restore them.
        """
        need = sum(t.length for t in changed)
        cuda = any(targets[t.name].is_cuda for t in changed)
        if self._spare is None or self._spare.numel() < need or (cuda and not self._spare.is_pinned()):
            self._spare = None
            self._spare = torch.empty(need, dtype=torch.uint8, pin_memory=cuda)
        out, off = {}, 0
        for t in changed:
            out[t.name] = self._spare[off:off + t.length]
            out[t.name].copy_(bytes_of(targets[t.name].detach().contiguous()), non_blocking=cuda)
            off += t.length
        # on CUDA the copies are queued: the caller synchronizes before any weight changes
        return lambda: ((out[t.name], targets[t.name]) for t in changed if t.length)

    def _finish(self, rep: LoadReport, changed: list[TensorEntry], failure: str | None, out, t0: float
                ) -> LoadReport:
        rep.tensors_changed = len(changed)
        rep.bytes_changed = sum(t.length for t in changed)
        rep.seconds = time.perf_counter() - t0
        if failure:
            rep.ok, rep.error = False, failure
            raise HealthCheckFailed(f"{rep.version}: {failure}; {rep.previous} keeps serving", rep)
        if out is not None and self.golden_output is None:
            self._reference = out
        return rep

    def _plan(self, buf: Buffer, tensors: ModuleTensors, manifest: Manifest) -> list[TensorEntry]:
        """The tensors to load (changed, new, or left dirty), after checking they all fit.

        Each entry's name is the module tensor it loads (`agents.worker.fit`): tied names
        load once, non-persistent buffers and ignored keys not at all."""
        new, problems = tensors.match(manifest, self.strict)
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise TensorMismatch(f"{manifest.artifact}@{manifest.version} does not fit the module: "
                                 + "; ".join(problems[:8]) + more + f"; {buf.version} keeps serving")
        old = tensors.match(buf.manifest, self.strict)[0] if buf.manifest is not None else {}
        return [t for name, t in new.items() if name in buf.dirty or _differs(old.get(name), t)]

    def _verify(self, files: VersionFiles, changed: list[TensorEntry], manifest: Manifest,
                targets: dict[str, torch.Tensor]) -> LoadCheck:
        """Check the files' sizes and what must pass before any weight changes: the changed
        tensors' bytes against the site seal or with BLAKE3, except CPU targets with a seal,
        which `copy` checks as it copies them (`agents.worker.sealcheck`)."""
        check = LoadCheck(files, changed, targets, manifest, verify=self.verify, use_seal=self.seal, pool=self._checks)
        check.before_copy()
        return check

    # --- health --------------------------------------------------------------------------

    def _check(self, module: torch.nn.Module) -> tuple[str | None, float, torch.Tensor | None]:
        """Run the health check in a thread, time-limited: (failure or None, ms, golden output)."""
        if self.health_check is None and self.golden_input is None:
            return None, 0.0, None
        result: dict = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    if self.health_check is not None and self.health_check(module) is False:
                        raise HealthCheckFailed("the health check returned False")
                    if self.golden_input is not None:
                        result["out"] = self._golden(module)
            except BaseException as e:  # noqa: BLE001 - any failure of the user's check fails the load
                result["error"] = e

        t0 = time.perf_counter()
        thread = threading.Thread(target=run, name="fabric-health-check", daemon=True)
        thread.start()
        thread.join(self.health_timeout)
        ms = (time.perf_counter() - t0) * 1e3
        if thread.is_alive():
            return f"health check did not finish within {self.health_timeout:g}s", ms, None
        e = result.get("error")
        if e is not None:
            return (e.message if isinstance(e, FabricError) else f"health check raised {e!r}"), ms, None
        return None, ms, result.get("out")

    def _golden(self, module: torch.nn.Module) -> torch.Tensor:
        x = self.golden_input
        device = next((p.device for p in module.parameters()), None)
        if isinstance(x, torch.Tensor) and device is not None:
            x = x.to(device)
        out = module(x)
        if not isinstance(out, torch.Tensor):  # a tuple, or a dict-like (transformers' ModelOutput)
            parts = out.values() if isinstance(out, Mapping) else out
            out = next((o for o in parts if isinstance(o, torch.Tensor)), None)
            if out is None:
                raise HealthCheckFailed("the golden input gives no tensor to check")
        out = out.detach().float().cpu()
        if not torch.isfinite(out).all():
            raise HealthCheckFailed("the golden input gives a non-finite output (NaN or inf)")
        ref = self.golden_output if self.golden_output is not None else self._reference
        if self.tolerance is not None and ref is not None:
            ref = ref.detach().float().cpu()
            if ref.shape != out.shape:
                raise HealthCheckFailed(f"golden output shape {tuple(out.shape)} != recorded {tuple(ref.shape)}")
            drift = (torch.linalg.vector_norm(out - ref) / (torch.linalg.vector_norm(ref) + 1e-12)).item()
            if drift > self.tolerance:
                raise HealthCheckFailed(f"golden output moved {drift:.3g} (relative L2) from the recorded one; "
                                        f"tolerance {self.tolerance:g}")
        return out


def _differs(old: TensorEntry | None, new: TensorEntry) -> bool:
    return old is None or (old.dtype, old.shape, old.chunks) != (new.dtype, new.shape, new.chunks)
