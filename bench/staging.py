"""Staged switches: promote to every site active, with the version staged first and without.

    python -m bench.staging [--size-mb 128] [--sites 3] [--runs 3] [--tree] [--workdir DIR]

Starts a real `fabric origin` and `--sites` `fabric agent` processes on loopback, all
following `m:prod` (each keeps 1 version, so the disk stays small); with `--tree` the
first site is a hub the others fetch and follow through (`upstreams = [hub]`). Each run publishes
two versions of `--size-mb` MB of random bytes (nothing to dedup, nothing to compress):

1. **staged**: publish `s<n>`, `fabric stage` it (the registry's stage, through the
   origin), time until every site reports it held (`/v1/site`, staged.state), then promote
   it and time from the promote's answer to every site's `current/m` pointing at it;
2. **unstaged**: publish `u<n>` and promote it at once: the same time, with the fetch.

The clock for "active" is each site's `current/m` symlink, read every 5 ms. Every run is
printed, then a table of the medians; the machine may be shared, so read them as they are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the origin and agent launchers the tests use

from fabric.publish import publish  # noqa: E402
from fabric.wire.client import RemoteTarget, SyncOrigin  # noqa: E402

from helpers.agent import SITE_TOKENS, AgentProcess  # noqa: E402
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, OriginProcess, write_token_file  # noqa: E402

COMMAND = "python -m bench.staging"
SITES = ("hub", "edge-a", "edge-b", "solo")  # the sites the test token file knows


def _publish(so: SyncOrigin, src: Path, version: str, mb: int) -> float:
    folder = src / version
    folder.mkdir(parents=True)
    with open(folder / "weights.bin", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    t0 = time.monotonic()
    publish(folder, artifact="m", version=version, target=RemoteTarget(so))
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return time.monotonic() - t0


def _all_active(agents: list[AgentProcess], version: str, since: float, timeout: float = 600) -> list[float]:
    """Seconds from `since` until each site's current/m points at `version`."""
    out: dict[str, float] = {}
    while len(out) < len(agents):
        now = time.monotonic()
        if now - since > timeout:
            raise TimeoutError(f"{version}: active at {sorted(out)} only after {timeout} s")
        for a in agents:
            if a.site not in out and a.active("m") == version:
                out[a.site] = now - since
        time.sleep(0.005)
    return [out[a.site] for a in agents]


def _held(agent: AgentProcess, version: str) -> bool:
    try:
        ch = next(c for c in agent.status()["channels"] if c["artifact"] == "m")
    except (OSError, AssertionError, StopIteration):
        return False
    return (ch.get("staged") or {}).get("version") == version and ch["staged"].get("state") == "held"


def _all_held(agents: list[AgentProcess], version: str, since: float, timeout: float = 600) -> float:
    while not all(_held(a, version) for a in agents):
        if time.monotonic() - since > timeout:
            raise TimeoutError(f"{version} not held everywhere after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - since


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--sites", type=int, default=3, choices=range(1, len(SITES) + 1))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", action="store_true", help="the first site a relay for the others")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fabric-staging-"))
    work.mkdir(parents=True, exist_ok=True)
    tokens = write_token_file(work / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    origin = OriginProcess(work / "origin-store", tokens, work / "origin.log").start()
    agents: list[AgentProcess] = []
    so = SyncOrigin(origin.url, PUBLISH_SECRET)
    staged, unstaged, holding = [], [], []
    try:
        _publish(so, work / "src", "v0", 1)
        so.promote("m", "v0", "prod")
        common = {"follow": ["m:prod"], "retention": {"keep": 1}, "sync": {"resync_interval": 30}}
        if args.tree:
            hub = AgentProcess(work, SITES[0], origin.url, tokens=tokens, **common).start()
            agents = [hub] + [AgentProcess(work, s, origin.url, upstreams=[hub.url], **common).start()
                              for s in SITES[1:args.sites]]
        else:
            agents = [AgentProcess(work, s, origin.url, **common).start() for s in SITES[:args.sites]]
        _all_active(agents, "v0", time.monotonic(), 120)
        shape = "a hub and edges through it" if args.tree else "each from the origin"
        print(f"{COMMAND}: {args.sites} site agents ({shape}) and an origin on loopback (load average "
              f"{os.getloadavg()[0]:.1f}); versions of {args.size_mb} MB random bytes; promote answer -> every "
              f"site's current/m")
        for run in range(1, args.runs + 1):
            pub = _publish(so, work / "src", f"s{run}", args.size_mb)
            t0 = time.monotonic()
            so.stage("m", f"s{run}", "prod")
            held = _all_held(agents, f"s{run}", t0)
            t1 = time.monotonic()
            so.promote("m", f"s{run}", "prod")
            flip = _all_active(agents, f"s{run}", t1)
            _publish(so, work / "src", f"u{run}", args.size_mb)
            t2 = time.monotonic()
            so.promote("m", f"u{run}", "prod")
            full = _all_active(agents, f"u{run}", t2)
            staged.append(max(flip))
            unstaged.append(max(full))
            holding.append(held)
            print(f"  run {run}: staged: held everywhere {held:.2f} s after the stage, promote -> all active "
                  f"{max(flip):.3f} s (per site {', '.join(f'{t:.3f}' for t in flip)});  unstaged: promote -> "
                  f"all active {max(full):.3f} s (per site {', '.join(f'{t:.2f}' for t in full)});  "
                  f"publish {pub:.1f} s; load {os.getloadavg()[0]:.1f}")
    finally:
        so.close()
        for a in agents:
            a.stop()
        origin.stop()
    print()
    print(f"| {args.size_mb} MB version, {args.sites} sites | median | max | runs |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| staged first: promote -> all sites active | {statistics.median(staged):.3f} s | {max(staged):.3f} s "
          f"| {len(staged)} |")
    print(f"| not staged: promote -> all sites active | {statistics.median(unstaged):.3f} s | "
          f"{max(unstaged):.3f} s | {len(unstaged)} |")
    print(f"| (the staging itself: stage -> held at every site) | {statistics.median(holding):.2f} s | "
          f"{max(holding):.2f} s | {len(holding)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
