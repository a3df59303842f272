"""The training-run corpus for the wire-bytes benchmark (`bench/wire_bytes.py`).

    .venv/bin/python -m bench.corpus [--root /tmp] [--steps 100]

Builds, from a real (small) training run on the CPU:

* a decoder-only transformer (4 layers, d_model 256, 4 heads, vocab 8192, untied
  head: about 7.4 M parameters; batches of 4 × 64 tokens) trained with AdamW (lr 3e-4, 10 warm-up steps,
  weight decay 0.1) on a synthetic Markov-chain language; checkpoints at steps
  0, 1, 10 and 100, each saved as fp32 and as bf16 safetensors;
* a fine-tune of step 100 on another language with every parameter frozen except
  the last block, the final norm and the head (30 steps), saved the same two ways;
* a jsonl dataset (about 32 MB of generated rows), the same with 10% more rows
  appended, and the same with one row in the middle edited;
* a second, larger jsonl dataset (about 60 MB, `DatasetParams`, built in its own
  cached folder so changing it never retrains the model) and five edits of it: 10%
  more lines appended plus one line in the middle edited (`text-append-edit`), the
  append alone, 1% new lines inserted at three places, one line edited, and 1% of
  the lines deleted at three places.

Every version is a folder (`<root>/fabric-corpus-<hash>/versions/<name>/`) holding
one file. The hash covers the parameters below and this file's version tag, so a
rerun with the same parameters reuses the folders and takes no time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CORPUS_FORMAT = 2  # bump when what is built changes, so caches are rebuilt


@dataclass(frozen=True)
class Params:
    vocab: int = 8192
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    seq: int = 64
    batch: int = 4
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.1
    steps: int = 100
    checkpoints: tuple[int, ...] = (0, 1, 10, 100)
    finetune_steps: int = 30
    dataset_mb: int = 32
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"format": CORPUS_FORMAT, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class DatasetParams:
    """The larger text dataset and its edits (`text-*` versions)."""

    mb: int = 60
    seed: int = 11
    append: float = 0.10  # fraction of lines appended
    churn: float = 0.01  # fraction of lines inserted, or deleted, at three places

    def key(self) -> str:
        blob = json.dumps({"format": 1, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Corpus:
    root: Path
    params: Params
    text_root: Path | None = None  # the DatasetParams folder (text-* versions)

    def version(self, name: str) -> Path:
        if name.startswith("text-") and self.text_root is not None:
            return self.text_root / "versions" / name
        return self.root / "versions" / name

    @property
    def names(self) -> list[str]:
        roots = [self.root] + ([self.text_root] if self.text_root else [])
        return sorted(p.name for r in roots for p in (r / "versions").iterdir())


def build(root: str | os.PathLike = "/tmp", params: Params = Params(), *, log=print,
          text: DatasetParams | None = DatasetParams(), model: bool = True) -> Corpus:
    """The corpus for `params` (and the text dataset for `text`) under `root`, built unless already there.

    `model=False` builds only the text dataset (the model's versions are then absent)."""
    folder = Path(root) / f"fabric-corpus-{params.key()}"
    model = _build_model(Path(root), params, log) if model else folder
    text_root = _build_text(Path(root), text, log) if text is not None else None
    return Corpus(model, params, text_root)


def _build_model(root: Path, params: Params, log) -> Path:
    folder = root / f"fabric-corpus-{params.key()}"
    done = folder / "DONE"
    if done.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "versions").mkdir(parents=True)
    t0 = time.monotonic()
    _train(staging / "versions", params, log)
    _dataset(staging / "versions", params, log)
    (staging / "params.json").write_text(json.dumps(asdict(params), indent=1))
    (staging / "DONE").write_text(f"built in {time.monotonic() - t0:.0f} s\n")
    os.rename(staging, folder)
    log(f"corpus built in {time.monotonic() - t0:.0f} s at {folder}")
    return folder


def _build_text(root: Path, p: DatasetParams, log) -> Path:
    folder = root / f"fabric-dataset-{p.key()}"
    if (folder / "DONE").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "versions").mkdir(parents=True)
    _text_dataset(staging / "versions", p, log)
    (staging / "params.json").write_text(json.dumps(asdict(p), indent=1))
    (staging / "DONE").write_text("built\n")
    os.rename(staging, folder)
    return folder


# --- the model ---------------------------------------------------------------------

def _model(p: Params):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(p.d_model)
            self.qkv = nn.Linear(p.d_model, 3 * p.d_model)
            self.proj = nn.Linear(p.d_model, p.d_model)
            self.ln2 = nn.LayerNorm(p.d_model)
            self.up = nn.Linear(p.d_model, 4 * p.d_model)
            self.down = nn.Linear(4 * p.d_model, p.d_model)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, p.heads, d // p.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(p.vocab, p.d_model)
            self.pos = nn.Embedding(p.seq, p.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(p.layers))
            self.ln_f = nn.LayerNorm(p.d_model)
            self.head = nn.Linear(p.d_model, p.vocab, bias=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, tokens):
            x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    return GPT()


class _Language:
    """A sparse random Markov chain over the vocabulary: something a model can learn."""

    def __init__(self, vocab: int, seed: int, fanout: int = 16):
        rng = np.random.default_rng(seed)
        self.next = rng.integers(0, vocab, (vocab, fanout))
        w = rng.zipf(1.5, (vocab, fanout)).astype(np.float64)
        self.cdf = np.cumsum(w / w.sum(1, keepdims=True), 1)
        self.rng = rng
        self.vocab = vocab

    def batch(self, n: int, t: int) -> np.ndarray:
        out = np.empty((n, t + 1), np.int64)
        out[:, 0] = self.rng.integers(0, self.vocab, n)
        for i in range(1, t + 1):
            u = self.rng.random(n)[:, None]
            j = (u > self.cdf[out[:, i - 1]]).sum(1).clip(max=self.next.shape[1] - 1)
            out[:, i] = self.next[out[:, i - 1], j]
        return out


def _save(model, folder: Path, name: str, step: int, kind: str) -> None:
    import torch
    from safetensors.torch import save_file

    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        out = folder / f"{tag}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors"),
                  metadata={"step": str(step), "kind": kind, "dtype": tag})


def _train(folder: Path, p: Params, log) -> None:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(p.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = _model(p)
    lang = _Language(p.vocab, p.seed + 1)
    decay = [w for n, w in model.named_parameters() if w.dim() >= 2]
    no_decay = [w for n, w in model.named_parameters() if w.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / p.warmup))

    def step_once(language, optimizer, scheduler=None) -> float:
        tokens = torch.from_numpy(language.batch(p.batch, p.seq))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, p.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if scheduler:
            scheduler.step()
        return float(loss)

    t0 = time.monotonic()
    if 0 in p.checkpoints:
        _save(model, folder, "step0", 0, "pretrain")
    for step in range(1, p.steps + 1):
        loss = step_once(lang, opt, sched)
        if step in p.checkpoints:
            _save(model, folder, f"step{step}", step, "pretrain")
            log(f"step {step}: loss {loss:.3f} ({time.monotonic() - t0:.0f} s)")
    # fine-tune: only the last block, the final norm and the head learn
    trainable = {f"blocks.{p.layers - 1}.", "ln_f.", "head."}
    for name, w in model.named_parameters():
        w.requires_grad_(any(name.startswith(t) for t in trainable))
    ft = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=p.lr,
                           weight_decay=p.weight_decay, betas=(0.9, 0.95))
    other = _Language(p.vocab, p.seed + 2)
    for _ in range(p.finetune_steps):
        loss = step_once(other, ft)
    _save(model, folder, "ft", p.steps + p.finetune_steps, "finetune")
    log(f"fine-tune: loss {loss:.3f} ({time.monotonic() - t0:.0f} s)")


# --- the dataset ----------------------------------------------------------------------

_WORDS = ("the of and to in is was for on that with as by at from his her an which this be are "
          "model weight layer token train data loss step batch learning rate gradient optimizer "
          "river mountain city music history science garden window paper market engine signal "
          "quickly slowly never always often because although however therefore while").split()


def _rows(rng: np.random.Generator, start: int, count: int) -> list[bytes]:
    rows = []
    words = np.array(_WORDS)
    lengths = rng.integers(8, 60, count)
    picks = rng.integers(0, len(words), lengths.sum())
    scores = rng.random(count)
    labels = rng.integers(0, 5, count)
    pos = 0
    for i in range(count):
        text = " ".join(words[picks[pos:pos + lengths[i]]])
        pos += lengths[i]
        row = {"id": start + i, "text": text, "label": int(labels[i]), "score": round(float(scores[i]), 6),
               "source": f"shard-{(start + i) % 97:03d}"}
        rows.append(json.dumps(row, separators=(",", ":")).encode() + b"\n")
    return rows


def _dataset(folder: Path, p: Params, log) -> None:
    rng = np.random.default_rng(p.seed + 3)
    rows: list[bytes] = []
    size = 0
    while size < p.dataset_mb * 1_000_000:
        batch = _rows(rng, len(rows), 10_000)
        rows += batch
        size += sum(map(len, batch))
    _write_jsonl(folder / "data-v1", rows)
    extra = _rows(rng, len(rows), len(rows) // 10)
    _write_jsonl(folder / "data-append", rows + extra)
    edited = list(rows)
    mid = len(edited) // 2
    row = json.loads(edited[mid])
    row["text"] = row["text"].replace("the", "THE", 1) + " (edited)"
    row["label"] = (row["label"] + 1) % 5
    edited[mid] = json.dumps(row, separators=(",", ":")).encode() + b"\n"
    _write_jsonl(folder / "data-edit", edited)
    log(f"dataset: {len(rows)} rows, {size / 1e6:.1f} MB (+{len(extra)} appended; row {mid} edited)")


def _text_dataset(folder: Path, p: DatasetParams, log) -> None:
    """text-v1 (about p.mb MB of rows) and its five edits."""
    rng = np.random.default_rng(p.seed)
    rows: list[bytes] = []
    size = 0
    while size < p.mb * 1_000_000:
        batch = _rows(rng, len(rows), 10_000)
        rows += batch
        size += sum(map(len, batch))
    n = len(rows)
    mid = n // 2
    edited = list(rows)
    row = json.loads(edited[mid])
    row["text"] = row["text"].replace("the", "THE", 1) + " (edited)"
    row["label"] = (row["label"] + 1) % 5
    edited[mid] = json.dumps(row, separators=(",", ":")).encode() + b"\n"
    extra = _rows(rng, n, int(n * p.append))
    churn = int(n * p.churn) // 3
    places = [n // 4, n // 2, 3 * n // 4]
    inserted, cursor = [], 0
    new_rows = _rows(rng, n + len(extra), 3 * churn)
    for k, at in enumerate(places):
        inserted += rows[cursor:at] + new_rows[k * churn:(k + 1) * churn]
        cursor = at
    inserted += rows[cursor:]
    deleted, cursor = [], 0
    for at in places:
        deleted += rows[cursor:at]
        cursor = at + churn
    deleted += rows[cursor:]
    versions = {"text-v1": rows, "text-append-edit": edited + extra, "text-append": rows + extra,
                "text-insert": inserted, "text-edit": edited, "text-delete": deleted}
    for name, content in versions.items():
        _write_jsonl(folder / name, content)
    log(f"text dataset: {n} rows, {size / 1e6:.1f} MB (+{len(extra)} appended; row {mid} edited; "
        f"{3 * churn} inserted or deleted at rows {places})")


def _write_jsonl(folder: Path, rows: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "wb") as f:
        f.write(b"".join(rows))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp")
    ap.add_argument("--steps", type=int, default=Params.steps)
    args = ap.parse_args(argv)
    params = Params(steps=args.steps, checkpoints=tuple(s for s in Params.checkpoints if s <= args.steps))
    corpus = build(args.root, params)
    return str(corpus.root)


if __name__ == "__main__":
    print(main())
