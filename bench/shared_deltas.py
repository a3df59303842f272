"""Many sites pulling one delta at once: the origin's work with frames kept and without.

    python -m bench.shared_deltas [--sites 4] [--runs 3] [--pairs fp32,bf16] [--root /tmp]

At a promote, the origin's direct children all ask for the new version's chunks with
the same held version at about the same moment. Here `--sites` `fabric pull`s of a
fine-tune step (the corpus's frozen fine-tune, `bench/corpus.py`: step 100 → the
fine-tune, each site holding step 100) start together against a `fabric origin` on
loopback, side by side:

* `kept frames`: the origin as shipped, which keeps the frames `full` encodes and has
  requests for a frame another is encoding wait for it (`fabric.wire.framecache`), and
  warms that cache when it starts (`fabric.wire.warming`: the command waits for it to be
  done before the sites start, and prints the codec CPU it took apart);
* `no kept frames`: the same with `FABRIC_FRAME_CACHE_MB=0` (every request encodes,
  nothing is warmed).

Both pin `FABRIC_ENCODE=full`, as the policy does on a WAN link (on loopback `auto`
would send stored forms). Each round starts both origins afresh (nothing kept from
the round before) on their own copies of one store, then runs the two in turn, in an
order that alternates by round. Per run it prints the wall time until every site has
the version, the origin's CPU seconds during it (`/proc/PID/stat`), the payload bytes
it sent and the frames it sent again without encoding (its /metrics), and checks that
every site's files are the version's. On 2 cores the sites' own decoding shares the
machine with the origin: compare the origin's CPU, and the rows with each other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from bench import md_table, scrape
from bench.pull_throughput import _child_env, service, wait_http, wait_warmed
from bench.shaped_links import PAIRS, TOKEN, prepared
from fabric.cli import fabric_command

COMMAND = "python -m bench.shared_deltas"
FABRIC = fabric_command()
ORIGINS = {"kept frames": ({}, 7201), "no kept frames": ({"FABRIC_FRAME_CACHE_MB": "0"}, 7202)}
TICKS = os.sysconf("SC_CLK_TCK")


def _log(msg: str) -> None:
    print(f"[shared-deltas] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def metric(url: str, name: str) -> float:
    return scrape(url, TOKEN).get(name, 0.0)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_run(work: Path, seed: Path, fam: str, url: str, pid: int, sites: int) -> dict:
    new = PAIRS[fam][2]
    stores = [work / f"site-{i}" for i in range(sites)]
    for store in stores:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(store.with_name(store.name + "-dest"), ignore_errors=True)
        shutil.copytree(seed, store, symlinks=True)
    os.sync()  # the copies written out first: the pulls' fsyncs would wait for them (bench.shaped_links)
    cpu0, sent0 = cpu_seconds(pid), metric(url, "fabric_bytes_sent_total")
    reused0 = metric(url, "fabric_encoded_frames_reused_total")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*FABRIC, "pull", f"{fam}@{new}", str(store.with_name(store.name + "-dest")),
                               "--origin", url, "--token", TOKEN, "--store", str(store), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
             for store in stores]
    outs = [p.communicate() for p in procs]
    seconds = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"fabric pull failed: {out.decode()[-1500:]}{err.decode()[-2500:]}")
    return {"seconds": seconds, "cpu": cpu_seconds(pid) - cpu0, "sent": metric(url, "fabric_bytes_sent_total") - sent0,
            "reused": metric(url, "fabric_encoded_frames_reused_total") - reused0,
            "dests": [s.with_name(s.name + "-dest") for s in stores]}


def rounds(work: Path, origin_store: Path, seed: Path, fam: str, expected: dict, sites: int, runs: int,
           results: list) -> None:
    for r in range(runs):
        order = list(ORIGINS) if r % 2 == 0 else list(reversed(ORIGINS))
        for name in order:
            env, port = ORIGINS[name]
            store = work / f"origin-{port}"
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(origin_store, store, symlinks=True)
            cmd = ["env", "FABRIC_ENCODE=full", f"FABRIC_CONFIG={os.devnull}", *[f"{k}={v}" for k, v in env.items()],
                   *FABRIC, "origin", "--store", str(store), "--listen", f"127.0.0.1:{port}",
                   "--tokens", str(work / "tokens.toml"), "--log-level", "warning"]
            url = f"http://127.0.0.1:{port}"
            with service(cmd, work / f"origin-{port}.log") as proc:
                wait_http(f"{url}/livez", log=work / f"origin-{port}.log", timeout=60)
                warmed, warm_cpu, _ = wait_warmed(url, TOKEN)
                got = one_run(work, seed, fam, url, proc.pid, sites)  # `env` execs the origin: same pid
                got.update(warm_cpu=warm_cpu, warmed=warmed)
            for dest in got.pop("dests"):
                if tree_bytes(dest) != expected:
                    raise SystemExit(f"{dest} is not {fam}@{PAIRS[fam][2]}")
            results.append((fam, name, got))
            _log(f"{fam} round {r + 1}/{runs} {name:>14}: warmed {got['warmed']:.0f} frames in {got['warm_cpu']:.2f} "
                 f"codec CPU s at start-up; {got['seconds']:.2f} s for {sites} sites, origin CPU "
                 f"{got['cpu']:.2f} s, sent {got['sent'] / 1e6:.2f} MB, frames reused {got['reused']:.0f}, "
                 f"load {os.getloadavg()[0]:.1f}")


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=4, help="sites pulling at once (default 4)")
    p.add_argument("--runs", type=int, default=3, help="rounds (every run is printed; default 3)")
    p.add_argument("--pairs", default="fp32,bf16", help="fp32, bf16 (comma-separated)")
    p.add_argument("--root", default="/tmp", help="where the corpus is built and cached")
    args = p.parse_args(argv)
    families = [f for f in args.pairs.split(",") if f]
    t_start = time.monotonic()
    results: list = []
    with prepared(args.root, families, "fabric-shared-deltas-") as (corpus, work, origin_store, seed):
        for fam in families:
            expected = tree_bytes(corpus.version(PAIRS[fam][2]))
            rounds(work, origin_store, seed, fam, expected, args.sites, args.runs, results)
    rows, notes = [], []
    for fam in families:
        med = {}
        for name in ORIGINS:
            runs = [g for f, n, g in results if (f, n) == (fam, name)]
            med[name] = {k: statistics.median(g[k] for g in runs)
                         for k in ("seconds", "cpu", "sent", "reused", "warm_cpu", "warmed")}
            rows.append([PAIRS[fam][0], name, f"{med[name]['warm_cpu']:.2f} ({med[name]['warmed']:.0f})",
                         f"{med[name]['cpu']:.2f}", f"{med[name]['seconds']:.2f}",
                         f"{med[name]['sent'] / 1e6:.2f}", f"{med[name]['reused']:.0f}",
                         " ".join(f"{g['cpu']:.2f}" for g in runs), " ".join(f"{g['seconds']:.2f}" for g in runs)])
        kept, none = med["kept frames"], med["no kept frames"]
        notes.append(f"{fam}: with kept frames the origin used {kept['cpu'] / none['cpu']:.2f}x the CPU of encoding "
                     f"for every site during the rollout ({kept['cpu']:.2f} s against {none['cpu']:.2f} s, medians; "
                     f"{(kept['cpu'] + kept['warm_cpu']) / none['cpu']:.2f}x counting its warm-up) and all "
                     f"{args.sites} sites had the version in {kept['seconds'] / none['seconds']:.2f}x the time; "
                     f"bytes sent {kept['sent'] / none['sent']:.3f}x")
    headers = ["pair", "origin", "warm-up CPU s (frames)", "origin CPU s (median)", "all sites s (median)",
               "payload MB sent", "frames reused", "every run: origin CPU s", "every run: all sites s"]
    notes.append(f"{args.sites} sites pulling at once from one origin on loopback, `FABRIC_ENCODE=full`; "
                 f"{args.runs} round(s), both origins started afresh each round; medians. `warm-up`: the codec CPU "
                 f"seconds of the origin's start-up warming (`fabric_frame_warm_cpu_seconds_total`; "
                 f"`fabric.wire.warming`: each channel's version against the one before it, here every pair's "
                 f"`prod`, not only this row's), done before the sites start; `origin CPU`: during the rollout. "
                 f"1-minute load at the end "
                 f"{os.getloadavg()[0]:.1f}. Took {time.monotonic() - t_start:.0f} s.")
    report = md_table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(report)
    return report


if __name__ == "__main__":
    main()
