"""Hot-load on CPU: swap time and request pause, changed tensors only vs a full reload.

    python -m bench.hotload [--size-gb 1] [--tensors 40] [--repeat 3]

A model of `--tensors` float32 tensors (`--size-gb` in all) is written as v1, and as
two successors: one where 10% of the tensors changed, one where all did. Each method
swaps the live module from v1 to the successor and back, `--repeat` times each way
(after one unmeasured round trip),
while a client thread runs requests against it without pause:

* `in-place` and `double-buffered`: `agents.worker.hotloader.LiveModule.load` with the
  versions' manifests (reads and verifies only the changed tensors). Each version
  folder carries the site seal a site agent writes (`fabric.core.seal`, made here by
  the agent's own re-read, `fabric.pull.verify_tree`), so these rows check the bytes
  against it; `in-place, BLAKE3` ignores the seal (`seal=False`: the chunk ids, as
  without a seal), `in-place, unverified` checks nothing but file sizes (`verify=False`);
* `load_file, locked`: `safetensors.torch.load_file` + `load_state_dict` with the
  request lock held (the plain way to never serve a mix);
* `load_file, then copy`: `load_file` outside the lock, `load_state_dict` under it.

First, the primitives on the 10% version's changed bytes (100 MB of 1 GB), from the
mapped file into spare tensors, best of 5: `torch copy_` (what `load_state_dict`
does), the seal's checked copy (`agents.worker.sealcheck.copy_sealed`), and hashing
alone with xxh3-128 and with BLAKE3.

A request touches every tensor (a few elements of each) under `serving()`, so its
latency is the time it waited for the weights plus a few hundred microseconds. The
table gives the swap's wall time, the bytes it read from the version's file, the
longest time requests could not start (`pause`), and the latency of the requests
that overlapped a swap (p50, p99, max). Files are in the page cache (just written),
so this measures the loader, not the disk. On 2 cores, compare rows, not machines.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agents.worker.files import VersionFiles
from agents.worker.hotloader import LiveModule, RWLock
from agents.worker.sealcheck import Fallback, copy_sealed, load_seal
from fabric.core import digest
from bench import md_table
from fabric.core import seal
from fabric.core.manifest import Manifest
from fabric.publish import publish
from fabric.fileio import replace_file
from fabric.pull import verify_tree

ROOT = Path(__file__).resolve().parents[1]
GAP = 0.2  # seconds between swaps, so requests resume in between


class Weights(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]):
        super().__init__()
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(s), requires_grad=False) for s in shapes)


class _ManifestOnly:
    """A publish target that stores nothing: we only want the manifest (chunk ids per tensor)."""

    registry = None  # it keeps no versions, so the manifest has no parent

    def offer(self, chunks, dtypes=None):
        return [0] * len(chunks)

    def flush(self):
        """Nothing was stored, so nothing to make durable."""

    def commit(self, manifest: Manifest) -> str:
        self.manifest = manifest
        return manifest.id

    def promote(self, *a):
        """No channels here: the benchmark reads the manifest only."""


def write_versions(folder: Path, size: float, n: int) -> tuple[list[tuple[int, int]], dict[str, tuple[Path, Manifest]]]:
    cols = 1536
    rows = max(1, int(size * 1e9 / 4 / cols / n))
    shapes = [(rows, cols)] * n
    gen = torch.Generator().manual_seed(0)
    v1 = {f"w.{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    changed10 = set(range(0, n, 10))  # every 10th tensor
    versions = {
        "v1": v1,
        "v10": {k: (v + 1 if int(k.split(".")[1]) in changed10 else v) for k, v in v1.items()},
        "v100": {k: v + 1 for k, v in v1.items()},
    }
    out = {}
    for name, sd in versions.items():
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"))
        target = _ManifestOnly()
        publish(d, artifact="bench", target=target, version=name)
        sealer = seal.Sealer()  # what a site agent writes beside a version it pulled
        verify_tree(target.manifest, d, sealer)
        replace_file(d / seal.SEAL_FILE, sealer.encode(target.manifest))
        out[name] = (d, target.manifest)
    return shapes, out


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Client:
    """Requests in a loop; keeps (start, end) of each."""

    def __init__(self, serve):
        self.serve, self.spans, self._stop = serve, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with torch.inference_mode(), self.serve() as module:
                s = 0.0
                for p in module.w:
                    s += float(p[0, :8].sum())
            self.spans.append((t0, time.perf_counter()))

    def __enter__(self):
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def during(self, windows: list[tuple[float, float]]) -> list[float]:
        return [(b - a) * 1e3 for a, b in self.spans if any(a < w1 and b > w0 for w0, w1 in windows)]


def bench_loader(mode: str, base: torch.nn.Module, versions, target: str, repeat: int, **options) -> dict:
    live = LiveModule(base, mode=mode, manifest=versions["v1"][1], **options)

    def serve():
        class _S:
            def __enter__(s):
                s.cm = live.serving()
                return s.cm.__enter__().module

            def __exit__(s, *e):
                return s.cm.__exit__(*e)
        return _S()

    swaps, pauses, windows, read, how = [], [], [], 0, set()
    for name in (target, "v1"):  # warm-up round trip, not measured (first-touch page faults)
        live.load(*versions[name])
    with Client(serve) as client:
        for _ in range(repeat):
            for name in (target, "v1"):
                t0 = time.perf_counter()
                rep = live.load(*versions[name])
                windows.append((t0, time.perf_counter()))
                swaps.append(rep.seconds)
                pauses.append(rep.pause_ms)
                read = rep.bytes_read
                how.add(f"{rep.verified}" + (f" (fallback: {rep.seal_fallback})" if rep.seal_fallback else ""))
                time.sleep(GAP)
    return dict(_row(swaps, pauses, client.during(windows), read), verified=", ".join(sorted(how)))


def bench_full_reload(base: torch.nn.Module, versions, target: str, repeat: int, locked: bool) -> dict:
    lock, current = RWLock(), {"m": base}

    def serve():
        class _S:
            def __enter__(s):
                s.cm = lock.read()
                s.cm.__enter__()
                return current["m"]

            def __exit__(s, *e):
                return s.cm.__exit__(*e)
        return _S()

    swaps, pauses, windows = [], [], []
    for name in (target, "v1"):  # warm-up round trip, not measured
        base.load_state_dict(load_file(str(versions[name][0] / "model.safetensors")))
    with Client(serve) as client:
        for _ in range(repeat):
            for name in (target, "v1"):
                path = str(versions[name][0] / "model.safetensors")
                t0 = time.perf_counter()
                if locked:
                    with lock.write():
                        base.load_state_dict(load_file(path))
                    t_ask = t0
                else:
                    sd = load_file(path)
                    t_ask = time.perf_counter()
                    with lock.write():
                        base.load_state_dict(sd)
                    del sd
                t1 = time.perf_counter()
                windows.append((t0, t1))
                swaps.append(t1 - t0)
                pauses.append((t1 - t_ask) * 1e3)
                time.sleep(GAP)
    return _row(swaps, pauses, client.during(windows), versions[target][0].joinpath("model.safetensors").stat().st_size)


def changed_tensors(versions, target: str) -> list:
    """The tensors of `target` whose chunks differ from v1's (what a load from v1 reads)."""
    old = {t.name: t.chunks for t in versions["v1"][1].tensors}
    return [t for t in versions[target][1].tensors if t.chunks != old[t.name]]


def primitives(versions) -> list[list[str]]:
    """GB/s of copying, checked copying and hashing the changed bytes of v10 (best of 5)."""
    folder, m = versions["v10"]
    changed = changed_tensors(versions, "v10")
    files = VersionFiles(folder, m)
    seal_, _ = load_seal(folder, m)
    targets = {t.name: torch.empty(t.length, dtype=torch.uint8) for t in changed}
    n = sum(t.length for t in changed)
    segment = m.chunking["safetensors"]["segment"]
    runs = {
        "torch copy_ (load_state_dict's copy)": lambda: [targets[t.name].copy_(files.tensor(t)) for t in changed],
        "seal-checked copy (copy_sealed)": lambda: copy_sealed(files, changed, targets, segment, seal_, Fallback()),
        "xxh3-128 alone (1 thread)": lambda: [seal.xxh(files.view(t)) for t in changed],
        "BLAKE3 alone (digest.digest)": lambda: [digest.digest(files.view(t)) for t in changed],
    }
    rows = []
    for name, fn in runs.items():
        fn()
        best = min(_timed(fn) for _ in range(5))
        rows.append([name, f"{n / 1e6:,.0f}", f"{n / best / 1e9:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    files.close()
    return rows


def copy_time(versions, target: str) -> float:
    """Seconds torch's copy_ takes to copy `target`'s changed tensors from the mapped file into
    spare tensors: what an in-place pause is compared with (median of 5, after one unmeasured)."""
    folder, m = versions[target]
    changed = changed_tensors(versions, target)
    files = VersionFiles(folder, m)
    spare = {t.name: torch.empty(t.length, dtype=torch.uint8) for t in changed}

    def copy():
        for t in changed:
            spare[t.name].copy_(files.tensor(t))
    copy()
    seconds = statistics.median(_timed(copy) for _ in range(5))
    files.close()
    return seconds


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _row(swaps: list[float], pauses: list[float], latencies: list[float], read: int) -> dict:
    swap = statistics.median(swaps)
    return {"swap_s": swap, "swap_max": max(swaps), "read": read, "gbps": read / swap / 1e9 if swap else 0.0, "pause_ms": max(pauses),
            "pause_med": statistics.median(pauses),
            "p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99),
            "max": max(latencies, default=0.0), "n": len(latencies)}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.hotload", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--tensors", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3, help="swaps each way per method")
    p.add_argument("--dir", default=str(ROOT / "bench-out" / "hotload"))
    args = p.parse_args(argv)

    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    shapes, versions = write_versions(folder, args.size_gb, args.tensors)
    size = versions["v1"][0].joinpath("model.safetensors").stat().st_size
    print(f"wrote 3 versions of {size / 1e9:.2f} GB ({args.tensors} tensors) in {time.perf_counter() - t0:.1f}s",
          flush=True)
    prims = md_table(["primitive", "MB", "GB/s (best of 5)"], primitives(versions))
    base = Weights(shapes)
    base.load_state_dict(load_file(str(versions["v1"][0] / "model.safetensors")))

    rows, ratios = [], []
    for target, label in (("v10", "10%"), ("v100", "100%")):
        results = [
            ("in-place", bench_loader("in-place", base, versions, target, args.repeat)),
            ("in-place, BLAKE3", bench_loader("in-place", base, versions, target, args.repeat, seal=False)),
            ("in-place, unverified", bench_loader("in-place", base, versions, target, args.repeat, verify=False)),
            ("double-buffered", bench_loader("double-buffered", base, versions, target, args.repeat)),
            ("load_file, locked", bench_full_reload(base, versions, target, args.repeat, locked=True)),
            ("load_file, then copy", bench_full_reload(base, versions, target, args.repeat, locked=False)),
        ]
        for method, r in results:
            rows.append([method, label, r.get("verified", "none"), f"{r['read'] / 1e6:,.0f}", f"{r['swap_s']:.3f} / {r['swap_max']:.3f}",
                         f"{r['gbps']:.2f}",
                         f"{r['pause_med']:.2f} / {r['pause_ms']:.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{r['max']:.2f}", r["n"]])
            print(" | ".join(map(str, rows[-1])), flush=True)
        rate = {m: r["gbps"] for m, r in results}
        copy_ms = copy_time(versions, target) * 1e3
        pause = dict(results)["in-place"]
        ratios.append(f"{label} changed: in-place with the seal reads at {rate['in-place'] / rate['load_file, locked']:.2f}x "
                      f"load_file's rate (BLAKE3 {rate['in-place, BLAKE3'] / rate['load_file, locked']:.2f}x, "
                      f"unverified {rate['in-place, unverified'] / rate['load_file, locked']:.2f}x); "
                      f"in-place pause {pause['pause_med']:.2f} ms median, {pause['pause_ms']:.2f} max, vs "
                      f"{copy_ms:.2f} ms to copy the changed bytes (torch copy_, median of 5)")
        print(ratios[-1], flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    table = md_table(["method", "tensors changed", "checked by", "MB read", "swap s (median / max)", "read GB/s (median)",
                      "pause ms (median / max)",
                      "request ms p50", "p99", "max", "requests during swaps"], rows)
    note = (f"\n\nModel: {args.tensors} float32 tensors, {size / 1e9:.2f} GB; {args.repeat} swaps each way per "
            "row; files in the page cache. `pause`: longest time new requests could not start "
            "(in-place: drain + checked copy + health check under the write lock; double-buffered: the reference swap). "
            "`checked by`: how the hot-loader checked the bytes it read (the site seal's xxh3-128, the "
            "manifest's BLAKE3 chunk ids, or not at all); the load_file rows verify nothing.\n\n"
            + "\n".join(f"* {r}" for r in ratios))
    print("\n" + prims + "\n\n" + table + note)
    return prims + "\n\n" + table + note


if __name__ == "__main__":
    main()
