"""Fabric's vLLM worker extension: load only the tensors a version changed, through the model's own
`load_weights`.

Run vLLM with

    VLLM_SERVER_DEV_MODE=1 vllm serve FOLDER \\
        --worker-extension-cls agents.serving.vllm_extension.FabricWorkerExtension

vLLM mixes this class into each of its GPU workers, so its methods can be called through
`POST /collective_rpc` (vLLM passes only JSON strings as arguments there). The agent's vLLM
adapter (`agents.serving.vllm`, `options.extension = true`) calls

    {"method": "fabric_load_changed",
     "kwargs": {"folder": NEW_FOLDER, "previous": OLD_FOLDER, "changed": "[\\"model.safetensors:w\\", …]"}}

between `/pause` and `/resume`. `changed` is Fabric's manifest diff (`file:tensor` names whose
bytes, dtype or shape differ, computed by the agent from the two manifests it holds): only those
tensors are read from NEW_FOLDER, so the bytes read are the bytes changed. Without `changed`
the method compares the two folders tensor by tensor (both are read; only the differing tensors
are handed to the model, which still shortens the copy to the GPU, not the read).

The tensors go through `model.load_weights(iterable of (name, tensor))`, the model's own loader
that maps checkpoint names onto vLLM's fused and sharded parameters (q/k/v into qkv_proj, a
tensor-parallel worker's slice), so a changed `q_proj` lands in the right rows of `qkv_proj`.
Quantized models whose loading post-processes weights (`process_weights_after_loading`) are
not supported by this path: use the whole `reload_weights`.

The answer, one per worker: `{"folder", "tensors", "bytes_read", "loaded", "mode"}`; `bytes_read`
counts the tensors read for the model plus, when comparing, both folders' bytes compared.
This module imports neither vLLM nor torch by name (safetensors' `safe_open(framework="pt")`
makes the tensors), so it imports anywhere Fabric does.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterator

WEIGHT_SUFFIX = ".safetensors"


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def changed_by_comparison(folder: Path, previous: Path, counter: list[int]) -> dict[str, list[str]]:
    """file -> names of the tensors of `folder` that `previous` lacks or holds otherwise; both are
    read, and `counter[0]` adds the bytes compared."""
    out: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*" + WEIGHT_SUFFIX)):
        rel = path.relative_to(folder).as_posix()
        new_h, new_base = read_header(path)
        old_path = previous / rel
        old_h, old_base = read_header(old_path) if old_path.is_file() else ({}, 0)
        names = []
        with open(path, "rb") as nf, (open(old_path, "rb") if old_h else open(path, "rb")) as of:
            nm = mmap.mmap(nf.fileno(), 0, access=mmap.ACCESS_READ) if new_h else None
            om = mmap.mmap(of.fileno(), 0, access=mmap.ACCESS_READ) if old_h else None
            for name, t in new_h.items():
                o = old_h.get(name)
                if o is None or (o["dtype"], o["shape"]) != (t["dtype"], t["shape"]):
                    names.append(name)
                    continue
                a0, a1 = t["data_offsets"]
                b0, b1 = o["data_offsets"]
                counter[0] += (a1 - a0) + (b1 - b0)
                if nm[new_base + a0:new_base + a1] != om[old_base + b0:old_base + b1]:
                    names.append(name)
        if names:
            out[rel] = names
    return out


def changed_from_diff(changed: list[str]) -> dict[str, list[str]]:
    """file -> names, from the manifest diff's `file:name` entries (weight files only)."""
    out: dict[str, list[str]] = {}
    for entry in changed:
        file, sep, name = entry.partition(":")
        if sep and file.endswith(WEIGHT_SUFFIX):
            out.setdefault(file, []).append(name)
    return out


def iter_tensors(folder: Path, wanted: dict[str, list[str]], counter: list[int]) -> Iterator[tuple[str, object]]:
    """(name, tensor) of each wanted tensor, read from `folder`; `counter[0]` adds the bytes read."""
    from safetensors import safe_open

    for rel, names in wanted.items():
        header, _ = read_header(folder / rel)
        with safe_open(str(folder / rel), framework="pt") as f:
            for name in names:
                a, b = header[name]["data_offsets"]
                counter[0] += b - a
                yield name, f.get_tensor(name)


class FabricWorkerExtension:
    """Mixed into vLLM's worker by `--worker-extension-cls`; `self.model_runner` is vLLM's."""

    def _fabric_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def fabric_load_changed(self, folder: str, previous: str = "", changed: str = "") -> dict:
        new = Path(folder)
        if not new.is_dir():
            raise FileNotFoundError(f"no version folder {folder}")
        counter = [0]
        if changed:
            wanted, mode = changed_from_diff(json.loads(changed)), "manifest_diff"
        elif previous and Path(previous).is_dir():
            wanted, mode = changed_by_comparison(new, Path(previous), counter), "compared"
        else:
            wanted = {p.relative_to(new).as_posix(): list(read_header(p)[0])
                      for p in sorted(new.rglob("*" + WEIGHT_SUFFIX))}
            mode = "full"
        loaded = self._fabric_model().load_weights(iter_tensors(new, wanted, counter))
        return {"folder": folder, "tensors": sum(len(v) for v in wanted.values()), "bytes_read": counter[0],
                "loaded": len(loaded) if loaded is not None else None, "mode": mode}
