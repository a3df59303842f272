"""Rate control on shaped links: `auto` against `full` and `stored`, bytes and seconds side by side.

    python -m bench.shaped_links [--rates 10mbit,100mbit,1gbit] [--pairs fp32,bf16] [--runs 1]
                                 [--root /tmp] [--modes auto,full,stored]

Pulls a fine-tune step after its base, the receiver holding the base: the corpus's
frozen fine-tune (`bench/corpus.py`: a real training run on the CPU; step 100 → the
fine-tune, fp32 29 MB and bf16 15 MB files), once per mode of the sender's rate
control (`FABRIC_ENCODE=auto|full|stored` in the origin's environment). Each link is
two network namespaces joined by a veth pair shaped with `tc tbf` on both ends
(`bench.netns`): three `fabric origin`s (one per mode, each on its own copy of one
store) in namespace a, `fabric pull` in namespace b. The client store holds the base
version exactly as the origins do (the same manifest, so the manifest too travels
as a patch); each run starts from a fresh copy of it, written out (`sync`) before the
pull starts.

Per run: `bytes` = what the origin side's veth sent during the pull (`tx_bytes` from
`ip -s link`: every TCP/IP byte, headers and the manifest included), `payload` = the
chunk payload bytes `fabric pull --json` counts, `pull s` = the seconds
`fabric pull --json` reports for its own work, `child s` = the child from start to
exit (interpreter start-up included; no final sync: the data is small). Modes run
interleaved (auto, full, stored, auto, …) so that load on the machine falls on all
alike. Every run is printed; the table gives the median of the runs per mode.

The origins run for all the rounds, as an origin serves one version to many sites:
the first round's pull is the first site's, later rounds are later sites' (the origin
sends the frames `full` made for the first, `fabric.wire.framecache`). The table keeps
the two apart (`first site`, `later sites`). An origin warms its cache when it starts
(`fabric.wire.warming`: each channel's version against the one before it, here channel
`prod`, promoted to each pair's base and then its new version); the command waits until every origin
says it is done (`fabric_frame_warm_jobs` 0 on its /metrics) and prints how long that
took and how many frames each warmed, so the first site gets the warmed frames.
Targets (issue 16): on every link `auto` sends ≤ 1.05× the bytes of `full` and
takes no longer (`pull s`) than the faster of `full` and `stored`.

Needs root, `ip` and `tc`; data lives in a temp folder under /tmp, removed at the
end with the namespaces and processes, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from bench import md_table, netns
from bench.corpus import build
from bench.pull_throughput import _child_env, service, wait_http, wait_warmed
from fabric.cli import fabric_command

COMMAND = "python -m bench.shaped_links"
MB = 1e6
TOKEN = "bench-shaped-token-0123456789abcdef"
PAIRS = {  # family -> (label, base, new)
    "fp32": ("fp32 step 100 → fine-tune", "fp32-step100", "fp32-ft"),
    "bf16": ("bf16 step 100 → fine-tune", "bf16-step100", "bf16-ft"),
}
MODES = ("auto", "full", "stored")
PORTS = {"auto": 7001, "full": 7002, "stored": 7003}
FABRIC = fabric_command()


def _log(msg: str) -> None:
    print(f"[shaped] {msg}", file=sys.stderr, flush=True)


def prepare(work: Path, corpus, families: list[str]) -> tuple[Path, Path]:
    """The origin store (base and new of each pair), the client's seed (the bases, same manifests)
    and the origins' token file (`work`/tokens.toml: `TOKEN`, may pull)."""
    from fabric.publish import LocalTarget, publish
    from fabric.store.store import open_store

    (work / "tokens.toml").write_text(f'[[token]]\nname = "bench"\nsecret = "{TOKEN}"\nscopes = ["pull"]\n')

    origin = work / "origin-store"
    target = LocalTarget(open_store(origin))
    for fam in families:  # channel `prod` holds the base, then the new version, as sites follow it
        publish(corpus.version(PAIRS[fam][1]), artifact=fam, version=PAIRS[fam][1], target=target, channel="prod")
    seed = work / "client-seed"
    shutil.copytree(origin, seed, symlinks=True)
    for fam in families:
        publish(corpus.version(PAIRS[fam][2]), artifact=fam, version=PAIRS[fam][2], target=target, channel="prod")
    return origin, seed


@contextmanager
def prepared(root: str, families: list[str], prefix: str, *, keep: bool = False
             ) -> Iterator[tuple[object, Path, Path, Path]]:
    """The corpus (built under `root` unless there), a temp work folder and, in it, `prepare`'s
    origin store and client seed: (corpus, work, origin store, seed). The folder goes at the end
    (unless `keep`: then its path is logged)."""
    corpus = build(root, log=_log, text=None)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield (corpus, work, *prepare(work, corpus, families))
    finally:
        if keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def tx_bytes(link: netns.Link) -> int:
    out = subprocess.run(["ip", "-n", link.ns_a, "-j", "-s", "link", "show", "dev", link.dev_a],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def pull_once(link: netns.Link, work: Path, seed: Path, fam: str, mode: str) -> dict:
    store, dest = work / "client-store", work / "dest"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(seed, store, symlinks=True)
    # Write out the copy (and the origins' store copies before round 1) before the clock starts:
    # the pull's first fsync would otherwise wait for them. Without this the first pull of an
    # invocation, whichever mode, took 0.24-0.27 s inside against 0.19-0.21 s with it (three
    # invocations each of `--runs 2 --pairs fp32 --modes stored,full,auto`, 2026-12-04).
    os.sync()
    new = PAIRS[fam][2]
    cmd = [*FABRIC, "pull", f"{fam}@{new}", str(dest), "--origin", f"http://{link.addr_a}:{PORTS[mode]}",
           "--token", TOKEN, "--store", str(store), "--json"]
    before = tx_bytes(link)
    t0 = time.perf_counter()
    res = subprocess.run(link.wrap("b", cmd), capture_output=True, text=True, env=_child_env())
    seconds = time.perf_counter() - t0
    wire = tx_bytes(link) - before
    if res.returncode != 0:
        raise SystemExit(f"fabric pull failed ({mode}, {fam}): {res.stdout[-1500:]}{res.stderr[-2500:]}")
    report = json.loads(res.stdout)
    return {"bytes": wire, "payload": report.get("bytes_received"), "raw": report.get("bytes_raw"),
            "seconds": seconds, "inside": report.get("seconds")}


def one_link(work: Path, origin: Path, seed: Path, rate: str, families: list[str], modes: list[str],
             runs: int, results: list) -> None:
    stores = {}
    for mode in modes:
        stores[mode] = work / f"origin-{mode}"
        shutil.rmtree(stores[mode], ignore_errors=True)
        shutil.copytree(origin, stores[mode], symlinks=True)
    with netns.shaped_link(rate=rate, tag=f"sl{os.getpid() % 10000}") as link:
        _log(f"{rate}: namespaces {link.ns_a} (origins) and {link.ns_b} (fabric pull), tbf {rate} each way")
        servers = []
        try:
            for mode in modes:
                cmd = ["env", f"FABRIC_ENCODE={mode}", f"FABRIC_CONFIG={os.devnull}", *FABRIC, "origin",
                       "--store", str(stores[mode]), "--listen", f"{link.addr_a}:{PORTS[mode]}",
                       "--tokens", str(work / "tokens.toml"), "--log-level", "warning"]
                ctx = service(cmd, work / f"origin-{mode}.log", lambda c: link.wrap("a", c))
                ctx.__enter__()
                servers.append(ctx)
            for mode in modes:
                wait_http(f"http://{link.addr_a}:{PORTS[mode]}/livez", lambda c: link.wrap("b", c),
                          log=work / f"origin-{mode}.log", timeout=60)
            for mode in modes:
                warmed, cpu, seconds = wait_warmed(f"http://{link.addr_a}:{PORTS[mode]}", TOKEN,
                                                   lambda c: link.wrap("b", c))
                _log(f"{rate}: origin {mode} warmed {warmed:.0f} frames ({cpu:.2f} codec CPU s), done "
                     f"{seconds:.2f} s after it answered")
            for r in range(runs):
                for fam in families:
                    for mode in modes:
                        got = pull_once(link, work, seed, fam, mode)
                        got["site"] = "first site" if r == 0 else "later sites"
                        results.append((rate, fam, mode, got))
                        _log(f"{rate} {fam} run {r + 1}/{runs} {mode:>6}: {got['bytes']:>11,} B on the link, "
                             f"payload {got['payload']:,} B of {got['raw']:,} raw, {got['seconds']:.2f} s "
                             f"(inside {got['inside']:.2f} s), load {os.getloadavg()[0]:.1f}")
        finally:
            for ctx in reversed(servers):
                ctx.__exit__(None, None, None)


def table(results: list, rates: list[str], families: list[str], modes: list[str]) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for rate, fam, site in [(r, f, s) for r in rates for f in families for s in ("first site", "later sites")]:
        med = {}
        for mode in modes:
            runs = [g for (r, f, m, g) in results if (r, f, m, g["site"]) == (rate, fam, mode, site)]
            if runs:
                med[mode] = {k: statistics.median(g[k] for g in runs)
                             for k in ("bytes", "payload", "seconds", "inside")}
                med[mode]["all"] = " ".join(f"{g['inside']:.1f}/{g['seconds']:.1f}" for g in runs)
                med[mode]["all_b"] = " ".join(f"{g['bytes'] / MB:.2f}" for g in runs)
        full = med.get("full")
        for mode in modes:
            if mode not in med:
                continue
            m = med[mode]
            rows.append([rate, PAIRS[fam][0], site, mode, f"{m['bytes']:,.0f}", f"{m['payload']:,.0f}",
                         f"{m['bytes'] / full['bytes']:.2f}x" if full else "-", f"{m['inside']:.2f}",
                         f"{m['seconds']:.2f}", m["all_b"], m["all"]])
        if {"auto", "full", "stored"} <= med.keys():
            b = med["auto"]["bytes"] / med["full"]["bytes"]
            fastest = min(med["full"]["inside"], med["stored"]["inside"])
            t = med["auto"]["inside"] / fastest
            verdicts.append(f"{rate}, {fam}, {site}: auto bytes = {b:.3f}x full (target ≤ 1.05x: "
                            f"{'met' if b <= 1.05 else 'NOT met'}); auto seconds = {t:.3f}x the faster of "
                            f"full and stored (target ≤ 1.00x: {'met' if t <= 1.0 else 'NOT met'})")
    headers = ["link", "pair", "sites", "mode", "bytes on link (median)", "payload bytes", "vs full", "pull s (median)",
               "child s (median)", "every run (MB)", "every run (pull s / child s)"]
    return md_table(headers, rows), verdicts


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="10mbit,100mbit,1gbit", help="tbf rates, comma-separated")
    p.add_argument("--pairs", default="fp32,bf16", help="fp32, bf16 (comma-separated)")
    p.add_argument("--modes", default=",".join(MODES), help="FABRIC_ENCODE values, comma-separated")
    p.add_argument("--runs", type=int, default=1, help="rounds per link (every run is printed; default 1)")
    p.add_argument("--root", default="/tmp", help="where the corpus is built and cached")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (origin logs) and say where")
    args = p.parse_args(argv)
    rates = [r for r in args.rates.split(",") if r]
    families = [f for f in args.pairs.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    reason = netns.available()
    if reason:
        msg = f"skipped: {reason}"
        print(msg)
        return msg
    t_start = time.monotonic()
    results: list = []
    with prepared(args.root, families, "fabric-shaped-", keep=args.keep) as (_, work, origin, seed):
        for rate in rates:
            one_link(work, origin, seed, rate, families, modes, args.runs, results)
    text, verdicts = table(results, rates, families, modes)
    notes = verdicts + [
        "`bytes on link`: what the origins' veth sent during the pull (TCP/IP headers, HTTP, the manifest "
        "patch and every chunk frame); `payload bytes`: the chunk payloads `fabric pull --json` counts. "
        "Byte counts barely vary between runs; seconds do (the machine is shared).",
        "`pull s`: the time `fabric pull --json` reports for its own work (resolve, fetch, verify, write); "
        "`child s`: the child from start to exit, interpreter start-up included. The targets use `pull s`.",
        "`first site`: round 1, after the origins warmed their caches at start-up (the deltas of the new "
        "versions against their bases, `fabric.wire.warming`; the `stored` origin warms nothing); `later "
        "sites`: rounds 2 on, the same origins, which send the frames `full` kept.",
        f"Medians of the run(s) per mode ({args.runs} round(s)), modes interleaved; 1-minute load at the end "
        f"{os.getloadavg()[0]:.1f}. Took {time.monotonic() - t_start:.0f} s.",
    ]
    report = text + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(report)
    return report


if __name__ == "__main__":
    main()
