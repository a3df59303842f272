"""Pacing a transfer: the most it may take (`RateLimit`), the least a source must give
(`ProgressFloor`), and the memory its reads may hold (`ByteBudget`).

`RateLimit` is a token bucket over payload bytes, shared by a transfer's connections
(`fabric pull --max-rate`, a site's `max_rate`). `ProgressFloor` watches one chunk-stream
answer: while the reader waits on it, the source must deliver at least `min_rate` bytes
per second, measured over windows of `window` seconds (`FetchOptions.stall_timeout`). A
source that drips bytes, or stops, fails within one window, whatever the size of the
frame it is in the middle of (a relay's wait frame, `alive`, starts the window over);
time the reader spends elsewhere (verifying, storing,
sleeping under its own `RateLimit`) does not count against the source. The floor costs
two clock reads per read and one timer per answer.
"""

from __future__ import annotations

import asyncio
import ctypes
import time

import aiohttp

from fabric.errors import TransferError


class RateLimit:
    """A token bucket over bytes: `await limit.take(n)` sleeps to keep under `rate` B/s."""

    def __init__(self, rate: float):
        self.rate = rate
        self._allowance = rate
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= n
        if self._allowance < 0:
            await asyncio.sleep(-self._allowance / self.rate)


class ProgressFloor:
    """Reads `stream` exactly (`read`), failing it with `TransferError` once a window of waiting
    brings fewer than `min_rate × window` bytes. Use as `async with`: the watch runs inside."""

    def __init__(self, stream: aiohttp.StreamReader, *, window: float, min_rate: float, source: str):
        self.stream, self.window, self.min_rate, self.source = stream, window, min_rate, source
        self._waited = 0.0  # seconds spent inside reads, finished ones
        self._since: float | None = None  # when the read in progress began
        self._mark = (0.0, 0)  # (seconds waited, bytes received) when the window began
        self._task: asyncio.Task | None = None

    async def read(self, n: int) -> bytes:
        self._since = time.monotonic()
        try:
            return await self.stream.readexactly(n)
        finally:
            self._waited += time.monotonic() - self._since
            self._since = None

    async def __aenter__(self) -> "ProgressFloor":
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()

    def alive(self) -> None:
        """The source says it is still working for this answer (a relay's wait frame): the
        window starts over, so time it spends waiting on its own upstream is not a stall."""
        self._mark = (self.waited(), self.stream.total_bytes)

    def waited(self) -> float:
        return self._waited + (time.monotonic() - self._since if self._since is not None else 0.0)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.window / 8)
            waited, received = self.waited(), self.stream.total_bytes
            then_waited, then_received = self._mark
            if waited - then_waited < self.window:
                continue
            got = received - then_received
            if got < self.min_rate * (waited - then_waited):
                self.stream.set_exception(TransferError(
                    f"{self.source} stalled: {got} bytes in {waited - then_waited:.1f}s of waiting, "
                    f"under the floor of {self.min_rate:g} B/s"))
                return
            self._mark = (waited, received)


MEMORY_BUDGET = 12 << 20  # payload bytes a site's fetches hold at once, read but not yet stored (issue 17)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
MMAP_THRESHOLD = 128 << 10  # blocks this large or larger are mapped, and unmapped when freed
ARENAS = 2  # malloc arenas: each thread that decodes, verifies or stores a chunk would get its own
_mmap_fixed = False


def return_freed_payloads() -> None:
    """Make glibc mmap every allocation of `MMAP_THRESHOLD` or more, once per process.

    For long-lived processes that hold many fetches (the site agent calls it at start):
    every mapped block costs a page fault per 4 KiB each time it is filled, so a short
    `fabric pull` (8x the page faults, 2-3x its system time) does without it and keeps what it
    frees (`keep_freed_payloads`).

    By default glibc raises its mmap threshold to the largest block freed (up to 32 MiB),
    so after the first chunk payload, 8 MiB payloads come from per-thread heaps that keep
    freed memory: the process's peak RSS then grows far past what `ByteBudget` holds at
    any one time. A fixed threshold returns each freed payload to the OS, and the socket
    reads and a relay's file pieces (128-256 KiB) with them. Smaller blocks freed in one
    of up to 8 x cores per-thread arenas stay resident there; `ARENAS` arenas keep that
    to a few. Elsewhere than glibc this does nothing."""
    global _mmap_fixed
    if _mmap_fixed:
        return
    _mmap_fixed = True
    _mallopt({_M_MMAP_THRESHOLD: MMAP_THRESHOLD,
              _M_TRIM_THRESHOLD: 128 << 10,  # glibc's default, should a pull in this process have raised it
              _M_ARENA_MAX: ARENAS})


def keep_freed_payloads() -> None:
    """The opposite, for a one-shot transfer (`fabric pull`): let glibc keep the memory
    freed payloads give back, for the next ones, instead of faulting fresh zeroed pages in
    for each: blocks up to 64 MiB come from the heap, whose free top goes back to the OS
    only past 512 MiB (a 1 GB loopback pull: 53-99k page faults per GB -> 25k, system time
    0.71-0.83 -> 0.48-0.75 s per GB, `python -m bench.pull_throughput`). Its peak memory is
    what its budget holds at once, kept until it exits. A process that called
    `return_freed_payloads` (it runs a daemon) keeps that. Elsewhere than glibc this does nothing."""
    if not _mmap_fixed:
        _mallopt({_M_MMAP_THRESHOLD: 64 << 20, _M_TRIM_THRESHOLD: 512 << 20})


def _mallopt(settings: dict[int, int]) -> None:
    """glibc's `mallopt` for each (parameter, value); nothing where the C library has none."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return  # not glibc: its defaults are what there is
    for param, value in settings.items():
        mallopt(param, value)


class ByteBudget:
    """Bytes held in memory by fetches sharing it: `take` waits while `limit` is used up
    (one taker may always exceed it alone, so a chunk larger than the limit still comes).
    A relay's fetches (its own deploy and every pull-through) share one, so however many
    children ask, the payloads read but not yet stored stay under `limit`."""

    def __init__(self, limit: int = MEMORY_BUDGET):
        self.limit, self.used = limit, 0
        self._freed: asyncio.Event | None = None

    async def take(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            self._freed = self._freed or asyncio.Event()
            await self._freed.wait()
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        if self._freed is not None:
            self._freed.set()
            self._freed = None
