"""The `fabric` CLI as a real process, with the test's own environment.

`run_cli` and `cli_json` pass on os.environ (which conftest's autouse fixture has
cleared of FABRIC_* settings) plus `env`; `helpers.origin.fabric` and friends pass a
clean environment instead, for tests that start servers of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fabric.cli import fabric_command

FABRIC = fabric_command()


def run_cli(*args, store: Path | None = None, env: dict | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = FABRIC + [str(a) for a in args]
    if store is not None:
        cmd += ["--store", str(store)]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def cli_json(*args, store: Path | None = None, env: dict | None = None, expect_rc: int = 0) -> dict:
    p = run_cli(*args, "--json", store=store, env=env)
    assert p.returncode == expect_rc, f"rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}"
    return json.loads(p.stdout)
