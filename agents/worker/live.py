"""The live weights: bring a torch module from one version to the next, safely.

(The hot-loader that connects this to a site agent is `agents.worker.hotloader.HotLoader`.)

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
import math
import mmap
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fabric.core import digest, dtypes
from fabric.core.chunking import SEGMENT_SIZE
from fabric.errors import (CorruptChunk, FabricError, HealthCheckFailed, IntegrityError, InvalidInput,
                           TensorMismatch)
from fabric.logs import get_logger
from fabric.core.manifest import Manifest, TensorEntry


log = get_logger("worker")

_TORCH_NAMES = {  # every dtype of fabric.core.dtypes, by its torch name
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
    "C64": "complex64",
}
assert _TORCH_NAMES.keys() == dtypes.DTYPES.keys(), "agents.worker.live: torch names out of step with fabric.core.dtypes"
DTYPES: dict[str, torch.dtype] = {  # those this torch build has (older ones lack uint16 and the float8s)
    name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items() if hasattr(torch, attr)}
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


# --- locks and buffers -----------------------------------------------------------------

class _RWLock:
    """Many readers (requests) or one writer (an in-place swap); a waiting writer goes first.

    Reentrant for readers on one thread, so a request path that nests `serving()`
    does not deadlock behind a waiting writer.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(eq=False)
class _Buffer:
    """One set of weights: a module, the version it holds, and what is known of it."""

    module: torch.nn.Module
    version: str | None
    manifest: Manifest | None = None
    dirty: set[str] = field(default_factory=set)  # tensors written by a load that did not finish
    users: int = 0  # requests running on it (double-buffered)
    folder: Path | None = None  # where its version's files are (the restore source for in-place)


# --- reading a version's files ------------------------------------------------------------

class _Files:
    """A version folder's files, memory-mapped on first use; counts the bytes it hands out."""

    def __init__(self, folder: str | os.PathLike, manifest: Manifest):
        self.folder = Path(folder)
        self.entries = {f.path: f for f in manifest.files}
        self._maps: dict[str, mmap.mmap] = {}
        self._ranges: set[tuple[str, int, int]] = set()

    @property
    def bytes_read(self) -> int:
        return sum(n for _, _, n in self._ranges)

    def _map(self, rel: str) -> mmap.mmap:
        mm = self._maps.get(rel)
        if mm is not None:
            return mm
        entry = self.entries.get(rel)
        if entry is None:
            raise IntegrityError(f"the manifest lists no file {rel!r}")
        path = self.folder / rel
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.size:
                    raise IntegrityError(f"{path} is {size} bytes, the manifest says {entry.size} "
                                         "(truncated or replaced?)")
                # ACCESS_COPY: a private mapping, so torch sees a writable buffer; nothing is written
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else mmap.mmap(-1, 1)
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing") from None
        self._maps[rel] = mm
        return mm

    def prefetch(self, tensors: list[TensorEntry]) -> None:
        """Ask the kernel to start reading these ranges now (a no-op when they are cached)."""
        for t in tensors:
            if t.length and hasattr(mmap, "MADV_WILLNEED"):
                start = t.offset - t.offset % mmap.PAGESIZE
                self._map(t.file).madvise(mmap.MADV_WILLNEED, start, t.offset + t.length - start)

    def view(self, t: TensorEntry) -> memoryview:
        self._ranges.add((t.file, t.offset, t.length))
        return memoryview(self._map(t.file))[t.offset:t.offset + t.length]

    def tensor(self, t: TensorEntry) -> torch.Tensor:
        """The tensor's bytes as a uint8 CPU tensor over the mapping (no copy)."""
        self._ranges.add((t.file, t.offset, t.length))
        return torch.frombuffer(self._map(t.file), dtype=torch.uint8, count=t.length, offset=t.offset)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it
                pass
        self._maps.clear()


def _segment(manifest: Manifest) -> int:
    seg = (manifest.chunking.get("safetensors") or {}).get("segment", SEGMENT_SIZE)
    if not isinstance(seg, int) or seg <= 0:
        raise IntegrityError(f"manifest gives a bad safetensors segment size {seg!r}")
    return seg


def verify_tensors(files: _Files, tensors: list[TensorEntry], segment: int) -> None:
    """Check each tensor's byte ranges against its chunk ids (the file sizes on opening)."""
    for t in tensors:
        want = math.ceil(t.length / segment)
        if len(t.chunks) != want:
            raise IntegrityError(f"tensor {t.name!r}: {len(t.chunks)} chunk ids for {t.length} bytes "
                                 f"(want {want} of {segment})")
        view = files.view(t)
        for i, cid in enumerate(t.chunks):
            try:
                digest.verify(cid, view[i * segment:(i + 1) * segment])
            except CorruptChunk:
                raise CorruptChunk(f"{files.folder / t.file}: bytes of tensor {t.name!r} "
                                   f"(segment {i}) do not match the manifest") from None


# --- copying --------------------------------------------------------------------------------

def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view."""
    return t.detach().reshape(-1).view(torch.uint8)


class _CudaStager:
    """Host-to-device copies through pinned staging buffers on a side stream, pipelined.

    While buffer k's bytes travel to the GPU, the CPU fills buffer k+1 from the file;
    a buffer is refilled only after its previous copy's event has completed.
    """

    def __init__(self, device: torch.device, stage_bytes: int, buffers: int = 4):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bufs = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
        self.events: list[torch.cuda.Event | None] = [None] * buffers
        self.stage = stage_bytes
        self._k = 0

    def begin(self) -> None:
        # work already queued on the default stream (requests) finishes before we write
        self.stream.wait_stream(torch.cuda.default_stream(self.device))

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        n = src.numel()
        for off in range(0, n, self.stage):
            i = self._k % len(self.bufs)
            self._k += 1
            if self.events[i] is not None:
                self.events[i].synchronize()
            m = min(self.stage, n - off)
            self.bufs[i][:m].copy_(src[off:off + m])
            with torch.cuda.stream(self.stream):
                dst[off:off + m].copy_(self.bufs[i][:m], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self.events[i] = ev

    def finish(self) -> None:
        self.stream.synchronize()


class _Copier:
    """Copies uint8 sources (file mappings, backups) into tensors on any device."""

    def __init__(self, stage_bytes: int):
        self.stage_bytes = stage_bytes
        self._cuda: dict[torch.device, _CudaStager] = {}

    def __call__(self, pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        used: list[_CudaStager] = []
        try:
            for src, dst in pairs:
                if dst.is_contiguous():
                    raw = _bytes_of(dst)
                    if raw.is_cuda:
                        stager = self._stager(raw.device)
                        if stager not in used:
                            stager.begin()
                            used.append(stager)
                        stager.copy(src, raw)
                    else:
                        raw.copy_(src)
                else:  # rare: a strided parameter; go through an aligned typed copy
                    with torch.no_grad():
                        dst.copy_(src.clone().view(dst.dtype).view(dst.shape))
        finally:
            for stager in used:
                stager.finish()

    def _stager(self, device: torch.device) -> _CudaStager:
        if device not in self._cuda:
            self._cuda[device] = _CudaStager(device, self.stage_bytes)
        return self._cuda[device]


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
        strict: every module tensor must be in the version and every version tensor in
            the module (as `load_state_dict(strict=True)`).
        stage_bytes: size of each pinned staging buffer (CUDA).
    """

    def __init__(self, module: torch.nn.Module, *, mode: str = "in-place", health_check: HealthCheck | None = None,
                 golden_input: Any = None, golden_output: torch.Tensor | None = None,
                 tolerance: float | None = None, health_timeout: float = 30.0, version: str | None = None,
                 manifest: Manifest | None = None, folder: str | os.PathLike | None = None,
                 verify: bool = True, strict: bool = True, stage_bytes: int = 32 << 20):
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.health_check, self.golden_input, self.golden_output = health_check, golden_input, golden_output
        self.tolerance, self.health_timeout = tolerance, health_timeout
        self.verify, self.strict = verify, strict
        version = manifest.version if manifest is not None else version
        folder = Path(folder) if folder is not None and manifest is not None else None
        self._live = _Buffer(module, version, manifest, folder=folder)
        self._shadow = _Buffer(copy.deepcopy(module), version, manifest) if mode == "double-buffered" else None
        self._rw = _RWLock()  # in-place: requests read, a swap writes
        self._mutex = threading.Condition()  # double-buffered: which buffer is live, and its users
        self._load_lock = threading.Lock()  # one load at a time
        self._copy = _Copier(stage_bytes)
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
        targets = _targets(buf.module)
        changed = self._plan(buf, targets, manifest)
        files = _Files(folder, manifest)
        old = _old_files(buf, changed)  # the overwritten tensors' bytes, if the old files are there
        try:
            restore = old.pairs(changed, targets) if old else self._backup(changed, targets)
            rep.verify_s = self._verify(files, changed, manifest)
            if any(targets[t.name].is_cuda for t in changed):
                torch.cuda.synchronize()  # the backup's device-to-host copies ran while we verified
            failure, out = None, None
            t_ask = time.perf_counter()
            with self._rw.write():
                try:
                    t1 = time.perf_counter()
                    self._copy((files.tensor(t), targets[t.name]) for t in changed if t.length)
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
        targets = _targets(shadow.module)
        changed = self._plan(live, targets, manifest)  # what the new version changes vs what serves
        names = {t.name for t in changed}
        # after a swap the spare holds the version before: bring the tensors it lags in from
        # the live module (memory to memory), except those the file is about to overwrite
        lagging = self._lagging(shadow, live, targets) - names
        files = _Files(folder, manifest)
        try:
            # verify first, then copy: overlapping the two in threads measured slower on a
            # 16-core GPU host (hashing and copying compete for cores and memory bandwidth)
            rep.verify_s = self._verify(files, changed, manifest)
            shadow.dirty |= lagging | names
            t1 = time.perf_counter()
            source = _targets(live.module)
            with torch.no_grad():
                for name in lagging:
                    targets[name].detach().copy_(source[name].detach())
            rep.catch_up_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            self._copy((files.tensor(t), targets[t.name]) for t in changed if t.length)
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

    @staticmethod
    def _lagging(shadow: _Buffer, live: _Buffer, targets: dict[str, torch.Tensor]) -> set[str]:
        """Names of the tensors where the spare buffer differs from the live one."""
        if shadow.version == live.version:
            return set(shadow.dirty)
        if shadow.manifest is not None and live.manifest is not None:
            old = {t.name: t for t in shadow.manifest.tensors}
            return {t.name for t in live.manifest.tensors
                    if t.name in targets and _differs(old.get(t.name), t)} | shadow.dirty
        return set(targets)

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
            out[t.name].copy_(_bytes_of(targets[t.name].detach().contiguous()), non_blocking=cuda)
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

    def _plan(self, buf: _Buffer, targets: dict[str, torch.Tensor], manifest: Manifest) -> list[TensorEntry]:
        """The tensors to load (changed, new, or left dirty), after checking they all fit."""
        new: dict[str, TensorEntry] = {}
        for t in manifest.tensors:
            if t.name in new:
                raise TensorMismatch(f"{manifest.artifact}@{manifest.version} has two tensors named {t.name!r}")
            new[t.name] = t
        problems = [p for t in new.values() if (p := _misfit(t, targets.get(t.name), self.strict))]
        if self.strict:
            problems += [f"{n}: in the module but not in the version" for n in _uncovered(targets, new)]
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise TensorMismatch(f"{manifest.artifact}@{manifest.version} does not fit the module: "
                                 + "; ".join(problems[:8]) + more + f"; {buf.version} keeps serving")
        old = {t.name: t for t in buf.manifest.tensors} if buf.manifest is not None else {}
        return [t for name, t in new.items()
                if name in targets and (name in buf.dirty or _differs(old.get(name), t))]

    def _verify(self, files: _Files, changed: list[TensorEntry], manifest: Manifest) -> float:
        """Check the changed tensors' bytes (and files' sizes); returns the seconds it took."""
        t0 = time.perf_counter()
        files.prefetch(changed)
        if self.verify:
            verify_tensors(files, changed, _segment(manifest))
        else:
            for rel in {t.file for t in changed}:
                files._map(rel)  # sizes are checked on opening
        return time.perf_counter() - t0

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
        out = out if isinstance(out, torch.Tensor) else next(o for o in out if isinstance(o, torch.Tensor))
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


def _targets(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


class _OldFiles(_Files):
    """The version a buffer holds, mapped before a load so a restore can read it back.

    Mapped before any weight changes: a file the agent prunes meanwhile stays readable.
    """

    def __init__(self, buf: _Buffer, changed: list[TensorEntry]):
        super().__init__(buf.folder, buf.manifest)
        index = {t.name: t for t in buf.manifest.tensors}
        self.entries_by_name = {t.name: index[t.name] for t in changed}
        for rel in {t.file for t in self.entries_by_name.values()}:
            self._map(rel)  # size checked here

    def pairs(self, changed: list[TensorEntry], targets: dict[str, torch.Tensor]):
        olds = [self.entries_by_name[t.name] for t in changed if t.length]
        return lambda: ((self.tensor(o), targets[o.name]) for o in olds)


def _old_files(buf: _Buffer, changed: list[TensorEntry]) -> _OldFiles | None:
    """The old files of the tensors a load changes, or None (restore from a memory copy)."""
    if buf.folder is None or buf.manifest is None or not changed:
        return None
    old = {t.name: t for t in buf.manifest.tensors}
    if any(t.name not in old or (old[t.name].dtype, old[t.name].shape) != (t.dtype, t.shape) for t in changed):
        return None
    try:
        return _OldFiles(buf, changed)
    except IntegrityError as e:  # gone or changed: fall back to copying the weights aside
        log.warning("old version's files unusable; backing up in memory", folder=str(buf.folder), error=e.message)
        return None


def _differs(old: TensorEntry | None, new: TensorEntry) -> bool:
    return old is None or (old.dtype, old.shape, old.chunks) != (new.dtype, new.shape, new.chunks)


def _misfit(t: TensorEntry, dst: torch.Tensor | None, strict: bool) -> str | None:
    if dst is None:
        return f"{t.name}: not in the module" if strict else None
    want = DTYPES.get(t.dtype)
    if want is None:
        return f"{t.name}: dtype {t.dtype} has no torch equivalent here"
    if dst.dtype != want:
        return f"{t.name}: dtype {t.dtype} ({want}) but the module has {dst.dtype}"
    if tuple(dst.shape) != tuple(t.shape):
        return f"{t.name}: shape {list(t.shape)} but the module has {list(dst.shape)}"
    if t.length != dst.numel() * dst.element_size():
        return f"{t.name}: {t.length} bytes for shape {list(t.shape)} {t.dtype}"
    return None


def _uncovered(targets: dict[str, torch.Tensor], names: dict) -> list[str]:
    """Module tensors the version does not provide (tied names count as one tensor)."""
    groups: dict[tuple, list[str]] = {}
    for n, t in targets.items():
        key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) \
            if t.numel() and t.device.type != "meta" else (n,)
        groups.setdefault(key, []).append(n)
    return [g[0] for g in groups.values() if not any(n in names for n in g)]


