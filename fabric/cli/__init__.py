"""The `fabric` command line: a thin typer app over the library.

`fabric/cli/app.py` holds the app and the error mapping; each command group has its
own module beside it. This package's `main` is the console script's entry point; it
imports the app only when called, so `fabric_command()` stays cheap to import.

A command's start-up and exit are part of what it costs (`fabric pull` of 1 GB on
loopback takes about 2 s, of which ~0.6 s were the interpreter's): `main` imports
the app with the garbage collector off (the imports allocate much and free nothing:
collections during them cost ~50 ms), and exits without the interpreter's teardown
(freeing every module and object: ~0.1 s) once it has done what a normal exit does
that anyone can see: the atexit handlers, logging's flush, stdout and stderr.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from pathlib import Path

__all__ = ["fabric_command", "keep_freed_memory", "main"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def fabric_command() -> list[str]:
    """How to run this interpreter's `fabric` console script: its venv's binary, else `-m`.

    The one place that finds the binary: the demo, the lab, the benchmarks and the tests
    all start `fabric` processes through it.
    """
    binary = Path(sys.executable).parent / "fabric"
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "fabric.cli"]


def keep_freed_memory() -> None:
    """For a one-shot transfer (`fabric pull`, `fabric publish`): let glibc's malloc keep
    the memory that freed chunk buffers give back, for the next ones, instead of handing
    it to the kernel and faulting fresh zeroed pages in for every 8 MiB payload (a 1 GB
    loopback pull: 53-99k page faults per GB -> 25k, 0.7-0.8 s of system time -> 0.5-0.6 s,
    `python -m bench.pull_throughput`). Daemons keep the defaults: idle, they give memory
    back. A no-op where the C library has no `mallopt` (not glibc)."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 64 << 20)  # buffers up to 64 MiB come from the heap, reused
        mallopt(_M_TRIM_THRESHOLD, 512 << 20)  # the heap's free top goes back only past 512 MiB


def main() -> None:
    gc.disable()
    try:
        from fabric.cli.app import main as run
    finally:
        gc.enable()
    try:
        run()
    except SystemExit as e:
        _exit(e.code)
    _exit(0)


def _exit(code: object) -> None:
    """Exit with `code` as `sys.exit` would, without the interpreter's teardown."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`fabric ls | head`) or a closed stream
            status = status or 120  # what the interpreter exits with when its final flush fails
    os._exit(status & 0xFF)
