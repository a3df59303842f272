"""The hot-loader library (agents/worker.py) on real torch modules and real published versions.

Each version is a safetensors file published to a local store, so its manifest (and
per-tensor chunk index) is the one an agent would hand a worker; the source folder
is byte-identical to what the agent materialises, so it serves as the version folder.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from agents.worker.hotloader import HealthCheckFailed, LiveModule, TensorMismatch
from fabric.errors import CorruptChunk, IntegrityError
from fabric.store.registry import Registry

from helpers.store import publish_local

MODES = ["in-place", "double-buffered"]
X = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))


class Net(torch.nn.Module):
    """Eight 64x64 layers and a buffer: 17 tensors."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(8))
        self.register_buffer("scale", torch.ones(64))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x * self.scale


def weights(seed: int, base: dict | None = None, change: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A state dict: all tensors from `seed`, or `base` with only `change` redrawn."""
    gen = torch.Generator().manual_seed(seed)
    fresh = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in Net().state_dict().items()}
    if base is None:
        return fresh
    return {k: fresh[k] if k in change else v.clone() for k, v in base.items()}


class Versions:
    """Publish state dicts as versions of artifact `m`; hand out (folder, manifest)."""

    def __init__(self, root: Path, store):
        self.root, self.store = root, store
        self.sd: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, sd: dict[str, torch.Tensor]):
        folder = self.root / name
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        publish_local(self.store, folder, artifact="m", version=name)
        self.sd[name] = sd
        return folder, Registry(self.store).manifest("m", name)

    def get(self, name: str):
        return self.root / name, Registry(self.store).manifest("m", name)

    def module(self, name: str) -> Net:
        net = Net()
        net.load_state_dict(self.sd[name])
        return net.eval()


@pytest.fixture
def versions(tmp_path, store):
    v = Versions(tmp_path / "versions", store)
    v1 = weights(1)
    v.add("v1", v1)
    v2 = weights(2, v1, ["layers.0.weight", "layers.5.bias"])
    v.add("v2", v2)
    v.add("v3", weights(3, v2, ["layers.1.weight", "layers.2.weight", "scale"]))
    v.add("v4", weights(4, v1, ["layers.7.weight"]))
    return v


def state_equals(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    got = module.state_dict()
    return got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def changed_bytes(versions: Versions, old: str | None, new: str) -> int:
    _, m_new = versions.get(new)
    if old is None:
        return sum(t.length for t in m_new.tensors)
    _, m_old = versions.get(old)
    before = {t.name: t.chunks for t in m_old.tensors}
    return sum(t.length for t in m_new.tensors if before.get(t.name) != t.chunks)


# --- loading only what changed --------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_loads_only_changed_tensors_and_ends_equal_to_each_version(versions, mode):
    live = LiveModule(Net().eval(), mode=mode)
    previous = None
    for name in ["v1", "v2", "v3", "v1", "v4"]:
        rep = live.load(*versions.get(name))
        assert rep.ok and live.version == name
        with live.serving() as s:
            assert s.version == name
            assert state_equals(s.module, versions.sd[name]), f"{mode}: state after loading {name}"
        assert rep.bytes_read == rep.bytes_changed == changed_bytes(versions, previous, name), name
        previous = name
    assert rep.tensors_changed == 1  # v1 -> v4: only layers.7.weight
    assert rep.bytes_read < changed_bytes(versions, None, "v4") / 5


def test_a_loaded_version_loads_again_for_free(versions):
    live = LiveModule(versions.module("v2"), manifest=versions.get("v2")[1])
    rep = live.load(*versions.get("v2"))
    assert rep.tensors_changed == 0 and rep.bytes_read == 0


def test_unchanged_tensors_are_never_read(versions, tmp_path):
    """Corrupt an unchanged tensor in v2's file: the load never touches it, so it succeeds."""
    live = LiveModule(versions.module("v1"), manifest=versions.get("v1")[1])
    folder, manifest = versions.get("v2")
    copy = tmp_path / "v2-copy"
    shutil.copytree(folder, copy)
    untouched = next(t for t in manifest.tensors if t.name == "layers.3.weight")
    _flip_byte(copy / "model.safetensors", untouched.offset + 17)
    rep = live.load(copy, manifest)
    assert rep.ok and state_equals(live.module, versions.sd["v2"])


# --- what must leave the old weights serving --------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["shape", "name", "dtype", "missing"])
def test_a_version_that_does_not_fit_is_refused_and_old_weights_serve(versions, mode, kind):
    live = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1])
    bad = dict(versions.sd["v1"])
    if kind == "shape":
        bad["layers.2.weight"] = torch.randn(32, 64)
    elif kind == "name":
        bad["layers.9.weight"] = torch.randn(64, 64)
    elif kind == "dtype":
        bad["layers.2.weight"] = bad["layers.2.weight"].half()
    else:
        del bad["layers.2.bias"]
    with pytest.raises(TensorMismatch) as e:
        live.load(*versions.add("bad", bad))
    message = str(e.value)
    assert ("layers.9.weight" if kind == "name" else "layers.2.") in message
    assert {"shape": "shape [32, 64]", "name": "not in the module", "dtype": "F16",
            "missing": "not in the version"}[kind] in message
    assert "v1 keeps serving" in message
    assert live.version == "v1" and state_equals(live.module, versions.sd["v1"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", ["truncate", "corrupt", "missing"])
def test_a_damaged_file_is_caught_before_any_weight_changes(versions, tmp_path, mode, damage):
    live = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1])
    folder, manifest = versions.get("v2")
    copy = tmp_path / "v2-damaged"
    shutil.copytree(folder, copy)
    path = copy / "model.safetensors"
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
    elif damage == "corrupt":
        changed = next(t for t in manifest.tensors if t.name == "layers.5.bias")
        _flip_byte(path, changed.offset + 5)
    else:
        path.unlink()
    with pytest.raises(IntegrityError) as e:
        live.load(copy, manifest)
    if damage == "corrupt":
        assert isinstance(e.value, CorruptChunk) and "layers.5.bias" in str(e.value)
    else:
        assert str(path) in str(e.value)
    assert live.version == "v1" and state_equals(live.module, versions.sd["v1"])


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_health_check_restores_the_old_weights(versions, mode):
    calls = []

    def check(module):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("model says no")

    live = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1], health_check=check)
    with pytest.raises(HealthCheckFailed) as e:
        live.load(*versions.get("v2"))
    assert "model says no" in str(e.value) and not e.value.report.ok
    assert live.version == "v1" and state_equals(live.module, versions.sd["v1"])
    # the next loads are complete even though the failed one had written part of a buffer
    for name in ["v3", "v2", "v1", "v4"]:
        assert live.load(*versions.get(name)).ok
        assert state_equals(live.module, versions.sd[name]), name


def test_in_place_restores_from_the_old_files_even_once_they_are_deleted(versions, tmp_path):
    """No copy in memory: the old version's files are mapped before the copy, so a prune cannot take them."""
    old = tmp_path / "v1-site-copy"
    shutil.copytree(versions.get("v1")[0], old)

    def check(module):
        shutil.rmtree(old)  # retention removes the old version mid-load
        raise RuntimeError("bad weights")

    live = LiveModule(versions.module("v1"), manifest=versions.get("v1")[1], folder=old, health_check=check)
    with pytest.raises(HealthCheckFailed):
        live.load(*versions.get("v3"))
    assert not old.exists() and live._spare is None  # nothing was copied aside in memory
    assert live.version == "v1" and state_equals(live.module, versions.sd["v1"])


@pytest.mark.parametrize("mode", MODES)
def test_a_hanging_health_check_is_cut_off_and_the_old_weights_restored(versions, mode):
    release = threading.Event()
    live = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1],
                      health_check=lambda m: release.wait(30), health_timeout=0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(HealthCheckFailed) as e:
            live.load(*versions.get("v2"))
    finally:
        release.set()
    assert time.monotonic() - t0 < 5
    assert "did not finish within 0.5s" in str(e.value)
    assert live.version == "v1" and state_equals(live.module, versions.sd["v1"])


@pytest.mark.parametrize("mode", MODES)
def test_golden_input_rejects_nan_weights_and_drift(versions, mode):
    nan = dict(versions.sd["v1"])
    nan["layers.4.bias"] = torch.full((64,), float("nan"))
    live = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1], golden_input=X)
    with pytest.raises(HealthCheckFailed, match="non-finite"):
        live.load(*versions.add("nan", nan))
    assert state_equals(live.module, versions.sd["v1"])

    ref = versions.module("v1")(X).detach()
    strict = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1], golden_input=X,
                        golden_output=ref, tolerance=1e-3)
    with pytest.raises(HealthCheckFailed, match="tolerance"):
        strict.load(*versions.get("v2"))  # two layers changed: the output moves far more than 0.1%
    assert strict.load(*versions.add("same", dict(versions.sd["v1"]))).ok  # same bytes: within tolerance


# --- serving while swapping ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_requests_during_swaps_all_succeed_and_each_sees_exactly_one_version(versions, mode):
    expected = {name: versions.module(name)(X).detach() for name in versions.sd}
    assert len({tuple(o.flatten()[:4].tolist()) for o in expected.values()}) == len(expected)
    live = LiveModule(versions.module("v1"), mode=mode, manifest=versions.get("v1")[1], golden_input=X)
    results: list[tuple[str, torch.Tensor]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client():
        while not stop.is_set() and len(results) < 5000:
            try:
                with torch.inference_mode(), live.serving() as s:
                    results.append((s.version, s.module(X)))
            except BaseException as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    pauses = []
    try:
        for name in ["v2", "v3", "v4", "v1", "v3", "v2", "v4"]:
            seen = len(results)
            while len(results) < seen + 30:
                time.sleep(0.001)
            pauses.append(live.load(*versions.get(name)).pause_ms)
        seen = len(results)
        while len(results) < seen + 30:
            time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) >= 240
    for version, out in results:
        assert torch.equal(out, expected[version]), f"{mode}: a response labelled {version} is not {version}'s"
    assert {v for v, _ in results} == {"v1", "v2", "v3", "v4"}
    if mode == "double-buffered":
        assert max(pauses) < 5  # a reference swap (ms), whatever the requests do


# --- CUDA (runs where a GPU is present) ----------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_loads_through_pinned_staging(versions, mode):
    live = LiveModule(Net().cuda().eval(), mode=mode, stage_bytes=4096, golden_input=X.cuda())
    for name in ["v1", "v2", "v3"]:
        rep = live.load(*versions.get(name))
        with live.serving() as s:
            got = {k: v.cpu() for k, v in s.module.state_dict().items()}
        assert rep.ok and all(torch.equal(got[k], versions.sd[name][k]) for k in got), name
    nan = dict(versions.sd["v3"])
    nan["layers.4.bias"] = torch.full((64,), float("nan"))
    with pytest.raises(HealthCheckFailed):
        live.load(*versions.add("nan", nan))
    with live.serving() as s:
        assert all(torch.equal(v.cpu(), versions.sd["v3"][k]) for k, v in s.module.state_dict().items())


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
