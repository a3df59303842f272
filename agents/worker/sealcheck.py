"""Checking a load's bytes: against the site seal (`fabric.core.seal`), or with BLAKE3.

`LoadCheck` is what a load (`agents.worker.live`) asks: `before_copy` (file sizes,
read-ahead, and every check that must pass before a weight changes), `copy` (the
copy, checked as it goes where it can be), `report` (how the bytes were checked).

The site agent verified every chunk of a version with BLAKE3 as it wrote the files,
and sealed each with xxh3-128 (`<folder>/.fabric-seal.json`). A worker trusts that
seal for the bytes it reads only after checking them against it:

* `load_seal` reads the seal (bounded) and says why it cannot be used: `missing`
  (no file), `malformed` (does not parse, or too big), `stale` (written for another
  manifest);
* `verify_sealed` checks tensors' segments before any weight changes (the path for
  CUDA targets), in parallel threads (xxh3 releases the GIL);
* `copy_sealed` copies CPU targets and checks the bytes that landed, segment by
  segment, in blocks small enough to be hashed from the cache they were just written
  through, in parallel threads: the check costs little more than the copy. A
  mismatch found here is found after some weights changed: the caller restores them
  (in-place mode does so under the same lock, so no request sees them).

A segment whose seal entry is absent (`incomplete`) or does not match (`mismatch`) is
checked with BLAKE3 against its chunk id: bytes that fail that raise CorruptChunk; bytes
that pass are used (the seal was wrong, not the file). Either way `Fallback` records the
first reason, which the load's report carries (`seal_fallback`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fabric.core import digest, seal
from fabric.core.lru import LRU
from fabric.core.manifest import Manifest, TensorEntry
from fabric.errors import CorruptChunk, IntegrityError
from fabric.logs import get_logger

from agents.worker.copying import bytes_of
from agents.worker.files import VersionFiles, segment_size, verify_tensors

log = get_logger("worker")

BLOCK = 2 << 20  # copy-then-hash block: two threads' blocks stay in the L3, so the hash reads from cache;
# 2 MiB loaded 10% of a 1 GB model in 12-13 ms where 512 KiB took 15 (fewer GIL hand-offs; docs/benchmarks.md)
REASONS = ("missing", "malformed", "stale", "incomplete", "mismatch")


def threads() -> int:
    """Hashing threads: the cores this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


@dataclass
class Fallback:
    """Why, if at all, some bytes of a load were checked with BLAKE3 instead of the seal."""

    reason: str | None = None
    segments: int = 0  # segments checked with BLAKE3 because their seal entry failed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, reason: str, segments: int = 0) -> None:
        with self._lock:
            self.reason = self.reason or reason
            self.segments += segments


class CheckPool:
    """What a live module keeps between loads to check them: the hashing threads, started
    once instead of per load, and the seals it decoded last, keyed by the seal file's bytes
    (a changed file is decoded again). Together 1 ms of a 10% load of a 1 GB model
    (docs/benchmarks.md). Thread-safe; its idle threads end with it (or the interpreter)."""

    def __init__(self, seals: int = 4):
        self.seals: LRU[seal.Seal] = LRU(seals)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(threads(), thread_name_prefix="fabric-seal")
            return self._pool


def load_seal(folder: Path, manifest: Manifest, seals: LRU[seal.Seal] | None = None
              ) -> tuple[seal.Seal | None, str | None]:
    """The folder's seal for `manifest`, or None and the reason it is unusable (`seals`: the
    ones decoded before, by their files' bytes)."""
    limit = seal.max_size(manifest)
    try:
        with open(Path(folder) / seal.SEAL_FILE, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        log.warning("seal unreadable; checking with BLAKE3", folder=str(folder), error=str(e))
        return None, "malformed"
    if len(raw) > limit:
        log.warning("seal too big; checking with BLAKE3", folder=str(folder), limit=limit)
        return None, "malformed"
    s = seals.get(raw) if seals is not None else None
    if s is None:
        try:
            s = seal.decode(raw)
        except IntegrityError as e:
            log.warning("seal malformed; checking with BLAKE3", folder=str(folder), error=e.message)
            return None, "malformed"
        if seals is not None:
            seals.put(raw, s)
    if s.manifest_id != manifest.id:
        log.warning("seal is for another manifest; checking with BLAKE3", folder=str(folder),
                    seal_manifest=s.manifest_id, manifest=manifest.id)
        return None, "stale"
    return s, None


def _segments(tensors: list[TensorEntry], segment: int) -> list[tuple[TensorEntry, int, str]]:
    out = []
    for t in tensors:
        want = -(-t.length // segment)
        if len(t.chunks) != want:
            raise IntegrityError(f"tensor {t.name!r}: {len(t.chunks)} chunk ids for {t.length} bytes "
                                 f"(want {want} of {segment})")
        out += [(t, i, cid) for i, cid in enumerate(t.chunks)]
    return out


def _check(files: VersionFiles, t: TensorEntry, i: int, cid: str, got: bytes | None, want: bytes | None,
           data, fb: Fallback) -> None:
    """Accept segment i of `t` if `got == want`; otherwise check `data` with BLAKE3."""
    if want is not None and got == want:
        return
    reason = "incomplete" if want is None else "mismatch"
    fb.note(reason, 1)
    log.warning("seal does not vouch for a segment; checking it with BLAKE3", file=str(files.folder / t.file),
                tensor=t.name, segment=i, reason=reason)
    try:
        digest.verify(cid, data)
    except CorruptChunk:
        raise CorruptChunk(f"{files.folder / t.file}: bytes of tensor {t.name!r} (segment {i}) do not match "
                           "the manifest (the site seal did not match them either)") from None


def _run(jobs, fn, pool: CheckPool | None = None) -> None:
    """`fn` on every job: inline for one, else on `pool`'s threads (without one, on threads of
    its own, stopped after). The first job to raise raises here."""
    if len(jobs) <= 1:
        for j in jobs:
            fn(j)
        return
    own = None if pool else ThreadPoolExecutor(min(threads(), len(jobs)), thread_name_prefix="fabric-seal")
    try:
        list((own or pool.executor()).map(fn, jobs))  # the jobs return None
    finally:
        if own:
            own.shutdown(wait=True, cancel_futures=True)


def verify_sealed(files: VersionFiles, tensors: list[TensorEntry], segment: int, s: seal.Seal,
                  fb: Fallback, pool: CheckPool | None = None) -> None:
    """Check each tensor's segments against the seal (BLAKE3 where it fails), before any copy."""
    def one(job):
        t, i, cid = job
        data = files.view(t)[i * segment:(i + 1) * segment]
        _check(files, t, i, cid, seal.xxh(data), s.get(cid), data, fb)
    _run(_segments(tensors, segment), one, pool)


def can_copy_sealed(tensors: list[TensorEntry], targets: dict[str, torch.Tensor]) -> bool:
    """Whether `copy_sealed` can load these: every target a contiguous CPU tensor."""
    return all(targets[t.name].device.type == "cpu" and targets[t.name].is_contiguous() for t in tensors)


def copy_sealed(files: VersionFiles, tensors: list[TensorEntry], targets: dict[str, torch.Tensor],
                segment: int, s: seal.Seal, fb: Fallback, pool: CheckPool | None = None) -> None:
    """Copy the tensors into CPU `targets`, checking the bytes that landed against the seal.

    Raises CorruptChunk (after copying some bytes: the caller restores) if a segment
    matches neither its seal entry nor its chunk id.
    """
    dst_of = {t.name: bytes_of(targets[t.name]).numpy() for t in tensors if t.length}

    def one(job):
        t, i, cid = job
        src = np.frombuffer(files.view(t), dtype=np.uint8)
        dst = dst_of[t.name]
        lo, hi = i * segment, min(t.length, (i + 1) * segment)
        h = seal.streaming()
        for a in range(lo, hi, BLOCK):
            b = min(hi, a + BLOCK)
            dst[a:b] = src[a:b]  # numpy releases the GIL for the copy, xxhash for the hash
            h.update(dst[a:b])
        _check(files, t, i, cid, h.digest(), s.get(cid), dst[lo:hi], fb)
    _run(_segments([t for t in tensors if t.length], segment), one, pool)


class LoadCheck:
    """How one load checks the changed tensors' bytes.

    With `verify` and `use_seal` and a usable seal: CPU targets are checked as they are
    copied (`copy_sealed`), others against the seal before the copy (`verify_sealed`);
    without a usable seal, against the chunk ids with BLAKE3 before the copy
    (`verify_tensors`). Without `verify`, only the files' sizes are checked.
    """

    def __init__(self, files: VersionFiles, tensors: list[TensorEntry], targets: dict[str, torch.Tensor],
                 manifest: Manifest, *, verify: bool = True, use_seal: bool = True, pool: CheckPool | None = None):
        self.files, self.tensors, self.targets, self.manifest = files, tensors, targets, manifest
        self.verify, self.use_seal, self.pool = verify, use_seal, pool
        self.seal: seal.Seal | None = None
        self.fallback = Fallback()
        self.deferred = False  # checked during the copy
        self.seconds = 0.0

    def before_copy(self) -> float:
        """Everything that must pass before any weight changes; returns the seconds it took."""
        t0 = time.perf_counter()
        files, tensors = self.files, self.tensors
        files.prefetch(tensors)
        for rel in {t.file for t in tensors}:
            files._map(rel)  # sizes are checked on opening
        if self.verify and tensors:
            segment = segment_size(self.manifest)
            if self.use_seal:
                self.seal, reason = load_seal(files.folder, self.manifest, self.pool.seals if self.pool else None)
                if reason:
                    self.fallback.note(reason)
            if self.seal is not None and can_copy_sealed(tensors, self.targets):
                self.deferred = True
                _segments(tensors, segment)  # chunk counts checked before any copy
            elif self.seal is not None:
                verify_sealed(files, tensors, segment, self.seal, self.fallback, self.pool)
            else:
                verify_tensors(files, tensors, segment)
        self.seconds = time.perf_counter() - t0
        return self.seconds

    def copy(self, copier) -> None:
        """Copy the tensors into their targets (`copier` takes (source, target) pairs)."""
        if self.deferred:
            copy_sealed(self.files, self.tensors, self.targets, segment_size(self.manifest), self.seal,
                        self.fallback, self.pool)
        else:
            copier((self.files.tensor(t), self.targets[t.name]) for t in self.tensors if t.length)

    def report(self, rep) -> None:
        """Fill the load report's `verified` and `seal_fallback`."""
        if not self.tensors:
            rep.verified = None
        elif not self.verify:
            rep.verified = "off"
        else:
            rep.verified = "seal" if self.seal is not None else "blake3"
        rep.seal_fallback = self.fallback.reason if self.verify and self.use_seal else None
        if rep.seal_fallback and rep.seal_fallback != "missing":
            log.warning("load checked with BLAKE3 where the seal failed", version=rep.version,
                        reason=rep.seal_fallback, segments=self.fallback.segments)
