"""Fan-out: one version to six edge sites through a relay tree, against every site pulling it directly.

    python -m bench.fanout [--size-mb 1024] [--runs 1] [--uplink shared|per-hub] [--uplink-rate 200mbit]
                           [--edge-rate 1gbit] [--tool aria2c|curl] [--no-direct] [--keep]

Builds a two-level tree in the namespace lab (topology/lab.py): the origin, two hubs,
three edge sites under each hub (8 sites), every link shaped with `tc tbf`. The origin's
uplink is the bottleneck (`--uplink-rate`, default 200 Mbit/s); hub→edge links run at
`--edge-rate` (1 Gbit/s).

* `--uplink shared` (default): the origin has ONE uplink, to a router node `wan` that
  runs nothing and joins both hubs at `--edge-rate`; every byte leaving the origin
  shares the one bottleneck. The agents get a topology file without `wan` (the tree
  origin → hubs → edges, with the lab's addresses), so they plan exactly as for a
  two-level tree.
* `--uplink per-hub`: one bottleneck link from the origin to each hub (the shape of
  topology/large.toml; `Topology.origin_uplink_bps` is the slowest of them).

The artifact is one safetensors file of `--size-mb` MB of random (incompressible) U8
tensors. It is published to `fabric origin` (inside the origin's namespace) without a
channel; the clock starts when `fabric promote model@v1 -c prod` returns (the channel
move every agent follows) and stops when every edge site has the version active (its
`current/model` symlink, polled every 50 ms). Each site's activation time, its bytes
by source (`/metrics`) and the origin's egress on its uplink veth(s) are recorded,
and every edge's file is compared with the source.

Each site's peak memory (`VmHWM` of its agent process, from /proc/PID/status) and CPU
seconds are read before it stops, and the bytes it wrote for the version (`write_bytes`
of /proc/PID/io: what the process sent, or will send, to storage, read right before the
promote and again once every site is active), against the version's new bytes (one copy
per site: goal ≤ 1.05×); the origin uplink's tx counter is sampled every
0.25 s, which tells when the uplink started carrying the version, when it had carried
99% of it, and its mean rate in between (an idle uplink is time lost on the lower bound).
`--runs N` repeats the Fabric run N times (a fresh origin, agents and data folders each
time, the same lab and artifact) and prints every run's figures, then a summary line
per run.

Then the agents and the origin are stopped, nginx serves the same file from the
origin's namespace, and all six edges pull it at once (`aria2c -x4 -s4`, or `curl`)
through the same routes (the same shared uplink). The same clock and counters apply.

Lower bound: artifact bytes / bottleneck rate (the origin must push every byte through
its uplink once). The report gives makespan / lower bound, origin egress / the
version's missing-chunk bytes, and direct-pull makespan / Fabric's. Targets: makespan
≤ 1.25 × lower bound, origin egress ≤ 1.05 × missing-chunk bytes. Everything runs
inside lab namespaces (10.77.0.0/16 exists only there) and in a temp folder under
/tmp; namespaces, processes and files are removed at the end, also on failure.
Needs root, `ip`/`tc`, nginx and aria2c or curl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import machine, md_table
from bench.pull_throughput import nginx_config
from fabric.safetensors_io import TensorSpec, write_safetensors
from fabric.core.topology import ORIGIN, Topology, parse_bandwidth

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `topology` is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from topology.lab import Lab, cleanup_stale, fabric_command, lab_available  # noqa: E402

COMMAND = "python -m bench.fanout"
MB = 1e6
TENSOR = 64 << 20  # bytes per generated tensor: whole 8 MiB segments
HUBS = {"hub-a": "a", "hub-b": "b"}
EDGES_PER_HUB = 3
ROUTER = "wan"
NGINX_PORT = 8080
PUBLISH_SECRET = "fanout-publish-secret-5b7e21c9"
ARTIFACT, VERSION, CHANNEL = "model", "v1", "prod"


def _log(msg: str) -> None:
    print(f"[fanout] {msg}", file=sys.stderr, flush=True)


def edges_of(hub: str) -> list[str]:
    return [f"{HUBS[hub]}-edge-{i}" for i in range(1, EDGES_PER_HUB + 1)]


EDGES = [e for h in HUBS for e in edges_of(h)]
SITES = [*HUBS, *EDGES]


def secret(site: str) -> str:
    return f"{site}-fanout-secret-0d4c8a"


# --- topology ----------------------------------------------------------------------------------

def lab_topology(shared: bool, uplink: str, edge_rate: str) -> Topology:
    """What the lab builds: with `shared`, a router `wan` between the origin and the hubs."""
    sites, links = [], []
    top = ROUTER if shared else ORIGIN
    if shared:
        sites.append({"name": ROUTER, "region": "wan", "upstream": ORIGIN})
        links.append({"a": ORIGIN, "b": ROUTER, "bandwidth": uplink})
    for hub, region in HUBS.items():
        sites.append({"name": hub, "region": region, "upstream": top})
        links.append({"a": top, "b": hub, "bandwidth": edge_rate if shared else uplink})
        for e in edges_of(hub):
            sites.append({"name": e, "region": region, "upstream": hub})
            links.append({"a": hub, "b": e, "bandwidth": edge_rate})
    return Topology.from_dict({"name": "fanout", "site": sites, "link": links})


def agent_topology(lab: Lab, path: Path, uplink: str, edge_rate: str) -> Path:
    """The tree the agents plan with (origin → hubs → edges), at the lab's addresses."""
    q = json.dumps
    lines = ['name = "fanout"', "", "[origin]", f"url = {q(lab.url(ORIGIN))}"]
    for hub, region in HUBS.items():
        for site, up in ((hub, ORIGIN), *((e, hub) for e in edges_of(hub))):
            lines += ["", "[[site]]", f"name = {q(site)}", f"region = {q(region)}", f"upstream = {q(up)}",
                      f"url = {q(lab.url(site))}"]
    for hub in HUBS:
        lines += ["", "[[link]]", f"a = {q(ORIGIN)}", f"b = {q(hub)}", f"bandwidth = {q(uplink)}"]
        for e in edges_of(hub):
            lines += ["", "[[link]]", f"a = {q(hub)}", f"b = {q(e)}", f"bandwidth = {q(edge_rate)}"]
    path.write_text("\n".join(lines) + "\n")
    Topology.load(path)  # valid, or fail here rather than in eight agents
    return path


def uplinks(lab: Lab) -> list[tuple[str, str]]:
    """(origin, peer) of every link leaving the origin."""
    return [(ORIGIN, link.other(ORIGIN)) for link in lab.links if ORIGIN in (link.a, link.b)]


def origin_egress(lab: Lab) -> dict[str, int]:
    """tx bytes so far on each of the origin's uplink veths, by peer."""
    return {peer: lab.iface_bytes(o, peer)[0] for o, peer in uplinks(lab)}


def _minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# --- the artifact ------------------------------------------------------------------------------

def make_artifact(folder: Path, size: int, seed: int = 0) -> Path:
    """One safetensors file of `size` bytes of random U8 tensors (plus its header)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    specs = [TensorSpec(f"layers.{i}.weight", "U8", (min(TENSOR, size - start),))
             for i, start in enumerate(range(0, size, TENSOR))]

    def fill(spec: TensorSpec):
        for start in range(0, spec.nbytes, 8 << 20):
            yield rng.bytes(min(8 << 20, spec.nbytes - start))

    write_safetensors(folder / "model.safetensors", specs, fill, metadata={"format": "pt"})
    return folder / "model.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


# --- runs ----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    makespan: float
    egress: dict[str, int]  # bytes out of each of the origin's uplink veths, headers included

    @property
    def total(self) -> int:
        return sum(self.egress.values())

    @property
    def busiest(self) -> int:
        return max(self.egress.values())
    done_at: dict[str, float]  # site -> seconds after the start
    identical: bool
    notes: list[str] = field(default_factory=list)
    uplink: "Timeline | None" = None


class Timeline:
    """The origin uplinks' total tx bytes, sampled every `period` s in a thread from `t0`."""

    def __init__(self, lab: Lab, t0: float, period: float = 0.25):
        self.lab, self.t0, self.period = lab, t0, period
        self.base = sum(origin_egress(lab).values())
        self.samples: list[tuple[float, int]] = [(0.0, 0)]
        self.watch = {s: (s, lab.nodes[s].upstream) for s in ("hub-a", "a-edge-1")}  # rx of one hub, one edge
        self.rx0 = {s: lab.iface_bytes(*f)[1] for s, f in self.watch.items()}
        self.rx: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                total = sum(origin_egress(self.lab).values()) - self.base
            except Exception:  # noqa: BLE001 - a failed sample only thins the timeline
                continue
            t = time.monotonic() - self.t0
            self.samples.append((t, total))
            try:
                self.rx.append((t, {s: self.lab.iface_bytes(*f)[1] - self.rx0[s] for s, f in self.watch.items()}))
            except Exception:  # noqa: BLE001
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def when(self, nbytes: float) -> float:
        """Seconds after t0 at which the uplink had carried `nbytes`."""
        return next((t for t, b in self.samples if b >= nbytes), float("nan"))

    def received(self, site: str, nbytes: float) -> float:
        return next((t for t, d in self.rx if d[site] >= nbytes), float("nan"))

    def summary(self, artifact_bytes: int, rate_bps: float) -> str:
        first, last = self.when(0.01 * artifact_bytes), self.when(0.99 * artifact_bytes)
        mean = 0.98 * artifact_bytes * 8 / (last - first) if last > first else float("nan")
        return (f"uplink carried 1% at {first:.1f}s, 99% at {last:.1f}s: {mean / 1e6:,.0f} Mbit/s between "
                f"({mean / rate_bps:.0%} of the {rate_bps / 1e6:,.0f} Mbit/s uplink); received 25/50/90/99%: "
                + "; ".join(f"{s} " + "/".join(f"{self.received(s, q * artifact_bytes):.1f}" for q in (.25, .5, .9, .99))
                            for s in self.watch) + f" s ({len(self.samples)} samples, the last at "
                f"{self.samples[-1][0]:.1f}s: {self.samples[-1][1] / MB:,.0f} MB)")


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS MiB from VmHWM, CPU seconds) of a running process."""
    hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return hwm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_bytes(pid: int) -> int:
    """Bytes the process caused to be written to storage (`write_bytes` of /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def wait_all(check, names: Sequence[str], t0: float, timeout: float, what: str) -> dict[str, float]:
    """Poll `check(name)` every 50 ms until it holds for every name; their times after t0."""
    done: dict[str, float] = {}
    deadline = t0 + timeout
    while len(done) < len(names):
        now = time.monotonic()
        for n in names:
            if n not in done and check(n):
                done[n] = now - t0
        if len(done) < len(names):
            if now > deadline:
                raise TimeoutError(f"{what}: {sorted(set(names) - set(done))} not done after {timeout:.0f}s")
            time.sleep(0.05)
    return done


def metrics_by_source(lab: Lab, site: str) -> dict[str, float]:
    """The agent's fabric_agent_bytes_by_source_total, keyed by node name."""
    r = lab.run(site, ["curl", "-sSf", "-m", "5", "-H", f"Authorization: Bearer {secret(site)}",
                       f"{lab.url(site)}/metrics"], timeout=15)
    names = {lab.url(n): n for n in lab.nodes}
    out: dict[str, float] = {}
    for line in r.stdout.splitlines():
        m = re.match(r'^fabric_agent_bytes_by_source_total\{source="([^"]+)"\}\s+(\S+)$', line)
        if m:
            out[names.get(m.group(1), m.group(1))] = float(m.group(2))
    return out


def log_events(lab: Lab, site: str) -> dict[str, dict]:
    """The agent's last 'version fetched' and 'version activated' log records."""
    out = {}
    for line in lab.logs(site).splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") in ("version fetched", "version activated", "channel points at new version"):
                out[rec["msg"]] = rec
    return out


def run_fabric(lab: Lab, work: Path, src: Path, tokens: Path, topo_file: Path | None,
               timeout: float) -> tuple[Outcome, dict, list[list[str]]]:
    env = {**os.environ, "FABRIC_CONFIG": os.devnull, "PYTHONUNBUFFERED": "1"}
    origin = lab.start_origin(work / "origin-store", tokens, env=env)
    agents = {}
    for s in SITES:
        cfg = lab.write_agent_config(s, work / "sites" / s, secret(s), [f"{ARTIFACT}:{CHANNEL}"], tokens,
                                     extra={"topology": topo_file} if topo_file else None)
        agents[s] = lab.start_agent(s, cfg, env=env)
    _log(f"origin and {len(agents)} agents up; publishing {src.stat().st_size / MB:,.0f} MB (no channel yet) …")
    fab = fabric_command()
    t = time.monotonic()
    r = lab.run(ORIGIN, [*fab, "publish", src.parent, "-a", ARTIFACT, "--version", VERSION, "--origin",
                         lab.url(ORIGIN), "--token", PUBLISH_SECRET, "--json"], env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"publish failed: {r.stderr[-2000:]}")
    report = json.loads(r.stdout)
    _log(f"published in {time.monotonic() - t:.1f}s: {report['new_bytes'] / MB:,.1f} MB new, "
         f"{report['written_bytes'] / MB:,.1f} MB sent; promoting …")
    egress0 = origin_egress(lab)
    feeds = {s: (s, lab.nodes[s].upstream) for s in SITES}  # each site's end of its tree uplink
    rx0 = {s: lab.iface_bytes(*f)[1] for s, f in feeds.items()}
    written0 = {s: write_bytes(p.pid) for s, p in agents.items()}
    r = lab.run(ORIGIN, [*fab, "promote", f"{ARTIFACT}@{VERSION}", "-c", CHANNEL, "--origin", lab.url(ORIGIN),
                         "--token", PUBLISH_SECRET], env=env, timeout=60)
    t0 = time.monotonic()  # the channel has moved
    timeline = Timeline(lab, t0)
    if r.returncode != 0:
        timeline.stop()
        raise RuntimeError(f"promote failed: {r.stderr[-2000:]}")

    def active(site: str) -> bool:
        if agents[site].poll() is not None:
            raise RuntimeError(f"agent {site} exited rc={agents[site].returncode}\n{lab.logs(site)[-3000:]}")
        link = work / "sites" / site / "current" / ARTIFACT
        return link.is_symlink() and link.resolve().name == VERSION

    try:
        done = wait_all(active, SITES, t0, timeout, "fabric fan-out")  # hubs activate before their edges
    finally:
        timeline.stop()
    makespan = max(done[e] for e in EDGES)
    usage = {s: proc_stats(p.pid) for s, p in agents.items()}
    written = {s: write_bytes(p.pid) - written0[s] for s, p in agents.items()}
    egress = _minus(origin_egress(lab), egress0)
    rx = {s: lab.iface_bytes(*f)[1] - rx0[s] for s, f in feeds.items()}
    _log(f"every edge active after {makespan:.1f}s; checking contents …")
    want = sha256(src)
    identical = all(sha256(work / "sites" / e / "current" / ARTIFACT / src.name) == want for e in EDGES)

    per_site = []
    for s in SITES:
        got = metrics_by_source(lab, s)
        ev = log_events(lab, s)
        fetched = ev.get("version fetched", {})
        up = ORIGIN if s in HUBS else next(h for h in HUBS if s in edges_of(h))  # as the agents plan it
        peers = sum(v for k, v in got.items() if k not in (ORIGIN, up))
        line = [s, f"{done[s]:.1f}", f"{fetched.get('seconds', float('nan')):.1f}",
                f"{got.get(up, 0) / MB:,.0f}" if up != ORIGIN else "-",
                f"{peers / MB:,.0f}", f"{got.get(ORIGIN, 0) / MB:,.0f}"]
        line += [f"{rx[s] / MB:,.0f}", f"{written[s] / MB:,.1f}", f"{written[s] / report['new_bytes']:.3f}",
                 f"{usage[s][0]:,.0f}", f"{usage[s][1]:.1f}"]
        per_site.append(line)
    for s, p in agents.items():
        lab.stop(p, 2)
    lab.stop(origin, 2)
    return Outcome(makespan, egress, done, identical, uplink=timeline), report, per_site


def run_direct(lab: Lab, work: Path, src: Path, tool: str, timeout: float) -> Outcome:
    ngx = lab.exec(ORIGIN, ["nginx", "-c", nginx_config(work, src.parent, lab.addr(ORIGIN), NGINX_PORT)])
    url = f"{lab.url(ORIGIN, NGINX_PORT)}/{src.name}"
    lab.wait_http(ORIGIN, url, proc=ngx, timeout=15)
    dirs = {e: work / "direct" / e for e in EDGES}
    for d in dirs.values():
        d.mkdir(parents=True)
    if tool == "aria2c":
        cmd = lambda d: ["aria2c", "-x4", "-s4", "--min-split-size=16M", "--file-allocation=none",  # noqa: E731
                         "--allow-overwrite=true", "--auto-file-renaming=false", "--console-log-level=warn",
                         "--summary-interval=0", "--download-result=hide", "-d", d, "-o", src.name, url]
    else:
        cmd = lambda d: ["curl", "-sSf", "-o", d / src.name, url]  # noqa: E731
    os.sync()
    egress0 = origin_egress(lab)
    t0 = time.monotonic()
    procs = {e: lab.exec(e, cmd(dirs[e])) for e in EDGES}

    def finished(e: str) -> bool:
        rc = procs[e].poll()
        if rc not in (None, 0):
            raise RuntimeError(f"{tool} on {e} failed (rc={rc})\n{lab.logs(e)[-2000:]}")
        return rc == 0

    try:
        done = wait_all(finished, EDGES, t0, timeout, f"direct pulls ({tool})")
    finally:
        for p in procs.values():
            lab.stop(p, 2)
    egress = _minus(origin_egress(lab), egress0)
    lab.stop(ngx, 2)
    want = sha256(src)
    identical = all(sha256(dirs[e] / src.name) == want for e in EDGES)
    return Outcome(max(done.values()), egress, done, identical)


# --- main -------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=1024, help="artifact size in MB (default 1024)")
    p.add_argument("--runs", type=int, default=1, help="Fabric runs, each printed (default 1)")
    p.add_argument("--uplink", choices=["shared", "per-hub"], default="shared",
                   help="one bottleneck uplink shared by both hubs (default), or one per hub")
    p.add_argument("--uplink-rate", default="200mbit", help="the origin's uplink (default 200mbit)")
    p.add_argument("--edge-rate", default="1gbit", help="hub→edge links, and wan→hub (default 1gbit)")
    p.add_argument("--tool", choices=["aria2c", "curl"], default=None,
                   help="direct-pull client (default aria2c if installed, else curl)")
    p.add_argument("--no-direct", action="store_true", help="skip the direct-pull comparison")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores) for inspection")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")

    ok, why = lab_available()
    tool = args.tool or ("aria2c" if shutil.which("aria2c") else "curl")
    missing = [t for t in ("curl", *(() if args.no_direct else ("nginx", tool))) if shutil.which(t) is None]
    if not ok or missing:
        text = f"Skipped: {why or 'missing ' + ', '.join(missing) + ' (apt-get install -y curl nginx-light aria2)'}"
        print(text)
        return text
    shared = args.uplink == "shared"
    rate = parse_bandwidth(args.uplink_rate, "--uplink-rate")
    size = int(args.size_mb * MB)
    command = f"{COMMAND} {' '.join(argv) if argv is not None else ' '.join(sys.argv[1:])}".rstrip()
    cleanup_stale()
    work = Path(tempfile.mkdtemp(prefix="fabric-fanout-", dir="/tmp"))
    t_start = time.monotonic()
    texts, runs = [], []
    try:
        _log(f"generating {size / MB:,.0f} MB of random tensors under {work} …")
        src = make_artifact(work / "src", size)
        artifact_bytes = src.stat().st_size
        tokens = work / "tokens.toml"
        tokens.write_text(f'[[token]]\nname = "publisher"\nsecret = "{PUBLISH_SECRET}"\nscopes = ["publish", "pull"]\n'
                          + "".join(f'[[token]]\nname = "{s}"\nsite = "{s}"\nsecret = "{secret(s)}"\nscopes = ["pull"]\n'
                                    for s in SITES))
        lower = artifact_bytes * 8 / rate
        topo = lab_topology(shared, args.uplink_rate, args.edge_rate)
        with Lab(topo, workdir=work / "lab", stop_grace=2) as lab:
            topo_file = agent_topology(lab, work / "agents-topology.toml", args.uplink_rate, args.edge_rate) \
                if shared else None
            _log(f"lab {lab.tag}: {len(lab.nodes)} namespaces; lower bound {lower:.1f}s")
            for n in range(1, args.runs + 1):
                fab, report, per_site = run_fabric(lab, work / f"run-{n}", src, tokens, topo_file,
                                                   timeout=20 * lower + 300)
                runs.append((fab, report, per_site))
                if not args.keep:
                    shutil.rmtree(work / f"run-{n}", ignore_errors=True)  # 9 copies of the artifact
                texts.append(report_run(n, args, fab, report, per_site, lower, artifact_bytes, rate))
                print(texts[-1] + "\n", flush=True)
                _log(f"run {n}/{args.runs}: {fab.makespan:.1f}s = {fab.makespan / lower:.2f}x the lower bound, "
                     f"busiest uplink {fab.busiest / report['written_bytes']:.2f} copies")
            direct = None
            if not args.no_direct:
                _log(f"direct pulls: {len(EDGES)} × {tool} from nginx in the origin's namespace …")
                direct = run_direct(lab, work, src, tool, timeout=40 * lower + 300)
    except BaseException:
        if not args.keep:
            _log(f"failed; logs kept in {work / 'lab' / 'logs'}")
            args.keep = True
        raise
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _log(f"work folder kept: {work}")

    def row(name: str, o: Outcome, base: float) -> list[str]:
        return [name, f"{o.makespan:.1f}", f"{lower:.1f}", f"{o.makespan / lower:.2f}", f"{o.total / MB:,.0f}",
                f"{o.busiest / artifact_bytes:.2f}", f"{o.makespan / base:.2f}", "yes" if o.identical else "NO"]

    best = min(f.makespan for f, _, _ in runs)
    rows = [row(f"Fabric run {n}" if len(runs) > 1 else "Fabric (relay tree)", f, best)
            for n, (f, _, _) in enumerate(runs, 1)]
    if direct:
        rows.append(row(f"direct pulls ({tool}, 6 edges at once)", direct, best))
    missing_bytes = runs[0][1]["written_bytes"]
    met = [f.makespan <= 1.25 * lower and f.busiest <= 1.05 * missing_bytes for f, _, _ in runs]
    m = machine()
    lines = ["Summary, every run (makespan ≤ 1.25 × lower bound and busiest uplink ≤ 1.05 copies: "
             f"{sum(met)} of {len(runs)} runs met both):", "",
             md_table(["method", "makespan s", "lower bound s", "× lower bound", "origin egress MB",
                       "busiest uplink / artifact", "× best Fabric makespan", "byte-identical"], rows)]
    if direct:
        lines.append(f"\n- direct pulls / best Fabric makespan: {direct.makespan / best:.2f}× (the issue expects about 6×)")
    lines += ["", f"Whole run {time.monotonic() - t_start:.0f} s on {m['nproc']} CPUs ({m['cpu']}); "
              f"command: `{command}`"]
    text = "\n".join(lines)
    print(text)
    return "\n\n".join(texts + [text])


def report_run(n: int, args, fab: Outcome, report: dict, per_site: list[list[str]], lower: float,
               artifact_bytes: int, rate: float) -> str:
    """One Fabric run's figures: the tree's row, the verdicts, the uplink's timeline and every site."""
    missing_bytes = report["written_bytes"]
    shared = args.uplink == "shared"
    uplink_desc = (f"one {args.uplink_rate} origin uplink shared by both hubs (via router `{ROUTER}`)" if shared
                   else f"one {args.uplink_rate} link from the origin to each hub")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    table = md_table(["method", "makespan s", "lower bound s", "× lower bound", "origin egress MB",
                      "busiest uplink / artifact", "byte-identical"],
                     [["Fabric (relay tree)", f"{fab.makespan:.1f}", f"{lower:.1f}", f"{fab.makespan / lower:.2f}",
                       f"{fab.total / MB:,.0f}", f"{fab.busiest / artifact_bytes:.2f}",
                       "yes" if fab.identical else "NO"]])
    sites = md_table(["site", "active at s", "fetch s (agent log)", "MB from upstream", "MB from peers",
                      "MB from origin", "MB in on its uplink veth", "MB written (write_bytes)",
                      "written / new bytes", "peak RSS MiB (VmHWM)", "CPU s"], per_site)
    hubs = [r for r in per_site if r[0] in HUBS]
    ratios = [float(r[-3]) for r in per_site]
    lines = [
        f"Run {n} of {args.runs}. Artifact: one safetensors file, {artifact_bytes / MB:,.1f} MB of random U8 tensors "
        f"({report['chunks']} chunks); version's missing-chunk bytes (sent by publish): {missing_bytes / MB:,.1f} MB.",
        f"Tree: origin → 2 hubs → 3 edges each; {uplink_desc}; hub→edge {args.edge_rate}; every link `tc tbf`. "
        f"Lower bound = artifact bytes / {args.uplink_rate}. Makespan: `fabric promote` returned → the last "
        f"edge's `current/` points at the version. Egress: tx bytes of the origin's uplink veth(s), TCP/IP "
        f"headers included; the target applies to each uplink (every WAN link carries each chunk once), so the "
        f"busiest one is shown.",
        "",
        table,
        "",
        f"- makespan ≤ 1.25 × lower bound: {verdict(fab.makespan <= 1.25 * lower)} ({fab.makespan / lower:.2f}×)",
        f"- origin egress ≤ 1.05 × missing-chunk bytes (busiest uplink): "
        f"{verdict(fab.busiest <= 1.05 * missing_bytes)} ({fab.busiest / missing_bytes:.2f}×; "
        + ", ".join(f"to {k} {v / missing_bytes:.2f}×" for k, v in fab.egress.items()) + ")",
        f"- {fab.uplink.summary(artifact_bytes, rate)}" if fab.uplink else "",
        f"- hubs' peak RSS relaying to {EDGES_PER_HUB} edges each: " + ", ".join(f"{r[0]} {r[-2]} MiB" for r in hubs),
        f"- bytes written per site ≤ 1.05 × the version's new bytes ({report['new_bytes'] / MB:,.1f} MB; one copy "
        f"per site): {verdict(max(ratios) <= 1.05)} (max {max(ratios):.3f}×, min {min(ratios):.3f}×)",
        "",
        "Per site. MB by source: the agent's `fabric_agent_bytes_by_source_total` (its own deploy fetches; chunks "
        "a hub fetched by pull-through for its edges are not counted there). MB in: rx bytes on the site's veth "
        "towards its upstream in the lab, headers included. MB written: `write_bytes` of the agent's /proc/PID/io "
        "from right before the promote to every site active (chunks, files, references, manifests, state). Peak "
        "RSS and CPU: the agent process, read before it stopped.", "", sites,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
