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

The network is agents/serving/dense.py's (a dense net, ReLU between layers). Input: one
FP32 tensor [batch, in]; output `output` FP32 [batch, out]; the response's
`model_version` is the Fabric version laid out.

KServe's ModelServer binds 0.0.0.0 itself; `--host` (default 127.0.0.1) rebinds it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import uuid
from pathlib import Path

from agents.serving import v2_repository
from agents.serving.dense import Dense

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
