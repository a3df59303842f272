"""A real KServe ModelServer (PyPI `kserve`) serving Fabric's KServe model, and the model's weights.

`KserveServer` runs `python -m agents.serving.kserve_model` on a free loopback port as a
real process (the v2 REST API with the model repository extension). `write_mlp` saves a
small `torch.nn.Sequential(Linear, ReLU, Linear)` as a safetensors version folder;
`expected` computes, with torch, what a version's weights answer; `infer` sends one v2
infer request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .origin import clean_env
from .process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
INPUTS, HIDDEN, OUTPUTS = 4, 8, 3
X = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.25, 2.0]]  # the golden input, [2, 4]


class KserveServer(ServerProcess):
    def __init__(self, repository: Path, model: str, port: int, log_path: Path):
        super().__init__(["--repository", str(repository), "--model", model, "--http-port", str(port)], port,
                         log_path, name="kserve", probe="/v2/health/live")
        self.repository, self.model = Path(repository), model

    def spawn(self) -> "KserveServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agents.serving.kserve_model", *self.argv],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=clean_env(**self.env), cwd=ROOT)
        return self


def golden_request(x=None) -> dict:
    x = X if x is None else x
    return {"inputs": [{"name": "input", "shape": [len(x), len(x[0])], "datatype": "FP32",
                        "data": [v for row in x for v in row]}]}


def infer(url: str, model: str, x=None, timeout: float = 10.0) -> tuple[int, str | None, list[float] | str]:
    """(status, model_version, flat output data) of one v2 infer request; the error text on failure."""
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(golden_request(x)).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.loads(r.read())
            return r.status, body.get("model_version"), body["outputs"][0]["data"]
    except urllib.error.HTTPError as e:
        return e.code, None, e.read().decode(errors="replace")


def write_mlp(folder: Path, seed: int, *, step: float = 0.0, base: int | None = None,
              hidden: int = HIDDEN) -> Path:
    """A version folder holding `model.safetensors`: random weights of `seed`, or the weights of
    `base` moved by `step` (a fine-tune's small change); `hidden` other than 8 is a wrong shape."""
    import torch
    from safetensors.torch import save_file

    def net(s: int) -> torch.nn.Sequential:
        torch.manual_seed(s)
        return torch.nn.Sequential(torch.nn.Linear(INPUTS, hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, OUTPUTS))

    state = net(seed if base is None else base).state_dict()
    if base is not None:
        torch.manual_seed(seed)
        state = {k: v + step * torch.randn_like(v) for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def expected(folder: Path, x=None) -> list[float]:
    """What the weights in `folder` answer for `x`, computed with torch (flat, as v2 sends it)."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(folder / "model.safetensors"))
    h = torch.relu(torch.nn.functional.linear(torch.tensor(X if x is None else x), t["0.weight"], t["0.bias"]))
    return torch.nn.functional.linear(h, t["2.weight"], t["2.bias"]).flatten().tolist()


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(p - q) <= tol for p, q in zip(a, b))
