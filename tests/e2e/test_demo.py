"""`python -m fabric.demo` (what `make demo` runs), end to end, as a process.

The demo starts a real origin, four site agents and three workers on loopback, so
this one test covers the whole serving path: v2 reaches every site, the workers swap
to it under a request stream, no request fails, and every process is gone after.
Every version is signed and every site verifies it; the forged v3 (signed by a key no
site trusts) is refused by every site with `unknown_key`, and every site stays on v2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SITES = ("hub-eu", "fra-edge-1", "ams-edge-1", "par-edge-1")


def _processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (the demo's children do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_demo_carries_v2_to_every_site_and_worker_with_zero_failed_requests(tmp_path):
    out = tmp_path / "demo-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env["COLUMNS"] = "200"  # one line per message, whatever the terminal
    p = subprocess.run([sys.executable, "-m", "fabric.demo", "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-6000:]
    for site in SITES:
        assert f"{site} reached v2" in text, text[-6000:]
    for worker in ("fra-edge-1-w1", "ams-edge-1-w1", "par-edge-1-w1"):
        assert f"{worker} swapped to v2" in text
    assert " 0 failed" in text
    assert "each left the origin once" in text
    assert "byte-identical" in text  # part 1, the local store, still runs
    assert "every site verified v1's signatures" in text and "every site verified v2's signatures" in text
    assert "--sign-key" in text and "signed by " in text
    for site in SITES:  # the forgery: refused by its code, v2 kept
        assert re.search(rf"│ {site} +│ v2 +│ refused +│ unknown_key +│", text), text[-6000:]
    assert "every site refused the forged v3 (unknown_key) and kept serving v2" in text
    for site in SITES:  # each agent kept its data where the demo says
        assert (out / "sites" / site / "current" / "demo-mlp").resolve().name == "v2"
        assert not (out / "sites" / site / "versions" / "demo-mlp" / "v3").exists()
    origin_channel = json.loads((out / "origin" / "store" / "refs" / "demo-mlp" / "channels" / "prod").read_text())
    assert origin_channel["version"] == "v3"  # the origin moved; no site followed
    if Path("/proc/self").exists():
        assert not _processes_under(out), "the demo left processes behind"
