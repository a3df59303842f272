"""Many sites in a relay tree on loopback: how a publish spreads, and what the origin carries.

    python -m bench.simulate --sites 10,100,1000 --fanout 10 --roots 1 --real 30

One `fabric origin` process and N site agents arranged as a tree (site i's upstream is
site (i - R) // F for i >= R, the origin for the first R = `--roots`, F = `--fanout`:
origin -> hubs -> edges), all
following `sim:prod`. With `--real`, each agent is its own `fabric agent` process;
otherwise `SiteAgent`s run many to a worker process (`--per-worker` edges or
`--relays-per-worker` relays to one, each site with its own data folder and listen port, started a tree level at a time so a child never starts
before its relay). A small artifact (`--size-mb`, random float32) is published, then
the channel is promoted, and the command prints, per run, side by side:

* time from the promote to each site's activation (p50, p99, max);
* established connections at the origin's port (from /proc/net/tcp): steady (the tree
  idle), peak (sampled every 0.1 s during the rollout), the goal (direct children +
  publishers + 10);
* requests/s at the origin (its `fabric_http_requests_total`): idle, and during the rollout;
* origin egress (`fabric_bytes_sent_total`) in copies of the artifact (one copy: the payload bytes
  of the version's chunks as the origin stores them, which is what one full fetch sends);
* CPU seconds the agents used during the rollout, per site (worker or agent processes);
* memory per agent: the worker process's RSS / agents in it (each real process's RSS);
* the 1-minute load average at the promote and at the end (a shared 2-CPU machine);
* who holds the origin's sockets at their peak (the process at the other end: the relay or
  edge workers, the publisher), and per tree level what the in-process sites asked of the
  origin themselves during the rollout (`OriginTap`: requests by path, the sites that took
  chunk bytes from it, their peak connections to it).

Workers talk to the coordinator in JSON lines over stdin/stdout (`--worker`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import machine, md_table

ARTIFACT, CHANNEL = "sim", "prod"
ADMIN, PUBLISHER = "sim-admin-secret-7c1e94b2d0a3", "sim-publish-secret-2f8b61d95e0c"


def _log(msg: str) -> None:
    print(f"[simulate] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def site_name(i: int) -> str:
    return f"s{i:04d}"


def parent(i: int, fanout: int, roots: int) -> int | None:
    return None if i < roots else (i - roots) // fanout


def levels(n: int, fanout: int, roots: int) -> list[list[int]]:
    depth, out = {}, []
    for i in range(n):
        p = parent(i, fanout, roots)
        depth[i] = 0 if p is None else depth[p] + 1
        if depth[i] == len(out):
            out.append([])
        out[depth[i]].append(i)
    return out


def secret(i: int) -> str:
    return f"sim-site-{i:04d}-secret-{(i * 2654435761) % 10**12:012d}"


def write_tokens(path: Path, n: int) -> Path:
    lines = ['[[token]]\nname = "admin"\nsecret = "%s"\nscopes = ["admin"]\n' % ADMIN,
             '[[token]]\nname = "publisher"\nsecret = "%s"\nscopes = ["publish", "pull"]\n' % PUBLISHER]
    lines += ['[[token]]\nname = "%s"\nsecret = "%s"\nscopes = ["pull"]\nsite = "%s"\n'
              % (site_name(i), secret(i), site_name(i)) for i in range(n)]
    path.write_text("\n".join(lines))
    return path


def make_artifact(folder: Path, size: int) -> Path:
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(17)
    save_file({"w": rng.standard_normal(size // 4).astype(np.float32)}, str(folder / "model.safetensors"))
    return folder


def make_trust(work: Path):
    """A publisher key and a trust file that trusts it for the artifact (`--trust`)."""
    from fabric.trust import Key, TrustPolicy
    key = Key.from_seed(os.urandom(32))
    policy = TrustPolicy()
    policy.add(key.public, [ARTIFACT], name="sim-ci")
    policy.save(work / "trust.toml")
    return key, work / "trust.toml"


def site_config(i: int, work: Path, origin: str, tokens: Path, upstream: str | None, report: float,
                trust: Path | None = None) -> dict:
    cfg = {"site": site_name(i), "data": str(work / "sites" / site_name(i)), "listen": "127.0.0.1:1",
           "origin": origin, "token": secret(i), "follow": [f"{ARTIFACT}:{CHANNEL}"], "tokens": str(tokens),
           "report_interval": report, "log_level": os.environ.get("SIM_LOG_LEVEL", "warning"),
           "sync": {"resync_interval": 60, "stall_timeout": 30, "give_up_after": 120}}
    if upstream:
        cfg["upstreams"] = [upstream]
    if trust:
        cfg["trust"] = str(trust)
    return cfg


def _toml(cfg: dict) -> str:
    top = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
              for k, v in cfg.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes `pids` have used (/proc/PID/stat)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def origin_sockets(port: int) -> int:
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
        except OSError:
            pass
    return n


def origin_counters(url: str, routes: dict | None = None) -> tuple[float, float]:
    """(requests served, chunk payload bytes sent) from the origin's /metrics; `routes` gets the
    requests by route."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    requests = sent = 0.0
    for line in text.splitlines():
        if line.startswith("fabric_http_requests_total{"):
            requests += float(line.rsplit(" ", 1)[1])
            if routes is not None:
                key = line.split("{", 1)[1].rsplit("}", 1)[0]
                routes[key] = routes.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("fabric_bytes_sent_total "):
            sent = float(line.rsplit(" ", 1)[1])
    return requests, sent


# --- the worker: many SiteAgents in one process -----------------------------------------------

class OriginTap:
    """What one in-process agent asks of the origin itself (not through a relay) during a rollout:
    requests by path, and the most connections its clients to the origin held at once."""

    def __init__(self, agent):
        origins = {u.rstrip("/") for u in agent.cfg.origins}
        clients = agent.plan.sources + agent.control.sources + agent.origins
        self.clients = list({id(c): c for c in clients if c.url in origins}.values())
        self.requests: dict[str, int] = {}
        self.peak = 0
        for c in self.clients:
            session = c.session  # made now, so its requests can be counted
            inner = session._request

            def counted(method, url, *a, _inner=inner, **kw):
                if self.counting:
                    path = str(url).split("//", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
                    key = f"{method} /{path}"
                    self.requests[key] = self.requests.get(key, 0) + 1
                return _inner(method, url, *a, **kw)
            session._request = counted
        self.counting = False

    def start(self) -> None:
        self.requests, self.peak, self.counting = {}, 0, True

    def sample(self) -> None:
        n = 0
        for c in self.clients:
            conn = c.session.connector
            n += len(getattr(conn, "_acquired", ())) + sum(len(v) for v in getattr(conn, "_conns", {}).values())
        self.peak = max(self.peak, n)


async def _worker() -> None:
    from agents.site.agent import SiteAgent
    from agents.site.app import create_app
    from agents.site.config import SiteConfig
    from fabric import logs
    from fabric.wire.server import bound_port, serve
    logs.setup(os.environ.get("SIM_LOG_LEVEL", "warning"))  # JSON lines with their fields, to the worker's log
    logs.bind("agent")
    raise_nofile()
    from concurrent.futures import ThreadPoolExecutor
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32))  # many sites' file work at once
    agents, runners, taps = {}, [], {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    while line := await reader.readline():
        msg = json.loads(line)
        if msg["op"] == "start":
            ports = {}
            for raw in msg["configs"]:
                Path(raw["data"]).mkdir(parents=True, exist_ok=True)
                agent = SiteAgent(SiteConfig.from_dict(raw, "sim"))
                runner = await serve(create_app(agent), "127.0.0.1", 0)
                runners.append(runner)
                agents[raw["site"]] = agent
                taps[raw["site"]] = OriginTap(agent)
                ports[raw["site"]] = bound_port(runner)
            say({"ports": ports})
        elif msg["op"] == "wait":
            version, deadline, seen = msg["version"], time.monotonic() + msg["timeout"], {}
            for tap in taps.values():
                tap.start()
            rounds = 0
            while len(seen) < len(agents) and time.monotonic() < deadline:
                now, rounds = time.time(), rounds + 1
                for name, a in agents.items():
                    if name not in seen and a.channels[ARTIFACT].active == version:
                        seen[name] = now
                    if rounds % 10 == 0:  # every 0.2 s: the sampling must not cost the agents' CPU
                        taps[name].sample()
                await asyncio.sleep(0.02)
            for tap in taps.values():
                tap.counting = False
            origin = {name: {"requests": t.requests, "peak": t.peak,
                             "chunk_bytes": sum(n for u, n in agents[name].metrics.fetched.items()
                                                if u.rstrip("/") in {o.rstrip("/") for o in agents[name].cfg.origins})}
                      for name, t in taps.items() if t.requests or t.peak}
            say({"active": seen, "rss": rss_bytes(), "agents": len(agents), "origin": origin})
        elif msg["op"] == "stop":
            break
    for r in runners:
        await r.cleanup()


class Workers:
    """In-process agents: relays (sites with children) `relay_per` to a worker process, the
    other sites `per` to one, so a hub is not starved by a hundred edges sharing its process."""

    def __init__(self, n: int, per: int, work: Path, relays: set[str], relay_per: int):
        self.relays = relays
        counts = (math.ceil(len(relays) / relay_per), max(1, math.ceil((n - len(relays)) / per)))
        env = dict(os.environ, FABRIC_CONFIG=os.devnull)
        self.procs = [subprocess.Popen([sys.executable, "-m", "bench.simulate", "--worker"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=open(work / f"worker{w}.log", "wb"),
                                       text=True, env=env) for w in range(sum(counts))]
        self.pools = (self.procs[:counts[0]], self.procs[counts[0]:])
        self._next = [0, 0]

    def _ask(self, per_proc: list[dict]) -> list[dict]:
        for p, msg in zip(self.procs, per_proc):
            p.stdin.write(json.dumps(msg) + "\n")
            p.stdin.flush()
        out = []
        for p in self.procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a worker died (rc={p.poll()}); see its log")
            out.append(json.loads(line))
        return out

    def start(self, configs: list[dict]) -> dict[str, int]:
        shares: dict[int, list[dict]] = {id(p): [] for p in self.procs}
        for raw in configs:
            pool = 0 if raw["site"] in self.relays else 1
            procs = self.pools[pool]
            shares[id(procs[self._next[pool] % len(procs)])].append(raw)
            self._next[pool] += 1
        shares = [shares[id(p)] for p in self.procs]
        ports = {}
        for answer in self._ask([{"op": "start", "configs": s} for s in shares]):
            ports.update(answer["ports"])
        return ports

    def wait(self, version: str, timeout: float) -> tuple[dict[str, float], list[float]]:
        seen, rss, agents = {}, 0, 0
        self.origin = {}  # site -> what it asked of the origin itself during the rollout (OriginTap)
        for answer in self._ask([{"op": "wait", "version": version, "timeout": timeout}] * len(self.procs)):
            seen.update(answer["active"])
            self.origin.update(answer["origin"])
            rss, agents = rss + answer["rss"], agents + answer["agents"]
        return seen, [rss / max(1, agents)]

    def stop(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"op": "stop"}) + "\n")
                p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


class RealAgents:
    """One `fabric agent` process per site."""

    def __init__(self, work: Path):
        from topology.lab import fabric_command
        self.work, self.command, self.procs, self.data = work, fabric_command(), {}, {}

    def start(self, configs: list[dict]) -> dict[str, int]:
        from fabric.wire.client import SyncOrigin  # noqa: F401  (imported here: the workers need no client)
        ports = {}
        for raw in configs:
            port = _free_port()
            raw = dict(raw, listen=f"127.0.0.1:{port}")
            path = self.work / f"{raw['site']}.toml"
            path.write_text(_toml(raw))
            log = open(self.work / f"{raw['site']}.log", "wb")
            self.procs[raw["site"]] = subprocess.Popen(self.command + ["agent", "--config", str(path)], stdout=log,
                                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                       env=dict(os.environ, FABRIC_CONFIG=os.devnull))
            self.data[raw["site"]] = Path(raw["data"])
            ports[raw["site"]] = port
        for site, port in ports.items():
            _wait_live(f"http://127.0.0.1:{port}", 60, self.procs[site])
        return ports

    def wait(self, version: str, timeout: float) -> tuple[dict[str, float], list[float]]:
        seen, deadline = {}, time.monotonic() + timeout
        while len(seen) < len(self.procs) and time.monotonic() < deadline:
            now = time.time()
            for site, data in self.data.items():
                link = data / "current" / ARTIFACT
                if site not in seen and link.is_symlink() and link.resolve().name == version:
                    seen[site] = now
            time.sleep(0.02)
        return seen, [rss_bytes(p.pid) for p in self.procs.values() if p.poll() is None]

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_live(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited rc={proc.returncode}")
        try:
            urllib.request.urlopen(url + "/livez", timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


# --- one run, and the comparison ----------------------------------------------------------------

def origin_peers(port: int, roles: dict[int, str]) -> dict[str, int]:
    """The origin's established connections by the role of the process at their other end
    (`roles`: pid -> role; "other" for any other process): which peers hold them."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port:
                    inodes[f[9]] = 0  # the client's end of a connection to the origin
        except OSError:
            pass
    out: dict[str, int] = {}
    for pid, role in roles.items():
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    inodes.pop(link[8:-1])
                    out[role] = out.get(role, 0) + 1
        except OSError:
            pass
    if inodes:
        out["other"] = len(inodes)
    return out


class Sampler:
    """The origin's established connections, every 0.1 s, in a thread; at each new peak, which
    processes hold them (`origin_peers`)."""

    def __init__(self, port: int, roles: dict[int, str] | None = None):
        import threading
        self.port, self.peak, self._stop = port, 0, threading.Event()
        self.roles, self.peak_peers = roles or {}, {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            n = origin_sockets(self.port)
            if n > self.peak:
                self.peak = n
                if self.roles:
                    self.peak_peers = origin_peers(self.port, self.roles)
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _load() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _pct(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def run(n: int, fanout: int, roots: int, *, real: bool, size: int, per: int, report: float, timeout: float,
        base: str | None = None, relay_per: int = 10, trust: bool = False) -> dict:
    from fabric.publish import publish
    from fabric.wire.client import RemoteTarget, SyncOrigin
    from topology.lab import fabric_command
    work = Path(tempfile.mkdtemp(prefix=f"fabric-sim-{n}-", dir=base))
    tokens = write_tokens(work / "tokens.toml", n)
    key, trust_file = make_trust(work) if trust else (None, None)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    origin = subprocess.Popen(fabric_command() + ["origin", "--store", str(work / "origin"), "--listen",
                                                  f"127.0.0.1:{port}", "--tokens", str(tokens)],
                              stdout=open(work / "origin.log", "wb"), stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=dict(os.environ, FABRIC_CONFIG=os.devnull))
    agents = None
    try:
        _wait_live(url, 60, origin)
        relays = {site_name(p) for i in range(n) if (p := parent(i, fanout, roots)) is not None}
        agents = RealAgents(work) if real else Workers(n, per, work, relays, relay_per)
        urls: dict[int, str] = {}
        t_start = time.monotonic()
        tree = levels(n, fanout, roots)
        for level in tree:
            configs = [site_config(i, work, url, tokens, urls.get(parent(i, fanout, roots)), report, trust_file)
                       for i in level]
            ports = agents.start(configs)
            urls.update({i: f"http://127.0.0.1:{ports[site_name(i)]}" for i in level})
        _log(f"{n} sites started in {time.monotonic() - t_start:.1f} s ({len(tree)} levels); settling")
        time.sleep(max(5.0, 2 * report))
        settle = time.monotonic() + 45  # a site whose relay was slow to start follows the origin for 30 s
        while origin_sockets(port) > min(n, roots) * 2 and time.monotonic() < settle:
            time.sleep(0.5)
        steady = origin_sockets(port)
        all_pids = [p.pid for p in (agents.procs if not real else agents.procs.values())]
        idle0: dict = {}
        r0, _ = origin_counters(url, idle0)
        idle_cpu0 = cpu_seconds(all_pids)
        time.sleep(10.0)
        idle1: dict = {}
        r1, _ = origin_counters(url, idle1)
        _log("origin requests while idle (10 s), by route: " + ", ".join(
            f"{k}: {v - idle0.get(k, 0):g}" for k, v in sorted(idle1.items()) if v - idle0.get(k, 0)))
        idle_rps, idle_cores = (r1 - r0) / 10.0, (cpu_seconds(all_pids) - idle_cpu0) / 10.0
        src = make_artifact(work / "v1", size)
        with SyncOrigin(url, PUBLISHER) as so:
            result = publish(src, artifact=ARTIFACT, target=RemoteTarget(so), version="v1")
            statement = None
            if key is not None:  # signed: the version's statement, and the promote's
                from fabric.trust import VersionStatement, sign
                from fabric.trust.statements import next_channel_statement
                so.put_signature(ARTIFACT, "v1", sign(VersionStatement(ARTIFACT, "v1", result.manifest_id),
                                                      [key]).to_bytes())
                statement = sign(next_channel_statement(ARTIFACT, CHANNEL, "v1", result.manifest_id, "promote", 0,
                                                        3600), [key]).to_json()
            before: dict = {}
            r2, s2 = origin_counters(url, before)
            copy = sum(f.stat().st_size - 1 for f in (work / "origin" / "chunks").rglob("*") if f.is_file())
            pids = [p.pid for p in agents.procs] if not real else \
                [p.pid for p in agents.procs.values()]
            roles = {os.getpid(): "publisher"}
            if not real:
                roles.update({p.pid: "relay workers" for p in agents.pools[0]})
                roles.update({p.pid: "edge workers" for p in agents.pools[1]})
            sampler = Sampler(port, roles)
            cpu0, load0 = cpu_seconds(pids), _load()
            t0 = time.time()
            so.promote(ARTIFACT, "v1", CHANNEL, statement=statement)
        seen, rss = agents.wait("v1", timeout)
        peak = sampler.stop()
        cpu = cpu_seconds(pids) - cpu0
        after_routes: dict = {}
        r3, s3 = origin_counters(url, after_routes)
        _log("origin requests during the rollout, by route: " + ", ".join(
            f"{k}: {v - before.get(k, 0):g}" for k, v in sorted(after_routes.items()) if v - before.get(k, 0)))
        after = origin_sockets(port)
        latencies = sorted(t - t0 for t in seen.values())
        depth = {site_name(i): d for d, level in enumerate(tree) for i in level}
        by_level = [sorted(t - t0 for s, t in seen.items() if depth[s] == d) for d in range(len(tree))]
        _log("all active after, by level (p50/max s): " + ", ".join(
            f"{d}: {_pct(v, 0.5):.2f}/{v[-1]:.2f}" for d, v in enumerate(by_level) if v))
        _log(f"origin sockets at their peak ({peak}), by the process at the other end: {sampler.peak_peers}")
        direct = by_origin(getattr(agents, "origin", {}), depth)
        _log("what sites asked of the origin itself during the rollout, by level: " + json.dumps(direct))
        span = max(latencies) if latencies else timeout
        mode = ("processes" if real else f"in-process ({len(agents.procs)} workers)") + (", signed" if trust else "")
        return {"sites": n, "mode": mode,
                "levels": len(tree), "direct": min(n, roots), "active": len(seen),
                "p50": _pct(latencies, 0.5) if latencies else None, "p99": _pct(latencies, 0.99) if latencies else None,
                "max": span if latencies else None, "steady_sockets": steady, "peak_sockets": peak,
                "after_sockets": after, "goal_sockets": min(n, roots) + 1 + 10, "idle_rps": idle_rps,
                "rollout_rps": (r3 - r2) / max(span, 1e-3), "rollout_requests": r3 - r2,
                "egress_copies": (s3 - s2) / max(1, copy), "artifact_bytes": result.bytes, "copy_bytes": copy,
                "cpu_s_per_site": cpu / max(1, len(seen)), "peak_peers": sampler.peak_peers,
                "origin_by_level": direct, "idle_cores": idle_cores, "load": f"{load0:.1f}-{_load():.1f}",
                "rss_per_agent_mib": (sum(rss) / len(rss) / (1 << 20)) if rss else None}
    finally:
        if agents is not None:
            agents.stop()
        origin.terminate()
        try:
            origin.wait(timeout=20)
        except subprocess.TimeoutExpired:
            origin.kill()
        if not os.environ.get("SIM_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def by_origin(taps: dict[str, dict], depth: dict[str, int]) -> dict[int, dict]:
    """Per tree level: sites that asked the origin anything themselves, requests by path, sites
    that took chunk bytes from it (and how many), and the sum of their peak connections to it."""
    out: dict[int, dict] = {}
    for site, t in sorted(taps.items()):
        lv = out.setdefault(depth[site], {"sites": 0, "requests": {}, "chunk_sites": 0, "chunk_bytes": 0,
                                          "peak_conns": 0})
        lv["sites"] += 1 if t["requests"] else 0
        for k, n in t["requests"].items():
            key = k.replace(f"/sites/{site}", "/sites/SITE")
            lv["requests"][key] = lv["requests"].get(key, 0) + n
        lv["chunk_sites"] += 1 if t["chunk_bytes"] else 0
        lv["chunk_bytes"] += t["chunk_bytes"]
        lv["peak_conns"] += t["peak"]
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    headers = ["sites", "agents run as", "levels", "active", "p50 s", "p99 s", "max s", "origin sockets idle",
               "peak", "goal", "origin req/s idle", "req/s rollout", "origin egress (copies)", "agent CPU s/site", "RSS/agent MiB", "load"]
    return md_table(headers, [[r["sites"], r["mode"], r["levels"], f"{r['active']}/{r['sites']}", _f(r["p50"], ".2f"),
                               _f(r["p99"], ".2f"), _f(r["max"], ".2f"), r["steady_sockets"], r["peak_sockets"],
                               r["goal_sockets"], _f(r["idle_rps"], ".1f"), _f(r["rollout_rps"], ".1f"),
                               _f(r["egress_copies"], ".2f"), _f(r["cpu_s_per_site"], ".3f"),
                               _f(r["rss_per_agent_mib"], ".1f"), r["load"]] for r in rows])


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", default="10,100,1000", help="comma-separated site counts (in-process agents)")
    ap.add_argument("--fanout", type=int, default=10, help="children per relay")
    ap.add_argument("--roots", type=int, default=1, help="the origin's direct children (hubs)")
    ap.add_argument("--real", type=int, default=0, help="also run this many sites as real agent processes")
    ap.add_argument("--size-mb", type=float, default=1.0)
    ap.add_argument("--per-worker", type=int, default=125, help="in-process agents per worker process")
    ap.add_argument("--relays-per-worker", type=int, default=10, help="in-process relays per worker process")
    ap.add_argument("--report-interval", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every site to activate")
    ap.add_argument("--data", default=None, help="where the sites' folders go (default: the temp folder); "
                    "/dev/shm keeps a thousand sites' fsyncs off one shared disk")
    ap.add_argument("--trust", action="store_true", help="every site has a trust policy; the version and its "
                    "promote are signed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if os.environ.get("SIM_PROFILE"):  # a folder: each worker's cProfile stats go there
            import cProfile
            cProfile.runctx("asyncio.run(_worker())", globals(), locals(),
                            str(Path(os.environ["SIM_PROFILE"]) / f"worker{os.getpid()}.prof"))
        else:
            asyncio.run(_worker())
        return ""
    raise_nofile()
    plan = [(int(n), False) for n in args.sites.split(",") if n.strip()] + ([(args.real, True)] if args.real else [])
    rows = []
    for n, real in plan:
        _log(f"run: {n} sites, {'processes' if real else 'in-process'}, fanout {args.fanout}")
        row = run(n, args.fanout, args.roots, real=real, size=int(args.size_mb * (1 << 20)), per=args.per_worker,
                  report=args.report_interval, timeout=args.timeout, base=args.data,
                  relay_per=args.relays_per_worker, trust=args.trust)
        _log(json.dumps(row))
        rows.append(row)
    m = machine()
    out = (f"# bench.simulate: {args.size_mb:g} MB artifact, {args.roots} root hub(s), fanout {args.fanout}, report every "
           f"{args.report_interval:g} s; data in {args.data or tempfile.gettempdir()}; {m['cpu']}, {m['nproc']} cores, {m['ram']}\n\n" + table(rows))
    base = next((r["max"] for r in rows if r["sites"] == min(r2["sites"] for r2 in rows) and r["max"]), None)
    if base:
        out += "\n\nall-active time relative to the smallest run: " + ", ".join(
            f"{r['sites']} sites ({r['mode']}): {r['max'] / base:.2f}x" for r in rows if r["max"])
    for r in rows:
        out += (f"\n\n{r['sites']} sites ({r['mode']}): origin sockets at their peak by the process holding "
                f"the other end: {r['peak_peers']}; CPU the agents used while idle: {r['idle_cores']:.2f} "
                f"cores; what sites asked of the origin themselves during the "
                f"rollout, by tree level: {json.dumps(r['origin_by_level'])}")
    print(out)
    return out


if __name__ == "__main__":
    main()
