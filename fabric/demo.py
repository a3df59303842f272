"""The demo (`python -m fabric.demo`, run by `make demo`): a version's path from a publish to a hot-load.

Part 1, the local store: it builds a small Llama-shaped model (bf16 safetensors,
about 110 MB, fixed seed), publishes it as v1 to channel `prod` in a local store,
changes three tensors as a training step would, publishes v2 (only the changed
chunks are stored), pulls v2 and checks it is byte-identical to its source.

Part 2, the serving path, all real processes on loopback: a `fabric origin` with its
own store and token file, one `fabric agent` per site of the demo topology (a hub
under the origin, three edges under the hub; the topology is embedded below, or
`--topology FILE`), each following `demo-mlp:prod`, and one `fabric worker demo` per
edge site (a site with no site below it). It publishes v1 of the worker's model with
`fabric publish --origin`, waits until every site and worker serves it, then runs a
request stream against every worker while publishing v2, which changes two of the
model's eight tensors. It shows v2 reaching every site (bytes fetched and from where;
what left the origin), the workers swapping to v2 under load, the requests and their
failures, and `fabric status`. The exit status is 1 if a request failed or a site or
worker did not reach v2.

Everything lives under `--out` (default `demo-out/`), which is wiped at the start:
`src/` and `store/` (part 1), `tokens.toml` and `tokens/` (the secrets),
`topology.toml` (the topology with the ports actually used: the preferred ones when
free, others when not), `origin/`, `sites/<site>.toml` and `sites/<site>/` (each
agent's config and data), `weights/v1`, `weights/v2`, and `logs/` (one per process).
Every process is stopped when the demo ends, also on Ctrl-C or an error (SIGTERM,
then SIGKILL; on Linux the children also get SIGTERM if the demo itself is killed).

The demo is a list of steps (`STEPS`), each a function of the shared `Demo` state.
Part 1 calls the library; part 2 runs the `fabric` CLI, as an operator would.

`write_safetensors` is a small streaming safetensors writer (header first, then
each tensor's bytes in pieces), shared with the benchmarks.
"""

from __future__ import annotations

import argparse
import filecmp
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.table import Table

from .chunking import DTYPE_SIZES
from .manifest import diff
from .publish import LocalTarget, PublishResult, publish
from .pull import materialize
from .registry import Registry
from .store import Store, open_store
from .topology import ORIGIN, Topology

ARTIFACT = "demo-llm"
CHANNEL = "prod"
SEED = 20261127
CHANGED = (  # the tensors the "training step" between v1 and v2 touches
    "model.layers.5.self_attn.q_proj.weight",
    "model.layers.5.mlp.down_proj.weight",
    "model.norm.weight",
)

SERVED = "demo-mlp"  # part 2: the reference worker's model (fabric/worker_demo.py)
WORKER_PORT = 8101  # preferred port of the first worker; the next ones count up
# A site of the topology is a hub when another site names it as upstream; the others
# are edges, and each edge runs one worker.
DEFAULT_TOPOLOGY = """\
# The demo topology (the same as topology/demo.toml): an origin, one regional hub,
# three edge sites behind it, on loopback ports.
name = "demo"

[origin]
url = "http://127.0.0.1:7000"

[[site]]
name = "hub-eu"
region = "eu"
upstream = "origin"
url = "http://127.0.0.1:7100"

[[site]]
name = "fra-edge-1"
region = "eu"
upstream = "hub-eu"
url = "http://127.0.0.1:7101"

[[site]]
name = "ams-edge-1"
region = "eu"
upstream = "hub-eu"
url = "http://127.0.0.1:7102"

[[site]]
name = "par-edge-1"
region = "eu"
upstream = "hub-eu"
url = "http://127.0.0.1:7103"

[[link]]
a = "origin"
b = "hub-eu"
bandwidth = "200mbit"
latency = "40ms"

[[link]]
a = "hub-eu"
b = "fra-edge-1"
bandwidth = "1gbit"
latency = "5ms"

[[link]]
a = "hub-eu"
b = "ams-edge-1"
bandwidth = "1gbit"
latency = "5ms"

[[link]]
a = "hub-eu"
b = "par-edge-1"
bandwidth = "1gbit"
latency = "5ms"
"""

# Part 2's bounds: the request stream, and how long each wait may take.
RATE = 50.0  # requests per second per worker
WARM = 80  # answers per worker before v2 is published, and v2 answers per worker before the stream stops
MAX_REQUESTS = 1000  # per worker
MAX_STREAM_S = 60.0
START_TIMEOUT = 60.0  # a process serving /livez; every site and worker on v1
SWAP_TIMEOUT = 45.0  # every site and worker on v2


class DemoFailed(Exception):
    """A step could not do its job; the message says what and where to look."""


# --- a streaming safetensors writer ---------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_SIZES[self.dtype]


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict | None = None) -> bytes:
    """The 8-byte length and the JSON header (space-padded to 8 bytes) for `specs`, in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec],
                      fill: Callable[[TensorSpec], Iterable[bytes | memoryview]],
                      metadata: dict | None = None) -> int:
    """Write a safetensors file without holding it in memory; return its size.

    `fill(spec)` yields the tensor's bytes in pieces of any size; their total must
    be `spec.nbytes`.
    """
    with open(path, "wb") as f:
        size = f.write(safetensors_header(specs, metadata))
        for s in specs:
            written = 0
            for piece in fill(s):
                written += f.write(piece)
            if written != s.nbytes:
                raise ValueError(f"{s.name}: wrote {written} bytes, want {s.nbytes}")
            size += written
    return size


def tensor_ranges(path: str | Path) -> dict[str, tuple[int, int]]:
    """Tensor name → (absolute offset, length) in a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()}


# --- the model ------------------------------------------------------------------------

VOCAB, HIDDEN, MLP, LAYERS = 16384, 768, 2048, 6


def model_specs() -> list[TensorSpec]:
    """A Llama-shaped layout: 56 bf16 tensors, about 110 MB."""
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        specs += [TensorSpec(f"{p}.input_layernorm.weight", "BF16", (HIDDEN,))]
        specs += [TensorSpec(f"{p}.self_attn.{x}_proj.weight", "BF16", (HIDDEN, HIDDEN)) for x in "qkvo"]
        specs += [TensorSpec(f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,))]
        specs += [TensorSpec(f"{p}.mlp.gate_proj.weight", "BF16", (MLP, HIDDEN)),
                  TensorSpec(f"{p}.mlp.up_proj.weight", "BF16", (MLP, HIDDEN)),
                  TensorSpec(f"{p}.mlp.down_proj.weight", "BF16", (HIDDEN, MLP))]
    specs.append(TensorSpec("model.norm.weight", "BF16", (HIDDEN,)))
    return specs


def bf16_values(spec: TensorSpec, rng: np.random.Generator) -> bytes:
    """Weights-like bf16 bytes: N(0, 0.02) matrices, norms near 1."""
    n = spec.nbytes // 2
    if spec.name.endswith("norm.weight"):
        x = (1.0 + 0.01 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
    else:
        x = 0.02 * rng.standard_normal(n, dtype=np.float32)
    return (x.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncate f32 to bf16


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
    topology_text: str = DEFAULT_TOPOLOGY
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


# --- part 1: the local store ---------------------------------------------------------------------

def step_local(d: Demo) -> None:
    """v1: a model, its config and a vocabulary; v2: v1 with three tensors rewritten. Publish both."""
    v1, v2 = d.src / "v1", d.src / "v2"
    v1.mkdir(parents=True)
    specs = model_specs()
    stream = {s.name: i for i, s in enumerate(specs)}
    size = write_safetensors(v1 / "model.safetensors", specs,
                             lambda s: [bf16_values(s, np.random.default_rng([SEED, stream[s.name]]))],
                             metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_hidden_layers": LAYERS, "torch_dtype": "bfloat16"}
    (v1 / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    vocab = "\n".join(f"tok{i:05d} {i * 7919 % 100003}" for i in range(VOCAB))
    (v1 / "vocab.txt").write_text(vocab + "\n")

    shutil.copytree(v1, v2)  # the "training step": three tensors rewritten in place
    ranges = tensor_ranges(v2 / "model.safetensors")
    by_name = {s.name: s for s in specs}
    rng = np.random.default_rng([SEED, 1 << 20])  # a stream no v1 tensor used
    with open(v2 / "model.safetensors", "r+b") as f:
        for name in CHANGED:
            f.seek(ranges[name][0])
            f.write(bf16_values(by_name[name], rng))
    d.console.print(f"wrote {_shown(d, v1)} ({len(specs)} bf16 tensors, {_mb(size)}, config.json, vocab.txt) "
                    f"and {_shown(d, v2)} (v1 with {len(CHANGED)} tensors changed)")

    d.store = open_store(d.root / "store")
    for version in ("v1", "v2"):
        d.results[version] = publish(d.src / version, artifact=ARTIFACT, version=version, channel=CHANNEL,
                                     target=LocalTarget(d.store),
                                     metadata={"step": str(1000 * int(version[1:]))})
    t = Table("version", "size", "chunks", "new (chunks)", "stored", "dedup", "time",
              title=f"publishes into {_shown(d, d.root / 'store')}")
    for v, x in d.results.items():
        t.add_row(v, _mb(x.bytes), str(x.chunks), f"{_mb(x.new_bytes)} ({x.new_chunks})",
                  _mb(x.written_bytes), f"{x.dedup_ratio:.1%}", f"{x.seconds:.2f}s")
    d.console.print(t)
    new = d.registry.manifest(ARTIFACT, "v2")
    delta = diff(d.registry.manifest(ARTIFACT, "v1"), new)
    d.console.print(f"v2 vs v1: {len(delta.tensors_changed)} tensors changed, {delta.new_chunks} new chunks "
                    f"({_mb(delta.new_bytes)}); the other {len(new.unique_chunks()) - delta.new_chunks} "
                    f"chunks are shared. {CHANNEL} → v2")


def step_pull(d: Demo) -> None:
    """Materialize the channel's version and compare it with its source, byte for byte."""
    version = d.registry.resolve(ARTIFACT, channel=CHANNEL)
    m = d.registry.manifest(ARTIFACT, version)
    dest = d.root / "pulled"
    t0 = time.monotonic()
    materialize(d.store, m, dest)
    seconds = time.monotonic() - t0
    if not _identical(d.src / version, dest):
        raise DemoFailed(f"pulled files differ from {d.src / version}")
    d.console.print(f"pulled {ARTIFACT}:{CHANNEL} (= {version}, {_mb(m.size)}) into {_shown(d, dest)} in "
                    f"{seconds:.2f}s: [green]byte-identical[/green] with {_shown(d, d.src / version)}")


# --- part 2: origin, site agents, workers -----------------------------------------------------

def step_start_sites(d: Demo) -> None:
    """Tokens, the topology with free ports, `fabric origin`, then one `fabric agent` per site."""
    raw = tomllib.loads(d.topology_text)
    topo = Topology.from_dict(raw, "topology")
    if not topo.origin_url or not all(s.url for s in topo.sites.values()):
        raise DemoFailed("the topology must give the origin and every site a url")
    taken: set[int] = set()
    origin_url = _loopback_url(topo.origin_url, taken)
    d.origin = Node(ORIGIN, origin_url, "origin")
    hubs = {s.upstream for s in topo.sites.values()}
    for s in topo.sites.values():
        d.sites[s.name] = Node(s.name, _loopback_url(s.url, taken), "hub" if s.name in hubs else "edge",
                               upstream=s.upstream)
    if not d.edges():
        raise DemoFailed("the topology has no edge site (a site no other site names as upstream)")
    raw.setdefault("origin", {})["url"] = origin_url
    for s in raw.get("site", []):
        s["url"] = d.sites[s["name"]].url
    _write_toml(d.root / "topology.toml", raw,
                "# Written by `python -m fabric.demo`: the demo topology with the ports actually used.\n")

    # One token file for the origin and every relay: an admin token (publishes, reads status)
    # and one pull token per site, named after it (a site reports its state under its own name).
    d.secrets = {name: secrets.token_hex(16) for name in ["admin", *d.sites]}
    entries = [{"name": "admin", "secret": d.secrets["admin"], "scopes": ["admin", "publish", "pull"]}]
    entries += [{"name": s, "secret": d.secrets[s], "scopes": ["pull"]} for s in d.sites]
    _write_toml(d.root / "tokens.toml", {"token": entries}, "# The demo's tokens (generated secrets).\n")
    (d.root / "tokens").mkdir()
    for name, secret in d.secrets.items():
        path = d.root / "tokens" / name
        path.write_text(secret + "\n")
        path.chmod(0o600)
    (d.root / "tokens.toml").chmod(0o600)

    d.procs = Processes(d)
    d.origin.proc = d.procs.start("origin", ["origin", "--store", d.root / "origin" / "store",
                                             "--listen", _listen(origin_url), "--tokens", d.root / "tokens.toml"])
    _wait_live(d, [d.origin])
    (d.root / "sites").mkdir()
    for site in d.sites.values():
        config = d.root / "sites" / f"{site.name}.toml"
        _write_toml(config, {
            "site": site.name, "data": site.name, "listen": _listen(site.url), "origin": origin_url,
            "token_file": f"../tokens/{site.name}", "follow": [f"{SERVED}:{CHANNEL}"],
            "topology": "../topology.toml", "tokens": "../tokens.toml", "report_interval": 0.5,
            "retention": {"keep": 3}, "sync": {"connections": 4, "stall_timeout": 10, "give_up_after": 30}})
        site.proc = d.procs.start(site.name, ["agent", "--config", config])
    _wait_live(d, list(d.sites.values()))
    sites = _shown(d, d.root / "sites")
    d.console.print(f"sites (config {sites}/SITE.toml, data {sites}/SITE/), each following {SERVED}:{CHANNEL}:")
    for site in d.sites.values():
        d.console.print(f"  {site.name:<12} {site.url}  {site.kind}, fetches from {site.upstream}")


def step_v1(d: Demo) -> None:
    """A worker per edge; the model's two versions; v1 published and served everywhere."""
    taken = {urlsplit(n.url).port for n in [d.origin, *d.sites.values()]}
    for i, site in enumerate(d.edges()):
        url = _loopback_url(f"http://127.0.0.1:{WORKER_PORT + i}", taken)
        w = Node(f"{site.name}-w1", url, "worker", site=site.name)
        w.proc = d.procs.start(w.name, ["worker", "demo", "--agent", site.url, "--artifact", SERVED,
                                        "--channel", CHANNEL, "--listen", _listen(url), "--worker-id", w.name,
                                        "--poll", "2"], token=site.name)
        d.workers[w.name] = w
    weights = d.root / "weights"
    d.procs.run("make-weights-v1", ["worker", "demo", "--make-weights", weights / "v1", "--seed", "1"])
    d.procs.run("make-weights-v2", ["worker", "demo", "--make-weights", weights / "v2", "--seed", "2",
                                    "--base", weights / "v1", "--change", "0.25"])
    d.expected = _expected_outputs(weights)
    _wait_live(d, list(d.workers.values()))

    t0 = time.monotonic()
    _publish_served(d, "v1")
    _wait(d, "every site active on v1 and every worker serving it",
          lambda: all(_active(d, s) == "v1" for s in d.sites.values())
          and all(_serving(w) == "v1" for w in d.workers.values()), START_TIMEOUT)
    d.console.print(f"every site is active on v1 and every worker serves it, {time.monotonic() - t0:.1f}s "
                    "after the publish started")


def step_v2(d: Demo) -> None:
    """Publish v2 while every worker answers a request stream; follow v2 to every site and worker."""
    before = _fetch_counters(d)
    d.stream = RequestStream({w.name: w.url for w in d.workers.values()}, d.expected)
    d.stream.start()
    _wait(d, f"{WARM} answers from every worker",
          lambda: all(d.stream.answered(w) >= WARM for w in d.workers), START_TIMEOUT)
    d.console.print(f"request stream running: POST /infer to {len(d.workers)} workers, {RATE:.0f}/s each")

    t0 = time.monotonic()
    publisher = d.procs.start("publish-v2", _publish_args(d, "v2"), token="admin", capture=True)
    reached: dict[str, float] = {}
    swapped: dict[str, float] = {}
    deadline = t0 + SWAP_TIMEOUT
    while time.monotonic() < deadline and (len(reached) < len(d.sites) or len(swapped) < len(d.workers)
                                           or publisher.poll() is None):
        d.procs.check()
        if publisher.poll() not in (None, 0):
            break  # _finish_publish says why
        now = time.monotonic() - t0
        for s in d.sites.values():
            if s.name not in reached and _active(d, s) == "v2":
                reached[s.name] = now
        for w in d.workers.values():
            if w.name not in swapped and _serving(w) == "v2":
                swapped[w.name] = now
        time.sleep(0.05)
    _finish_publish(d, "v2", publisher)
    _wait(d, f"{WARM} v2 answers from every worker", lambda: all(
        d.stream.answered(w, "v2") >= WARM for w in swapped), 10.0, fail=False)
    d.stream.stop()

    d.console.print("since `fabric publish` started:")
    for s in d.sites.values():
        if s.name in reached:
            d.console.print(f"  {s.name} reached v2 after {reached[s.name]:.2f}s")
        else:
            d.problems.append(f"{s.name} did not reach v2 within {SWAP_TIMEOUT:.0f}s (active: {_active(d, s)})")
    for w in d.workers.values():
        if w.name in swapped:
            load = _last_load(w, "v2")
            how = (f": loaded {load['tensors_changed']} changed tensors ({_mb(load['bytes_read'])} read), "
                   f"paused {load['pause_ms']:.1f} ms" if load else "")
            d.console.print(f"  {w.name} swapped to v2 after {swapped[w.name]:.2f}s{how}")
        else:
            d.problems.append(f"{w.name} did not swap to v2 within {SWAP_TIMEOUT:.0f}s")
    _show_replication(d, before, _fetch_counters(d))
    _show_workers(d)


def step_status(d: Demo) -> None:
    """What the origin knows: `fabric status`, once every site has reported v2."""
    def reported() -> bool:
        status, body = _http(d.origin.url, "GET", "/v1/sites", token=d.secrets["admin"])
        sites = {s["site"]: s for s in json.loads(body)["sites"]} if status == 200 else {}
        return all(s in sites and all(c.get("active") == "v2" for c in sites[s]["channels"])
                   and all(w.get("serving") == "v2" for w in sites[s].get("workers", [])) for s in d.sites)
    _wait(d, "every site's report of v2", reported, 10.0, fail=False)
    p = d.procs.run("status", ["status", "--origin", d.origin.url], token="admin",
                    env={"COLUMNS": str(max(d.console.width, 100))})
    d.console.print(p.stdout.rstrip(), markup=False, highlight=False, crop=False, soft_wrap=True)


STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    (f"local store: publish {ARTIFACT} v1, change 3 tensors, publish v2", step_local),
    (f"pull {CHANNEL} from the local store and verify", step_pull),
    ("start an origin and a site agent per site (loopback)", step_start_sites),
    (f"start a worker per edge site; publish {SERVED} v1 to {CHANNEL}", step_v1),
    (f"publish {SERVED} v2 to {CHANNEL} while the workers serve requests", step_v2),
    ("fabric status", step_status),
]


# --- part 2's pieces ---------------------------------------------------------------------------

BIN = Path(sys.executable).parent
FABRIC = [str(BIN / "fabric")] if (BIN / "fabric").exists() else [sys.executable, "-m", "fabric.cli"]


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
        from .worker_demo import fixed_input, model_from
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


def run(root: Path, console: Console | None = None,
        steps: Sequence[tuple[str, Callable[[Demo], None]]] = STEPS,
        topology: str | None = None) -> Demo:
    """Wipe `root`, then run each step in order; every process started is stopped at the end."""
    console = console or Console()
    shown = str(root)
    root = root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    d = Demo(root=root, console=console, shown_root=shown, topology_text=topology or DEFAULT_TOPOLOGY)
    t0 = time.monotonic()
    try:
        for i, (title, step) in enumerate(steps, 1):
            console.rule(f"[bold]{i}. {title}")
            step(d)
    finally:
        if d.stream is not None:
            d.stream.stop()
        if d.procs is not None:
            console.print(f"stopped {d.procs.stop()} processes")
    seconds = time.monotonic() - t0
    if d.stream is not None and not d.problems:
        console.print(f"[green]✓[/green] every site reached v2 ({', '.join(d.sites)}), "
                      f"every worker swapped, {d.stream.total} requests, 0 failed")
    for p in d.problems:
        console.print(f"[red]✗ {p}[/red]", highlight=False)
    console.rule(f"[bold {'red' if d.problems else 'green'}]demo done in {seconds:.1f}s")
    return d


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run()'s finally, which stops the processes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fabric.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder to (re)create (default: demo-out)")
    parser.add_argument("--topology", help="topology file for part 2 (default: the embedded demo topology, "
                                           "an origin, hub-eu and three edges on ports 7000, 7100-7103)")
    args = parser.parse_args(argv)
    topology = Path(args.topology).read_text() if args.topology else None
    signal.signal(signal.SIGTERM, _terminate)
    console = Console()
    try:
        d = run(Path(args.out), console, topology=topology)
    except DemoFailed as e:
        console.print(f"[red]demo failed: {e}[/red]", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every process was stopped[/yellow]")
        raise SystemExit(130) from None
    if d.problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
