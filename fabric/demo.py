"""The demo (`python -m fabric.demo`, run by `make demo`): one version's path, end to end.

It builds a small transformer-shaped model (bf16 safetensors, about 100 MB, fixed
seed), publishes it as v1 to channel `prod` in a local store, changes three tensors
as a training step would, publishes v2, shows what changed, pulls v2 and checks the
pulled files are byte-identical to the source. Everything lives under `demo-out/`,
which is wiped at the start of each run.

The demo is a list of steps (`STEPS`), each a function of the shared `Demo` state,
so later stages (an origin server, site agents, workers) are added as further steps.
It calls the library, never the CLI.

`write_safetensors` is a small streaming safetensors writer (header first, then
each tensor's bytes in pieces), shared with the benchmarks.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from .chunking import DTYPE_SIZES
from .manifest import diff
from .publish import LocalTarget, PublishResult, publish
from .pull import materialize
from .registry import Registry
from .store import Store, open_store

ARTIFACT = "demo-llm"
CHANNEL = "prod"
SEED = 20261127
CHANGED = (  # the tensors the "training step" between v1 and v2 touches
    "model.layers.5.self_attn.q_proj.weight",
    "model.layers.5.mlp.down_proj.weight",
    "model.norm.weight",
)


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


# --- the demo's state and steps -----------------------------------------------------------

@dataclass
class Demo:
    root: Path
    console: Console
    store: Store | None = None
    results: dict[str, PublishResult] = field(default_factory=dict)

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def registry(self) -> Registry:
        return Registry(self.store)


def step_generate(d: Demo) -> None:
    """v1: the model's weights (one random stream per tensor), its config and a vocabulary."""
    v1 = d.src / "v1"
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
    d.console.print(f"wrote {v1}: model.safetensors ({len(specs)} bf16 tensors, {_mb(size)}), "
                    "config.json, vocab.txt")


def step_publish_v1(d: Demo) -> None:
    d.store = open_store(d.root / "store")
    _publish(d, "v1")


def step_train(d: Demo) -> None:
    """v2 = v1 with three tensors rewritten in place, as one training step might."""
    v2 = d.src / "v2"
    shutil.copytree(d.src / "v1", v2)
    path = v2 / "model.safetensors"
    ranges = tensor_ranges(path)
    specs = {s.name: s for s in model_specs()}
    rng = np.random.default_rng([SEED, 1 << 20])  # a stream no v1 tensor used
    with open(path, "r+b") as f:
        for name in CHANGED:
            offset, _ = ranges[name]
            f.seek(offset)
            f.write(bf16_values(specs[name], rng))
    d.console.print(f"wrote {v2}: v1 with {len(CHANGED)} tensors changed: {', '.join(CHANGED)}")


def step_publish_v2(d: Demo) -> None:
    _publish(d, "v2")


def step_show(d: Demo) -> None:
    """What `fabric show` reports: the files and tensors v2 changed, and the chunks it added."""
    old, new = d.registry.manifest(ARTIFACT, "v1"), d.registry.manifest(ARTIFACT, "v2")
    delta = diff(old, new)
    d.console.print(f"{ARTIFACT}@v2 ({new.id[:19]}…), parent {new.parent}")
    d.console.print(f"  files changed: {', '.join(delta.files_changed) or '-'}; "
                    f"added: {', '.join(delta.files_added) or '-'}; removed: {', '.join(delta.files_removed) or '-'}")
    t = Table("tensor changed vs v1 (file: tensor)", "dtype", "shape", "bytes")
    t.columns[0].min_width = 40
    tensors = {f"{x.file}:{x.name}": x for x in new.tensors}
    for key in delta.tensors_changed:
        x = tensors[key]
        t.add_row(f"{x.file}:\n  {x.name}", x.dtype, str(list(x.shape)), _mb(x.length))
    d.console.print(t)
    d.console.print(f"  {delta.new_chunks} chunks ({_mb(delta.new_bytes)}) of v2 are not in v1; "
                    f"the other {len(new.unique_chunks()) - delta.new_chunks} are shared")
    history = d.registry.channel(ARTIFACT, CHANNEL).history
    d.console.print(f"  channel {CHANNEL}: " + " → ".join(h["version"] for h in history))


def step_pull(d: Demo) -> None:
    """Materialize the channel's version and compare it with its source, byte for byte."""
    version = d.registry.resolve(ARTIFACT, channel=CHANNEL)
    m = d.registry.manifest(ARTIFACT, version)
    dest = d.root / "pulled"
    t0 = time.monotonic()
    materialize(d.store, m, dest)
    seconds = time.monotonic() - t0
    same = _identical(d.src / version, dest)
    d.console.print(f"pulled {ARTIFACT}:{CHANNEL} (= {version}) into {dest} in {seconds:.2f}s: "
                    f"{len(m.files)} files, {_mb(m.size)}")
    if not same:
        raise SystemExit(f"pulled files differ from {d.src / version}")
    d.console.print(f"[green]byte-identical[/green] with {d.src / version}")


STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("generate model v1", step_generate),
    (f"publish v1 → {CHANNEL}", step_publish_v1),
    ("train: change 3 tensors → v2", step_train),
    (f"publish v2 → {CHANNEL}", step_publish_v2),
    ("show v2 vs v1", step_show),
    (f"pull {CHANNEL} and verify", step_pull),
]


# --- helpers ------------------------------------------------------------------------------

def _publish(d: Demo, version: str) -> None:
    r = publish(d.src / version, artifact=ARTIFACT, version=version, channel=CHANNEL,
                target=LocalTarget(d.store), metadata={"step": str(1000 * int(version[1:]))})
    d.results[version] = r
    t = Table("version", "size", "chunks", "new (chunks)", "stored", "dedup", "time",
              title=f"publishes into {d.root / 'store'}")
    for v, x in d.results.items():
        t.add_row(v, _mb(x.bytes), str(x.chunks), f"{_mb(x.new_bytes)} ({x.new_chunks})",
                  _mb(x.written_bytes), f"{x.dedup_ratio:.1%}", f"{x.seconds:.2f}s")
    d.console.print(t)
    d.console.print("  new: bytes (and number) of chunks the store lacked; stored: those bytes on "
                    "disk after zstd; dedup: share of the version's bytes already stored")
    d.console.print(f"  {ARTIFACT}@{version}: {r.files} files, manifest {r.manifest_id[:23]}…; "
                    f"{CHANNEL} → {version}")


def _identical(a: Path, b: Path) -> bool:
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return names_a == names_b and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def run(root: Path, console: Console | None = None,
        steps: Sequence[tuple[str, Callable[[Demo], None]]] = STEPS) -> Demo:
    """Wipe `root`, then run each step in order."""
    console = console or Console()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    d = Demo(root=root, console=console)
    t0 = time.monotonic()
    for i, (title, step) in enumerate(steps, 1):
        console.rule(f"[bold]{i}. {title}")
        step(d)
    console.rule(f"[bold green]demo done in {time.monotonic() - t0:.1f}s")
    return d


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fabric.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder to (re)create (default: demo-out)")
    args = parser.parse_args(argv)
    run(Path(args.out))


if __name__ == "__main__":
    main()
