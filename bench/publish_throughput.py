"""Publish throughput: `fabric publish` against `cp -r` and `zstd -1` on the same files.

    python -m bench.publish_throughput [--size-gb 2] [--runs 3] [--workdir bench-out/publish]

Generates an incompressible bf16 model (random bytes in safetensors shards of at
most 1 GB, written piece by piece so the generator holds one piece at a time), then
measures, in one run and in turn:

* `cp -r SRC DST`
* `zstd -1` of every file (`zstd -1 -q -f --output-dir-flat DST FILES…`; one thread,
  the CLI's default)
* `fabric publish` (the library's `publish` into a new local store through
  `LocalTarget`, in a child process) with store compression off, then on
* the `fabric publish` command itself (`--store`, compression on, its default), which
  adds the command line's start-up: typer, rich, the option parsing

Each command runs as a child process followed by `sync`, both timed, so no tool
gets credit for writes still sitting in the page cache (Fabric makes its chunks durable
before it commits anyway). The source is written and synced first and stays in the
page cache (the residency is printed); caches are never dropped, so every tool reads
from memory. Each of `--runs` rounds runs every method once, in a rotated order, and
prints a line as it ends: each publish's GB/s, the GB/s of that round's `cp -r`, their
ratio and the publish's peak RSS (GNU time, the child's own). The report has a row per
round and the best of each method. The library's publish child is `python -c` with
`CHILD`, which imports only what `publish` needs (`fabric.publish`, `fabric.store.store`),
not this benchmark's own modules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from bench import GB, Run, cached_fraction, md_table, run_timed, tree_size
from fabric.cli import fabric_command

SHARD = 1 << 30  # bytes of tensor data per safetensors shard, at most
PIECE = 8 << 20  # the generator writes and holds this much at a time
COMMAND = "python -m bench.publish_throughput"
CLI = "fabric publish (the command), compression on"
_SETTLE = 1.0  # seconds of rest between runs


def model_layout(size: int) -> list:
    """bf16 tensors of shape [rows, 4096] (32 MiB or less), grouped into shards."""
    from fabric.safetensors_io import TensorSpec  # here, not at the top: the publish child does not need it

    width, rows_max = 4096, 4096
    shards: list[list] = [[]]
    used, remaining, i = 0, size, 0
    while remaining >= width * 2:
        rows = min(rows_max, remaining // (width * 2))
        spec = TensorSpec(f"model.layers.{i // 4}.w{i % 4}.weight", "BF16", (rows, width))
        if used + spec.nbytes > SHARD and shards[-1]:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
        remaining -= spec.nbytes
        i += 1
    return shards


def generate(src: Path, size: int, seed: int = 0) -> list[Path]:
    import numpy as np

    from fabric.safetensors_io import write_safetensors

    src.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def fill(spec):
        for start in range(0, spec.nbytes, PIECE):
            yield rng.bytes(min(PIECE, spec.nbytes - start))

    shards = model_layout(size)
    paths = []
    for k, specs in enumerate(shards, 1):
        path = src / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, specs, fill, metadata={"format": "pt"})
        paths.append(path)
    (src / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "shards": len(shards)}) + "\n")
    return sorted(src.iterdir())


# The library's publish child, `python -c CHILD SRC STORE COMPRESS`: publish SRC into a new store
# and print the result as JSON. `-c`, not `-m bench…`: importing this package (ctypes, subprocess,
# tempfile, …: 30-50 ms) is the benchmark's cost, not the publish's.
CHILD = """
import json, sys
from fabric.publish import LocalTarget, publish
from fabric.store.store import open_store
src, store, compress = sys.argv[1:]
r = publish(src, artifact="bench", version="v1", target=LocalTarget(open_store(store, compress=compress == "1")))
print(json.dumps(r.to_json()))
"""


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="model size in GB (default 2)")
    p.add_argument("--runs", "--repeat", dest="runs", type=int, default=3,
                   help="rounds of every method, each printed (default 3)")
    p.add_argument("--workdir", default="bench-out/publish", help="scratch folder, wiped first")
    args = p.parse_args(argv)
    work = Path(args.workdir).absolute()
    shutil.rmtree(work, ignore_errors=True)
    src, out = work / "src", work / "out"
    size = int(args.size_gb * GB)
    _log(f"generating {size / GB:.2f} GB of random bf16 safetensors under {src} …")
    files = generate(src, size)
    total = tree_size(src)
    methods = _methods(src, out, files)
    rounds: list[dict[str, Run]] = []
    outputs: dict[str, int] = {}
    residency = []
    for r in range(args.runs):
        k = r % len(methods)  # rotate the order each round, so no method always follows the same one
        runs: dict[str, Run] = {}
        for name, cmd in methods[k:] + methods[:k]:
            if cmd is None:
                continue
            if name == "zstd -1":
                out.mkdir()  # zstd does not create its output folder
            residency.append(cached_fraction(files))
            run = run_timed(cmd, env=_child_env())
            if run.returncode != 0:
                raise SystemExit(f"{name} failed (exit {run.returncode}): {' '.join(cmd)}")
            outputs[name] = tree_size(out)
            shutil.rmtree(out)
            os.sync()
            time.sleep(_SETTLE)  # let the disk finish with the deleted output (ext4 may discard it)
            runs[name] = run
        rounds.append(runs)
        _log(f"run {r + 1}/{args.runs}: " + _run_line(runs, total))
    shutil.rmtree(work, ignore_errors=True)

    table = _table(methods, rounds, outputs, total) + "\n\n" + _rounds_table(rounds, total)
    notes = [
        f"Source: {len(files)} files, {total / GB:.2f} GB ({total:,} bytes) of random bytes "
        f"(incompressible), bf16 safetensors shards of at most {SHARD >> 20} MiB.",
        f"Page cache: the source was {min(residency):.0%}–{max(residency):.0%} resident before each run "
        "(caches are never dropped): every tool reads from memory, so this measures the "
        "write and CPU side. Each time includes a final `sync`.",
        f"{args.runs} rounds; in each, every method runs once, in a rotated order. The first table keeps "
        "each method's best round; `vs cp` = throughput / `cp -r` throughput (above 1 is faster than cp). "
        "The second has every round, each publish against the `cp -r` of the same round. Peak RSS is the "
        "command's own (GNU time `%M`). The two library rows are a Python interpreter that imports "
        "`fabric.publish` and `fabric.store.store`, nothing else; the command's row is "
        "`fabric publish SRC --store DIR --json`, start-up included.",
        "Fabric reads each 8 MiB safetensors segment in one of its worker threads (`fabric.publish._WORKERS`: 4) into a reused page-aligned "
        "buffer, hashes it with BLAKE3 and writes it with direct I/O (O_DIRECT: no page-cache copy) into a pack "
        "of its own (docs/formats.md `packs/`); a reference per chunk is written to a temp file and "
        "renamed into `chunks/` after a syncfs (one in the background per 256 MiB or 2 s, and one before the "
        "commit). `cp -r` copies through the page cache (copy_file_range), and its final `sync` writes it out. "
        "With compression on, each chunk's first 64 KiB are test-compressed (zstd-1) first. zstd -1 runs "
        "single-threaded.",
    ]
    best = {name: min((rd[name] for rd in rounds if name in rd), key=lambda run: run.seconds, default=None)
            for name, _ in methods}
    inner = {n: json.loads(r.stdout)["seconds"] for n, r in best.items() if r and n.startswith("fabric")}
    if inner:
        notes.append("Inside the publish child (no interpreter start-up, no final sync): "
                     + "; ".join(f"{n}: {s:.2f}s, {total / GB / s:.2f} GB/s" for n, s in inner.items()) + ".")
    notes.append(f"Tools: {_version('cp')}; {_version('zstd')}; the files live on {_fs_type(work)}.")
    missing = [n for n, c in methods if c is None]
    if missing:
        notes.append("Not measured, tool missing: " + ", ".join(missing) + " (apt-get install -y zstd).")
    report = table + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(report)
    return report


def _run_line(runs: dict[str, Run], total: int) -> str:
    """One round as it ends: every method's GB/s; each publish's ratio to this round's cp and its peak RSS."""
    cp = runs.get("cp -r")
    parts = []
    for name, run in runs.items():
        part = f"{name} {total / GB / run.seconds:.2f} GB/s"
        if name.startswith("fabric") and cp:
            part += f" = {cp.seconds / run.seconds:.2f}x cp, peak RSS {run.max_rss / (1 << 20):.0f} MiB"
        parts.append(part)
    return "; ".join(parts)


def _methods(src: Path, out: Path, files: list[Path]) -> list[tuple[str, list[str] | None]]:
    zstd = shutil.which("zstd")
    if zstd is None:
        _log("zstd is not installed: its row is skipped (install it: apt-get install -y zstd)")
    child = [sys.executable, "-c", CHILD, str(src), str(out / "store")]
    command = [*fabric_command(), "publish", str(src), "-a", "bench", "--version", "v1",
               "--store", str(out / "store"), "--json"]
    return [
        ("cp -r", ["cp", "-r", str(src), str(out)]),
        ("zstd -1", [zstd, "-1", "-q", "-f", "--output-dir-flat", str(out), *map(str, files)] if zstd else None),
        ("fabric publish, compression off", child + ["0"]),
        ("fabric publish, compression on", child + ["1"]),
        (CLI, command),
    ]


def _table(methods, rounds: list[dict[str, Run]], outputs: dict[str, int], total: int) -> str:
    """Each method's best round, with every round's seconds."""
    best = {}
    for name, _ in methods:
        done = [rd[name] for rd in rounds if name in rd]
        best[name] = min(done, key=lambda run: run.seconds) if done else None
    cp = best.get("cp -r")
    rows = []
    for name, cmd in methods:
        run = best[name]
        if run is None:
            rows.append([name, "missing", "-", "-", "-", "-", "-"])
            continue
        speed = total / GB / run.seconds
        ratio = f"{cp.seconds / run.seconds:.2f}x" if cp else "-"
        rows.append([name, f"{run.seconds:.2f}", f"{speed:.2f}", ratio,
                     f"{outputs[name] / GB:.3f}", f"{run.max_rss / (1 << 20):.0f}",
                     " / ".join(f"{rd[name].seconds:.2f}" for rd in rounds if name in rd)])
    return md_table(["method", "seconds (best)", "GB/s", "vs cp", "output GB", "peak RSS MiB", "every run (s)"],
                    rows)


def _rounds_table(rounds: list[dict[str, Run]], total: int) -> str:
    """Every round: cp -r and each publish, the publish against that round's cp."""
    names = [n for n in rounds[0] if n.startswith("fabric")] if rounds else []
    headers = ["run", "cp -r GB/s"]
    for n in names:
        short = "the command, compression on" if n == CLI else n.removeprefix("fabric publish, ")
        headers += [f"publish ({short}) GB/s", "vs cp", "peak RSS MiB"]
    rows = []
    for i, rd in enumerate(rounds, 1):
        cp = rd.get("cp -r")
        row = [str(i), f"{total / GB / cp.seconds:.2f}" if cp else "-"]
        for n in names:
            run = rd[n]
            row += [f"{total / GB / run.seconds:.2f}", f"{cp.seconds / run.seconds:.2f}x" if cp else "-",
                    f"{run.max_rss / (1 << 20):.0f}"]
        rows.append(row)
    return md_table(headers, rows)


def _fs_type(path: Path) -> str:
    best, fs = "", "an unknown file system"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, kind = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, kind
    except OSError:
        pass
    return fs


def _version(tool: str) -> str:
    exe = shutil.which(tool)
    if not exe:
        return f"{tool} not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip("* ") if out else tool


def _child_env() -> dict:
    """The environment for children: `bench` importable wherever we were started from."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
