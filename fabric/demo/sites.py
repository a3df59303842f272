"""The demo's moving parts: its processes, the request stream, and what it shows.

Helpers of `fabric.demo` (the steps live there): starting and stopping every process
the demo runs, a bounded request stream against the workers, reading the agents'
state and metrics, and the tables that show replication and the workers' swaps.
"""

from __future__ import annotations

import filecmp
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.table import Table

from fabric.publish import PublishResult
from fabric.store.registry import Registry
from fabric.store.store import Store, open_store
from fabric.core.topology import ORIGIN
from fabric.cli import fabric_command

CHANNEL = "prod"
SERVED = "demo-mlp"  # part 2: the reference worker's model (fabric/worker_demo.py)
WORKER_PORT = 8101  # preferred port of the first worker; the next ones count up
# A site of the topology is a hub when another site names it as upstream; the others
# are edges, and each edge runs one worker.
DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "topology" / "demo.toml"

# Part 2's bounds: the request stream, and how long each wait may take.
RATE = 50.0  # requests per second per worker
WARM = 80  # answers per worker before v2 is published, and v2 answers per worker before the stream stops
MAX_REQUESTS = 1000  # per worker
MAX_STREAM_S = 60.0
START_TIMEOUT = 60.0  # a process serving /livez; every site and worker on v1
SWAP_TIMEOUT = 45.0  # every site and worker on v2


class DemoFailed(Exception):
    """A step could not do its job; the message says what and where to look."""


# --- the demo's state ----------------------------------------------------------------------

@dataclass
class Node:
    """A server process of part 2: the origin, a site agent or a worker."""

    name: str
    url: str
    kind: str  # "origin", "hub", "edge" or "worker"
    upstream: str | None = None  # sites: the site (or "origin") above
    site: str | None = None  # workers: their site
    proc: subprocess.Popen | None = None


@dataclass
class Demo:
    root: Path
    console: Console
    shown_root: str = ""  # how `root` is printed in commands (as given on the command line)
    topology_text: str = ""
    store: Store | None = None
    results: dict[str, PublishResult] = field(default_factory=dict)
    procs: "Processes | None" = None
    origin: Node | None = None
    sites: dict[str, Node] = field(default_factory=dict)
    workers: dict[str, Node] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # token name ("admin" or a site) -> secret
    published: dict[str, dict] = field(default_factory=dict)  # version -> `fabric publish --json`
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # version -> output on the fixed input
    stream: "RequestStream | None" = None
    problems: list[str] = field(default_factory=list)

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def registry(self) -> Registry:
        return Registry(self.store)

    def edges(self) -> list[Node]:
        return [s for s in self.sites.values() if s.kind == "edge"]


# --- part 2's pieces ---------------------------------------------------------------------------

FABRIC = fabric_command()


class Processes:
    """The `fabric` processes the demo starts, each logging to `logs/NAME.log`.

    `stop` ends every one still running: SIGTERM, then SIGKILL for any still alive
    after a grace period. On Linux a server started before any thread exists also
    gets SIGTERM if the demo dies without running `stop` (PR_SET_PDEATHSIG).
    """

    def __init__(self, d: Demo):
        self.d = d
        self.logs = d.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.servers: dict[str, subprocess.Popen] = {}
        self.all: list[subprocess.Popen] = []
        # No FABRIC_* variable or config file of the user's leaks into the demo's processes.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
        self.env["FABRIC_CONFIG"] = str(d.root / "no-client-config.toml")

    def _env(self, token: str | None, extra: dict | None) -> dict:
        env = dict(self.env, **(extra or {}))
        if token:
            env["FABRIC_TOKEN"] = self.d.secrets[token]
        return env

    def _show(self, args: list, token: str | None) -> None:
        line = " ".join(shlex.quote(_shown(self.d, a) if isinstance(a, Path) else str(a)) for a in args)
        note = f"  [dim](FABRIC_TOKEN: {token}'s token)[/dim]" if token else ""
        self.d.console.print(f"[dim]$[/dim] [cyan]fabric {line}[/cyan]{note}", highlight=False, soft_wrap=True)

    def start(self, name: str, args: list, *, token: str | None = None, capture: bool = False,
              env: dict | None = None) -> subprocess.Popen:
        """Start `fabric ARGS`; a server (capture False) logs to logs/NAME.log and must keep running."""
        self._show(args, token)
        cmd = FABRIC + [str(a) for a in args]
        if capture:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 text=True, env=self._env(token, env))
        else:
            with open(self.logs / f"{name}.log", "ab") as log:
                p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._env(token, env), preexec_fn=_die_with_parent())
            self.servers[name] = p
        self.all.append(p)
        return p

    def run(self, name: str, args: list, *, token: str | None = None, env: dict | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run `fabric ARGS` to its end; its output goes to logs/NAME.log too. Fails on a non-zero status."""
        p = self.start(name, args, token=token, capture=True, env=env)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            raise DemoFailed(f"`fabric {args[0]}` ({name}) did not finish within {timeout:.0f}s")
        (self.logs / f"{name}.log").write_text(stdout + stderr)
        if p.returncode != 0:
            raise DemoFailed(f"`fabric {args[0]}` ({name}) failed with status {p.returncode}:\n{stderr.strip()}")
        return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)

    def check(self) -> None:
        """Raise if a server exited."""
        for name, p in self.servers.items():
            if p.poll() is not None:
                raise DemoFailed(f"{name} exited with status {p.returncode}; "
                                 f"the end of {_shown(self.d, self.logs / (name + '.log'))}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM to every process still running, SIGKILL after `grace` seconds; how many there were."""
        alive = [p for p in self.all if p.poll() is None]
        for p in alive:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return len(alive)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the demo dies (None where unsafe)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None  # a preexec_fn is unsafe once threads exist
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RequestStream:
    """POST /infer to every worker, `RATE` per second each, one thread and connection per worker.

    A request fails when it gets no answer, a status other than 200, or an output that
    differs from what the named version's weights give on the fixed input. Each thread
    stops after `MAX_REQUESTS` requests or `MAX_STREAM_S` seconds, or at `stop()`.
    """

    def __init__(self, workers: dict[str, str], expected: dict[str, np.ndarray]):
        self.workers, self.expected = workers, expected
        self.answers: dict[str, Counter] = {w: Counter() for w in workers}  # worker -> version -> count
        self.failures: dict[str, list[str]] = {w: [] for w in workers}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w, u), name=f"stream-{w}", daemon=True)
                         for w, u in workers.items()]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def answered(self, worker: str, version: str | None = None) -> int:
        c = self.answers[worker]
        return c[version] if version else sum(c.values())

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.answers.values()) + self.failed

    @property
    def failed(self) -> int:
        return sum(len(f) for f in self.failures.values())

    def versions(self) -> Counter:
        out: Counter = Counter()
        for c in self.answers.values():
            out.update(c)
        return out

    def _run(self, worker: str, url: str) -> None:
        u = urlsplit(url)
        conn: http.client.HTTPConnection | None = None
        start = next_at = time.monotonic()
        for _ in range(MAX_REQUESTS):
            if self._stop.is_set() or time.monotonic() - start > MAX_STREAM_S:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                conn.request("POST", "/infer", body=b"")
                r = conn.getresponse()
                body = r.read()
                why = self._check(worker, r.status, body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                why = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            if why:
                self.failures[worker].append(why)
            next_at += 1.0 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def _check(self, worker: str, status: int, body: bytes) -> str | None:
        """None for a good answer (counted under its version), else why it is not."""
        if status != 200:
            return f"HTTP {status}: {body[:200]!r}"
        obj = json.loads(body)
        version = obj.get("version")
        if self.expected:
            want = self.expected.get(version)
            if want is None:
                return f"answer from an unknown version {version!r}"
            got = np.asarray(obj["output"], dtype=np.float32)
            if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-4):
                return f"output differs from what {version}'s weights give"
        self.answers[worker][version] += 1
        return None


def _expected_outputs(weights: Path) -> dict[str, np.ndarray]:
    """Each version's output on the worker's fixed input, computed here with torch ({} without it)."""
    try:
        import torch
        from agents.worker.reference import fixed_input, model_from
    except ImportError:
        return {}
    with torch.inference_mode():
        return {v.name: model_from(v)(fixed_input()).numpy().astype(np.float32)
                for v in sorted(weights.iterdir()) if v.is_dir()}


def _publish_args(d: Demo, version: str) -> list:
    return ["publish", d.root / "weights" / version, "--artifact", SERVED, "--version", version,
            "--channel", CHANNEL, "--origin", d.origin.url, "--json"]


def _publish_served(d: Demo, version: str) -> None:
    p = d.procs.start(f"publish-{version}", _publish_args(d, version), token="admin", capture=True)
    _finish_publish(d, version, p)


def _finish_publish(d: Demo, version: str, p: subprocess.Popen) -> None:
    try:
        stdout, stderr = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise DemoFailed(f"`fabric publish` of {version} did not finish within 120s") from None
    (d.root / "logs" / f"publish-{version}.log").write_text(stdout + stderr)
    if p.returncode != 0:
        raise DemoFailed(f"`fabric publish` of {version} failed:\n{stderr.strip()}")
    r = d.published[version] = json.loads(stdout)
    d.console.print(f"  published {SERVED}@{version} → {CHANNEL}: {r['files']} files, {_mb(r['bytes'])}; "
                    f"new {r['new_chunks']} of {r['chunks']} chunks, {_mb(r['bytes_sent'])} sent to the origin")


def _active(d: Demo, site: Node) -> str | None:
    """The site's active version of the served artifact (its `current/` link)."""
    link = d.root / "sites" / site.name / "current" / SERVED
    return link.resolve().name if link.is_symlink() else None


def _serving(worker: Node) -> str | None:
    try:
        status, body = _http(worker.url, "GET", "/status", timeout=2)
    except (OSError, http.client.HTTPException):
        return None
    return json.loads(body).get("version") if status == 200 else None


def _fetch_counters(d: Demo) -> dict[str, float]:
    """Chunk payload bytes so far: the origin's and each site's sent ("origin", "SITE|sent"), and each
    site's fetched for its deploys, by source ("SITE|SOURCE-URL")."""
    out = {"origin": _metrics(d.origin.url, d.secrets["admin"]).get("fabric_bytes_sent_total", 0.0)}
    for s in d.sites.values():
        for key, value in _metrics(s.url, d.secrets["admin"]).items():
            m = re.fullmatch(r'fabric_agent_bytes_by_source_total\{source="(.*)"\}', key)
            if m:
                out[f"{s.name}|{m.group(1)}"] = value
            elif key == "fabric_bytes_sent_total":
                out[f"{s.name}|sent"] = value
    return out


def _show_replication(d: Demo, before: dict[str, float], after: dict[str, float]) -> None:
    names = {d.origin.url: ORIGIN} | {s.url: s.name for s in d.sites.values()}
    ids, new = _new_chunks(d, "v1", "v2")
    t = Table("site", "upstream", "active", "fetched", "from", "served", title="v2 through the topology")
    notes = []
    for s in d.sites.values():
        _, body = _http(s.url, "GET", "/v1/site", token=d.secrets["admin"])
        active = ", ".join(c.get("active") or "-" for c in json.loads(body)["channels"])
        delta = {k.split("|", 1)[1]: after[k] - before.get(k, 0.0) for k in after if k.startswith(s.name + "|")}
        served = delta.pop("sent", 0.0)
        by_source = {names.get(src, src): n for src, n in delta.items() if n > 0}
        fetched = sum(by_source.values())
        t.add_row(s.name, s.upstream, active, _mb(fetched),
                  "\n".join(f"{src} {_mb(n)}" for src, n in sorted(by_source.items())) or "-", _mb(served))
        if fetched < new and served > 0:
            notes.append(f"{s.name}'s own deploy found v2's chunks already in its store: it had fetched them "
                         f"from {s.upstream} while serving them to the sites below (a relay's pull-through)")
    d.console.print(t)
    d.console.print("  fetched: chunk bytes a site's deploy of v2 fetched, by source; served: chunk bytes it "
                    "sent to other sites", style="dim")
    for note in notes:
        d.console.print(f"  {note}", style="dim")
    sent = after["origin"] - before["origin"]
    once = "each left the origin once" if sent <= new else "some left the origin more than once"
    d.console.print(f"origin egress for v2: {_mb(sent)} = {sent / new if new else 0:.2f}× its {len(ids)} new "
                    f"chunks ({_mb(new)}): {once}, whatever the number of sites ({len(d.sites)})")


def _new_chunks(d: Demo, old: str, new: str) -> tuple[list[str], int]:
    """The chunks of `new` that `old` lacks, and their payload bytes as the origin stores (and sends) them."""
    store = open_store(d.root / "origin" / "store", create=False)
    reg = Registry(store)
    ids = sorted(set(reg.manifest(SERVED, new).unique_chunks()) - set(reg.manifest(SERVED, old).unique_chunks()))
    sizes = store.stored_sizes(ids) or []
    return ids, sum(n - 1 for n in sizes if n)  # less each chunk's one-byte encoding tag


def _last_load(worker: Node, version: str) -> dict | None:
    """The worker's report of its last successful load of `version`."""
    try:
        _, body = _http(worker.url, "GET", "/status")
        loads = json.loads(body).get("loads", [])
    except (OSError, http.client.HTTPException, ValueError):
        return None
    return next((r for r in reversed(loads) if r.get("version") == version and r.get("ok")), None)


def _show_workers(d: Demo) -> None:
    versions = sorted(d.stream.versions())
    t = Table("worker", "serving", "requests", "failed", *(f"{v} answers" for v in versions),
              title="requests during the swap")
    for w in d.workers.values():
        answers = d.stream.answers[w.name]
        failed = len(d.stream.failures[w.name])
        t.add_row(w.name, _serving(w) or "-", str(sum(answers.values()) + failed), str(failed),
                  *(str(answers[v]) for v in versions))
    d.console.print(t)
    s = d.stream
    versions = ", ".join(f"{v} ({n})" for v, n in sorted(s.versions().items()))
    colour = "green" if not s.failed else "red"
    d.console.print(f"[{colour}]requests: {s.total} total, {s.failed} failed[/{colour}]; "
                    f"versions that answered: {versions}")
    if d.expected:
        d.console.print("  (a request fails on no answer, a status other than 200, or an output other than "
                        "its version's weights give)", style="dim")
    for w, whys in s.failures.items():
        for why in whys[:3]:
            d.console.print(f"  [red]{w}: {why}[/red]", highlight=False)
    if s.failed:
        d.problems.append(f"{s.failed} of {s.total} requests failed")


def _wait(d: Demo, what: str, predicate: Callable[[], bool], timeout: float, fail: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        d.procs.check()
        try:
            if predicate():
                return True
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            if fail:
                raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}; logs in "
                                 f"{_shown(d, d.root / 'logs')}/")
            return False
        time.sleep(0.1)


def _wait_live(d: Demo, nodes: list[Node]) -> None:
    def live() -> bool:
        return all(_http(n.url, "GET", "/livez", timeout=2)[0] == 200 for n in nodes)
    _wait(d, "/livez of " + ", ".join(n.name for n in nodes), live, START_TIMEOUT)


def _http(url: str, method: str, path: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _metrics(url: str, token: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value}."""
    status, body = _http(url, "GET", "/metrics", token=token)
    out = {}
    for line in body.decode().splitlines() if status == 200 else []:
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def _loopback_url(url: str, taken: set[int]) -> str:
    """http://127.0.0.1:PORT with the URL's port if it is free, else a free one."""
    port = urlsplit(url).port
    if port is None or port in taken or not _port_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    taken.add(port)
    return f"http://127.0.0.1:{port}"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _listen(url: str) -> str:
    u = urlsplit(url)
    return f"{u.hostname}:{u.port}"


def _write_toml(path: Path, data: dict, header: str = "") -> None:
    """A small TOML writer for the demo's files: scalars and lists, then tables and arrays of tables."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a JSON string is a TOML basic string

    def pairs(table: dict) -> list[str]:
        return [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)
                and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]

    lines = pairs(data)
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *pairs(v)]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                lines += ["", f"[[{k}]]", *pairs(x)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join(lines).lstrip("\n") + "\n")


# --- helpers ------------------------------------------------------------------------------

def _identical(a: Path, b: Path) -> bool:
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return names_a == names_b and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def _mb(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def _shown(d: Demo, path: Path | str) -> str:
    """`path` as the demo prints it: under --out as given on the command line."""
    text = str(path)
    root = str(d.root)
    return (d.shown_root or root) + text[len(root):] if text.startswith(root) else text


