"""The `fabric` command line: a thin typer app over the library.

`fabric/cli/app.py` holds the app and the error mapping; each command group has its
own module beside it. This package's `main` is the console script's entry point; it
imports the app only when called, so `fabric_command()` stays cheap to import.
"""

from __future__ import annotations

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
    from fabric.cli.app import main as run

    run()
