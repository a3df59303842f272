"""Relay memory: a hub agent's peak RSS while it relays one large version to 10 children.

    python -m bench.relay_memory [--size-mb 1024] [--children 10] [--runs 1] [--timeout 1800]
                                 [--delta] [--encode auto|full]

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

With `--delta` the version is a model's next step instead, the case where a relay
decodes deltas: v1 is BF16 weights (normal, scale 0.02), rolled out as above; then every
agent's peak is reset (`5` into /proc/PID/clear_refs) and v2, the same weights after a
small update of every element (as after an optimizer step), is published and promoted.
The edges hold v1, so the origin sends the hub deltas, and the hub sends its edges the
delta frames it received while it keeps them (`fabric.wire.framecache.Forwarded`,
`FORWARD_BYTES`; a relay never encodes), else stored forms; both rollouts' figures are
printed, with how many frames the hub forwarded and the bytes it fetched and sent.
`--encode full` pins `FABRIC_ENCODE` in every process, as the rate control picks on a
WAN link (on loopback `auto` sends most chunks stored); the origin then sends the hub a
delta for every changed chunk.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench import machine, md_table, scrape
from bench.simulate import ADMIN, PUBLISHER, RealAgents, _free_port, _wait_live, raise_nofile, site_config, site_name, write_tokens

GOAL_MIB = 100
ARTIFACT, CHANNEL, VERSION = "sim", "prod", "v1"  # bench.simulate's names (its site configs follow sim:prod)
NEXT = "v2"  # `--delta`: the step after VERSION
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


def make_weights(folder: Path, size: int, step: bool) -> Path:
    """One safetensors file of `size` bytes of BF16 weights (normal, scale 0.02), 8 MiB at a
    time; with `step`, the same weights after a small update of every element."""
    import numpy as np
    from fabric.safetensors_io import TensorSpec, write_safetensors
    folder.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(f"layers.{i}.weight", "BF16", (min(TENSOR, size - start) // 2,))
             for i, start in enumerate(range(0, size, TENSOR))]

    def fill(spec):
        i = int(spec.name.split(".")[1])
        for j, start in enumerate(range(0, spec.nbytes, 8 << 20)):
            n = min(8 << 20, spec.nbytes - start) // 2
            w = np.random.default_rng([7, i, j]).normal(0, 0.02, n).astype(np.float32)
            if step:
                w += np.random.default_rng([8, i, j]).normal(0, 0.02e-2, n).astype(np.float32)
            bits = w.view(np.uint32)
            yield ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()

    write_safetensors(folder / "model.safetensors", specs, fill, metadata={"format": "pt"})
    return folder


def reset_peak(pid: int) -> None:
    """Reset a process's VmHWM to its RSS now (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rollout(agents, so, src: Path, version: str, timeout: float, work: Path) -> tuple[float, int, dict]:
    """Publish `src` as `version`, promote it and wait until every edge has it active:
    (seconds from the promote, edges active, each agent's (VmHWM, VmRSS))."""
    from fabric.publish import publish
    from fabric.wire.client import RemoteTarget
    t = time.monotonic()
    publish(src, artifact=ARTIFACT, target=RemoteTarget(so), version=version)
    _log(f"{version} published in {time.monotonic() - t:.1f} s; promoting")
    t0 = time.monotonic()
    so.promote(ARTIFACT, version, CHANNEL)
    edges = [s for s in agents.procs if s != site_name(0)]
    done: dict[str, float] = {}
    deadline = t0 + timeout
    while len(done) < len(edges) and time.monotonic() < deadline:
        for s in edges:
            link = agents.data[s] / "current" / ARTIFACT
            if s not in done and link.is_symlink() and link.resolve().name == version:
                done[s] = time.monotonic() - t0
        for s, p in agents.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"agent {s} exited rc={p.returncode}: "
                                   f"{(work / f'{s}.log').read_text()[-3000:]}")
        time.sleep(0.05)
    wall = time.monotonic() - t0
    same = all(filecmp.cmp(agents.data[s] / "current" / ARTIFACT / "model.safetensors", src / "model.safetensors",
                           shallow=False) for s in done)
    if not same:
        raise RuntimeError(f"an edge's {version} is not the published file")
    return wall, len(done), {s: proc_mem(p.pid) for s, p in agents.procs.items()}


def run(size: int, children: int, timeout: float, base: str | None, delta: bool = False) -> dict:
    from fabric.wire.client import SyncOrigin
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
        src = make_weights(work / "v1", size, step=False) if delta else make_artifact(work / "v1", size)
        time.sleep(3.0)
        idle = {s: proc_mem(p.pid)[1] for s, p in agents.procs.items()}
        edges = [site_name(i) for i in range(1, n)]
        with SyncOrigin(url, PUBLISHER) as so:
            wall, active, mem = rollout(agents, so, src, VERSION, timeout, work)
            out = {"size": size, "children": children, "active": active, "wall": wall,
                   "hub_hwm": mem[site_name(0)][0], "hub_rss": mem[site_name(0)][1],
                   "hub_idle": idle[site_name(0)], "idle": statistics.median(idle.values()),
                   "edges": {s: mem[s] for s in edges}, "same_size": True}
            if delta:
                nxt = make_weights(work / "v2", size, step=True)
                for p in agents.procs.values():
                    reset_peak(p.pid)
                wall, active, mem = rollout(agents, so, nxt, NEXT, timeout, work)
                out["delta"] = {"active": active, "wall": wall, "hub_hwm": mem[site_name(0)][0],
                                "hub_rss": mem[site_name(0)][1], "edges": {s: mem[s] for s in edges},
                                "hub_metrics": scrape(hub_url, ADMIN)}
        return out
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
    ap.add_argument("--delta", action="store_true", help="then roll out the model's next step (deltas)")
    ap.add_argument("--encode", choices=("auto", "full"), default="auto", help="FABRIC_ENCODE in every process")
    args = ap.parse_args(argv)
    raise_nofile()
    os.environ["FABRIC_ENCODE"] = args.encode  # the origin's and the agents' (they inherit it)
    rows, texts = [], []
    for k in range(1, args.runs + 1):
        _log(f"run {k} of {args.runs}: {args.size_mb:g} MB to {args.children} children")
        r = run(int(args.size_mb * 1e6), args.children, args.timeout, args.data, args.delta)
        peaks = sorted(h for h, _ in r["edges"].values())
        each = ", ".join(f"{s} {h:.0f}/{rss:.0f}" for s, (h, rss) in r["edges"].items())
        text = (f"Run {k}: hub peak (VmHWM) {r['hub_hwm']:.1f} MiB, RSS at the end {r['hub_rss']:.1f} MiB, idle "
                f"before the publish {r['hub_idle']:.1f} MiB; edges' peak min/median/max {peaks[0]:.1f}/"
                f"{statistics.median(peaks):.1f}/{peaks[-1]:.1f} MiB (each, peak/RSS: {each}); idle agent "
                f"(median of all) {r['idle']:.1f} MiB; {r['active']}/{r['children']} edges active in "
                f"{r['wall']:.1f} s; files the source's size: {'yes' if r['same_size'] else 'NO'}")
        print(text, flush=True)
        texts.append(text)
        rows.append([str(k), VERSION, f"{r['size'] / 1e6:,.0f}", str(r["children"]), f"{r['hub_hwm']:.1f}",
                     f"{r['hub_rss']:.1f}", f"{peaks[-1]:.1f}", f"{r['idle']:.1f}", f"{r['wall']:.1f}",
                     "met" if r["hub_hwm"] <= GOAL_MIB and r["active"] == r["children"] else "MISSED"])
        if "delta" in r:
            d, hm = r["delta"], r["delta"]["hub_metrics"]
            dpeaks = sorted(h for h, _ in d["edges"].values())
            sent = {k.split('"')[1]: v for k, v in hm.items() if k.startswith("fabric_fetch_responses_total{")}
            text = (f"Run {k}, {NEXT} (the next step, peaks reset after {VERSION}): hub peak {d['hub_hwm']:.1f} MiB, "
                    f"RSS at the end {d['hub_rss']:.1f} MiB; edges' peak min/median/max {dpeaks[0]:.1f}/"
                    f"{statistics.median(dpeaks):.1f}/{dpeaks[-1]:.1f} MiB; {d['active']}/{r['children']} edges "
                    f"active in {d['wall']:.1f} s; the hub's fetch answers by path {sent}, frames reused "
                    f"{hm.get('fabric_encoded_frames_reused_total', 0):.0f}, frames forwarded "
                    f"{hm.get('fabric_forwarded_frames_total', 0):.0f}, fetched "
                    f"{sum(v for m, v in hm.items() if m.startswith('fabric_agent_bytes_by_source_total')) / 1e6:,.1f} MB "
                    f"(both rollouts), payload bytes sent "
                    f"{hm.get('fabric_bytes_sent_total', 0) / 1e6:,.1f} MB (both rollouts), received "
                    f"{hm.get('fabric_bytes_received_total', 0) / 1e6:,.1f} MB")
            print(text, flush=True)
            texts.append(text)
            rows.append([str(k), f"{NEXT} (delta)", f"{r['size'] / 1e6:,.0f}", str(r["children"]),
                         f"{d['hub_hwm']:.1f}", f"{d['hub_rss']:.1f}", f"{dpeaks[-1]:.1f}", f"{r['idle']:.1f}",
                         f"{d['wall']:.1f}",
                         "met" if d["hub_hwm"] <= GOAL_MIB and d["active"] == r["children"] else "MISSED"])
    m = machine()
    table = md_table(["run", "version", "MB", "children", "hub peak MiB", "hub RSS end MiB", "edge peak max MiB",
                      "idle agent MiB", "wall s", f"hub ≤ {GOAL_MIB} MiB"], rows)
    out = "\n".join(["", table, "", f"{m['nproc']} CPUs ({m['cpu']}); command: `python -m bench.relay_memory "
                     + " ".join(argv if argv is not None else sys.argv[1:]) + "`"])
    print(out)
    return "\n\n".join(texts + [out])


if __name__ == "__main__":
    main()
