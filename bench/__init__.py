"""Benchmarks: commands that compare Fabric side by side with standard tools, in one run.

They are not tests: each module has a `main(argv)` that measures, prints a markdown
table and returns it; `python -m bench.run_all` (`make bench`) runs them all and
rewrites docs/benchmarks.md. On the 2-core machines we use, quote ratios, not
absolute times.

This module holds what the benchmarks share: timing a child process with its peak
RSS, page-cache residency of files, machine facts, and markdown tables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

GB = 1e9


@dataclass(frozen=True)
class Run:
    seconds: float
    max_rss: int  # bytes, peak resident set of the command
    stdout: str
    returncode: int


GNU_TIME = "/usr/bin/time"


def run_timed(cmd: Sequence[str], *, then_sync: bool = True, env: dict | None = None) -> Run:
    """Run `cmd`, then `sync` (both timed, so unflushed writes are not free).

    The peak RSS is the command's own. A child forked from this Python process
    inherits its resident-size high-water mark (Linux keeps it across exec), so the
    command runs under GNU time, a small process, which reports the RSS of the
    command it forks. Without GNU time, `wait4` gives an upper bound.
    """
    use_time = os.access(GNU_TIME, os.X_OK)
    with tempfile.NamedTemporaryFile("r") as rss_file:
        full = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *cmd] if use_time else list(cmd)
        os.sync()  # start with no dirty pages from an earlier step
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if then_sync:
            os.sync()
        seconds = time.perf_counter() - t0
        lines = rss_file.read().split()
    max_rss = int(lines[-1]) * 1024 if use_time and lines else usage.ru_maxrss * 1024
    return Run(seconds, max_rss, out.decode(errors="replace"), proc.returncode)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_fraction(paths: Iterable[Path]) -> float:
    """The share of these files' pages that sit in the page cache now (mincore)."""
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            try:
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
                resident += sum(b & 1 for b in vec)
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total if total else 1.0


def tree_size(root: Path) -> int:
    """Bytes in the regular files under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def machine() -> dict[str, str]:
    """CPU model, core count, RAM and kernel, for the benchmarks' header."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    except OSError:
        pass
    return {"cpu": model, "nproc": str(len(os.sched_getaffinity(0))), "ram": ram,
            "kernel": platform.release(), "python": platform.python_version()}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) ([-+0-9.eE]+|NaN)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def scrape(url: str, token: str) -> dict[str, float]:
    """A Fabric server's /metrics (`parse_metrics`), with `token`."""
    import urllib.request
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return parse_metrics(r.read().decode())


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    align = ["---:" if rows and all(_numeric(r[i]) for r in rows) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x×%").replace(",", ""))
        return True
    except ValueError:
        return False
