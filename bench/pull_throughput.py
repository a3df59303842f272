"""Pull throughput: `fabric pull` from an origin against curl and aria2c from nginx, same bytes.

    python -m bench.pull_throughput [--size-gb 2] [--shaped-gb 1] [--repeat 1] [--connections 4]
                                    [--layout safetensors|plain] [--no-shaped]

Generates an incompressible artifact (random U8 tensors in safetensors shards, or
with `--layout plain` plain random files, which Fabric cuts with FastCDC), publishes
it with the library into an origin store (`LocalTarget`, store compression off), and
serves it two ways at once: `fabric origin` (a child process) and nginx (a generated
minimal config, foreground, `sendfile on`) serving the very same source files. Then,
in turn, each timed as a child process followed by `sync`:

* `curl`: one process fetching every file over one connection (`-o` per file);
* `aria2c -x8 -s8`: each file split over 8 connections, one file at a time;
* `fabric pull --origin … --store <empty> DEST --json`: resolve, fetch, verify every
  chunk, store it (fsync), materialise DEST (fsync), end to end;
* `fabric sync`: fetch + verify + store only (`fabric.transfer.sync` in a child, the
  same engine and options `fabric pull` uses), without materialising.

Part a runs on loopback. Part b builds two network namespaces joined by a veth pair
shaped with `tc tbf` to 1 Gbit/s on both ends (`bench.netns`), runs the origin and
nginx in one and the clients in the other, and reports each tool's share of the
link rate. It is skipped, with the reason, where namespaces cannot be created.

Every client writes to the same disk, and every time includes a final `sync`, so no
tool gets credit for writes still in the page cache (Fabric fsyncs every object it
writes anyway). Sources are in the page cache throughout: the origin store's packs, which a
publish writes around it (direct I/O), are read once before the first run.

Next to the times, each run prints what it cost in CPU, which a busy machine inflates
less than it does wall time: the client's user and system seconds and page faults (its
`wait4` rusage, descendants included) and the server's (`fabric origin` for Fabric,
nginx's master and workers for curl and aria2c: /proc/PID/stat of the process tree,
read before and after the run), each per GB of the artifact. Data lives in a temp
folder under /tmp that is removed at the end, and every server is stopped, also on
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from bench import cached_fraction, machine, md_table, parse_metrics, tree_size
from bench import netns
from fabric.cli import fabric_command
from fabric.safetensors_io import TensorSpec, write_safetensors

COMMAND = "python -m bench.pull_throughput"
MB = 1e6
LINK_RATE = "1gbit"
LINK_BYTES_PER_S = 125e6  # 1 Gbit/s
TENSOR = 32 << 20  # bytes per generated tensor (whole 8 MiB segments)
SHARD_TENSORS = 8  # tensors per safetensors shard: 256 MiB shards
PLAIN_FILE = 256 << 20  # bytes per file with --layout plain
PIECE = 8 << 20  # the generator holds this much at a time
TOKEN = "bench-pull-token-0123456789abcdef"
FABRIC = fabric_command()[0] if len(fabric_command()) == 1 else None


# --- the artifact ------------------------------------------------------------------------

def generate(root: Path, size: int, layout: str, seed: int = 0) -> list[Path]:
    """Write `size` random bytes under `root` as safetensors shards or plain files."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def pieces(n: int) -> Iterator[bytes]:
        for start in range(0, n, PIECE):
            yield rng.bytes(min(PIECE, n - start))

    if layout == "plain":
        paths = []
        for k, start in enumerate(range(0, size, PLAIN_FILE)):
            path = root / f"part-{k:04d}.bin"
            with open(path, "wb") as f:
                for p in pieces(min(PLAIN_FILE, size - start)):
                    f.write(p)
            paths.append(path)
        return paths
    specs = [TensorSpec(f"layers.{i}.weight", "U8", (min(TENSOR, size - start),))
             for i, start in enumerate(range(0, size, TENSOR))]
    shards = [specs[k:k + SHARD_TENSORS] for k in range(0, len(specs), SHARD_TENSORS)]
    paths = []
    for k, group in enumerate(shards, 1):
        path = root / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, group, lambda s: pieces(s.nbytes))
        paths.append(path)
    return paths


def _files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file()]


def warm(root: Path) -> None:
    """Read every file under `root` once, so that both servers serve from the page cache."""
    for p in _files(root):
        with open(p, "rb") as f:
            while f.read(PIECE):
                pass


def subset(files: list[Path], size: int, root: Path) -> list[Path]:
    """Hard links to the smallest prefix of `files` holding at least `size` bytes."""
    root.mkdir(parents=True)
    out, total = [], 0
    for f in files:
        if total >= size:
            break
        link = root / f.name
        os.link(f, link)
        out.append(link)
        total += f.stat().st_size
    return out


def publish_into(store: Path, src: Path, artifact: str) -> dict:
    from fabric.publish import LocalTarget, publish
    from fabric.store.store import open_store

    r = publish(src, artifact=artifact, version="v1", target=LocalTarget(open_store(store, compress=False)))
    return r.to_json()


# --- servers -------------------------------------------------------------------------------

@contextmanager
def service(cmd: Sequence[str], log: Path,
            wrap: Callable[[list[str]], list[str]] = list) -> Iterator[subprocess.Popen]:
    """Run a server in the foreground as a child; stop it (and its children) on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(wrap(list(cmd)), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        netns._stop(proc)


def wait_http(url: str, wrap: Callable[[list[str]], list[str]] = list, timeout: float = 20.0,
              log: Path | None = None) -> None:
    """Poll `url` with curl (from where `wrap` runs it) until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(wrap(["curl", "-sf", "-o", "/dev/null", url]), capture_output=True)
        if res.returncode == 0:
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise SystemExit(f"{url} did not come up within {timeout:.0f}s\n{tail}")


def wait_warmed(url: str, token: str, wrap: Callable[[list[str]], list[str]] = list,
                timeout: float = 120.0) -> tuple[float, float, float]:
    """Poll an origin's /metrics at `url` (with curl, from where `wrap` runs it) until it has no
    frame-warming job left (`fabric.wire.warming`); (frames it warmed, their codec CPU seconds,
    seconds waited)."""
    t0 = time.monotonic()
    while True:
        out = subprocess.run(wrap(["curl", "-sf", "-H", f"Authorization: Bearer {token}", f"{url}/metrics"]),
                             capture_output=True, text=True).stdout
        values = parse_metrics(out)
        if values and values.get("fabric_frame_warm_jobs", 0) == 0:
            return (values.get("fabric_frames_warmed_total", 0.0),
                    values.get("fabric_frame_warm_cpu_seconds_total", 0.0), time.monotonic() - t0)
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"{url} still warming its frame cache after {timeout:.0f} s")
        time.sleep(0.1)


def nginx_config(work: Path, root: Path, host: str, port: int) -> Path:
    """A minimal foreground nginx serving `root` read-only on host:port."""
    prefix = work / "nginx"
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 temp folder
    conf.write_text(f"""{user}daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/temp/body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    server {{
        listen {host}:{port};
        root {root};
        location / {{ }}
    }}
}}
""")
    return conf


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- measuring -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cpu:
    """CPU seconds and page faults (minor + major) of a process, or of a run's share of one."""

    user: float = 0.0
    sys: float = 0.0
    faults: int = 0

    @property
    def total(self) -> float:
        return self.user + self.sys

    def __sub__(self, other: "Cpu") -> "Cpu":
        return Cpu(self.user - other.user, self.sys - other.sys, self.faults - other.faults)

    def show(self, gb: float) -> str:
        return (f"{self.total / gb:.2f} s/GB (user {self.user / gb:.2f} + sys {self.sys / gb:.2f}), "
                f"{self.faults / gb / 1000:.0f}k faults/GB")


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> Cpu:
    """CPU so far of `pid` and every process below it (/proc/PID/stat: utime, stime, minflt, majflt)."""
    parents: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = fields
        parents.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = Cpu(), [pid]
    while todo:
        p = todo.pop()
        todo += parents.get(p, [])
        f = stats.get(p)
        if f is not None:  # fields after the name: [9] minflt, [11] majflt, [11..12] utime, stime (ticks)
            total = Cpu(total.user + int(f[11]) / _TICK, total.sys + int(f[12]) / _TICK,
                        total.faults + int(f[7]) + int(f[9]))
    return total


@dataclass
class Result:
    name: str
    exit_s: float  # child started → child exited
    synced_s: float  # … → final sync done
    inner_s: float | None = None  # what the child reports of its own work (fabric only)
    client: Cpu = Cpu()  # the client's CPU (wait4 rusage)
    server: Cpu = Cpu()  # the server's CPU during the run
    note: str = ""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str, Cpu]:
    """Run `cmd` (stdout captured), then `sync`; return (seconds to exit, seconds to synced,
    stdout, the child's CPU)."""
    os.sync()
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        stdout = proc.stdout.read()  # to EOF; then reap it ourselves, for its rusage
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        t_exit = time.perf_counter() - t0
        os.sync()
        t_sync = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{stdout.decode(errors='replace')[-2000:]}{stderr.decode(errors='replace')[-3000:]}")
    cpu = Cpu(usage.ru_utime, usage.ru_stime, usage.ru_minflt + usage.ru_majflt)
    return t_exit, t_sync, stdout.decode(errors="replace"), cpu


def clear(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    os.sync()


def measure(*, label: str, urls: list[tuple[str, str]], origin_url: str, artifact: str, size: int,
            work: Path, wrap: Callable[[list[str]], list[str]], connections: int, repeat: int,
            servers: dict[str, int]) -> list[Result]:
    """Run each client `repeat` times; keep the fastest (by time to synced) of each.

    `servers` are the pids of "origin" and "nginx", whose CPU each run is charged with."""
    out_dir, store, dest = work / "out", work / "client-store", work / "dest"
    env = _child_env()
    url_list = work / "aria2-urls.txt"
    url_list.write_text("".join(f"{u}\n  out={name}\n" for name, u in urls))
    curl = ["curl", "-sS", "--fail", "--create-dirs"]
    for name, u in urls:
        curl += ["-o", str(out_dir / name), u]
    aria2 = ["aria2c", "-q", "-x8", "-s8", "-j1", "-k1M", "--file-allocation=none", "--allow-overwrite=true",
             "--auto-file-renaming=false", "--summary-interval=0", "-d", str(out_dir), "-i", str(url_list)]
    pull = [FABRIC, "pull", f"{artifact}@v1", str(dest), "--origin", origin_url, "--token", TOKEN,
            "--store", str(store), "--connections", str(connections), "--json"]
    child_sync = [sys.executable, "-m", "bench.pull_throughput", "--child-sync", origin_url, artifact,
                  str(store), str(connections)]
    methods: list[tuple[str, list[str] | None, Path, str]] = [
        ("curl", curl if shutil.which("curl") else None, out_dir, "nginx"),
        ("aria2c -x8 -s8", aria2 if shutil.which("aria2c") else None, out_dir, "nginx"),
        (f"fabric pull (end to end, {connections} conns)", pull, dest, "origin"),
        ("fabric sync (fetch+verify+store)", child_sync, store, "origin"),
    ]
    gb = size / 1e9
    best: dict[str, Result] = {}
    for r in range(repeat):
        for name, cmd, check, server in methods:
            if cmd is None:
                _log(f"[{label}] {name}: not installed, skipped")
                continue
            clear(out_dir, store, dest)
            before = tree_cpu(servers[server])
            t_exit, t_sync, stdout, client = timed(wrap(cmd), env)
            served = tree_cpu(servers[server]) - before
            inner = None
            if name.startswith("fabric"):
                report = json.loads(stdout)
                inner = report["seconds"]
            got = tree_size(check) if check != store else None
            if got is not None and got != size:
                raise SystemExit(f"[{label}] {name} wrote {got} bytes, expected {size}")
            res = Result(name, t_exit, t_sync, inner, client, served)
            _log(f"[{label}] run {r + 1}/{repeat} {name}: {t_sync:.2f}s to synced ({t_exit:.2f}s to exit), "
                 f"{size / MB / t_sync:.0f} MB/s" + (f"; inside the child {inner:.2f}s" if inner else "")
                 + f"; client CPU {client.show(gb)}; {server} CPU {served.show(gb)}; load {_load()}")
            if name not in best or t_sync < best[name].synced_s:
                best[name] = res
    clear(out_dir, store, dest)
    return [best[n] for n, *_ in methods if n in best]


def rows(link_name: str, results: list[Result], size: int, link: float | None = None) -> list[list[str]]:
    curl = next((r for r in results if r.name == "curl"), None)
    gb = size / 1e9
    out = []
    for r in results:
        out.append([link_name, r.name, f"{size / MB:,.0f}", f"{r.synced_s:.2f}", f"{size / MB / r.synced_s:.0f}",
                    f"{size / r.synced_s / link:.0%}" if link else "-",
                    f"{curl.synced_s / r.synced_s:.2f}x" if curl else "-",
                    f"{size / MB / r.exit_s:.0f}",
                    f"{size / MB / r.inner_s:.0f}" if r.inner_s else "-",
                    f"{r.client.total / gb:.2f} ({r.client.user / gb:.2f} + {r.client.sys / gb:.2f})",
                    f"{r.server.total / gb:.2f}", f"{r.client.faults / gb / 1000:.0f}k"])
    return out


HEADERS = ["link", "method", "MB", "seconds", "MB/s", "% of link", "vs curl", "MB/s to exit", "MB/s inside",
           "client CPU s/GB (user + sys)", "server CPU s/GB", "client faults/GB"]


def verdict(results: list[Result], size: int, target: str) -> str:
    by = {r.name.split(" (")[0]: r for r in results}
    pull, curl = by.get("fabric pull"), by.get("curl")
    if target == "curl" and pull and curl:
        ratio = curl.synced_s / pull.synced_s
        return f"fabric pull / curl = {ratio:.2f}x (target ≥ 0.95x): {'met' if ratio >= 0.95 else 'NOT met'}."
    if target == "link" and pull:
        share = size / pull.synced_s / LINK_BYTES_PER_S
        return f"fabric pull = {share:.0%} of the link rate (target ≥ 90%): {'met' if share >= 0.9 else 'NOT met'}."
    return "target not evaluated (a row is missing)."


# --- the two parts -------------------------------------------------------------------------

def loopback(work: Path, www: Path, origin_store: Path, tokens: Path, files: list[Path], artifact: str,
             args) -> tuple[list[list[str]], str]:
    """Part a: origin and nginx on 127.0.0.1; returns (table rows, verdict)."""
    size = sum(f.stat().st_size for f in files)
    o_port, n_port = free_port(), free_port()
    origin_url, base = f"http://127.0.0.1:{o_port}", f"http://127.0.0.1:{n_port}"
    urls = [(f.name, f"{base}/{f.parent.name}/{f.name}") for f in files]
    conf = nginx_config(work, www, "127.0.0.1", n_port)
    _log(f"[loopback] origin on {origin_url}, nginx on {base}")
    with service(_origin_cmd(origin_store, tokens, f"127.0.0.1:{o_port}"), work / "origin.log") as origin, \
            service(["nginx", "-c", str(conf)], work / "nginx.log") as nginx:
        wait_http(f"{origin_url}/livez", log=work / "origin.log")
        wait_http(urls[0][1], log=work / "nginx.log")
        results = measure(label="loopback", urls=urls, origin_url=origin_url, artifact=artifact, size=size,
                          work=work, wrap=list, connections=args.connections, repeat=args.repeat,
                          servers={"origin": origin.pid, "nginx": nginx.pid})
    return rows("loopback", results, size), "Loopback: " + verdict(results, size, "curl")


def shaped(work: Path, www: Path, origin_store: Path, tokens: Path, files: list[Path], artifact: str,
           args) -> tuple[list[list[str]], str]:
    """Part b: origin and nginx in namespace a, clients in b, over a tbf-shaped veth pair."""
    reason = netns.available()
    if reason:
        _log(f"[shaped] skipped: {reason}")
        return [], f"Shaped link: skipped, {reason}."
    size = sum(f.stat().st_size for f in files)
    try:
        with netns.shaped_link(rate=LINK_RATE) as link:
            a = link.addr_a
            o_port, n_port = 7000, 8080  # inside the namespace, nothing else listens
            origin_url, base = f"http://{a}:{o_port}", f"http://{a}:{n_port}"
            urls = [(f.name, f"{base}/{f.parent.name}/{f.name}") for f in files]
            conf = nginx_config(work, www, a, n_port)
            _log(f"[shaped] namespaces {link.ns_a} ({a}: origin, nginx) and {link.ns_b} ({link.addr_b}: "
                 f"clients), veth shaped with tbf {LINK_RATE} each way")
            in_a = lambda cmd: link.wrap("a", cmd)  # noqa: E731
            in_b = lambda cmd: link.wrap("b", cmd)  # noqa: E731
            with service(_origin_cmd(origin_store, tokens, f"{a}:{o_port}"), work / "origin-ns.log",
                         in_a) as origin, \
                    service(["nginx", "-c", str(conf)], work / "nginx-ns.log", in_a) as nginx:
                wait_http(f"{origin_url}/livez", in_b, log=work / "origin-ns.log")
                wait_http(urls[0][1], in_b, log=work / "nginx-ns.log")
                results = measure(label="shaped", urls=urls, origin_url=origin_url, artifact=artifact,
                                  size=size, work=work, wrap=in_b, connections=args.connections,
                                  repeat=args.repeat, servers={"origin": origin.pid, "nginx": nginx.pid})
            qdisc = link.qdisc_stats("a").split("\n")
            _log("[shaped] server-side qdisc: " + " ".join(q.strip() for q in qdisc[:3]))
    except netns.NetnsUnavailable as e:
        _log(f"[shaped] skipped: {e}")
        return [], f"Shaped link: skipped, could not build the namespaces ({e})."
    return (rows(f"tbf {LINK_RATE}", results, size, LINK_BYTES_PER_S),
            f"Shaped link (veth between two network namespaces, `tc qdisc … tbf rate {LINK_RATE}` on both ends, "
            f"link rate {LINK_BYTES_PER_S / MB:.0f} MB/s): " + verdict(results, size, "link"))


def _origin_cmd(store: Path, tokens: Path, listen: str) -> list[str]:
    return [FABRIC, "origin", "--store", str(store), "--listen", listen, "--tokens", str(tokens),
            "--log-level", "warning"]


# --- entry points ----------------------------------------------------------------------------

def sync_child(origin: str, artifact: str, store: str, connections: int) -> None:
    """Runs in a child: fetch, verify and store every chunk of artifact@v1; print the stats as JSON."""
    from fabric.wire.client import OriginClient
    from fabric.store.store import open_store
    from fabric.transfer import FetchOptions, sync

    async def run() -> dict:
        async with OriginClient(origin, TOKEN, connections=connections) as client:
            manifest = await client.manifest(artifact, "v1")
            stats = await sync(manifest, open_store(store), [client], FetchOptions(connections=connections))
            return stats.to_json()

    print(json.dumps(asyncio.run(run())))


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="artifact size for the loopback part (default 2)")
    p.add_argument("--shaped-gb", type=float, default=1.0, help="artifact size on the shaped link (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="runs per method; the fastest is kept (default 3)")
    p.add_argument("--connections", type=int, default=4, help="fabric pull --connections (default 4, its default)")
    p.add_argument("--layout", choices=["safetensors", "plain"], default="safetensors",
                   help="random U8 safetensors shards (8 MiB segment chunks) or plain files (FastCDC chunks)")
    p.add_argument("--no-shaped", action="store_true", help="skip part b (the shaped link)")
    p.add_argument("--child-sync", nargs=4, metavar=("ORIGIN", "ARTIFACT", "STORE", "CONNS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_sync:
        origin, artifact, store, conns = args.child_sync
        sync_child(origin, artifact, store, int(conns))
        return ""
    missing = [t for t in ("nginx", "curl") if shutil.which(t) is None] + ([] if FABRIC else ["fabric"])
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install -y nginx-light curl aria2; "
                         "pip install -e . for fabric)")

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fabric-pull-bench-", dir="/tmp"))
    try:
        www = work / "www"
        size, shaped_size = int(args.size_gb * 1e9), int(args.shaped_gb * 1e9)
        _log(f"generating {size / MB:,.0f} MB of random bytes ({args.layout}) under {www / 'full'} …")
        files = generate(www / "full", size, args.layout)
        small = subset(files, shaped_size, www / "shaped")
        tokens = work / "tokens.toml"
        tokens.write_text(f'[[token]]\nname = "bench"\nsecret = "{TOKEN}"\nscopes = ["pull"]\n')
        origin_store = work / "origin-store"
        _log("publishing into the origin store (library, LocalTarget, compression off) …")
        pub = publish_into(origin_store, www / "full", "bench")
        publish_into(origin_store, www / "shaped", "bench-shaped")
        _log(f"published bench@v1: {pub['chunks']} chunks in {pub['seconds']:.1f}s")
        cold = cached_fraction(_files(origin_store))
        warm(origin_store)  # a publish writes its packs around the page cache (direct I/O); nginx's are in it
        _log(f"in the page cache: {cold:.0%} of the origin store after the publish, "
             f"{cached_fraction(_files(origin_store)):.0%} once read; "
             f"{cached_fraction(_files(www)):.0%} of nginx's files")
        table_rows, verdicts = loopback(work, www, origin_store, tokens, files, "bench", args)
        verdicts = [verdicts]
        if args.no_shaped:
            verdicts.append("Shaped link: skipped (--no-shaped).")
        else:
            more, v = shaped(work, www, origin_store, tokens, small, "bench-shaped", args)
            table_rows += more
            verdicts.append(v)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = machine()
    notes = verdicts + [
        f"Artifact: random bytes ({'U8 tensors in safetensors shards of 256 MiB, chunked into 8 MiB segments' if args.layout == 'safetensors' else 'plain 256 MiB files, FastCDC chunks of ~64 KiB'}); "
        f"{pub['chunks']} chunks for the loopback artifact. Published with store compression off.",
        "Servers: `fabric origin` (one process) and nginx (2 workers, sendfile) serve the same files, both "
        "from the page cache. Clients and servers share the machine's "
        f"{m['nproc']} CPUs ({m['cpu']}).",
        "`client CPU` is the client's user + system seconds per GB (wait4 rusage, the kept run's; "
        "`fabric pull` includes the interpreter's start-up), `server CPU` the server's in the same run "
        "(`fabric origin`, or nginx's master and workers, from /proc), `client faults` its page faults "
        "(minor + major) per GB. Every run's figures are printed to stderr as it ends.",
        "`seconds` = child start → child exit → `sync` done; `MB/s` is artifact bytes over that. "
        "`MB/s to exit` leaves out the final sync (curl and aria2c leave data in the page cache; "
        "Fabric makes its cache and DEST durable itself). `MB/s inside` is the time the fabric child reports "
        "for its own work (no interpreter start-up).",
        "fabric pull writes each byte once, into DEST as each chunk arrives, and its chunk cache (`--store`) "
        "shares DEST's files through hard links (packs); `fabric sync` writes one file per chunk into a store.",
        f"Fastest of {args.repeat} run(s) per method. Took {time.monotonic() - t_start:.0f}s.",
    ]
    report = md_table(HEADERS, table_rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(report)
    return report


def _child_env() -> dict:
    """Children: `bench` importable wherever we were started from; no user config or FABRIC_* vars."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    env["FABRIC_CONFIG"] = os.devnull
    return env


def _load() -> str:
    """The 1-minute load average, as /proc/loadavg gives it."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
