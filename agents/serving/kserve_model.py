"""The KServe model Fabric ships: a dense network whose weights are a version folder's safetensors.

    python -m agents.serving.kserve_model --repository DIR --model NAME --http-port 8080

runs a real KServe `ModelServer` (PyPI `kserve`) serving the v2 REST API and its model
repository extension, on CPU, for one model laid out as agents/serving/v2_repository.py
says. `POST /v2/repository/models/NAME/load` loads the highest numbered version folder
of `DIR/NAME/` (a no-op when that is the one served already); the new model replaces
the served one in the registry only once it is fully read and checked, so requests in
flight finish on the old weights and none is dropped or paused. A version whose
tensors do not match the served one (a name, shape or dtype) is refused with the
server's 503 "not ready" answer and the old version keeps serving, as Triton does when
a reload fails. At start the newest version on disk, if any, is loaded.

The network: every `<prefix>.weight` ([out, in]) with its optional `<prefix>.bias`
([out]) of every `*.safetensors` file in the folder is a dense layer; layers run in the
natural order of their prefixes (`0`, `2`, `layers.10` after `layers.9`), with ReLU
between them, exactly what `torch.nn.Sequential(Linear, ReLU, Linear, …)` computes
from its `state_dict`. Input: one FP32 tensor [batch, in]; output `output` FP32
[batch, out]; the response's `model_version` is the Fabric version laid out.

KServe's ModelServer binds 0.0.0.0 itself; `--host` (default 127.0.0.1) rebinds it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import uuid
from pathlib import Path

import numpy as np

from agents.serving import v2_repository

# kserve's model_server parses sys.argv at import time (parse_known_args): it must not
# see ours (`--model` would abbreviate its `--model_name`). Hide them during the import.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput
    from kserve.model_repository import ModelRepository
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

MAX_BATCH = 4096


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


class FabricModel(kserve.Model):
    """One loaded version: immutable once in the registry (a reload makes a new one)."""

    def __init__(self, name: str, number: int, version: str, net: Dense):
        super().__init__(name)
        self.number, self.version, self.net = number, version, net
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, self.net.inputs]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "output", "datatype": "FP32", "shape": [-1, self.net.outputs]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None,
                      response_headers: dict | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest) or len(payload.inputs) != 1:
            raise InvalidInput("expected a v2 infer request with one input tensor")
        x = payload.inputs[0].as_numpy()
        if x.ndim != 2 or x.shape[1] != self.net.inputs or not 0 < x.shape[0] <= MAX_BATCH:
            raise InvalidInput(
                f"input must be [batch <= {MAX_BATCH}, {self.net.inputs}], got {list(x.shape)}")
        y = await asyncio.to_thread(self.net.forward, x)
        out = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.version, infer_outputs=[out])


class FabricRepository(ModelRepository):
    """KServe's registry, loading each model from its newest folder in the v2 layout."""

    def __init__(self, repository: Path):
        super().__init__(str(repository))
        self.repository = Path(repository)
        self._lock = asyncio.Lock()

    def _read(self, name: str) -> FabricModel | None:
        """The model the layout names now, read and checked (blocking); None when it is served already."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise ValueError(f"bad model name {name!r}")
        found = v2_repository.newest(self.repository / name)
        if found is None:
            raise FileNotFoundError(f"no version folder under {self.repository / name}")
        number, folder, version = found
        current = self.get_model(name)
        if isinstance(current, FabricModel) and current.number == number:
            return None
        net = Dense.from_folder(folder)
        if isinstance(current, FabricModel) and net.signature != current.net.signature:
            diff = sorted(k for k in set(net.signature) | set(current.net.signature)
                          if net.signature.get(k) != current.net.signature.get(k))
            first = diff[0]
            raise ValueError(f"version {version} does not fit the served {current.version}: tensor {first} is "
                             f"{net.signature.get(first)} where the served one is {current.net.signature.get(first)}"
                             f" ({len(diff)} tensors differ)")
        return FabricModel(name, number, version, net)

    def load_model(self, name: str) -> bool:
        model = self._read(name)
        if model is not None:
            self.update(model)
        return True

    async def load(self, name: str) -> bool:
        async with self._lock:  # one reload at a time; the swap is one dict assignment
            model = await asyncio.to_thread(self._read, name)
            if model is not None:
                self.update(model)
        return True


class _Server(kserve.ModelServer):
    def __init__(self, host: str, **kw):
        super().__init__(**kw)
        self._host = host

    async def _serve(self):
        if self._rest_server is not None:
            self._rest_server.config.host = self._host  # kserve hard-codes 0.0.0.0
        await super()._serve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.serving.kserve_model", description=__doc__.split("\n")[0])
    ap.add_argument("--repository", type=Path, required=True, help="the v2 model repository folder")
    ap.add_argument("--model", required=True, help="the model's name (a folder under the repository)")
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    args.repository.mkdir(parents=True, exist_ok=True)
    repo = FabricRepository(args.repository)
    if v2_repository.newest(args.repository / args.model) is not None:
        repo.load_model(args.model)
    server = _Server(args.host, http_port=args.http_port, enable_grpc=False, workers=1,
                     registered_models=repo, enable_latency_logging=False)
    server.start([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
