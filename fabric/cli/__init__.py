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

__all__ = ["fabric_command", "main"]


def fabric_command() -> list[str]:
    """How to run this interpreter's `fabric` console script: its venv's binary, else `-m`.

    The one place that finds the binary: the demo, the lab, the benchmarks and the tests
    all start `fabric` processes through it.
    """
    binary = Path(sys.executable).parent / "fabric"
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "fabric.cli"]


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
