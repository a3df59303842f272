"""One copy per site, for a later version: the bytes a site agent writes, on ext4 and on
a file system with reflinks, side by side.

    python -m bench.site_writes [--size-mb 512] [--changed 0.1] [--runs 2]

One `fabric origin` and two `fabric agent` processes on loopback, following `m:prod`:
one agent keeps its data folder on this machine's disk (ext4 here), the other on an
XFS with reflinks (`bench.loopfs`: an image file, loop-mounted). v1 is one safetensors
file of `--size-mb` MB of random bytes in 8 MiB tensors; v2 changes every tensor
`i` with `i % round(1 / --changed) == 0` (10% by default), so its file is a new file
whose other tensors are v1's. Each version is published and promoted with the CLI;
per agent the command reads `write_bytes` of /proc/PID/io (what the process sent, or
will send, to storage: direct writes, page-cache writes, logs, state) right before the
promote and again once the version is active (`current/m`), and prints it against the
version's new bytes (`new_bytes` of the publish report) and against its folder's bytes.

Goal (issue 16): ≤ 1.05x the version's new bytes at every site. ext4 cannot share
blocks between files, so there a later version's changed file is written whole (its
reused chunks copied from the older file); on XFS they are shared with it
(`fabric.fileio.clone_range`), and only the new chunks are written. Every run is
printed. Needs root and `mkfs.xfs` (Debian's xfsprogs) for the XFS rows; data lives
in a temp folder under /tmp, removed at the end with the mount and the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import loopfs, machine, md_table
from bench.fanout import write_bytes
from bench.pull_throughput import free_port, service, wait_http
from fabric.cli import fabric_command
from fabric.demo.processes import write_toml
from fabric.safetensors_io import TensorSpec, write_safetensors
from topology.lab import HOST_DISK_RETENTION

COMMAND = "python -m bench.site_writes"
MB = 1e6
TENSOR = 8 << 20
ARTIFACT, CHANNEL = "m", "prod"
PUBLISHER = "bench-site-writes-publisher-5d2a7c"
SITES = {"ext4": "bench-site-writes-ext4-91b3e0", "xfs": "bench-site-writes-xfs-4c8f17"}


def make_version(folder: Path, size: int, changed_every: int, version: int) -> Path:
    """v1: random tensors; v2: every `changed_every`-th tensor redrawn, the rest v1's bytes."""
    folder.mkdir(parents=True)
    specs = [TensorSpec(f"layers.{i}.weight", "U8", (min(TENSOR, size - start),))
             for i, start in enumerate(range(0, size, TENSOR))]

    def fill(spec: TensorSpec):
        i = int(spec.name.split(".")[1])
        seed = version if version > 1 and i % changed_every == 0 else 1
        yield np.random.default_rng((seed, i)).bytes(spec.nbytes)

    write_safetensors(folder / "model.safetensors", specs, fill, metadata={"format": "pt"})
    return folder


def agent_config(path: Path, site: str, data: Path, port: int, origin: str) -> Path:
    write_toml(path, {"site": site, "data": data, "listen": f"127.0.0.1:{port}", "origin": origin,
                      "token": SITES[site], "follow": [f"{ARTIFACT}:{CHANNEL}"],
                      "retention": dict(HOST_DISK_RETENTION)})  # the host's disk is not the site's
    return path


def fabric(*args: object, env: dict) -> dict:
    r = subprocess.run([*fabric_command(), *map(str, args)], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"fabric {' '.join(map(str, args[:2]))} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout) if "--json" in args else {}


def active(data: Path) -> str | None:
    link = data / "current" / ARTIFACT
    return link.resolve().name if link.is_symlink() else None


def run_once(work: Path, xfs: Path, size: int, changed_every: int, env: dict) -> list[dict]:
    tokens = work / "tokens.toml"
    write_toml(tokens, {"token": [{"name": "publisher", "secret": PUBLISHER, "scopes": ["publish", "pull"]}]
                        + [{"name": s, "site": s, "secret": t, "scopes": ["pull"]} for s, t in SITES.items()]})
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    data = {"ext4": work / "ext4-site", "xfs": xfs / "xfs-site"}
    rows = []
    with service([*fabric_command(), "origin", "--store", str(work / "origin-store"), "--listen",
                  f"127.0.0.1:{port}", "--tokens", str(tokens), "--log-level", "warning"], work / "origin.log"):
        wait_http(f"{origin}/livez", log=work / "origin.log")
        with contextlib.ExitStack() as agents:
            procs = {}
            for site in SITES:
                p = free_port()
                cfg = agent_config(work / f"{site}.toml", site, data[site], p, origin)
                procs[site] = agents.enter_context(service([*fabric_command(), "agent", "--config", str(cfg)],
                                                           work / f"{site}.log"))
                wait_http(f"http://127.0.0.1:{p}/livez", log=work / f"{site}.log")
            for version in (1, 2):
                src = make_version(work / f"src-v{version}", size, changed_every, version)
                report = fabric("publish", src, "-a", ARTIFACT, "--version", f"v{version}", "--origin", origin,
                                "--token", PUBLISHER, "--json", env=env)
                before = {s: write_bytes(p.pid) for s, p in procs.items()}
                t0 = time.monotonic()
                fabric("promote", f"{ARTIFACT}@v{version}", "-c", CHANNEL, "--origin", origin, "--token", PUBLISHER,
                       env=env)
                seconds = {}
                deadline = t0 + 600
                while len(seconds) < len(procs) and time.monotonic() < deadline:
                    for s, p in procs.items():
                        if p.poll() is not None:
                            raise RuntimeError(f"agent {s} exited: {(work / f'{s}.log').read_text()[-2000:]}")
                        if s not in seconds and active(data[s]) == f"v{version}":
                            seconds[s] = time.monotonic() - t0
                    time.sleep(0.05)
                if len(seconds) < len(procs):
                    raise RuntimeError(f"v{version} not active everywhere within 600 s: {seconds}")
                time.sleep(0.5)  # the activation's state save and log lines
                for s, p in procs.items():
                    rows.append({"site": s, "version": f"v{version}", "new": report["new_bytes"],
                                 "folder": (src / "model.safetensors").stat().st_size,
                                 "written": write_bytes(p.pid) - before[s], "seconds": seconds[s]})
                shutil.rmtree(src)
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=512)
    p.add_argument("--changed", type=float, default=0.1, help="share of v1's tensors v2 changes (default 0.1)")
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args(argv)
    why = loopfs.unavailable()
    if why:
        print(f"Skipped: {why}")
        return f"Skipped: {why}"
    size, every = int(args.size_mb * MB), max(1, round(1 / args.changed))
    env = {**os.environ, "FABRIC_CONFIG": os.devnull}
    command = f"{COMMAND} {' '.join(argv) if argv is not None else ' '.join(sys.argv[1:])}".rstrip()
    table, met = [], []
    t_start = time.monotonic()
    for n in range(1, args.runs + 1):
        work = Path(tempfile.mkdtemp(prefix="fabric-site-writes-", dir="/tmp"))
        try:
            with loopfs.xfs_with_reflinks(work / "loop", size_mb=int(4 * args.size_mb) + 512) as xfs:
                rows = run_once(work, xfs, size, every, env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for r in rows:
            ratio = r["written"] / r["new"]
            met.append(ratio <= 1.05)
            table.append([n, r["site"], r["version"], f"{r['new'] / MB:,.1f}", f"{r['folder'] / MB:,.1f}",
                          f"{r['written'] / MB:,.1f}", f"{ratio:.3f}", f"{r['written'] / r['folder']:.3f}",
                          f"{r['seconds']:.2f}"])
            print(" | ".join(map(str, table[-1])), flush=True)
    m = machine()
    text = "\n".join([
        md_table(["run", "site's file system", "version", "new MB", "folder MB", "written MB", "written / new",
                  "written / folder", "s to active"], table), "",
        f"Goal ≤ 1.05x the new bytes: {sum(met)} of {len(met)} rows. Whole run {time.monotonic() - t_start:.0f} s "
        f"on {m['nproc']} CPUs ({m['cpu']}); command: `{command}`"])
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
