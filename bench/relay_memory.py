"""Relay memory: a hub agent's peak RSS while it relays one large version to 10 children.

    python -m bench.relay_memory [--size-mb 1024] [--children 10] [--runs 1] [--timeout 1800]

A real `fabric origin` process, one real hub agent process (upstream: the origin) and
`--children` real edge agent processes (`upstreams = [hub]`), all on loopback, each with
its own data folder, all following `model:prod`. Once every agent is up and idle, the
hub's RSS is the baseline of an idle agent. Then a version of `--size-mb` MB (one
safetensors file of random, incompressible U8 tensors) is published to the origin and
promoted, and the clock runs until every edge has it active (`current/model`, polled
every 50 ms). Before the agents stop, each one's `VmHWM` (peak RSS) and `VmRSS` are
read from /proc/PID/status. Every run's figures are printed: the hub's peak and RSS, the
edges' peaks (min/median/max and each), the idle baseline, and the wall time. The goal
(issue 17): the hub's peak ≤ 100 MiB relaying 1 GB to 10 children.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench import machine, md_table
from bench.simulate import PUBLISHER, RealAgents, _free_port, _wait_live, raise_nofile, site_config, site_name, write_tokens

GOAL_MIB = 100
ARTIFACT, CHANNEL, VERSION = "sim", "prod", "v1"  # bench.simulate's names (its site configs follow sim:prod)
TENSOR = 64 << 20


def _log(msg: str) -> None:
    print(f"[relay_memory] {msg}", file=sys.stderr, flush=True)


def proc_mem(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out["VmHWM"], out["VmRSS"]


def make_artifact(folder: Path, size: int) -> Path:
    """One safetensors file of `size` bytes of random U8 tensors, written 8 MiB at a time."""
    import numpy as np
    from fabric.safetensors_io import TensorSpec, write_safetensors
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    specs = [TensorSpec(f"layers.{i}.weight", "U8", (min(TENSOR, size - start),))
             for i, start in enumerate(range(0, size, TENSOR))]

    def fill(spec):
        for start in range(0, spec.nbytes, 8 << 20):
            yield rng.bytes(min(8 << 20, spec.nbytes - start))

    write_safetensors(folder / "model.safetensors", specs, fill, metadata={"format": "pt"})
    return folder


def run(size: int, children: int, timeout: float, base: str | None) -> dict:
    from fabric.publish import publish
    from fabric.wire.client import RemoteTarget, SyncOrigin
    from topology.lab import fabric_command
    work = Path(tempfile.mkdtemp(prefix="fabric-relay-mem-", dir=base))
    n = 1 + children
    tokens = write_tokens(work / "tokens.toml", n)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    origin = subprocess.Popen(fabric_command() + ["origin", "--store", str(work / "origin"), "--listen",
                                                  f"127.0.0.1:{port}", "--tokens", str(tokens)],
                              stdout=open(work / "origin.log", "wb"), stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=dict(os.environ, FABRIC_CONFIG=os.devnull))
    agents = None
    try:
        _wait_live(url, 60, origin)
        agents = RealAgents(work)
        hub_port = agents.start([site_config(0, work, url, tokens, None, 2.0)])[site_name(0)]
        hub_url = f"http://127.0.0.1:{hub_port}"
        agents.start([site_config(i, work, url, tokens, hub_url, 2.0) for i in range(1, n)])
        _log(f"origin, hub and {children} edges up; making a {size / 1e6:,.0f} MB artifact")
        src = make_artifact(work / "v1", size)
        time.sleep(3.0)
        idle = {s: proc_mem(p.pid)[1] for s, p in agents.procs.items()}
        with SyncOrigin(url, PUBLISHER) as so:
            t = time.monotonic()
            publish(src, artifact=ARTIFACT, target=RemoteTarget(so), version=VERSION)
            _log(f"published in {time.monotonic() - t:.1f} s; promoting")
            t0 = time.monotonic()
            so.promote(ARTIFACT, VERSION, CHANNEL)
        edges = [site_name(i) for i in range(1, n)]
        done: dict[str, float] = {}
        deadline = t0 + timeout
        while len(done) < len(edges) and time.monotonic() < deadline:
            for s in edges:
                link = agents.data[s] / "current" / ARTIFACT
                if s not in done and link.is_symlink() and link.resolve().name == VERSION:
                    done[s] = time.monotonic() - t0
            for s, p in agents.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"agent {s} exited rc={p.returncode}: "
                                       f"{(work / f'{s}.log').read_text()[-3000:]}")
            time.sleep(0.05)
        wall = time.monotonic() - t0
        mem = {s: proc_mem(p.pid) for s, p in agents.procs.items()}
        same = all((agents.data[s] / "current" / ARTIFACT / "model.safetensors").stat().st_size
                   == (src / "model.safetensors").stat().st_size for s in done)
        return {"size": size, "children": children, "active": len(done), "wall": wall,
                "hub_hwm": mem[site_name(0)][0], "hub_rss": mem[site_name(0)][1],
                "hub_idle": idle[site_name(0)], "idle": statistics.median(idle.values()),
                "edges": {s: mem[s] for s in edges}, "same_size": same}
    finally:
        if agents is not None:
            agents.stop()
        origin.terminate()
        try:
            origin.wait(timeout=20)
        except subprocess.TimeoutExpired:
            origin.kill()
        if not os.environ.get("RELAY_MEMORY_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            _log(f"work folder kept: {work}")


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.relay_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024.0, help="the version's size, MB (10^6 bytes)")
    ap.add_argument("--children", type=int, default=10, help="edge agents under the hub")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for every edge to activate")
    ap.add_argument("--data", default=None, help="where the work folder goes (default: the temp folder)")
    args = ap.parse_args(argv)
    raise_nofile()
    rows, texts = [], []
    for k in range(1, args.runs + 1):
        _log(f"run {k} of {args.runs}: {args.size_mb:g} MB to {args.children} children")
        r = run(int(args.size_mb * 1e6), args.children, args.timeout, args.data)
        peaks = sorted(h for h, _ in r["edges"].values())
        each = ", ".join(f"{s} {h:.0f}/{rss:.0f}" for s, (h, rss) in r["edges"].items())
        text = (f"Run {k}: hub peak (VmHWM) {r['hub_hwm']:.1f} MiB, RSS at the end {r['hub_rss']:.1f} MiB, idle "
                f"before the publish {r['hub_idle']:.1f} MiB; edges' peak min/median/max {peaks[0]:.1f}/"
                f"{statistics.median(peaks):.1f}/{peaks[-1]:.1f} MiB (each, peak/RSS: {each}); idle agent "
                f"(median of all) {r['idle']:.1f} MiB; {r['active']}/{r['children']} edges active in "
                f"{r['wall']:.1f} s; files the source's size: {'yes' if r['same_size'] else 'NO'}")
        print(text, flush=True)
        texts.append(text)
        rows.append([str(k), f"{r['size'] / 1e6:,.0f}", str(r["children"]), f"{r['hub_hwm']:.1f}",
                     f"{r['hub_rss']:.1f}", f"{peaks[-1]:.1f}", f"{r['idle']:.1f}", f"{r['wall']:.1f}",
                     "met" if r["hub_hwm"] <= GOAL_MIB and r["active"] == r["children"] else "MISSED"])
    m = machine()
    table = md_table(["run", "MB", "children", "hub peak MiB", "hub RSS end MiB", "edge peak max MiB",
                      "idle agent MiB", "wall s", f"hub ≤ {GOAL_MIB} MiB"], rows)
    out = "\n".join(["", table, "", f"{m['nproc']} CPUs ({m['cpu']}); command: `python -m bench.relay_memory "
                     + " ".join(argv if argv is not None else sys.argv[1:]) + "`"])
    print(out)
    return "\n\n".join(texts + [out])


if __name__ == "__main__":
    main()
