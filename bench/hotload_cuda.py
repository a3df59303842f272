"""Hot-load on a GPU: changed tensors' load rate vs the host-to-device copy rate and load_file.

    python -m bench.hotload_cuda [--size-gb 2] [--tensors 32] [--stage-mb 32]

Run it wherever a CUDA device is present; without one it says so and exits 0.

It writes a bf16 model of `--size-gb` as v1 and two successors (10% and 100% of the
tensors changed), then measures, side by side:

* the machine's host-to-device copy rate from pinned memory and from pageable memory
  (1 GiB, `copy_(non_blocking=True)`), the ceiling for any loader;
* `safetensors.torch.load_file(device="cuda")` of the whole file, and the same followed
  by `load_state_dict` into a live module (the plain reload);
* `agents.worker.hotloader.LiveModule.load` in both modes, with and without verifying the chunk
  digests: swap time, its rate over the changed bytes, the copy stage's own rate, and
  the pause (in-place: the write lock; double-buffered: the reference swap).

Files are in the page cache (just written): this measures the loader, not the disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import md_table

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def copy_rate(pinned: bool, reps: int = 5) -> float:
    src = torch.empty(GIB, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return GIB / statistics.median(times) / 1e9


def write_versions(folder: Path, size_gb: float, n: int):
    from safetensors.torch import save_file

    from bench.hotload import _ManifestOnly
    from fabric.publish import publish
    cols = 4096
    rows = max(1, int(size_gb * 1e9 / 2 / cols / n))
    gen = torch.Generator(device="cuda").manual_seed(0)
    v1 = {f"w.{i}": torch.randn(rows, cols, generator=gen, device="cuda", dtype=torch.bfloat16) for i in range(n)}
    every10 = set(range(0, n, 10))
    versions = {"v1": v1,
                "v10": {k: v + 1 if int(k.split(".")[1]) in every10 else v for k, v in v1.items()},
                "v100": {k: v + 1 for k, v in v1.items()}}
    out = {}
    for name, sd in versions.items():
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in sd.items()}, str(d / "model.safetensors"))
        target = _ManifestOnly()
        publish(d, artifact="bench", target=target, version=name)
        out[name] = (d, target.manifest)
    return [(rows, cols)] * n, out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.hotload_cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--tensors", type=int, default=32)
    p.add_argument("--stage-mb", type=int, default=32, help="size of each pinned staging buffer")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=str(ROOT / "bench-out" / "hotload_cuda"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        msg = "bench.hotload_cuda: no CUDA device here (torch.cuda.is_available() is False); nothing measured."
        print(msg)
        return msg

    from safetensors.torch import load_file

    from agents.worker.hotloader import LiveModule
    from bench.hotload import Weights

    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    shapes, versions = write_versions(folder, args.size_gb, args.tensors)
    size = versions["v1"][0].joinpath("model.safetensors").stat().st_size
    device = torch.cuda.get_device_name()
    print(f"{device}: wrote 3 versions of {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    pinned, pageable = copy_rate(True), copy_rate(False)
    rows.append(["host-to-device copy, pinned (1 GiB)", "-", "1,074", "-", f"{pinned:.1f}", "-", "-"])
    rows.append(["host-to-device copy, pageable (1 GiB)", "-", "1,074", "-", f"{pageable:.1f}", "-", "-"])

    path = str(versions["v100"][0] / "model.safetensors")
    times = []
    for _ in range(args.repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        sd = load_file(path, device="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del sd
    lf = statistics.median(times)
    rows.append(["safetensors load_file(device=cuda)", "100%", f"{size / 1e6:,.0f}", f"{lf:.3f}",
                 f"{size / lf / 1e9:.1f}", "-", "-"])

    module = Weights(shapes).to(device="cuda", dtype=torch.bfloat16)
    module.load_state_dict(load_file(str(versions["v1"][0] / "model.safetensors"), device="cuda"))
    for target, label in (("v10", "10%"), ("v100", "100%")):
        times = []
        for name in (target, "v1") * args.repeat:
            torch.cuda.synchronize()
            t = time.perf_counter()
            module.load_state_dict(load_file(str(versions[name][0] / "model.safetensors"), device="cuda"))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        rows.append(["load_file(cuda) + load_state_dict", label, f"{size / 1e6:,.0f}", f"{s:.3f}",
                     f"{size / s / 1e9:.1f}", "-", f"{s * 1e3:.1f} (stop the world)"])

        for mode in ("in-place", "double-buffered"):
            for verify in (True, False):
                live = LiveModule(module, mode=mode, manifest=versions["v1"][1], verify=verify,
                                  stage_bytes=args.stage_mb << 20)
                reps = [live.load(*versions[name]) for name in (target, "v1") * (args.repeat + 1)][2:]
                swap = statistics.median(r.seconds for r in reps)
                copy_s = statistics.median(r.copy_s for r in reps)
                changed = reps[0].bytes_changed
                rows.append([f"LiveModule {mode}" + ("" if verify else ", no verify"), label,
                             f"{changed / 1e6:,.0f}", f"{swap:.3f}", f"{changed / swap / 1e9:.1f}",
                             f"{changed / copy_s / 1e9:.1f}" if copy_s else "-",
                             f"{statistics.median(r.pause_ms for r in reps):.3f} / "
                             f"{max(r.pause_ms for r in reps):.3f}"])
                print(" | ".join(rows[-1]), flush=True)
                del live
                torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)
    table = md_table(["method", "tensors changed", "MB loaded", "seconds (median)", "GB/s (of MB loaded)",
                      "copy stage GB/s", "pause ms (median / max)"], rows)
    note = (f"\n\n{device}; model {args.tensors} bf16 tensors, {size / 1e9:.2f} GB; staging "
            f"{args.stage_mb} MiB x 4 pinned buffers; files in the page cache. Loader rate vs pinned "
            f"host-to-device copy: see the ratio of the GB/s columns.")
    print("\n" + table + note)
    return table + note


if __name__ == "__main__":
    main(sys.argv[1:])
