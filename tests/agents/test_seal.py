"""The site seal (fabric/core/seal.py, agents/worker/sealcheck.py): a real origin and a real
site agent pull versions and seal them; workers check the seal instead of BLAKE3, and
fall back to BLAKE3, and say so, whenever the seal cannot vouch for the bytes.

Names say what each test survives: a file edited after the site sealed it (the stale
seal mismatches, BLAKE3 catches the edit, the load is refused and the old weights
serve), a wrong seal entry over good bytes, a seal that is missing, cut short, not a
seal, another version's or oversized, and a seal lost before a worker loads (reported
to the agent, which counts it).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from agents.worker.hotloader import HotLoader, LiveModule
from agents.worker import sealcheck
from agents.worker.reference import DemoModel, fixed_input, make_weights, model_from
from fabric.core import digest, seal
from fabric.core.manifest import Manifest
from fabric.errors import CorruptChunk
from fabric.publish import publish
from fabric.pull import Sink, pull
from fabric.store.registry import Registry
from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.wire.protocol import MANIFESTS

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, start_origin
from helpers.store import publish_local

A = "demo-mlp"
TOKEN = SITE_SECRETS["solo"]
MODES = ["in-place", "double-buffered"]


class Lab:
    """An origin and a site agent following demo-mlp:prod, with v1 and then v2 activated."""

    def __init__(self, root: Path):
        self.root = root
        self.origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
        self.agent = AgentProcess(root, "solo", self.origin.url, follow=[f"{A}:prod"])
        self.src: dict[str, Path] = {}
        self.snap: dict[str, Path] = {}  # copies of the site's folders, seal included, as first written

    def publish(self, version: str, seed: int, base: str | None = None, change: float = 1.0) -> None:
        self.src[version] = make_weights(self.root / "src" / version, seed,
                                         base=self.src[base] if base else None, change=change)
        with SyncOrigin(self.origin.url, PUBLISH_SECRET) as so:
            publish(self.src[version], artifact=A, target=RemoteTarget(so), version=version, channel="prod")

    def folder(self, version: str) -> Path:
        return self.agent.data / "versions" / A / version

    def manifest(self, version: str) -> Manifest:
        r = request(self.agent.url, "GET", f"{MANIFESTS}/{A}/{version}", token=TOKEN)
        assert r.status == 200, r.body
        return Manifest.from_json(r.json())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("seal"))
    try:
        lab.publish("v1", 1)
        lab.agent.start()
        lab.agent.wait_active(A, "v1")
        lab.publish("v2", 2, base="v1", change=0.5)
        lab.agent.wait_active(A, "v2")
        for v in ("v1", "v2"):
            lab.snap[v] = lab.root / "snap" / v
            shutil.copytree(lab.folder(v), lab.snap[v])
        yield lab
    finally:
        lab.agent.stop()
        lab.origin.stop()


@pytest.fixture
def blake3_calls(monkeypatch):
    """How many times BLAKE3 verified bytes (the worker's files and seal checks call digest.verify)."""
    calls = []
    real = digest.verify

    def counting(cid, data):
        calls.append(cid)
        return real(cid, data)
    monkeypatch.setattr(digest, "verify", counting)
    return calls


def output(module: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return module(fixed_input())


def live_on_v1(lab: Lab, mode: str) -> LiveModule:
    return LiveModule(model_from(lab.snap["v1"]), mode=mode, manifest=lab.manifest("v1"), folder=lab.snap["v1"])


def served(live: LiveModule) -> torch.Tensor:
    with live.serving() as s:
        return output(s.module)


def changed_tensor(lab: Lab):
    """A tensor v2 changed (so a load from v1 reads it), of more than one seal block."""
    old = {t.name: t.chunks for t in lab.manifest("v1").tensors}
    return next(t for t in lab.manifest("v2").tensors if t.chunks != old[t.name] and t.length > (512 << 10))


def copy_of(lab: Lab, version: str, tmp_path: Path) -> Path:
    dest = tmp_path / version
    shutil.copytree(lab.snap[version], dest)
    return dest


# --- the seal the site writes, and the worker's use of it ------------------------------------------

def test_the_site_seals_each_version_it_pulls_and_workers_check_the_seal_not_blake3(lab, blake3_calls, monkeypatch):
    m2 = lab.manifest("v2")
    raw = (lab.folder("v2") / seal.SEAL_FILE).read_bytes()
    s = seal.decode(raw)
    assert s.manifest_id == m2.id and set(s.digests) == set(m2.unique_chunks())
    assert raw == seal.encode(m2.id, s.digests), "the site writes the canonical form (docs/formats.md)"
    data = (lab.folder("v2") / "model.safetensors").read_bytes()
    offset = 0
    for cid, size in next(f for f in m2.files if f.path == "model.safetensors").chunks:
        assert s.get(cid) == seal.xxh(data[offset:offset + size]) and digest.digest(data[offset:offset + size]) == cid
        offset += size
    assert sorted(p.name for p in lab.folder("v2").iterdir()) == [seal.SEAL_FILE, "config.json",
                                                                   "model.safetensors"]
    want = output(model_from(lab.src["v2"]))
    for mode in MODES:
        live = live_on_v1(lab, mode)
        rep = live.load(lab.snap["v2"], m2)
        assert rep.ok and rep.tensors_changed >= 2 and (rep.verified, rep.seal_fallback) == ("seal", None)
        assert torch.equal(served(live), want)
    assert blake3_calls == [], "the seal vouched for every byte: nothing needed BLAKE3"
    checked, real = [], sealcheck.verify_sealed  # the path CUDA targets take (checked before the copy), on CPU
    monkeypatch.setattr(sealcheck, "can_copy_sealed", lambda tensors, targets: False)
    monkeypatch.setattr(sealcheck, "verify_sealed", lambda *a: checked.append(len(a[1])) or real(*a))
    live = live_on_v1(lab, "in-place")
    rep = live.load(lab.snap["v2"], m2)
    assert checked == [rep.tensors_changed] and (rep.verified, rep.seal_fallback) == ("seal", None)
    assert torch.equal(served(live), want) and blake3_calls == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("when", ["while copying", "before copying"])  # CPU targets; CUDA's path, on CPU
def test_a_file_edited_after_sealing_is_caught_by_blake3_and_the_load_refused(lab, tmp_path, mode, when, blake3_calls,
                                                                              monkeypatch):
    if when == "before copying":
        monkeypatch.setattr(sealcheck, "can_copy_sealed", lambda tensors, targets: False)
    folder = copy_of(lab, "v2", tmp_path)
    t = changed_tensor(lab)
    with open(folder / t.file, "r+b") as f:  # same size, different bytes: the seal is stale now
        f.seek(t.offset + t.length // 2)
        f.write(b"\x7f\x7f\x7f\x7f")
    live = live_on_v1(lab, mode)
    with pytest.raises(CorruptChunk, match=r"segment 0.*seal did not match"):
        live.load(folder, lab.manifest("v2"))
    assert blake3_calls == [t.chunks[0]], "only the segment the seal did not vouch for went to BLAKE3"
    assert live.version == "v1" and torch.equal(served(live), output(model_from(lab.src["v1"])))


def test_a_wrong_seal_entry_over_good_bytes_falls_back_to_blake3_and_loads(lab, tmp_path, blake3_calls):
    folder = copy_of(lab, "v2", tmp_path)
    t = changed_tensor(lab)
    s = seal.decode((folder / seal.SEAL_FILE).read_bytes())
    s.digests[t.chunks[0]] = bytes(seal.DIGEST_SIZE)
    (folder / seal.SEAL_FILE).write_bytes(seal.encode(s.manifest_id, s.digests))
    live = live_on_v1(lab, "in-place")
    rep = live.load(folder, lab.manifest("v2"))
    assert rep.ok and (rep.verified, rep.seal_fallback) == ("seal", "mismatch")
    assert blake3_calls == [t.chunks[0]]
    assert torch.equal(served(live), output(model_from(lab.src["v2"])))


def test_a_live_module_keeps_its_hashing_threads_and_decodes_a_seal_again_only_when_its_bytes_change(
        lab, tmp_path, monkeypatch, blake3_calls):
    decoded = []
    real = seal.decode
    monkeypatch.setattr(seal, "decode", lambda raw: decoded.append(len(raw)) or real(raw))
    folders = {v: copy_of(lab, v, tmp_path) for v in ("v1", "v2")}
    live = live_on_v1(lab, "in-place")

    def pool_threads() -> set[int]:
        return {t.ident for t in threading.enumerate() if t.name.startswith("fabric-seal")}

    for v in ("v2", "v1", "v2"):
        rep = live.load(folders[v], lab.manifest(v))
        assert rep.ok and (rep.verified, rep.seal_fallback) == ("seal", None), rep
        if v == "v2" and len(decoded) == 1:
            first = pool_threads()
    assert len(decoded) == 2 and blake3_calls == []  # each folder's seal decoded once for three loads
    assert first and pool_threads() == first  # the same threads hashed every load
    t = changed_tensor(lab)  # the seal's bytes change: decoded again, and its wrong entry found
    s = seal.decode((folders["v2"] / seal.SEAL_FILE).read_bytes())
    s.digests[t.chunks[0]] = bytes(seal.DIGEST_SIZE)
    (folders["v2"] / seal.SEAL_FILE).write_bytes(seal.encode(s.manifest_id, s.digests))
    live.load(folders["v1"], lab.manifest("v1"))
    rep = live.load(folders["v2"], lab.manifest("v2"))
    assert rep.ok and (rep.verified, rep.seal_fallback) == ("seal", "mismatch")
    assert blake3_calls == [t.chunks[0]]
    assert torch.equal(served(live), output(model_from(lab.src["v2"])))


def _spoil(kind: str, folder: Path, lab: Lab) -> None:
    path = folder / seal.SEAL_FILE
    raw = path.read_bytes()
    if kind == "missing":
        path.unlink()
    elif kind == "cut short":
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "not a seal":
        path.write_bytes(json.dumps({"format": "fabric.manifest/1", "chunks": {}}).encode())
    elif kind == "another version's":
        shutil.copy(lab.snap["v1"] / seal.SEAL_FILE, path)
    elif kind == "oversized":
        path.write_bytes(b" " * seal.max_size(lab.manifest("v2")) + raw)


@pytest.mark.parametrize("kind, reason", [("missing", "missing"), ("cut short", "malformed"),
                                          ("not a seal", "malformed"), ("another version's", "stale"),
                                          ("oversized", "malformed")])
def test_a_seal_that_cannot_vouch_falls_back_to_blake3_and_says_why(lab, tmp_path, kind, reason, blake3_calls):
    folder = copy_of(lab, "v2", tmp_path)
    _spoil(kind, folder, lab)
    live = live_on_v1(lab, "in-place")
    rep = live.load(folder, lab.manifest("v2"))
    assert rep.ok and (rep.verified, rep.seal_fallback) == ("blake3", reason)
    old = {t.name: t.chunks for t in lab.manifest("v1").tensors}
    assert len(blake3_calls) == sum(len(t.chunks) for t in lab.manifest("v2").tensors if t.chunks != old[t.name])
    assert rep.to_json()["seal_fallback"] == reason
    assert torch.equal(served(live), output(model_from(lab.src["v2"])))


def test_a_seal_lost_before_a_worker_loads_is_reported_to_the_agent_and_counted(lab):
    def lose_seal(version: str) -> None:
        if version == "v3":
            (lab.folder("v3") / seal.SEAL_FILE).unlink()

    loader = HotLoader(lab.agent.url, A, "prod", DemoModel().eval(), token=TOKEN, worker_id="w1", poll_s=0.5,
                       before_load=lose_seal).start()
    try:
        assert loader.wait_for("v2", 30), loader.reports
        first = loader.reports[-1]
        assert (first["verified"], first["seal_fallback"]) == ("seal", None)
        lab.publish("v3", 3, base="v2", change=0.25)
        assert loader.wait_for("v3", 60), loader.reports
        rep = loader.reports[-1]
        assert rep["ok"] and (rep["verified"], rep["seal_fallback"]) == ("blake3", "missing")
        deadline = time.monotonic() + 10
        while True:
            row = {w["worker"]: w for w in lab.agent.status()["workers"]}["w1"]
            if (row["last_report"] or {}).get("version") == "v3" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (row["last_report"]["verified"], row["last_report"]["seal_fallback"]) == ("blake3", "missing")
        assert lab.agent.metrics().get('fabric_agent_seal_fallbacks_total{reason="missing"}') == 1.0
    finally:
        loader.stop()


# --- tensors of several segments; a folder the site already holds --------------------------------

class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2_300_000), requires_grad=False)  # 9.2 MB: two segments
        self.b = torch.nn.Parameter(torch.zeros(64, 64), requires_grad=False)


def test_each_segment_of_a_large_tensor_is_sealed_and_checked_and_a_reused_folder_is_resealed(tmp_path, store):
    gen = torch.Generator().manual_seed(7)
    sds, site = {}, tmp_path / "site"
    for v in ("v1", "v2"):
        sds[v] = {"a": torch.randn(2_300_000, generator=gen), "b": torch.randn(64, 64, generator=gen)}
        (tmp_path / "src" / v).mkdir(parents=True)
        save_file(sds[v], str(tmp_path / "src" / v / "model.safetensors"))
        publish_local(store, tmp_path / "src" / v, artifact="big", version=v)
        asyncio.run(pull(store, Registry(store).manifest("big", v), Sink.site_version(site / v)))
    m1, m2 = Registry(store).manifest("big", "v1"), Registry(store).manifest("big", "v2")
    a = next(t for t in m2.tensors if t.name == "a")
    assert len(a.chunks) == 2 and set(seal.decode((site / "v2" / seal.SEAL_FILE).read_bytes()).digests) == \
        set(m2.unique_chunks())

    (site / "v2" / seal.SEAL_FILE).unlink()  # a restart finds the folder built: the re-read seals it again
    asyncio.run(pull(store, m2, Sink.site_version(site / "v2")))
    assert seal.decode((site / "v2" / seal.SEAL_FILE).read_bytes()).manifest_id == m2.id

    module = Big()
    module.load_state_dict(sds["v1"])
    live = LiveModule(module, manifest=m1, folder=site / "v1")
    spoilt = tmp_path / "spoilt"
    shutil.copytree(site / "v2", spoilt)
    with open(spoilt / "model.safetensors", "r+b") as f:
        f.seek(a.offset + a.length - 100)  # in the second segment only
        f.write(b"\x00" * 8)
    with pytest.raises(CorruptChunk, match="segment 1"):
        live.load(spoilt, m2)
    assert torch.equal(live.module.a, sds["v1"]["a"]), "the restored weights are v1's"
    rep = live.load(site / "v2", m2)
    assert (rep.verified, rep.seal_fallback) == ("seal", None)
    assert torch.equal(live.module.a, sds["v2"]["a"]) and torch.equal(live.module.b, sds["v2"]["b"])


# --- docs/formats.md "The site seal" ------------------------------------------------------------

def test_the_formats_doc_seal_example_is_what_the_code_writes_for_the_example_manifest():
    text = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()
    bodies = [b for k, b in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M) if k == "json"]
    example = next(b for b in bodies if '"fabric.seal/1"' in b)
    manifest = Manifest.from_bytes(next(b for b in bodies if '"files"' in b and "\n" not in b.strip()).strip().encode())
    header = {"__metadata__": {"format": "pt"},  # the example's files, as tests/test_docs.py rebuilds them
              "embed.weight": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
              "head.bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    embed = (np.arange(1, 9, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    files = {"model.safetensors": len(raw).to_bytes(8, "little") + raw + embed
             + np.array([0.25, -0.25], "<f4").tobytes(),
             "README.md": b"# tiny\nA two-tensor model for the format examples.\n"}
    sealer = seal.Sealer()
    for f in manifest.files:
        offset = 0
        for cid, n in f.chunks:
            assert digest.digest(files[f.path][offset:offset + n]) == cid
            sealer.add(cid, files[f.path][offset:offset + n])
            offset += n
    assert sealer.encode(manifest) == example.encode()
    decoded = seal.decode(example.encode())
    assert decoded.manifest_id == manifest.id and set(decoded.digests) == set(manifest.unique_chunks())
    assert seal.decode(json.dumps(json.loads(example), indent=2).encode()).digests == decoded.digests, \
        "a reader does not depend on the layout"
