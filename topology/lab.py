"""The test lab: a topology file built as Linux network namespaces joined by shaped veths.

    with Lab("topology/demo.toml") as lab:
        origin = lab.start_origin(store_dir, tokens_file)
        cfg = lab.write_agent_config("fra-edge-1", data_dir, token, ["model:prod"], tokens_file)
        lab.start_agent("fra-edge-1", cfg)
        tx, rx = lab.iface_bytes("origin", "hub-eu")

Terms:

- *node*: the origin or a site. Each node gets a namespace `fab-<pid>-<n>-<node>`
  (`<n>` counts labs within one process, so parallel runs never collide), `lo` up, and a
  *node address* `10.77.255.k/32` on `lo`; `lab.url(node)` and the lab's topology file
  use it.
- *link*: each `[[link]]` becomes a veth pair with a /30 of its own (link `i` holds
  `10.77.0.0 + 4i`, end `a` gets `.1`, end `b` `.2`). The veth end in node X that faces
  Y is named `l<i>-<Y>` (at most 15 characters). Both ends are shaped with
  `tc qdisc replace dev D root tbf rate R burst B latency 50ms`, R the link's bandwidth
  (after the lab's overrides). The tbf `latency` is only the queue bound; the link's
  *latency* from the file is recorded (`LabLink.latency_s`) but not emulated: netem is not
  available on these machines, so a test that needs delay must put a delaying proxy in
  front of the server.
- *routes*: every site has a default route towards its upstream; a node with children
  forwards (`net.ipv4.ip_forward=1`) and routes each child subtree's node addresses and
  link /30s towards that child. The two ends of a link that is not an upstream link reach
  each other's node address over it directly. Every route carries `src <node address>`,
  so connections come from node addresses.

All addresses live inside the lab's namespaces only: nothing is routed to or from the
host, so lab traffic never leaves the machine. Everything built is removed on exit (also
when the body raises), at interpreter exit for a lab left open, and by `cleanup_stale()`
for labs whose process died.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from fabric import cli
from fabric.core.topology import ORIGIN, Topology, parse_bandwidth

PREFIX = "fab-"
_LINK_BASE = int(ipaddress.IPv4Address("10.77.0.0"))
_NODE_BASE = int(ipaddress.IPv4Address("10.77.255.0"))
_MAX_LINKS = (255 * 256) // 4  # 10.77.0.0 - 10.77.254.255; 10.77.255.0/24 holds node addresses
_MAX_NODES = 254
# [retention] of every agent a lab (or a test) starts on one host: its sites share the host's
# disk, so the disk watermarks (agents.site.retention) are off and only `keep` prunes
HOST_DISK_RETENTION = {"high_watermark": 1.0, "low_watermark": 1.0}
TBF_QUEUE = "50ms"  # tbf `latency`: how long a packet may wait in the shaper's queue
_REPO = Path(__file__).resolve().parent.parent
_counter = itertools.count(1)
_live: set["Lab"] = set()
_live_lock = threading.Lock()


class LabError(RuntimeError):
    """The lab could not be built, or a process in it did not come up."""


# --- the plan (pure: no processes, testable without root) ----------------------------------

@dataclass(frozen=True)
class Node:
    name: str
    ns: str
    addr: str  # the node address (/32 on lo)
    upstream: str | None  # None for the origin


@dataclass(frozen=True)
class LabLink:
    index: int
    a: str
    b: str
    dev_a: str  # the veth end in a's namespace (faces b)
    dev_b: str
    addr_a: str
    addr_b: str
    rate_bps: float  # what tbf shapes to, both directions
    latency_s: float  # from the file; recorded, not emulated (no netem)
    burst_bytes: int
    tree: bool  # an upstream link (site <-> its upstream)

    @property
    def subnet(self) -> str:
        return str(ipaddress.ip_network(f"{self.addr_a}/30", strict=False))

    def end(self, node: str) -> tuple[str, str]:
        """(device, address) of this link's end in `node`."""
        if node == self.a:
            return self.dev_a, self.addr_a
        if node == self.b:
            return self.dev_b, self.addr_b
        raise KeyError(f"link {self.a}<->{self.b} has no end in {node!r}")

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a


@dataclass(frozen=True)
class Route:
    node: str
    dest: str  # "default" or a CIDR
    via: str
    dev: str
    src: str


@dataclass(frozen=True)
class Plan:
    nodes: dict[str, Node]
    links: tuple[LabLink, ...]
    routes: tuple[Route, ...]
    forwarders: tuple[str, ...]  # nodes with ip_forward=1


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def burst_for(rate_bps: float) -> int:
    """A tbf bucket: at least 128 KiB (two GSO packets), else 2 ms at the rate."""
    return max(128 * 1024, int(rate_bps / 8 * 0.002))


def make_plan(topo: Topology, tag: str, *, rates: Mapping[tuple[str, str], str | float] | None = None,
              scale: float = 1.0) -> Plan:
    """Namespaces, addresses, links and routes for `topo`; `tag` is `fab-<pid>-<n>`.

    Args:
        rates: per-link bandwidth overrides, keyed by (a, b) in either order; a value is
            bits/s or a rate string like "50mbit".
        scale: multiplies every bandwidth from the file (not the overrides).

    Raises:
        LabError: a site has no link to its upstream, two links join the same pair, or the
            topology is too large for the address plan.
    """
    names = [ORIGIN, *topo.sites]
    if len(names) > _MAX_NODES or len(topo.links) > _MAX_LINKS:
        raise LabError(f"the lab holds at most {_MAX_NODES} nodes and {_MAX_LINKS} links")
    nodes, used = {}, set()
    for k, name in enumerate(names):
        ns = f"{tag}-{_safe(name)}"
        if ns in used:
            ns = f"{ns}-{k}"
        used.add(ns)
        up = None if name == ORIGIN else topo.sites[name].upstream
        nodes[name] = Node(name, ns, str(ipaddress.IPv4Address(_NODE_BASE + k + 1)), up)

    overrides = {frozenset(pair): parse_bandwidth(v, f"rate override {pair}") if isinstance(v, str) else float(v)
                 for pair, v in (rates or {}).items()}
    tree_pairs = {frozenset((s.name, s.upstream)) for s in topo.sites.values()}
    links, seen = [], set()
    for i, l in enumerate(topo.links):
        pair = frozenset((l.a, l.b))
        if pair in seen:
            raise LabError(f"two links join {l.a!r} and {l.b!r}")
        seen.add(pair)
        rate = overrides.get(pair, l.bandwidth * scale)
        base = _LINK_BASE + 4 * i
        links.append(LabLink(i, l.a, l.b, f"l{i}-{_safe(l.b)}"[:15], f"l{i}-{_safe(l.a)}"[:15],
                             str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2)),
                             rate, l.latency, burst_for(rate), pair in tree_pairs))
    unknown = set(overrides) - seen
    if unknown:
        raise LabError(f"rate override for {sorted(next(iter(unknown)))} names no link")
    by_pair = {frozenset((l.a, l.b)): l for l in links}
    for s in topo.sites.values():
        if frozenset((s.name, s.upstream)) not in by_pair:
            raise LabError(f"site {s.name!r} has no [[link]] to its upstream {s.upstream!r}")

    children = {n: [s.name for s in topo.children(n)] for n in names}

    def subtree(n: str) -> list[str]:
        out = [n]
        for c in children[n]:
            out += subtree(c)
        return out

    routes: list[Route] = []
    for n in names:
        me, dests = nodes[n], set()
        if me.upstream is not None:
            up = by_pair[frozenset((n, me.upstream))]
            dev, _ = up.end(n)
            routes.append(Route(n, "default", up.end(me.upstream)[1], dev, me.addr))
        for c in children[n]:
            down = by_pair[frozenset((n, c))]
            dev, via = down.end(n)[0], down.end(c)[1]
            below = set(subtree(c))
            for d in sorted(below, key=names.index):
                dests.add(f"{nodes[d].addr}/32")
                routes.append(Route(n, f"{nodes[d].addr}/32", via, dev, me.addr))
            for l in links:
                if n not in (l.a, l.b) and (l.a in below or l.b in below) and l.subnet not in dests:
                    dests.add(l.subnet)
                    routes.append(Route(n, l.subnet, via, dev, me.addr))
        for l in links:  # a cross link: its two ends reach each other directly
            if not l.tree and n in (l.a, l.b):
                peer = l.other(n)
                if f"{nodes[peer].addr}/32" not in dests:
                    dests.add(f"{nodes[peer].addr}/32")
                    routes.append(Route(n, f"{nodes[peer].addr}/32", l.end(peer)[1], l.end(n)[0], me.addr))
    forwarders = tuple(n for n in names if children[n] or any(not l.tree and n in (l.a, l.b) for l in links))
    return Plan(nodes, tuple(links), tuple(routes), forwarders)


def write_topology(topo: Topology, plan: Plan, path: Path, *, ports: Mapping[str, int],
                   name: str = "lab", tag: str = "") -> Path:
    """`topo` with the lab's URLs (node addresses) and shaped rates, as a topology file."""
    def url(node: str) -> str:
        return f"http://{plan.nodes[node].addr}:{ports[node]}"

    lines = [f"# Written by topology/lab.py for the lab {tag or '(planned)'}: namespace addresses, shaped rates",
             f"name = {json.dumps(name)}", "", "[origin]", f"url = {json.dumps(url(ORIGIN))}"]
    for s in topo.sites.values():
        lines += ["", "[[site]]", f"name = {json.dumps(s.name)}", f"region = {json.dumps(s.region)}",
                  f"upstream = {json.dumps(s.upstream)}", f"url = {json.dumps(url(s.name))}"]
    for l in plan.links:
        lines += ["", "[[link]]", f"a = {json.dumps(l.a)}", f"b = {json.dumps(l.b)}",
                  f'bandwidth = "{round(l.rate_bps)}bit"', f'latency = "{round(l.latency_s * 1e6)}us"']
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # agents may be reading the old one
    return path


# --- system helpers ------------------------------------------------------------------------

def _sh(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise LabError(f"`{' '.join(map(str, argv))}` failed: {res.stderr.strip() or res.returncode}")
    return res


def list_namespaces() -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_ns_pids(ns: str) -> None:
    for pid in _sh(["ip", "netns", "pids", ns], check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_ns(ns: str) -> None:
    _kill_ns_pids(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_owner(name: str) -> bool:
    m = re.match(rf"^{PREFIX}(\d+)-", name)
    return bool(m) and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))


def cleanup_stale(*, workdirs: bool = True) -> list[str]:
    """Delete `fab-<pid>-…` namespaces (and processes in them) whose pid is dead; return them.

    With `workdirs`, also the temporary work folders of those labs (the logs a lab kept
    after an exception, or left when its process was killed).
    """
    removed = []
    for ns in list_namespaces():
        if _dead_owner(ns):
            _delete_ns(ns)
            removed.append(ns)
    if workdirs:
        for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
            if d.is_dir() and _dead_owner(d.name):
                shutil.rmtree(d, ignore_errors=True)
    return removed


_available: tuple[bool, str] | None = None


def lab_available() -> tuple[bool, str]:
    """(True, "") if namespaces, veths and tbf work here, else (False, why not)."""
    global _available
    if _available is not None:
        return _available
    if os.geteuid() != 0:
        _available = (False, "the lab needs root (CAP_NET_ADMIN) to create network namespaces")
        return _available
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            _available = (False, f"`{tool}` is not installed (apt-get install -y iproute2)")
            return _available
    a, b = f"{PREFIX}{os.getpid()}-probe-a", f"{PREFIX}{os.getpid()}-probe-b"
    try:
        _sh(["ip", "netns", "add", a])
        _sh(["ip", "netns", "add", b])
        _sh(["ip", "-n", a, "link", "add", "p0", "type", "veth", "peer", "name", "p1", "netns", b])
        _sh(["tc", "-n", a, "qdisc", "replace", "dev", "p0", "root", "tbf", "rate", "1mbit",
             "burst", "32kb", "latency", TBF_QUEUE])
        _available = (True, "")
    except (LabError, OSError, subprocess.SubprocessError) as e:
        _available = (False, f"cannot build a shaped namespace link here: {e}")
    finally:
        for ns in (a, b):
            _sh(["ip", "netns", "del", ns], check=False)
    return _available


def fabric_command() -> list[str]:
    """The `fabric` console script of this interpreter's venv (or of the repo's .venv)."""
    repo_binary = _REPO / ".venv" / "bin" / "fabric"
    command = cli.fabric_command()
    return [str(repo_binary)] if command[0] == sys.executable and repo_binary.exists() else command


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


@atexit.register
def _close_all() -> None:
    for lab in list(_live):
        lab.close()


# --- the lab ---------------------------------------------------------------------------------

class Lab:
    """A topology built in namespaces; a context manager (see the module doc).

    Args:
        topology: a parsed `Topology` or a path to a topology file.
        workdir: where logs, configs and the lab's topology file go; default a temporary
            folder, removed on a clean exit and kept (its path printed) after an exception.
        rates: per-link bandwidth overrides, {(a, b): "50mbit" or bits/s}.
        scale: multiplies every bandwidth from the file (not the overrides).
        origin_port, agent_port: the ports the lab's URLs and topology file use.
        stop_grace: seconds between SIGTERM and SIGKILL when the lab stops a process.
    """

    def __init__(self, topology: Topology | str | Path, *, workdir: str | Path | None = None,
                 rates: Mapping[tuple[str, str], str | float] | None = None, scale: float = 1.0,
                 origin_port: int = 7000, agent_port: int = 7070, stop_grace: float = 5.0):
        self.topology = topology if isinstance(topology, Topology) else Topology.load(topology)
        self._name = Path(topology).stem if not isinstance(topology, Topology) else "lab"
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.plan = make_plan(self.topology, self.tag, rates=rates, scale=scale)
        self._own_workdir = workdir is None
        self._workdir = Path(workdir) if workdir else None
        self.ports = {n: (origin_port if n == ORIGIN else agent_port) for n in self.plan.nodes}
        self._created: list[str] = []
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._closed = False
        self.stop_grace = stop_grace

    @property
    def workdir(self) -> Path:
        if self._workdir is None:  # made on first use, so a lab that is only planned leaves nothing
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        return self._workdir

    @property
    def topology_path(self) -> Path:
        """The lab's topology file: the original with namespace URLs and the shaped rates."""
        return self.workdir / "topology.toml"

    # -- life cycle

    def __enter__(self) -> "Lab":
        with _live_lock:
            _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep_workdir=exc_type is not None)

    def _build(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        for node in self.plan.nodes.values():
            _sh(["ip", "netns", "add", node.ns])
            self._created.append(node.ns)
            _sh(["ip", "-n", node.ns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", node.ns, "addr", "add", f"{node.addr}/32", "dev", "lo"])
            # no IPv6 chatter (DAD, router solicitations) on the links: byte counters stay exact
            self._sysctl(node.name, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                         check=False)
        for l in self.plan.links:
            ns_a, ns_b = self.ns(l.a), self.ns(l.b)
            _sh(["ip", "-n", ns_a, "link", "add", l.dev_a, "type", "veth", "peer", "name", l.dev_b, "netns", ns_b])
            for ns, dev, addr in ((ns_a, l.dev_a, l.addr_a), (ns_b, l.dev_b, l.addr_b)):
                _sh(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
                _sh(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                     f"{round(l.rate_bps)}bit", "burst", str(l.burst_bytes), "latency", TBF_QUEUE])
                _sh(["ip", "-n", ns, "link", "set", dev, "up"])
        for n in self.plan.forwarders:
            self._sysctl(n, "net.ipv4.ip_forward=1")
        for r in self.plan.routes:
            _sh(["ip", "-n", self.ns(r.node), "route", "add", r.dest, "via", r.via, "dev", r.dev, "src", r.src])
        self._write_topology()

    def _sysctl(self, node: str, *settings: str, check: bool = True) -> None:
        _sh(["ip", "netns", "exec", self.ns(node), "sysctl", "-qw", *settings], check=check)

    def close(self, *, keep_workdir: bool = False) -> None:
        """Stop every process (SIGTERM, then SIGKILL), delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for _, proc, _ in reversed(self._procs):
                self.stop(proc, self.stop_grace)
        finally:
            for ns in reversed(self._created):
                _delete_ns(ns)
            with _live_lock:
                _live.discard(self)
            if self._own_workdir and self._workdir is not None:
                if keep_workdir:
                    print(f"lab {self.tag}: logs kept in {self.workdir}", file=sys.stderr)
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    # -- where things are

    @property
    def nodes(self) -> dict[str, Node]:
        return self.plan.nodes

    @property
    def links(self) -> tuple[LabLink, ...]:
        return self.plan.links

    def ns(self, node: str) -> str:
        return self._node(node).ns

    def addr(self, node: str) -> str:
        return self._node(node).addr

    def url(self, node: str, port: int | None = None) -> str:
        return f"http://{self.addr(node)}:{port or self.ports[node]}"

    def link(self, a: str, b: str) -> LabLink:
        for l in self.plan.links:
            if {l.a, l.b} == {a, b}:
                return l
        raise KeyError(f"no link joins {a!r} and {b!r}")

    def _node(self, node: str) -> Node:
        if node not in self.plan.nodes:
            raise KeyError(f"{node!r} is not a node of the lab (known: {', '.join(self.plan.nodes)})")
        return self.plan.nodes[node]

    # -- running things

    def exec(self, node: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start `argv` inside `node`'s namespace; it is stopped when the lab closes.

        Output goes to a log file under `workdir/logs` (see `logs`) unless stdout/stderr
        are given. The process leads its own session, so stopping it stops its children.
        """
        argv = [str(a) for a in argv]
        log = self.workdir / "logs" / f"{_safe(node)}-{len(self._procs)}-{_safe(Path(argv[0]).name)}.log"
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        with open(log, "ab") as f:
            if "stdout" not in popen_kwargs:
                popen_kwargs["stdout"] = f
            if "stderr" not in popen_kwargs:
                popen_kwargs["stderr"] = subprocess.STDOUT if popen_kwargs["stdout"] is f else f
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], **popen_kwargs)
        self._procs.append((node, proc, log))
        return proc

    def run(self, node: str, argv: Sequence[str], *, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside `node`'s namespace to completion (text output captured)."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.ns(node), *map(str, argv)], timeout=timeout, **kwargs)

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM the process (its group, if it leads one), then SIGKILL after `grace` s."""
        def send(sig: int) -> None:
            if os.getpgid(proc.pid) == proc.pid:  # started by `exec`: a session of its own
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

        if proc.poll() is None:
            try:
                send(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    send(signal.SIGKILL)
                    proc.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass  # gone already, or stuck in the kernel: deleting the namespace kills what is left
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def logs(self, node: str) -> str:
        """Everything the processes started in `node` wrote, oldest process first."""
        parts = []
        for n, proc, log in self._procs:
            if n == node and log.exists():
                parts.append(f"==> {' '.join(map(str, proc.args[4:]))} (rc={proc.poll()})\n{log.read_text(errors='replace')}")
        return "\n".join(parts)

    def http_ok(self, node: str, url: str, *, any_status: bool = False) -> bool:
        """Does `url` answer a GET from inside `node` within 2 s (with 2xx, unless `any_status`)?"""
        if shutil.which("curl"):
            probe = ["curl", "-s", "-m", "2", "-o", "/dev/null", *([] if any_status else ["-f"]), url]
        else:
            probe = [sys.executable, "-c", "import sys, urllib.request, urllib.error\n"
                     "try: urllib.request.urlopen(sys.argv[1], timeout=2)\n"
                     "except urllib.error.HTTPError: sys.exit(sys.argv[2] != 'any')", url,
                     "any" if any_status else "2xx"]
        return self.run(node, probe, timeout=10).returncode == 0

    def wait_http(self, node: str, url: str, *, proc: subprocess.Popen | None = None,
                  timeout: float = 30.0) -> None:
        """Poll `url` from inside `node` until it answers 2xx; fail early if `proc` exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise LabError(f"{node}: process exited (rc={proc.returncode}) before {url} answered\n"
                               f"{self.logs(node)[-4000:]}")
            if self.http_ok(node, url):
                return
            time.sleep(0.1)
        raise LabError(f"{node}: {url} did not answer within {timeout:.0f}s\n{self.logs(node)[-4000:]}")

    def _ensure_free(self, node: str, url: str) -> None:
        # else an earlier server on the port would answer for a new one that is failing
        if self.http_ok(node, url, any_status=True):
            raise LabError(f"{node}: {url} already answers; stop that server or pick another port")

    # -- fabric processes

    def start_origin(self, store_dir: str | Path, tokens_file: str | Path, port: int | None = None, *,
                     args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                     timeout: float = 30.0) -> subprocess.Popen:
        """`fabric origin` in the origin's namespace on its node address; waits for /livez.

        A `port` other than the lab's origin port becomes the lab's (URLs, topology file)
        once the origin answers.
        """
        port = port or self.ports[ORIGIN]
        livez = f"{self.url(ORIGIN, port)}/livez"
        self._ensure_free(ORIGIN, livez)
        proc = self.exec(ORIGIN, [*fabric_command(), "origin", "--store", store_dir, "--listen",
                                  f"{self.addr(ORIGIN)}:{port}", "--tokens", tokens_file, *args], env=self._env(env))
        self.wait_http(ORIGIN, livez, proc=proc, timeout=timeout)
        if port != self.ports[ORIGIN]:
            self.ports[ORIGIN] = port
            self._write_topology()
        return proc

    def start_agent(self, site: str, config_path: str | Path, *, args: Sequence[str] = (),
                    env: Mapping[str, str] | None = None, timeout: float = 30.0) -> subprocess.Popen:
        """`fabric agent --config PATH` in `site`'s namespace; waits for its /livez."""
        cfg = tomllib.loads(Path(config_path).read_text())
        host, _, port = str(cfg.get("listen", f":{self.ports[site]}")).rpartition(":")
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = self.addr(site)
        livez = f"http://{host}:{port}/livez"
        self._ensure_free(site, livez)
        proc = self.exec(site, [*fabric_command(), "agent", "--config", config_path, *args], env=self._env(env))
        self.wait_http(site, livez, proc=proc, timeout=timeout)
        return proc

    def write_agent_config(self, site: str, data_dir: str | Path, token: str | Path | None,
                           follow: Sequence[str], tokens_file: str | Path | None, port: int | None = None, *,
                           keep: int | None = None, extra: Mapping[str, object] | None = None) -> Path:
        """An agent config for `site` with the lab's URLs; returns its path.

        `token` is the secret (a `Path` is written as `token_file`); `extra` adds keys (a
        mapping value becomes a table, e.g. {"sync": {...}}; `keep` fills [retention], whose
        disk watermarks are off: `HOST_DISK_RETENTION`). A `port` other than the lab's agent
        port is written into the lab's topology file too, so set ports before starting agents
        that read it.
        """
        self._node(site)
        if site == ORIGIN:
            raise KeyError("the origin runs `fabric origin`, not an agent")
        if port is not None and port != self.ports[site]:
            self.ports[site] = port
            self._write_topology()
        keys: dict[str, object] = {"site": site, "data": Path(data_dir).resolve(),
                                   "listen": f"{self.addr(site)}:{self.ports[site]}",
                                   "origin": self.url(ORIGIN), "follow": list(follow),
                                   "topology": self.topology_path.resolve()}
        if isinstance(token, Path):
            keys["token_file"] = token.resolve()
        elif token is not None:
            keys["token"] = token
        if tokens_file is not None:
            keys["tokens"] = Path(tokens_file).resolve()
        # every site of a lab shares the host's disk: how full the host is must not prune them
        tables: dict[str, dict] = {"retention": dict(HOST_DISK_RETENTION)}
        if keep is not None:
            tables["retention"]["keep"] = int(keep)
        for k, v in (extra or {}).items():
            if isinstance(v, Mapping):
                tables.setdefault(k, {}).update(v)
            else:
                keys[k] = v
        lines = [f"{k} = {_toml(v)}" for k, v in keys.items()]
        for table, values in tables.items():
            lines += ["", f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
        path = self.workdir / "agents" / f"{_safe(site)}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        out = dict(os.environ, PYTHONUNBUFFERED="1")
        out.update(env or {})
        return out

    def _write_topology(self) -> None:
        write_topology(self.topology, self.plan, self.topology_path, ports=self.ports, name=self._name, tag=self.tag)

    # -- measuring

    def iface_bytes(self, node: str, peer: str) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of the veth end in `node` that faces `peer`."""
        dev, _ = self.link(node, peer).end(node)
        stats = json.loads(_sh(["ip", "-n", self.ns(node), "-s", "-j", "link", "show", "dev", dev]).stdout)[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]

    def qdisc(self, node: str, peer: str) -> dict:
        """The root qdisc (`tc -j qdisc show`) on `node`'s end of its link to `peer`."""
        dev, _ = self.link(node, peer).end(node)
        qdiscs = json.loads(_sh(["tc", "-n", self.ns(node), "-j", "qdisc", "show", "dev", dev]).stdout)
        return next(q for q in qdiscs if q.get("root"))
