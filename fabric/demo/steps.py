"""The demo (`python -m fabric.demo`, run by `make demo`): a version's path from a publish to a hot-load.

Part 1, the local store: it builds a small Llama-shaped model (bf16 safetensors,
about 110 MB, fixed seed), publishes it as v1 to channel `prod` in a local store,
changes three tensors as a training step would, publishes v2 (only the changed
chunks are stored), pulls v2 and checks it is byte-identical to its source.

Part 2, the serving path, all real processes on loopback: a `fabric origin` with its
own store and token file, one `fabric agent` per site of the demo topology (a hub
under the origin, three edges under the hub; topology/demo.toml, or
`--topology FILE`), each following `demo-mlp:prod`, and one `fabric worker demo` per
edge site (a site with no site below it). It publishes v1 of the worker's model with
`fabric publish --origin`, waits until every site and worker serves it, then runs a
request stream against every worker while publishing v2, which changes two of the
model's eight tensors. It shows v2 reaching every site (bytes fetched and from where;
what left the origin), the workers swapping to v2 under load, the requests and their
failures, and `fabric status`. Every publish is signed (`--sign-key keys/publisher.key`)
and every site verifies with `trust.toml` (fabric.demo.signing); then a forgery, v3
signed by a key no site trusts, is published: every site refuses it (`unknown_key`) and
keeps serving v2. The exit status is 1 if a request failed, a site or worker did not
reach v2, or a site did not refuse the forgery. Then it prints the origin's status page URL (`/ui/`); with
`--hold` it also prints the admin token to log in with and keeps every process up
until Ctrl-C.

Everything lives under `--out` (default `demo-out/`), which is wiped at the start:
`src/` and `store/` (part 1), `tokens.toml` and `tokens/` (the secrets),
`topology.toml` (the topology with the ports actually used: the preferred ones when
free, others when not), `keys/` and `trust.toml`, `origin/`, `sites/<site>.toml` and `sites/<site>/` (each
agent's config and data), `weights/v1`, `weights/v2`, and `logs/` (one per process).
Every process is stopped when the demo ends, also on Ctrl-C or an error (SIGTERM,
then SIGKILL; on Linux the children also get SIGTERM if the demo itself is killed).

The demo is a list of steps (`STEPS`), each a function of the shared `Demo` state.
Part 1 calls the library; part 2 runs the `fabric` CLI, as an operator would.

Its moving parts are beside it: `fabric.demo.state` (the `Demo` every step fills in),
`fabric.demo.processes` (starting, waiting for and talking to processes),
`fabric.demo.stream` (the request stream), `fabric.demo.report` (the tables) and
`fabric.demo.signing` (keys, trust file, the forgery). The
streaming safetensors writer it shares with the benchmarks is `fabric.safetensors_io`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import time
import tomllib
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.table import Table

from fabric.core.manifest import diff
from fabric.core.topology import ORIGIN, Topology
from fabric.demo.processes import Processes, http_request, listen, loopback_url, wait, wait_live, write_toml
from fabric.demo.report import (active, fetch_counters, finish_publish, identical, last_load, mb, publish_args,
                                publish_served, serving, show_replication, show_workers)
from fabric.demo.signing import FORGED, TRUST_FILE, setup_keys, show_verified, step_forgery
from fabric.errors import DemoFailed
from fabric.demo.state import (CHANNEL, DEFAULT_TOPOLOGY, RATE, SERVED, START_TIMEOUT, SWAP_TIMEOUT, WARM, WORKER_PORT,
                               Demo, Node, shown)
from fabric.demo.stream import RequestStream, expected_outputs
from fabric.publish import LocalTarget, publish
from fabric.pull import materialize
from fabric.safetensors_io import TensorSpec, tensor_ranges, write_safetensors
from fabric.store.store import open_store

ARTIFACT = "demo-llm"
SEED = 20261127
CHANGED = (  # the tensors the "training step" between v1 and v2 touches
    "model.layers.5.self_attn.q_proj.weight",
    "model.layers.5.mlp.down_proj.weight",
    "model.norm.weight",
)


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
    d.console.print(f"wrote {shown(d, v1)} ({len(specs)} bf16 tensors, {mb(size)}, config.json, vocab.txt) "
                    f"and {shown(d, v2)} (v1 with {len(CHANGED)} tensors changed)")

    d.store = open_store(d.root / "store")
    for version in ("v1", "v2"):
        d.results[version] = publish(d.src / version, artifact=ARTIFACT, version=version, channel=CHANNEL,
                                     target=LocalTarget(d.store),
                                     metadata={"step": str(1000 * int(version[1:]))})
    t = Table("version", "size", "chunks", "new (chunks)", "stored", "dedup", "time",
              title=f"publishes into {shown(d, d.root / 'store')}")
    for v, x in d.results.items():
        t.add_row(v, mb(x.bytes), str(x.chunks), f"{mb(x.new_bytes)} ({x.new_chunks})",
                  mb(x.written_bytes), f"{x.dedup_ratio:.1%}", f"{x.seconds:.2f}s")
    d.console.print(t)
    new = d.registry.manifest(ARTIFACT, "v2")
    delta = diff(d.registry.manifest(ARTIFACT, "v1"), new)
    d.console.print(f"v2 vs v1: {len(delta.tensors_changed)} tensors changed, {delta.new_chunks} new chunks "
                    f"({mb(delta.new_bytes)}); the other {len(new.unique_chunks()) - delta.new_chunks} "
                    f"chunks are shared. {CHANNEL} → v2")


def step_pull(d: Demo) -> None:
    """Materialize the channel's version and compare it with its source, byte for byte."""
    version = d.registry.resolve(ARTIFACT, channel=CHANNEL)
    m = d.registry.manifest(ARTIFACT, version)
    dest = d.root / "pulled"
    t0 = time.monotonic()
    materialize(d.store, m, dest)
    seconds = time.monotonic() - t0
    if not identical(d.src / version, dest):
        raise DemoFailed(f"pulled files differ from {d.src / version}")
    d.console.print(f"pulled {ARTIFACT}:{CHANNEL} (= {version}, {mb(m.size)}) into {shown(d, dest)} in "
                    f"{seconds:.2f}s: [green]byte-identical[/green] with {shown(d, d.src / version)}")


# --- part 2: origin, site agents, workers -----------------------------------------------------

def step_start_sites(d: Demo) -> None:
    """Tokens, the topology with free ports, `fabric origin`, then one `fabric agent` per site."""
    raw = tomllib.loads(d.topology_text)
    topo = Topology.from_dict(raw, "topology")
    if not topo.origin_url or not all(s.url for s in topo.sites.values()):
        raise DemoFailed("the topology must give the origin and every site a url")
    taken: set[int] = set()
    origin_url = loopback_url(topo.origin_url, taken)
    d.origin = Node(ORIGIN, origin_url, "origin")
    hubs = {s.upstream for s in topo.sites.values()}
    for s in topo.sites.values():
        d.sites[s.name] = Node(s.name, loopback_url(s.url, taken), "hub" if s.name in hubs else "edge",
                               upstream=s.upstream)
    if not d.edges():
        raise DemoFailed("the topology has no edge site (a site no other site names as upstream)")
    raw.setdefault("origin", {})["url"] = origin_url
    for s in raw.get("site", []):
        s["url"] = d.sites[s["name"]].url
    write_toml(d.root / "topology.toml", raw,
                "# Written by `python -m fabric.demo`: the demo topology with the ports actually used.\n")

    # One token file for the origin and every relay: an admin token (publishes, reads status)
    # and one pull token per site, named after it (a site reports its state under its own name).
    d.secrets = {name: secrets.token_hex(16) for name in ["admin", *d.sites]}
    entries = [{"name": "admin", "secret": d.secrets["admin"], "scopes": ["admin", "publish", "pull"]}]
    entries += [{"name": s, "secret": d.secrets[s], "scopes": ["pull"], "site": s} for s in d.sites]
    write_toml(d.root / "tokens.toml", {"token": entries}, "# The demo's tokens (generated secrets).\n")
    (d.root / "tokens").mkdir()
    for name, secret in d.secrets.items():
        path = d.root / "tokens" / name
        path.write_text(secret + "\n")
        path.chmod(0o600)
    (d.root / "tokens.toml").chmod(0o600)

    d.procs = Processes(d)
    setup_keys(d)
    d.origin.proc = d.procs.start("origin", ["origin", "--store", d.root / "origin" / "store",
                                             "--listen", listen(origin_url), "--tokens", d.root / "tokens.toml"])
    wait_live(d, [d.origin])
    (d.root / "sites").mkdir()
    for site in d.sites.values():
        config = d.root / "sites" / f"{site.name}.toml"
        write_toml(config, {
            "site": site.name, "data": site.name, "listen": listen(site.url), "origin": origin_url,
            "token_file": f"../tokens/{site.name}", "follow": [f"{SERVED}:{CHANNEL}"],
            "topology": "../topology.toml", "tokens": "../tokens.toml", "trust": f"../{TRUST_FILE}",
            "report_interval": 0.5,
            "retention": {"keep": 3}, "sync": {"connections": 4, "stall_timeout": 10, "give_up_after": 30}})
        site.proc = d.procs.start(site.name, ["agent", "--config", config])
    wait_live(d, list(d.sites.values()))
    sites = shown(d, d.root / "sites")
    d.console.print(f"sites (config {sites}/SITE.toml, data {sites}/SITE/), each following {SERVED}:{CHANNEL}:")
    for site in d.sites.values():
        d.console.print(f"  {site.name:<12} {site.url}  {site.kind}, fetches from {site.upstream}")


def step_v1(d: Demo) -> None:
    """A worker per edge; the model's two versions; v1 published and served everywhere."""
    taken = {urlsplit(n.url).port for n in [d.origin, *d.sites.values()]}
    for i, site in enumerate(d.edges()):
        url = loopback_url(f"http://127.0.0.1:{WORKER_PORT + i}", taken)
        w = Node(f"{site.name}-w1", url, "worker", site=site.name)
        w.proc = d.procs.start(w.name, ["worker", "demo", "--agent", site.url, "--artifact", SERVED,
                                        "--channel", CHANNEL, "--listen", listen(url), "--worker-id", w.name,
                                        "--poll", "2"], token=site.name)
        d.workers[w.name] = w
    weights = d.root / "weights"
    d.procs.run("make-weights-v1", ["worker", "demo", "--make-weights", weights / "v1", "--seed", "1"])
    d.procs.run("make-weights-v2", ["worker", "demo", "--make-weights", weights / "v2", "--seed", "2",
                                    "--base", weights / "v1", "--change", "0.25"])
    d.expected = expected_outputs(weights)
    wait_live(d, list(d.workers.values()))

    t0 = time.monotonic()
    publish_served(d, "v1")
    wait(d, "every site active on v1 and every worker serving it",
          lambda: all(active(d, s) == "v1" for s in d.sites.values())
          and all(serving(w) == "v1" for w in d.workers.values()), START_TIMEOUT)
    d.console.print(f"every site is active on v1 and every worker serves it, {time.monotonic() - t0:.1f}s "
                    "after the publish started")
    show_verified(d, "v1")


def step_v2(d: Demo) -> None:
    """Publish v2 while every worker answers a request stream; follow v2 to every site and worker."""
    before = fetch_counters(d)
    d.stream = RequestStream({w.name: w.url for w in d.workers.values()}, d.expected)
    d.stream.start()
    wait(d, f"{WARM} answers from every worker",
          lambda: all(d.stream.answered(w) >= WARM for w in d.workers), START_TIMEOUT)
    d.console.print(f"request stream running: POST /infer to {len(d.workers)} workers, {RATE:.0f}/s each")

    t0 = time.monotonic()
    publisher = d.procs.start("publish-v2", publish_args(d, "v2"), token="admin", capture=True)
    reached: dict[str, float] = {}
    swapped: dict[str, float] = {}
    deadline = t0 + SWAP_TIMEOUT
    while time.monotonic() < deadline and (len(reached) < len(d.sites) or len(swapped) < len(d.workers)
                                           or publisher.poll() is None):
        d.procs.check()
        if publisher.poll() not in (None, 0):
            break  # finish_publish says why
        now = time.monotonic() - t0
        for s in d.sites.values():
            if s.name not in reached and active(d, s) == "v2":
                reached[s.name] = now
        for w in d.workers.values():
            if w.name not in swapped and serving(w) == "v2":
                swapped[w.name] = now
        time.sleep(0.05)
    finish_publish(d, "v2", publisher)
    wait(d, f"{WARM} v2 answers from every worker", lambda: all(
        d.stream.answered(w, "v2") >= WARM for w in swapped), 10.0, fail=False)
    d.stream.stop()

    d.console.print("since `fabric publish` started:")
    for s in d.sites.values():
        if s.name in reached:
            d.console.print(f"  {s.name} reached v2 after {reached[s.name]:.2f}s")
        else:
            d.problems.append(f"{s.name} did not reach v2 within {SWAP_TIMEOUT:.0f}s (active: {active(d, s)})")
    for w in d.workers.values():
        if w.name in swapped:
            load = last_load(w, "v2")
            how = (f": loaded {load['tensors_changed']} changed tensors ({mb(load['bytes_read'])} read), "
                   f"paused {load['pause_ms']:.1f} ms" if load else "")
            d.console.print(f"  {w.name} swapped to v2 after {swapped[w.name]:.2f}s{how}")
        else:
            d.problems.append(f"{w.name} did not swap to v2 within {SWAP_TIMEOUT:.0f}s")
    show_replication(d, before, fetch_counters(d))
    show_workers(d)
    show_verified(d, "v2")


def step_status(d: Demo) -> None:
    """What the origin knows: `fabric status`, once every site has reported v2."""
    def reported() -> bool:
        status, body = http_request(d.origin.url, "GET", "/v1/sites", token=d.secrets["admin"])
        sites = {s["site"]: s for s in json.loads(body)["sites"]} if status == 200 else {}
        return all(s in sites and all(c.get("active") == "v2" for c in sites[s]["channels"])
                   and all(w.get("serving") == "v2" for w in sites[s].get("workers", [])) for s in d.sites)
    wait(d, "every site's report of v2", reported, 10.0, fail=False)
    p = d.procs.run("status", ["status", "--origin", d.origin.url], token="admin",
                    env={"COLUMNS": str(max(d.console.width, 100))})
    d.console.print(p.stdout.rstrip(), markup=False, highlight=False, crop=False, soft_wrap=True)


STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    (f"local store: publish {ARTIFACT} v1, change 3 tensors, publish v2", step_local),
    (f"pull {CHANNEL} from the local store and verify", step_pull),
    ("start an origin and a site agent per site (loopback)", step_start_sites),
    (f"start a worker per edge site; publish {SERVED} v1 to {CHANNEL}", step_v1),
    (f"publish {SERVED} v2 to {CHANNEL} while the workers serve requests", step_v2),
    (f"a forgery: {SERVED} {FORGED} signed by a key no site trusts", step_forgery),
    ("fabric status", step_status),
]


def run(root: Path, console: Console | None = None,
        steps: Sequence[tuple[str, Callable[[Demo], None]]] = STEPS,
        topology: str | None = None, hold: bool = False) -> Demo:
    """Wipe `root`, then run each step in order; every process started is stopped at the end
    (with `hold`, only after Ctrl-C: the status page stays up meanwhile)."""
    console = console or Console()
    as_given = str(root)
    root = root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    d = Demo(root=root, console=console, shown_root=as_given, topology_text=topology or DEFAULT_TOPOLOGY.read_text())
    t0 = time.monotonic()
    try:
        for i, (title, step) in enumerate(steps, 1):
            console.rule(f"[bold]{i}. {title}")
            step(d)
        status_page(d, hold)
    finally:
        if d.stream is not None:
            d.stream.stop()
        if d.procs is not None:
            console.print(f"stopped {d.procs.stop()} processes")
    seconds = time.monotonic() - t0
    if d.stream is not None and not d.problems:
        console.print(f"[green]✓[/green] every site reached v2 ({', '.join(d.sites)}), "
                      f"every worker swapped, {d.stream.total} requests, 0 failed")
        if d.refused:
            console.print(f"[green]✓[/green] every site refused the forged {FORGED} "
                          f"({', '.join(sorted(set(d.refused.values())))}) and kept serving v2")
    for p in d.problems:
        console.print(f"[red]✗ {p}[/red]", highlight=False)
    console.rule(f"[bold {'red' if d.problems else 'green'}]demo done in {seconds:.1f}s")
    return d


def status_page(d: Demo, hold: bool) -> None:
    """Say where the origin's status page is; with `hold`, keep every process up until Ctrl-C."""
    if d.origin is None or d.procs is None:
        return  # part 2 did not run
    url, token_file = f"{d.origin.url}/ui/", shown(d, d.root / "tokens" / "admin")
    if not hold:
        d.console.print(f"status page: {url} (while the demo runs; log in with the admin token in {token_file}); "
                        "`python -m fabric.demo --hold` keeps it up after the demo")
        return
    d.console.print(f"[bold]status page: {url}[/bold]\n  log in with the admin token: {d.secrets['admin']} "
                    f"(also in {token_file})\n  every process stays up until Ctrl-C", highlight=False)
    try:
        while True:
            d.procs.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        d.console.print("Ctrl-C: stopping")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run()'s finally, which stops the processes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fabric.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder to (re)create (default: demo-out)")
    parser.add_argument("--hold", action="store_true", help="after the steps, print the status page's URL and "
                                                             "token, and keep every process up until Ctrl-C")
    parser.add_argument("--topology", help="topology file for part 2 (default: the embedded demo topology, "
                                           "an origin, hub-eu and three edges on ports 7000, 7100-7103)")
    args = parser.parse_args(argv)
    topology = Path(args.topology).read_text() if args.topology else None
    signal.signal(signal.SIGTERM, _terminate)
    console = Console()
    try:
        d = run(Path(args.out), console, topology=topology, hold=args.hold)
    except DemoFailed as e:
        console.print(f"[red]demo failed: {e}[/red]", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every process was stopped[/yellow]")
        raise SystemExit(130) from None
    if d.problems:
        raise SystemExit(1)

