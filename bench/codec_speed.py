"""Codec speed and ratio on 8 MiB tensor segments (a benchmark, not a test).

    .venv/bin/python bench/codec_speed.py

Prints, per case, the encoding chosen, payload/raw ratio, and single-thread encode
and decode GB/s (raw bytes per second), then the same with two threads at once.
Data: normal(0, 0.02) weights; the "step" cases pair them with the same weights after
a small update (noise of 1e-3 of the weights' scale), as after an optimizer step:
once as the selector chooses (`encode`), and once pinned to `xor`, `delta` and
`deltapack` (`encode_as`; the selector's sampling is then skipped, except `deltapack`'s
choice of packing per plane). The last lines time xor, delta and deltapack in turns.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from fabric.core import codec
from fabric.core.digest import digest

SEGMENT = 8 << 20
REPEAT = 10


def weights(rng, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """An 8 MiB segment of `dtype` and the same segment after one small update."""
    count = SEGMENT // (2 if dtype == "BF16" else 4)
    before = rng.normal(0, 0.02, count).astype(np.float32)
    after = before + rng.normal(0, 0.02e-3, count).astype(np.float32)
    if dtype == "BF16":  # round-to-nearest-even fp32 -> bf16
        return tuple(_bf16(x) for x in (before, after))
    return before, after


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def timed(fn) -> float:
    """Best-of-REPEAT seconds for one call."""
    best = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def threaded(fn, threads: int = 2) -> float:
    """Seconds per call while `threads` threads call `fn` REPEAT times each (best of 3)."""
    def work() -> None:
        for _ in range(REPEAT):
            fn()

    best = float("inf")
    for _ in range(3):
        workers = [threading.Thread(target=work) for _ in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return best / (threads * REPEAT)


def case(name: str, data: bytes, dtype: str, reference: bytes | None = None, pinned: str | None = None) -> None:
    ref_id = digest(reference) if reference is not None else None
    kwargs = dict(dtype=dtype, reference=reference, reference_id=ref_id)
    if pinned:
        def encode(data, **kw):
            return codec.encode_as(pinned, data, **kw)
    else:
        encode = codec.encode
    enc = encode(data, **kwargs)
    back = dict(raw_size=len(data), reference=reference, reference_id=ref_id)
    assert codec.decode(enc, **back) == data

    def gbps(seconds: float) -> float:
        return len(data) / seconds / 1e9

    print(
        f"{name:16s} {enc.name:9s} ratio {len(enc.payload) / len(data):.3f}  "
        f"encode {gbps(timed(lambda: encode(data, **kwargs))):5.2f} GB/s  "
        f"decode {gbps(timed(lambda: codec.decode(enc, **back))):5.2f} GB/s  "
        f"2 threads: encode {gbps(threaded(lambda: encode(data, **kwargs))):5.2f} "
        f"decode {gbps(threaded(lambda: codec.decode(enc, **back))):5.2f} GB/s"
    )


def side_by_side(rng, dtype: str, rounds: int = 15) -> None:
    """xor, delta and deltapack on the same step, timed in alternation (best of `rounds`): on
    a busy machine the ratios of the three hold even when the absolute figures do not."""
    before, after = (x.tobytes() for x in weights(rng, dtype))
    ref_id = digest(before)
    kwargs = dict(dtype=dtype, reference=before, reference_id=ref_id)
    encs = {name: codec.encode_as(name, after, **kwargs) for name in ("xor", "delta", "deltapack")}
    best = {(name, op): float("inf") for name in encs for op in ("encode", "decode")}
    for _ in range(rounds):
        for name, enc in encs.items():
            t0 = time.perf_counter()
            codec.encode_as(name, after, **kwargs)
            t1 = time.perf_counter()
            codec.decode(enc, raw_size=len(after), reference=before, reference_id=ref_id)
            t2 = time.perf_counter()
            best[name, "encode"] = min(best[name, "encode"], t1 - t0)
            best[name, "decode"] = min(best[name, "decode"], t2 - t1)
    rate = {k: len(after) / v / 1e9 for k, v in best.items()}
    line = [f"{dtype.lower()} step, alternating:"]
    for name, enc in encs.items():
        line.append(f"{name} ratio {len(enc.payload) / len(after):.3f} encode {rate[name, 'encode']:.2f} "
                    f"decode {rate[name, 'decode']:.2f} GB/s"
                    + ("" if name == "xor" else f" (÷ xor: bytes {len(enc.payload) / len(encs['xor'].payload):.3f}, "
                       f"decode speed {rate[name, 'decode'] / rate['xor', 'decode']:.2f})") + ";")
    print(" ".join(line))


def main() -> None:
    rng = np.random.default_rng(0)
    for dtype in ("BF16", "F32"):
        before, after = (x.tobytes() for x in weights(rng, dtype))
        case(dtype.lower(), after, dtype)
        case(f"{dtype.lower()} step", after, dtype, reference=before)
        case(f"{dtype.lower()} step, xor", after, dtype, reference=before, pinned="xor")
        case(f"{dtype.lower()} step, delta", after, dtype, reference=before, pinned="delta")
        case(f"{dtype.lower()} step, dpack", after, dtype, reference=before, pinned="deltapack")
    before, after = (x.tobytes() for x in weights(rng, "BF16"))
    hashed = dict(raw_size=len(after), reference=before)
    enc = codec.encode(after, dtype="BF16", reference=before)
    seconds = timed(lambda: codec.decode(enc, **hashed))
    print(f"bf16 step decode ({enc.name}), reference hashed (no reference_id): "
          f"{len(after) / seconds / 1e9:.2f} GB/s")
    for dtype in ("BF16", "F32"):
        side_by_side(rng, dtype)


if __name__ == "__main__":
    main()
