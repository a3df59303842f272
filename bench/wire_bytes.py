"""Bytes on the wire per version pair: Fabric against rsync, casync and zstd (a benchmark).

    .venv/bin/python -m bench.wire_bytes [--root /tmp] [--only fp32,bf16,jsonl]

The corpus is a real training run (`bench/corpus.py`: checkpoints at steps 0, 1, 10
and 100 in fp32 and bf16, a frozen-layer fine-tune, a jsonl dataset with an append
and an edit); it is built once and cached under --root. For each version pair
(old → new), with the receiver holding the old version:

* **Fabric**: both versions are published into a sender store; a receiver store holds
  the old version (its chunks and its committed manifest). The receiver asks for the
  chunks it lacks with the fields of `fabric.wire.negotiate.request_fields` (batches of at most
  16 MiB and 4096 ids, as the sync engine cuts them); the sender plans and encodes each
  chunk (`fabric.wire.chunks.plan_request`, `encode_chunk`); the receiver decodes and verifies
  each one against its own store (`fabric.wire.frames.decode`) and stores it. Counted: the manifest (its
  canonical JSON, and in its own column the zstd patch against the held manifest that
  `negotiate.encode_manifest` makes), each request body, the stream magic and end frame of
  each response, and every chunk frame (42 bytes of header and the payload).
* **rsync** `-z --no-whole-file --ignore-times --stats` pulling the new file through a
  local "remote shell" onto a copy of the old one: its "Total bytes sent" plus
  "Total bytes received" (both directions of the real protocol).
* **casync** `make` of each version into its own store: the compressed chunk files of
  the new store that the old store lacks, plus the new index (`.caibx`).
* **zstd -3** of the whole new file.
* **reference** (the issue's lower bound for tensors): per tensor, 0 if its bytes are
  unchanged, else the smaller of its byte planes each compressed with zstd -3 and the
  byte planes of its XOR with the old tensor each compressed with zstd -3.

Targets checked per pair: for checkpoints after a step from a held one (issue 16),
Fabric's chunk payloads ≤ 0.9 × the reference (10% fewer bytes; "Fabric ÷ ref" is
that ratio); Fabric ≤ rsync (all pairs, the text datasets included: append, insert,
edit and delete lines). Encode and decode throughput are single-threaded (GB/s per
core) over the chunks Fabric sent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from bench import md_table
from bench.corpus import Corpus, Params, build
from fabric.core import chunking
from fabric.core import codec
from fabric.core.codec import Encoding
from fabric.core.refplan import ChunkHint
from fabric.wire import chunks, frames, negotiate
from fabric.wire.protocol import FRAME_OVERHEAD, MAX_IDS
from fabric.core.manifest import Manifest
from fabric.publish import LocalTarget, publish
from fabric.store.registry import Registry
from fabric.store.store import Store, open_store

BATCH_BYTES = 16 << 20
STREAM_FRAMING = 4 + 5  # magic, end frame

PAIRS = [  # label, family, old version (None: first sync), new version
    ("fp32 step 0→1", "fp32", "fp32-step0", "fp32-step1"),
    ("fp32 step 1→10", "fp32", "fp32-step1", "fp32-step10"),
    ("fp32 step 10→100", "fp32", "fp32-step10", "fp32-step100"),
    ("fp32 step 0→100", "fp32", "fp32-step0", "fp32-step100"),
    ("bf16 step 0→1", "bf16", "bf16-step0", "bf16-step1"),
    ("bf16 step 1→10", "bf16", "bf16-step1", "bf16-step10"),
    ("bf16 step 10→100", "bf16", "bf16-step10", "bf16-step100"),
    ("bf16 step 0→100", "bf16", "bf16-step0", "bf16-step100"),
    ("bf16 step 100, first sync", "bf16", None, "bf16-step100"),
    ("fp32 frozen fine-tune", "fp32", "fp32-step100", "fp32-ft"),
    ("bf16 frozen fine-tune", "bf16", "bf16-step100", "bf16-ft"),
    ("jsonl +10% rows", "jsonl", "data-v1", "data-append"),
    ("jsonl one row edited", "jsonl", "data-v1", "data-edit"),
    ("text 60 MB: +10% lines, one edited", "text", "text-v1", "text-append-edit"),
    ("text 60 MB: +10% lines appended", "text", "text-v1", "text-append"),
    ("text 60 MB: 1% lines inserted", "text", "text-v1", "text-insert"),
    ("text 60 MB: one line edited", "text", "text-v1", "text-edit"),
    ("text 60 MB: 1% lines deleted", "text", "text-v1", "text-delete"),
]
WIDTHS = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "I16": 2, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class Fabric:
    chunks: int = 0
    frames: int = 0  # chunk frame bytes (header + payload)
    requests: int = 0  # request bodies + stream framing
    manifest: int = 0  # canonical manifest
    manifest_patch: int = 0  # the manifest as a zstd patch against the held one
    raw: int = 0  # raw bytes of the chunks sent
    payload: int = 0  # chunk payload bytes (what `fabric pull --json` reports as bytes_received)
    encode_s: float = 0.0  # store read + plan lookup + encode, one thread
    decode_s: float = 0.0  # reference read and check + decode + verify, one thread
    codec_encode_s: float = 0.0  # the codec alone on bytes in memory (best of 3)
    codec_decode_s: float = 0.0
    by_encoding: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """What the wire carries: the manifest as a patch when the receiver holds an older one."""
        return self.frames + self.requests + self.manifest_patch

    @property
    def total_json_manifest(self) -> int:
        return self.frames + self.requests + self.manifest


# --- Fabric -------------------------------------------------------------------------------

class Sender:
    """Every version published into one store, as an origin holds them."""

    def __init__(self, corpus: Corpus, work: Path, pairs=PAIRS):
        self.dir = work / "sender"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.store = open_store(self.dir)
        target = LocalTarget(self.store)
        self.manifests: dict[str, Manifest] = {}
        for _, family, old, new in pairs:
            for name in (old, new):
                if name and name not in self.manifests:
                    publish(corpus.version(name), artifact=family, version=name, target=target)
                    self.manifests[name] = Registry(self.store).manifest(family, name)


def fabric_pair(sender: Sender, work: Path, old: str | None, new: str) -> Fabric:
    recv_dir = work / "receiver"
    shutil.rmtree(recv_dir, ignore_errors=True)
    recv = open_store(recv_dir)
    target = sender.manifests[new]
    held = sender.manifests[old] if old else None
    if held:
        for cid in held.unique_chunks():
            recv.put_chunk(cid, sender.store.get_chunk(cid), verified=True)
        Registry(recv).commit(held)
    out = Fabric(manifest=len(target.canonical()))
    base = negotiate.manifest_base(recv, target.artifact, exclude=target.version)
    body, ctype, headers = negotiate.serve_manifest(sender.store, target.artifact, target.version,
                                                base.version if base else None)
    assert negotiate.read_manifest_body(body, ctype, headers, base) == target.canonical()
    out.manifest_patch = len(body)
    fields = negotiate.request_fields(recv, target)
    sizes = target.unique_chunks()
    missing = recv.missing(list(sizes))
    for batch in _batches(missing, sizes):
        body = negotiate.fetch_body(batch, fields)
        out.requests += len(json.dumps(body).encode()) + STREAM_FRAMING
        plan = chunks.plan_request(sender.store, body)
        for cid in batch:
            t0 = time.perf_counter()
            tag, raw_size, payload = chunks.encode_chunk(sender.store, cid, plan.hint(cid), encodings=plan.names)
            t1 = time.perf_counter()
            data = frames.decode(cid, tag, raw_size, payload, references=frames.store_references(recv),
                                 expected_size=sizes[cid])
            t2 = time.perf_counter()
            recv.put_chunk(cid, data, verified=True)
            out.encode_s += t1 - t0
            out.decode_s += t2 - t1
            out.chunks += 1
            out.raw += raw_size
            out.frames += FRAME_OVERHEAD + len(payload)
            out.payload += len(payload)
            name = Encoding(tag).name.lower()
            out.by_encoding[name] = out.by_encoding.get(name, 0) + 1
            enc_s, dec_s = codec_timing(sender.store, data, plan.hint(cid), plan.names)
            out.codec_encode_s += enc_s
            out.codec_decode_s += dec_s
    Registry(recv).commit(target)  # every chunk arrived and verified
    shutil.rmtree(recv_dir, ignore_errors=True)
    return out


def codec_timing(store: Store, data: bytes, hint: ChunkHint, names: list[str]) -> tuple[float, float]:
    """Best-of-3 seconds to encode and to decode one chunk with the codec, inputs in memory."""
    ref = store.get_chunk(hint.reference) if hint.reference else None
    args = dict(dtype=hint.dtype, reference=ref, reference_id=hint.reference if ref is not None else None)
    enc_best = dec_best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        enc = codec.encode(data, encodings=names, **args)
        t1 = time.perf_counter()
        codec.decode_body(enc.encoding, enc.body, raw_size=len(data), reference=args["reference"],
                          reference_id=enc.reference_id)
        t2 = time.perf_counter()
        enc_best, dec_best = min(enc_best, t1 - t0), min(dec_best, t2 - t1)
    return enc_best, dec_best


def _batches(ids: list[str], sizes: dict[str, int]) -> list[list[str]]:
    out, current, total = [], [], 0
    for cid in ids:
        if current and (total + sizes[cid] > BATCH_BYTES or len(current) >= MAX_IDS):
            out.append(current)
            current, total = [], 0
        current.append(cid)
        total += sizes[cid]
    return out + [current] if current else out


# --- the other tools ---------------------------------------------------------------------------

def the_file(folder: Path) -> Path:
    (path,) = [p for p in folder.iterdir() if p.is_file()]
    return path


def rsync_bytes(work: Path, old: Path | None, new: Path) -> int:
    rsh = work / "local-rsh"
    rsh.write_text('#!/bin/sh\nshift\nexec "$@"\n')  # "ssh host cmd…" → run cmd… here
    rsh.chmod(0o755)
    dst_dir = work / "rsync-dst"
    shutil.rmtree(dst_dir, ignore_errors=True)
    dst_dir.mkdir()
    dst = dst_dir / new.name
    if old is not None:
        shutil.copyfile(old, dst)
    proc = subprocess.run(["rsync", "-z", "--no-whole-file", "--ignore-times", "--stats", "-e", str(rsh),
                           f"localhost:{new}", str(dst)], capture_output=True, text=True, check=True)
    if dst.read_bytes() != new.read_bytes():
        raise RuntimeError("rsync did not reproduce the new file")
    sent = _stat(proc.stdout, "Total bytes sent")
    received = _stat(proc.stdout, "Total bytes received")
    shutil.rmtree(dst_dir, ignore_errors=True)
    return sent + received


def _stat(text: str, label: str) -> int:
    m = re.search(rf"{label}: ([\d,.]+)", text)
    if not m:
        raise RuntimeError(f"rsync --stats has no {label!r}:\n{text}")
    return int(m.group(1).replace(",", "").replace(".", ""))


def casync_bytes(work: Path, old: Path | None, new: Path) -> int:
    base = work / "casync"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    old_chunks: set[str] = set()
    if old is not None:
        subprocess.run(["casync", "make", f"--store={base / 'old.castr'}", str(base / "old.caibx"), str(old)],
                       check=True, capture_output=True)
        old_chunks = {p.name for p in (base / "old.castr").rglob("*.cacnk")}
    subprocess.run(["casync", "make", f"--store={base / 'new.castr'}", str(base / "new.caibx"), str(new)],
                   check=True, capture_output=True)
    total = (base / "new.caibx").stat().st_size
    total += sum(p.stat().st_size for p in (base / "new.castr").rglob("*.cacnk") if p.name not in old_chunks)
    shutil.rmtree(base, ignore_errors=True)
    return total


def zstd_bytes(new: Path) -> int:
    proc = subprocess.run(["zstd", "-3", "-q", "-c", str(new)], capture_output=True, check=True)
    return len(proc.stdout)


# --- the reference -------------------------------------------------------------------------

def tensors_of(path: Path) -> dict[str, tuple[str, memoryview]]:
    data = path.read_bytes()
    n = chunking.header_length(data[:8], len(data))
    header = chunking.parse_safetensors_header(data[8:8 + n], len(data))
    view = memoryview(data)
    return {t.name: (t.dtype, view[t.offset:t.offset + t.length]) for t in header.tensors}


def reference_bytes(old: Path | None, new: Path) -> int:
    zc = zstandard.ZstdCompressor(level=3)
    before = tensors_of(old) if old else {}
    total = 0
    for name, (dtype, data) in tensors_of(new).items():
        prior = before.get(name)
        if prior is not None and prior[0] == dtype and prior[1] == data:
            continue
        width = WIDTHS.get(dtype, 1)
        options = [_planes_zstd(zc, np.frombuffer(data, np.uint8), width)]
        if prior is not None and prior[0] == dtype:
            xored = np.frombuffer(data, np.uint8).copy()
            m = min(len(xored), len(prior[1]))
            xored[:m] ^= np.frombuffer(prior[1], np.uint8, count=m)
            options.append(_planes_zstd(zc, xored, width))
        total += min(options)
    return total


def _planes_zstd(zc, arr: np.ndarray, width: int) -> int:
    n = len(arr) // width
    planes = arr[:n * width].reshape(n, width).T
    return sum(len(zc.compress(planes[i].tobytes())) for i in range(width)) + len(arr) - n * width


# --- the command --------------------------------------------------------------------------------------

def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.wire_bytes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp", help="where the corpus is cached (default /tmp)")
    ap.add_argument("--only", default="", help="comma-separated families to run: fp32, bf16, jsonl, text")
    args = ap.parse_args(argv)
    families = set(filter(None, args.only.split(","))) or {"fp32", "bf16", "jsonl", "text"}
    corpus = build(args.root, Params(), log=lambda m: print(m, flush=True), model=bool(families - {"text"}))
    work = Path(args.root) / f"fabric-wire-bytes-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _run(corpus, work, families)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(corpus: Corpus, work: Path, families: set[str]) -> str:
    pairs = [p for p in PAIRS if p[1] in families]
    tools = {t: shutil.which(t) is not None for t in ("rsync", "casync", "zstd")}
    if not all(tools.values()):
        print(f"missing {[t for t, ok in tools.items() if not ok]}: apt-get install -y rsync casync zstd", flush=True)
    sender = Sender(corpus, work, pairs)
    rows, checks, speed = [], [], {}
    for label, family, old, new in pairs:
        old_file = the_file(corpus.version(old)) if old else None
        new_file = the_file(corpus.version(new))
        raw = new_file.stat().st_size
        f = fabric_pair(sender, work, old, new)
        rs = rsync_bytes(work, old_file, new_file) if tools["rsync"] else None
        ca = casync_bytes(work, old_file, new_file) if tools["casync"] else None
        zs = zstd_bytes(new_file) if tools["zstd"] else None
        ref = reference_bytes(old_file, new_file) if new_file.suffix == ".safetensors" else None
        agg = speed.setdefault(family, [0, 0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((f.raw, f.codec_encode_s, f.codec_decode_s, f.encode_s, f.decode_s)):
            agg[i] += v

        def cell(n: int | None) -> str:
            return "n/a" if n is None else f"{n:,} ({n / raw:.3f})"
        verdicts = []
        if ref is not None and old is not None:
            verdicts.append(("payload ≤0.9×ref", f.payload <= 0.9 * ref))
        if rs is not None:
            verdicts.append(("≤rsync", f.total <= rs))
        rows.append([label, f"{raw:,}", cell(f.total), f"{f.total_json_manifest:,}",
                     f"{f.manifest:,} / {f.manifest_patch:,}",
                     cell(ref), f"{f.payload / ref:.3f}" if ref else "-", cell(rs), cell(ca), cell(zs),
                     ", ".join(f"{k} {v}" for k, v in sorted(f.by_encoding.items())) or "none",
                     "; ".join(f"{name} {'✓' if ok else '✗'}" for name, ok in verdicts)])
        checks += [(label, name, ok) for name, ok in verdicts]
        print(f"{label}: fabric {f.total:,} (payload {f.payload:,}) ref {ref} rsync {rs} casync {ca} zstd {zs} "
              f"(encode {f.encode_s:.2f}s decode {f.decode_s:.2f}s for {f.raw:,} B)", flush=True)
    table = md_table(["pair (old → new)", "new bytes", "Fabric (÷ new)", "Fabric, JSON manifest",
                      "manifest: JSON / sent",
                      "reference", "Fabric payload ÷ ref", "rsync -z", "casync", "zstd -3", "Fabric encodings", "targets"], rows)
    def gbps(n: float, s: float) -> str:
        return f"{n / s / 1e9:.2f}" if s else "-"
    speed_rows = [[fam, f"{v[0]:,}", gbps(v[0], v[1]), gbps(v[0], v[2]), gbps(v[0], v[3]), gbps(v[0], v[4])]
                  for fam, v in speed.items()]
    speed_table = md_table(["corpus", "bytes encoded", "codec encode GB/s", "codec decode GB/s",
                            "with store: encode GB/s", "with store: decode GB/s"], speed_rows)
    failed = [f"{label}: {name}" for label, name, ok in checks if not ok]
    verdict = ("All targets met." if not failed else "Targets missed: " + "; ".join(failed) + ".")
    text = "\n\n".join([
        table,
        "Bytes on the wire to bring a receiver holding the old version to the new one "
        "(ratio to the new version's size in parentheses). Fabric is measured in its `full` "
        "mode, the one its rate control uses on any link slower than its codec. It counts the "
        "manifest (as the zstd patch against the held manifest that the receiver asks for; the "
        "canonical JSON on a first sync), request bodies, stream framing and chunk frames; HTTP "
        "headers (about 0.3 KB per request) are not counted. rsync counts both directions of its "
        "protocol. The reference is the issue's per-tensor lower bound (byte planes, or byte "
        "planes of the XOR with the old tensor, each compressed with zstd -3).",
        speed_table,
        "Throughput on the chunks Fabric sent, one thread (GB/s of raw chunk bytes per core): "
        "the codec alone on bytes in memory (best of 3), and with the store (sender: read the "
        "chunk and its reference, encode; receiver: read and verify the reference, decode, "
        "verify the chunk).",
        verdict,
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
