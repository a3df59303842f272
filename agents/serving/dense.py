"""A dense network whose weights are a version folder's safetensors (numpy, no torch).

Every `<prefix>.weight` ([out, in]) with its optional `<prefix>.bias` ([out]) of every
`*.safetensors` file in the folder is a layer; layers run in the natural order of their
prefixes (`0`, `2`, `layers.10` after `layers.9`), with ReLU between them: exactly what
`torch.nn.Sequential(Linear, ReLU, Linear, …)` computes from its `state_dict`. The model
Fabric ships for KServe (agents/serving/kserve_model.py) serves it; `signature` is what a
new version must keep to replace a served one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np


def _natural(prefix: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", prefix)]


class Dense:
    """The layers read from a version folder, and their forward pass (numpy, float32)."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.signature = {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}
        prefixes = sorted({k[: -len(".weight")] for k in tensors if k.endswith(".weight")}, key=_natural)
        extra = set(tensors) - {f"{p}.{s}" for p in prefixes for s in ("weight", "bias")}
        if not prefixes or extra:
            raise ValueError(f"not a dense network: no '<layer>.weight' tensor or foreign tensors {sorted(extra)}")
        self.layers: list[tuple[np.ndarray, np.ndarray | None]] = []
        width = None
        for p in prefixes:
            w, b = tensors[f"{p}.weight"], tensors.get(f"{p}.bias")
            if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
                raise ValueError(f"tensor {p}.weight: expected a 2-D float matrix, got {w.dtype} {list(w.shape)}")
            if width is not None and w.shape[1] != width:
                raise ValueError(f"tensor {p}.weight has shape {list(w.shape)}: its input width must be {width}")
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"tensor {p}.bias has shape {list(b.shape)}, expected [{w.shape[0]}]")
            self.layers.append((w.astype(np.float32), None if b is None else b.astype(np.float32)))
            width = w.shape[0]
        self.inputs, self.outputs = self.layers[0][0].shape[1], width

    @classmethod
    def from_folder(cls, folder: Path) -> "Dense":
        from safetensors.numpy import load_file
        tensors: dict[str, np.ndarray] = {}
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in sorted(files):
                if name.endswith(".safetensors"):
                    for k, v in load_file(os.path.join(root, name)).items():
                        if k in tensors:
                            raise ValueError(f"tensor {k} is in two files of {folder}")
                        tensors[k] = v
        if not tensors:
            raise ValueError(f"no .safetensors file in {folder}")
        return cls(tensors)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T
            if b is not None:
                x = x + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x
