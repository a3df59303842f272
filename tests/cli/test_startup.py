"""What a `fabric` command imports before it works: a local command never loads the origin's client.

Every command pays for its imports on every run; `fabric publish --store` of a small folder
took 0.27 s before the origin's client (aiohttp) was imported only where a command talks to
an origin and typer was kept below 0.29 (which coerces every parameter through pydantic),
0.12 s after (docs/benchmarks.md, "The CLI's start-up"). These tests run the real command
under `python -X importtime` and read the modules it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Modules a local command has no use for, with what each costs to import here.
HEAVY = {"aiohttp": "~70 ms, the origin's client", "pydantic": "~35 ms, typer 0.29's coercion",
         "asyncio": "~11 ms, only a pull from an origin runs a loop", "numpy": "~50 ms, the codec's decode",
         "cryptography": "~10 ms, only signing and verifying"}


def imported(*args: str, cwd=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `fabric ARGS` under -X importtime; its result and every module it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "fabric.cli", *args], capture_output=True,
                       text=True, env=env, timeout=60, cwd=cwd)
    names = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "fabric.cli.app" in names, p.stderr[-2000:]  # the output is what this test reads: it must be there
    return p, names


def test_a_local_publish_imports_neither_the_origins_client_nor_pydantic(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(300_000))
    p, names = imported("publish", str(src), "-a", "m", "--version", "v1", "--store", str(tmp_path / "store"),
                        "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["version"] == "v1"
    loaded = {m: why for m, why in HEAVY.items() if m in names}
    assert not loaded, f"a local publish imported {loaded}"


@pytest.mark.parametrize("args", [["--help"], ["publish", "--help"], ["ls", "--store", "{tmp}"]])
def test_help_and_local_reads_import_nothing_heavy(tmp_path, args):
    p, names = imported(*[a.format(tmp=tmp_path) for a in args])
    assert p.returncode in (0, 3), p.stderr[-2000:]  # `ls` of an empty store: nothing to list, or not found
    loaded = {m: why for m, why in HEAVY.items() if m in names}
    assert not loaded, f"fabric {' '.join(args)} imported {loaded}"


def test_a_command_that_talks_to_an_origin_still_loads_its_client(tmp_path):
    """The other side of the lazy import: an origin command finds the client where it needs it."""
    p, names = imported("ls", "--origin", "http://127.0.0.1:9", "--json")  # port 9: nothing listens
    assert p.returncode == 5, (p.returncode, p.stdout, p.stderr[-2000:])  # network error, not an ImportError
    assert json.loads(p.stdout)["error"]["code"]
    assert "aiohttp" in names
