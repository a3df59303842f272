"""A torch module shaped like a vLLM model: fused parameters and its own `load_weights`.

vLLM's models hold q, k and v in one `qkv_proj` parameter and map checkpoint names onto it in
`load_weights(weights: Iterable[tuple[str, Tensor]]) -> set[str]` (the names of the parameters
it loaded). `TinyModel` does the same on CPU, so Fabric's worker extension can be tested
without vLLM: a checkpoint holds `layer.q_proj.weight`, `layer.k_proj.weight`,
`layer.v_proj.weight` and `layer.o_proj.weight`; the model has `layer.qkv_proj.weight` and
`layer.o_proj.weight`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

D = 16
STACKED = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(3 * D, D), requires_grad=False)
        self.o = torch.nn.Parameter(torch.zeros(D, D), requires_grad=False)
        self.calls: list[list[str]] = []  # checkpoint names handed to each load_weights call

    def load_weights(self, weights) -> set[str]:
        names, loaded = [], set()
        for name, tensor in weights:
            names.append(name)
            part = name.split(".")[1]
            if part in STACKED:
                i = STACKED[part]
                self.qkv.data[i * D:(i + 1) * D].copy_(tensor)
                loaded.add("layer.qkv_proj.weight")
            elif part == "o_proj":
                self.o.data.copy_(tensor)
                loaded.add("layer.o_proj.weight")
            else:
                raise KeyError(f"no parameter for checkpoint tensor {name!r}")
        self.calls.append(names)
        return loaded


def checkpoint(seed: int, changed: tuple[str, ...] = (), base: int = 0) -> dict[str, torch.Tensor]:
    """The four checkpoint tensors: those named in `changed` drawn from `seed`, the rest from `base`."""
    out = {}
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        g = torch.Generator().manual_seed((seed if part in changed else base) * 10 + len(part) + ord(part[0]))
        out[f"layer.{part}.weight"] = torch.randn(D, D, generator=g)
    return out


def write_version(folder: Path, tensors: dict[str, torch.Tensor], answer: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "answer.txt").write_text(answer)
    return folder
