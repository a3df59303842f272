"""Origins over one bucket: how fast a move made through one reaches a site on the other, and failover.

    python -m bench.failover [--publishes 10] [--resync 5] [--workdir bench-out/failover]

Starts a real SeaweedFS (`weed mini`), two `fabric origin` processes A and B on one
bucket prefix, and two `fabric agent` processes following `m:prod`: `edge-a` lists
`origins = [A, B]`, `edge-b` lists `[B, A]`; both re-sync only every 300 s. Then:

1. **propagation**: `--publishes` times, publish a small version through A and promote
   it; time from the promote's answer to each site's target (its `/v1/site`, polled every
   10 ms): `edge-b` learns through B's reading of the move log, `edge-a` from A's own event.
2. **without the move log** (the comparison): two more origins on another prefix with
   `--move-log off`, a site on the second re-syncing every `--resync` seconds; 3 publishes
   through the first: the site learns only at its next re-sync.
3. **failover**: kill A (SIGKILL); time until `edge-a`'s report reaches B (its control
   plane moved to B); then publish through B: time from the promote's answer to `edge-a`
   targeting and activating that version.

Every run's figures are printed; the machine is shared, so read them as they are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS, origin and agent launchers the tests use

from fabric.publish import publish  # noqa: E402
from fabric.wire.client import RemoteTarget, SyncOrigin  # noqa: E402

from helpers.agent import SITE_TOKENS, AgentProcess  # noqa: E402
from helpers.http import request  # noqa: E402
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, OriginProcess, write_token_file  # noqa: E402
from helpers.s3 import Weed  # noqa: E402

COMMAND = "python -m bench.failover"
BUCKET = "fabric-bench"


def _origin(work: Path, tokens: Path, store: str, name: str, env: dict, args=()) -> OriginProcess:
    o = OriginProcess(work, tokens, work / f"{name}.log", args=list(args))
    o.store, o.env = store, dict(env)
    return o.start()


def _agent(work: Path, site: str, origins: list[str], resync: float) -> AgentProcess:
    return AgentProcess(work, site, origins[0], origins=origins, follow=["m:prod"],
                        sync={"resync_interval": resync}).start()


def _publish(origin: OriginProcess, src: Path, version: str) -> float:
    (src / "weights.bin").write_bytes(os.urandom(100_000))
    with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
        publish(src, artifact="m", version=version, target=RemoteTarget(so))
        so.promote("m", version, "prod")
    return time.monotonic()


def _target(agent: AgentProcess) -> str | None:
    try:
        return next(c["target"] for c in agent.status()["channels"] if c["artifact"] == "m")
    except (OSError, AssertionError, StopIteration):
        return None


def _received(origin: OriginProcess, site: str) -> float:
    r = request(origin.url, "GET", "/v1/sites", token=ADMIN_SECRET, timeout=5)
    return next((s["received"] for s in r.json()["sites"] if s["site"] == site), 0.0) if r.status == 200 else 0.0


def _wait(pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError("timed out")


def _times(agents: dict[str, AgentProcess], version: str, since: float, timeout: float = 120) -> dict[str, float]:
    out = {}
    while len(out) < len(agents):
        if time.monotonic() - since > timeout:
            raise TimeoutError(f"{version}: only {sorted(out)} after {timeout} s")
        for name, agent in agents.items():
            if name not in out and _target(agent) == version:
                out[name] = time.monotonic() - since
        time.sleep(0.01)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--publishes", type=int, default=10)
    ap.add_argument("--resync", type=float, default=5.0, help="the comparison site's re-sync interval (s)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fabric-failover-"))
    work.mkdir(parents=True, exist_ok=True)
    tokens = write_token_file(work / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    src = work / "model"
    src.mkdir(exist_ok=True)
    procs: list = []
    with Weed(work / "weed") as weed:
        weed.client().create_bucket(Bucket=BUCKET)
        try:
            store = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
            a = _origin(work, tokens, store, "origin-a", weed.env)
            b = _origin(work, tokens, store, "origin-b", weed.env)
            procs += [a, b]
            _publish(a, src, "v0")
            edge_a, edge_b = _agent(work, "edge-a", [a.url, b.url], 300), _agent(work, "edge-b", [b.url, a.url], 300)
            procs += [edge_a, edge_b]
            for agent in (edge_a, edge_b):
                agent.wait_active("m", "v0", timeout=60)
            print(f"{COMMAND}: two origins on one SeaweedFS bucket; a small version published through A, "
                  f"promote answer -> site's target")
            cross, same = [], []
            for i in range(1, args.publishes + 1):
                t = _times({"edge-b": edge_b, "edge-a": edge_a}, f"v{i}", _publish(a, src, f"v{i}"))
                cross.append(t["edge-b"])
                same.append(t["edge-a"])
                print(f"  publish {i:2d}: site on B (move log) {t['edge-b']:.3f} s   site on A (own event) "
                      f"{t['edge-a']:.3f} s")

            # the comparison: origins that do not share a move log, the site's re-sync is all it has
            store2 = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
            c = _origin(work, tokens, store2, "origin-c", weed.env, ["--move-log", "off"])
            d = _origin(work, tokens, store2, "origin-d", weed.env, ["--move-log", "off"])
            procs += [c, d]
            _publish(c, src, "w0")
            solo = AgentProcess(work, "solo", d.url, follow=["m:prod"], sync={"resync_interval": args.resync}).start()
            procs.append(solo)
            solo.wait_active("m", "w0", timeout=60)
            off = []
            for i in range(1, 4):
                t = _times({"solo": solo}, f"w{i}", _publish(c, src, f"w{i}"))["solo"]
                off.append(t)
                print(f"  --move-log off, publish {i}: site on the other origin {t:.3f} s "
                      f"(re-sync every {args.resync:g} s)")

            # failover: A dies; the site that prefers it reports to B, then follows what is published there
            a.kill()
            killed, killed_wall = time.monotonic(), time.time()
            reported = _wait(lambda: _received(b, "edge-a") > killed_wall, 60) - killed
            promoted = _publish(b, src, "vf")
            targeted = _wait(lambda: _target(edge_a) == "vf", 60) - promoted
            edge_a.wait_active("m", "vf", timeout=60)
            active = time.monotonic() - promoted
            print(f"  failover: origin A killed; the site that prefers A reports to B {reported:.3f} s later; "
                  f"a publish through B: it targets it {targeted:.3f} s after the promote, active {active:.3f} s")
        finally:
            for p in reversed(procs):
                p.stop()
    print()
    print("| what | median | max | runs |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| site on the other origin (move log, poll 0.5 s) | {statistics.median(cross):.3f} s | "
          f"{max(cross):.3f} s | {len(cross)} |")
    print(f"| site on the publishing origin (its own event) | {statistics.median(same):.3f} s | "
          f"{max(same):.3f} s | {len(same)} |")
    print(f"| site on the other origin, `--move-log off` (re-sync {args.resync:g} s) | "
          f"{statistics.median(off):.3f} s | {max(off):.3f} s | {len(off)} |")
    print(f"| failover: origin killed -> its site's report at the other origin | {reported:.3f} s | | 1 |")
    print(f"| failover: then a publish through the other -> the site targets it / active | "
          f"{targeted:.3f} s / {active:.3f} s | | 1 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
