"""Stock Hugging Face `transformers` models through the hot-loader (issue 14).

Real model classes built locally from tiny configs (no hub: HF_HUB_OFFLINE=1), random
weights written by `save_pretrained`: a BertModel whose checkpoint holds
`embeddings.position_ids` as a sentence-transformers save does (a buffer the module
registers as non-persistent), and a LlamaForCausalLM with tied embeddings (the
checkpoint holds `model.embed_tokens.weight` only; `lm_head.weight` is the same tensor).
Each version is published into a real SiteAgent's store (in-process, as in
test_rollout.py) and loaded by a `HotLoader` worker wrapping `from_pretrained` of the
first version, with default options, while a request loop runs: every answer must
equal, bit for bit, the answer of a fresh `from_pretrained` of the version it is
labelled with. A real misfit (a missing weight, a wrong shape or dtype) is refused
with the tensor named.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported: nothing may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from agents.worker.hotloader import HotLoader, LiveModule, TensorMismatch  # noqa: E402
from fabric.pull import materialize  # noqa: E402
from fabric.store.registry import Registry  # noqa: E402

from helpers.store import publish_local  # noqa: E402
from test_rollout import SECRET, Agent  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
MODES = ["in-place", "double-buffered"]
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
WEIGHTS = "model.safetensors"


class Kind:
    """One model class, its tiny config and the tensors its v2 changes."""

    def __init__(self, name, cls, config, changed, output):
        self.name, self.cls, self.config, self.changed, self.output = name, cls, config, changed, output

    def answer(self, module, ids=IDS) -> torch.Tensor:
        with torch.inference_mode():
            return getattr(module(input_ids=ids), self.output)


KINDS = {
    "bert": Kind("bert", BertModel, lambda: BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32), ["encoder.layer.1.attention.self.query.weight", "pooler.dense.bias"],
        "last_hidden_state"),
    "llama": Kind("llama", LlamaForCausalLM, lambda: LlamaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=True),
        ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"], "logits"),
}


def edit_weights(folder: Path, edit) -> None:
    """Rewrite a version's safetensors file through `edit(state_dict)`."""
    sd = load_file(str(folder / WEIGHTS))
    edit(sd)
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})


class Checkpoints:
    """v1 and v2 of one kind, saved by save_pretrained, and a fresh from_pretrained's answers."""

    def __init__(self, root: Path, kind: Kind):
        self.root, self.kind = root, kind
        torch.manual_seed(11)
        model = kind.cls(kind.config()).eval()
        self.save(model, "v1")
        with torch.no_grad():
            for name in kind.changed:
                t = model.get_parameter(name)
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(len(name))))
        self.save(model, "v2")
        self.answers = {v: kind.answer(self.fresh(v)) for v in ("v1", "v2")}
        assert not torch.equal(self.answers["v1"], self.answers["v2"])

    def save(self, model, version: str) -> None:
        folder = self.root / version
        model.save_pretrained(folder)
        if self.kind.name == "bert":  # as sentence-transformers checkpoints hold it
            assert "embeddings.position_ids" not in load_file(str(folder / WEIGHTS))
            edit_weights(folder, lambda sd: sd.update(
                {"embeddings.position_ids": torch.arange(32, dtype=torch.int64).unsqueeze(0)}))
        else:
            assert "lm_head.weight" not in load_file(str(folder / WEIGHTS))  # tied: saved once

    def folder(self, version: str) -> Path:
        return self.root / version

    def fresh(self, version: str):
        return self.kind.cls.from_pretrained(self.folder(version)).eval()

    def variant(self, name: str, edit) -> Path:
        """A copy of v1 with its weights edited."""
        folder = self.root / name
        if not folder.exists():
            shutil.copytree(self.folder("v1"), folder)
            edit_weights(folder, edit)
        return folder


@pytest.fixture(scope="module", params=sorted(KINDS))
def ckpt(request, tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp(request.param), KINDS[request.param])


def publish_folder(site: Agent, version: str, folder: Path) -> None:
    """Publish a save_pretrained folder into the agent's store and materialise it, as a deploy does."""
    store = site.agent.store
    publish_local(store, folder, artifact="m", version=version)
    materialize(store, Registry(store).manifest("m", version), site.agent.layout.version_dir("m", version))


def manifest_of(store, folder: Path, version: str):
    publish_local(store, folder, artifact="m", version=version)
    return Registry(store).manifest("m", version)


@pytest.fixture
def site(tmp_path, ckpt):
    a = Agent(tmp_path)
    for v in ("v1", "v2"):
        publish_folder(a, v, ckpt.folder(v))
    yield a
    a.close()


def serving(site: Agent, version: str, timeout: float = 20.0) -> None:
    """Wait until worker w0 has registered and serves `version`."""
    deadline = time.monotonic() + timeout
    while (row := site.workers().get("w0")) is None or (row["serving"], row["state"]) != (version, "serving"):
        assert time.monotonic() < deadline, f"w0 does not serve {version}: {row}"
        time.sleep(0.05)


# --- through HotLoader, under requests -------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_stock_model_hot_loads_and_every_answer_is_a_fresh_from_pretrained_one(site, ckpt, mode):
    kind = ckpt.kind
    site.activate("v1")
    loader = HotLoader(site.url, "m", "prod", ckpt.fresh("v1"), mode=mode, token=SECRET, worker_id="w0",
                       poll_s=0.5, version="v1", golden_input=IDS).start()
    results: list[tuple[str, torch.Tensor]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                with loader.serving() as s:
                    results.append((s.version, kind.answer(s.module)))
            except BaseException as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(e)

    def after(n: int) -> None:
        seen = len(results)
        deadline = time.monotonic() + 20
        while len(results) < seen + n and time.monotonic() < deadline and not errors:
            time.sleep(0.005)

    threads = [threading.Thread(target=client) for _ in range(2)]
    try:
        serving(site, "v1")
        for t in threads:
            t.start()
        after(5)
        site.activate("v2")
        assert loader.wait_for("v2", 20), loader.reports
        after(5)
        site.activate("v1")
        assert loader.wait_for("v1", 20), loader.reports
        after(5)
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(10)
        loader.stop()
    assert not errors, errors[:3]
    assert len(results) >= 15 and {v for v, _ in results} == {"v1", "v2"}
    for version, out in results:
        assert torch.equal(out, ckpt.answers[version]), f"{mode}: an answer labelled {version} is not {version}'s"
    loads = [r for r in loader.reports if r["version"] != r["previous"]]
    assert [(r["version"], r["ok"]) for r in loads] == [("v2", True), ("v1", True)], loader.reports
    # only the changed tensors were read: the tied embedding once, position_ids never
    m2 = Registry(site.agent.store).manifest("m", "v2")
    assert loads[0]["tensors_changed"] == len(kind.changed)
    assert loads[0]["bytes_read"] == sum(t.length for t in m2.tensors if t.name in kind.changed)
    with loader.serving() as s:
        if kind.name == "llama":  # the tie is kept: one tensor under both names
            assert s.module.lm_head.weight is s.module.model.embed_tokens.weight
        else:
            assert torch.equal(s.module.embeddings.position_ids, torch.arange(32).unsqueeze(0))


def test_a_misfit_fails_the_canary_with_the_tensor_named(site, ckpt):
    kind = ckpt.kind
    missing = "encoder.layer.0.output.dense.bias" if kind.name == "bert" else "model.layers.0.mlp.down_proj.weight"
    publish_folder(site, "vbad", ckpt.variant("canary-missing", lambda sd: sd.pop(missing)))
    site.activate("v1")
    loader = HotLoader(site.url, "m", "prod", ckpt.fresh("v1"), token=SECRET, worker_id="w0", poll_s=0.5,
                       version="v1").start()
    try:
        serving(site, "v1")
        site.activate("vbad")
        ro = site.rollout("rejected")
        assert ro["phase"] == "rejected" and f"{missing}: in the module but not in the version" in ro["error"]
        assert site.agent.layout.active("m") == "v1" and loader.version == "v1"
        with loader.serving() as s:
            assert torch.equal(kind.answer(s.module), ckpt.answers["v1"])
    finally:
        loader.stop()


# --- the strict check's rules, on LiveModule ---------------------------------------------------

@pytest.mark.parametrize("misfit", ["missing", "shape", "dtype", "foreign"])
def test_a_real_misfit_is_refused_naming_the_tensor(ckpt, store, misfit):
    name = "encoder.layer.0.output.dense.weight" if ckpt.kind.name == "bert" else "model.layers.0.mlp.down_proj.weight"

    def edit(sd):
        if misfit == "missing":
            del sd[name]
        elif misfit == "shape":
            sd[name] = sd[name][:-1].contiguous()
        elif misfit == "dtype":
            sd[name] = sd[name].half()
        else:
            sd["extra.head.weight"] = torch.zeros(4, 4)
    live = LiveModule(ckpt.fresh("v1"), manifest=manifest_of(store, ckpt.folder("v1"), "v1"))
    bad = ckpt.variant(misfit, edit)
    with pytest.raises(TensorMismatch) as e:
        live.load(bad, manifest_of(store, bad, misfit))
    assert {"missing": f"{name}: in the module but not in the version", "shape": f"{name}: shape [",
            "dtype": f"{name}: dtype F16", "foreign": "extra.head.weight: not in the module"}[misfit] in str(e.value)
    assert "v1 keeps serving" in str(e.value)
    assert live.version == "v1" and torch.equal(ckpt.kind.answer(live.module), ckpt.answers["v1"])


def test_the_model_class_lists_of_keys_to_ignore_are_honoured(ckpt, store):
    """_keys_to_ignore_on_load_unexpected / _missing, set on the model as a class would."""
    drop = "pooler.dense.bias" if ckpt.kind.name == "bert" else "model.norm.weight"
    folder = ckpt.variant("ignorable", lambda sd: (sd.pop(drop), sd.update({"cls.head.bias": torch.zeros(3)})))
    manifest = manifest_of(store, folder, "ignorable")
    model = ckpt.fresh("v1")
    with pytest.raises(TensorMismatch) as e:
        LiveModule(model).load(folder, manifest)
    assert "cls.head.bias: not in the module" in str(e.value) and f"{drop}: in the module" in str(e.value)
    model._keys_to_ignore_on_load_unexpected = {r"^cls\."}
    model._keys_to_ignore_on_load_missing = [drop.replace(".", r"\.") + "$"]
    kept = model.get_parameter(drop).detach().clone()
    rep = LiveModule(model).load(folder, manifest)
    assert rep.ok and torch.equal(model.get_parameter(drop), kept)  # absent: the module's own value stays
    assert torch.equal(ckpt.kind.answer(model), ckpt.answers["v1"])


def test_tied_weights_load_once_and_a_declared_tie_is_kept(tmp_path, store):
    ckpt = Checkpoints(tmp_path, KINDS["llama"])
    m1 = manifest_of(store, ckpt.folder("v1"), "v1")
    # the checkpoint holds both tied names with the same bytes (as a torch .bin conversion would)
    both = ckpt.variant("both", lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    live = LiveModule(ckpt.fresh("v2"))
    rep = live.load(both, manifest_of(store, both, "both"))
    embed = next(t for t in m1.tensors if t.name == "model.embed_tokens.weight")
    assert rep.tensors_changed == len(m1.tensors) and rep.bytes_read == sum(t.length for t in m1.tensors)
    assert live.module.lm_head.weight is live.module.model.embed_tokens.weight
    assert torch.equal(ckpt.kind.answer(live.module), ckpt.answers["v1"]) and embed.length > 0
    # ... or with different bytes: one tensor in the module cannot take both
    apart = ckpt.variant("apart", lambda sd: sd.update({"lm_head.weight": torch.zeros_like(sd["model.embed_tokens.weight"])}))
    with pytest.raises(TensorMismatch, match="lm_head.weight: tied to model.embed_tokens.weight"):
        live.load(apart, manifest_of(store, apart, "apart"))
    # a module whose tied pair was split into two tensors still gets the source's bytes in both
    m2 = manifest_of(store, ckpt.folder("v2"), "v2")
    for mode in MODES:
        split = ckpt.fresh("v1")
        split.lm_head.weight = torch.nn.Parameter(split.lm_head.weight.detach().clone())
        assert split.all_tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
        live = LiveModule(split, mode=mode, manifest=m1)
        rep = live.load(ckpt.folder("v2"), m2)
        assert rep.ok and rep.tensors_changed == 3  # the embedding, into both tensors, and up_proj
        with live.serving() as s:
            assert s.module.lm_head.weight is not s.module.model.embed_tokens.weight
            assert torch.equal(ckpt.kind.answer(s.module), ckpt.answers["v2"]), mode
