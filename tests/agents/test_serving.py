"""Server adapters (agents/serving) against the vLLM and SGLang stand-ins, every fault, and
Fabric's vLLM worker extension on a small torch module with vLLM's `load_weights` shape.

The stand-ins (tests/helpers/inference_servers.py) serve the documented endpoints on real
loopback sockets; each test drives an adapter as the agent does and checks what the server
was asked, what it serves afterwards and what the load record says.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from agents.serving import build_adapter
from agents.serving.base import HealthCheck, ServerConfig, Timeouts, parse_servers
from agents.serving.http import matches, pick
from agents.serving.vllm_extension import FabricWorkerExtension
from agents.site.config import SiteConfig
from fabric.errors import ConfigError
from fabric.store.registry import Registry
from fabric.store.store import open_store

from helpers.inference_servers import InferenceServer, ServerThread
from helpers.store import publish_local
from helpers.tiny_vllm_model import D, TinyModel, checkpoint, write_version

TENSOR_BYTES = D * D * 4  # one float32 tensor of the tiny checkpoint


@pytest.fixture
def versions(tmp_path):
    """v1 and v2 (q_proj changed), both answering " Paris"; v3 answers " Berlin"."""
    return {"v1": write_version(tmp_path / "v1", checkpoint(1, base=1), " Paris"),
            "v2": write_version(tmp_path / "v2", checkpoint(2, ("q_proj",), base=1), " Paris"),
            "v3": write_version(tmp_path / "v3", checkpoint(3, ("o_proj",), base=1), " Berlin")}


def server(kind, v1, **kw):
    s = InferenceServer(kind, initial=v1, **kw)
    s.hang_s = 1.3  # past the adapter's timeouts below; then the stand-in gives up
    return ServerThread(s).start()


def adapter(t: ServerThread, *, name="s1", token=None, expect=" Paris", **extras):
    cfg = ServerConfig(name, t.server.kind, t.url, "tiny", artifact="m", token=token,
                       health=HealthCheck({"prompt": "The capital of France is", "max_tokens": 2}, expect=expect),
                       timeouts=Timeouts(connect_s=1, load_s=1.0, health_s=2.0, pause_s=0.5), extras=extras)
    return build_adapter(cfg)


def drive(a, *steps):
    """Run adapter calls on one event loop; returns their results."""
    async def go():
        try:
            return [await step(a) for step in steps]
        finally:
            await a.close()
    return asyncio.run(go())


def load(version, folder, previous=None):
    return lambda a: a.load(version, folder, previous)


def restore(version, folder):
    return lambda a: a.restore((version, folder))


def serving(a):
    return a.serving()


def fail_then_restore(kind, versions, fault):
    """A `kind` server with `fault` loads v2 over v1; the fault cleared, v1 is restored: (t, rec, back)."""
    t = server(kind, versions["v1"])
    t.server.faults.add(fault)
    a = adapter(t)
    try:
        async def steps():
            try:
                rec = await a.load("v2", versions["v2"], ("v1", versions["v1"]))
                t.server.faults.clear()
                return rec, await a.restore(("v1", versions["v1"]))
            finally:
                await a.close()
        rec, back = asyncio.run(steps())
    finally:
        t.stop()
    return t, rec, back


# --- vLLM ---------------------------------------------------------------------------------

def test_vllm_pauses_reloads_resumes_then_asks_the_golden_request(versions):
    t = server("vllm", versions["v1"])
    try:
        rec, now = drive(adapter(t), load("v2", versions["v2"], ("v1", versions["v1"])), serving)
    finally:
        t.stop()
    assert rec.ok and rec.error is None and now == "v2" and rec.mode == "reload_weights"
    assert t.server.requests == ["POST /pause", "POST /collective_rpc", "POST /resume", "POST /v1/completions"]
    assert t.server.loads == [str(versions["v2"])] and t.server.folder == versions["v2"]
    assert rec.bytes_read == (versions["v2"] / "model.safetensors").stat().st_size
    assert rec.pause_ms is not None and rec.pause_ms >= 1000 * t.server.paused_for[0] * 0.5


def test_vllm_extension_reads_only_the_changed_tensor_by_the_manifest_diff(versions, tmp_path):
    store = open_store(tmp_path / "store")
    for v in ("v1", "v2"):
        publish_local(store, versions[v], artifact="m", version=v)
    t = server("vllm", versions["v1"], extension=True)
    a = adapter(t, extension=True)
    a.manifests = lambda v: Registry(store).manifest("m", v)
    try:
        (rec,) = drive(a, load("v2", versions["v2"], ("v1", versions["v1"])))
    finally:
        t.stop()
    assert rec.ok and rec.mode == "changed_tensors" and rec.bytes_read == TENSOR_BYTES
    model = t.server.ext_workers[0].model_runner.model
    assert model.calls == [["layer.q_proj.weight"]]  # one tensor read, through the model's own loader
    assert torch.equal(model.qkv[:D], checkpoint(2, ("q_proj",), base=1)["layer.q_proj.weight"])  # fused rows


def test_vllm_extension_without_manifests_compares_the_folders(versions):
    t = server("vllm", versions["v1"], extension=True, workers=2)
    try:
        (rec,) = drive(adapter(t, extension=True), load("v2", versions["v2"], ("v1", versions["v1"])))
    finally:
        t.stop()
    assert rec.ok, rec.error
    for w in t.server.ext_workers:  # every worker loaded only q_proj
        assert w.model_runner.model.calls == [["layer.q_proj.weight"]]
    # each of 2 workers compared 4 tensors in both folders and read the changed one
    assert rec.bytes_read == 2 * (8 * TENSOR_BYTES + TENSOR_BYTES)


def test_the_extension_loads_through_load_weights_on_a_fake_worker(versions):
    class Worker(FabricWorkerExtension):
        def __init__(self):
            self.model_runner = type("Runner", (), {"get_model": lambda _: self.model})()
            self.model = TinyModel()

    w = Worker()
    full = w.fabric_load_changed(str(versions["v1"]))
    assert full["mode"] == "full" and full["tensors"] == 4 and full["bytes_read"] == 4 * TENSOR_BYTES
    assert full["loaded"] == 2  # four checkpoint tensors onto two parameters (q, k, v fused)
    diffed = w.fabric_load_changed(str(versions["v3"]), str(versions["v1"]),
                                   json.dumps(["model.safetensors:layer.o_proj.weight"]))
    assert diffed == {"folder": str(versions["v3"]), "tensors": 1, "bytes_read": TENSOR_BYTES, "loaded": 1,
                      "mode": "manifest_diff"}
    assert torch.equal(w.model.o, checkpoint(3, ("o_proj",), base=1)["layer.o_proj.weight"])
    with pytest.raises(FileNotFoundError):
        w.fabric_load_changed(str(versions["v1"]) + "-missing")


@pytest.mark.parametrize("fault, code, changed", [
    ("pause_hangs", "server_timeout", False),
    ("load_hangs", "server_timeout", True),
    ("load_5xx", "server_error", True),
    ("unreadable", "server_error", True),
    ("health_5xx", "health_check_failed", True),
])
def test_vllm_faults_fail_the_load_and_restore_puts_the_previous_back(versions, fault, code, changed):
    t, rec, back = fail_then_restore("vllm", versions, fault)
    assert not rec.ok and rec.error.startswith(code + ":") and rec.changed is changed, rec
    assert "POST /resume" in t.server.requests  # a pause sent is always undone, even one that timed out
    assert back.ok and t.server.answer == " Paris" and t.server.folder == versions["v1"]
    # loaded again only when the failed load may have changed the weights
    assert t.server.loads[-1:] == ([str(versions["v1"])] if changed else [str(versions["v2"])] * (fault != "pause_hangs"))


def test_vllm_health_answer_that_differs_is_a_failed_check(versions):
    t = server("vllm", versions["v1"])
    try:
        (rec,) = drive(adapter(t), load("v3", versions["v3"], ("v1", versions["v1"])))
    finally:
        t.stop()
    assert not rec.ok and rec.error.startswith("health_check_failed:") and "' Berlin'" in rec.error


def test_vllm_extension_naming_another_folder_is_a_wrong_version(versions):
    t = server("vllm", versions["v1"], extension=True)
    t.server.faults.add("wrong_version")
    try:
        (rec,) = drive(adapter(t, extension=True), load("v2", versions["v2"], ("v1", versions["v1"])))
    finally:
        t.stop()
    assert not rec.ok and rec.error.startswith("server_wrong_version:") and rec.changed


def test_a_server_that_is_down_is_unreachable(versions):
    t = server("vllm", versions["v1"])
    t.stop()
    (rec,) = drive(adapter(t), load("v2", versions["v2"]))
    assert not rec.ok and rec.error.startswith("server_unreachable:") and not rec.changed
    t2 = server("sglang", versions["v1"])
    t2.stop()
    assert drive(adapter(t2), serving) == [None]


def test_the_token_is_sent_and_a_wrong_one_is_refused(versions):
    t = server("sglang", versions["v1"], token="sglang-api-key-0123456789")
    try:
        (good,) = drive(adapter(t, token="sglang-api-key-0123456789"), load("v2", versions["v2"]))
        (bad,) = drive(adapter(t, token="wrong"), load("v3", versions["v3"]))
    finally:
        t.stop()
    assert good.ok and not bad.ok and bad.error.startswith("server_refused:") and "401" in bad.error
    assert not bad.changed and t.server.weight_version == "v2"


# --- SGLang ---------------------------------------------------------------------------------

def test_sglang_updates_from_disk_and_confirms_the_weight_version(versions):
    t = server("sglang", versions["v1"])
    try:
        rec, now = drive(adapter(t, load_format="safetensors"), load("v2", versions["v2"]), serving)
    finally:
        t.stop()
    assert rec.ok and now == "v2" and rec.mode == "update_weights_from_disk"
    assert t.server.requests[:3] == ["POST /update_weights_from_disk", "GET /model_info", "POST /v1/completions"]
    assert t.server.loads == [str(versions["v2"])] and rec.bytes_read == (versions["v2"] / "model.safetensors").stat().st_size


def test_sglang_without_weight_version_in_model_info_asks_get_weight_version(versions):
    t = server("sglang", versions["v1"], legacy=True)
    try:
        rec, now = drive(adapter(t), load("v2", versions["v2"]), serving)
    finally:
        t.stop()
    assert rec.ok and now == "v2" and "GET /get_weight_version" in t.server.requests


@pytest.mark.parametrize("fault, code, changed", [
    ("update_fails", "server_refused", False),  # SGLang rolled back to its old weights itself
    ("unreadable", "server_refused", False),
    ("wrong_version", "server_wrong_version", True),
    ("load_5xx", "server_error", True),
    ("load_hangs", "server_timeout", True),
    ("health_5xx", "health_check_failed", True),
])
def test_sglang_faults_and_their_restore(versions, fault, code, changed):
    t, rec, back = fail_then_restore("sglang", versions, fault)
    assert not rec.ok and rec.error.startswith(code + ":") and rec.changed is changed, rec
    assert back.ok and t.server.folder == versions["v1"]
    assert t.server.loads.count(str(versions["v1"])) == (1 if changed else 0)  # re-updated only if it changed
    if changed:
        assert t.server.weight_version == "v1"


# --- the golden answer and site.toml -------------------------------------------------------------

def test_answers_match_within_the_tolerance():
    body = {"choices": [{"text": " Paris", "logprobs": {"token_logprobs": [-0.25, -1.5]}}]}
    assert pick(body, "choices.0.text") == " Paris"
    assert matches(pick(body, "choices.0.logprobs.token_logprobs"), [-0.2, -1.5], 0.06)
    assert not matches(pick(body, "choices.0.logprobs.token_logprobs"), [-0.2, -1.5], 0.01)
    assert not matches(True, 1, 0.5) and not matches([1, 2], [1], 0)
    with pytest.raises(KeyError):
        pick(body, "choices.3.text")


BASE = {"site": "s", "data": "/tmp/x", "listen": "127.0.0.1:1", "origin": "http://o", "token": "t" * 24,
        "follow": ["m:prod"]}
GOOD = {"name": "a", "kind": "vllm", "url": "http://127.0.0.1:8000/", "model": "tiny",
        "health": {"request": {"prompt": "x"}, "expect": " y", "tolerance": 0.5},
        "timeouts": {"load": 30, "pause": 5}, "options": {"extension": True}}


def test_servers_blocks_are_read_into_typed_configs(tmp_path):
    (tmp_path / "key").write_text("secret-from-file\n")
    cfg = SiteConfig.from_dict({**BASE, "servers": [GOOD, {"name": "b", "kind": "sglang", "url": "http://h:1",
                                                           "model": "tiny", "token_file": "key"}]},
                               "site.toml", base=tmp_path)
    a, b = cfg.servers
    assert (a.url, a.artifact, a.timeouts.load_s, a.timeouts.pause_s, a.extras) == \
        ("http://127.0.0.1:8000", "m", 30.0, 5.0, {"extension": True})
    assert a.health.request == {"prompt": "x"} and a.health.tolerance == 0.5 and b.token == "secret-from-file"
    assert SiteConfig.from_dict(BASE).servers == ()


@pytest.mark.parametrize("change, message", [
    ({"kind": "tgi"}, "servers[0]: kind: must be one of vllm, sglang, kserve, triton"),
    ({"url": "ftp://x"}, "servers[0]: url: must be an http(s) URL"),
    ({"colour": 1}, "servers[0]: colour: unknown key"),
    ({"name": "a b"}, "servers[0]: name:"),
    ({"artifact": "other"}, "servers[0]: artifact: 'other' is not followed"),
    ({"health": {"expect": 1}}, "servers[0]: health: request: must be a non-empty table"),
    ({"health": {"request": {"p": 1}, "path": "v1"}}, "servers[0]: health: path: must start with '/'"),
    ({"timeouts": {"load": -1}}, "servers[0]: timeouts: load: must be a finite number"),
    ({"token": "x", "token_file": "y"}, "servers[0]: token: give at most one"),
    ({"model": ""}, "servers[0]: model: missing"),
])
def test_a_bad_servers_block_names_the_key(change, message):
    with pytest.raises(ConfigError) as e:
        SiteConfig.from_dict({**BASE, "servers": [{**GOOD, **change}]}, "site.toml")
    assert message in e.value.message and e.value.message.startswith("site.toml: servers[0]")


def test_two_servers_of_one_name_or_a_table_instead_of_an_array_are_refused():
    with pytest.raises(ConfigError, match=r"servers\[1\]: name: 'a' names two servers"):
        parse_servers([GOOD, GOOD], "site.toml", Path("."), ("m",))
    with pytest.raises(ConfigError, match="servers: must be an array of tables"):
        parse_servers(GOOD, "site.toml", Path("."), ("m",))
    with pytest.raises(ConfigError, match="artifact: required when the site follows more than one"):
        parse_servers([GOOD], "site.toml", Path("."), ("m", "n"))


def test_the_documented_block_and_record_follow_the_code(tmp_path):
    """docs/serving.md: its first site.toml block parses; its load record has LoadRecord's fields."""
    import re
    import tomllib

    from agents.serving.base import LoadRecord

    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    block = re.findall(r"^```toml\n(.*?)^```", text, re.S | re.M)[0]
    (tmp_path / "vllm.key").write_text("k")
    raw = tomllib.loads(block.replace("/etc/fabric/vllm.key", str(tmp_path / "vllm.key")))
    (cfg,) = parse_servers(raw["servers"], "site.toml", tmp_path, ("llama-8b",))
    assert (cfg.kind, cfg.model, cfg.timeouts.pause_s, cfg.extras, cfg.token) == ("vllm", "llama-8b", 60.0,
                                                                                 {"extension": True}, "k")
    assert build_adapter(cfg).extension
    record = json.loads(re.findall(r"^```json\n(.*?)^```", text, re.S | re.M)[0])
    assert set(record) == set(LoadRecord(None, ok=True).to_json())



def test_a_refused_canary_is_rejected_and_only_checked_back_the_others_never_asked(versions):
    """Two members of a real Rollout: SGLang refuses v2 at the canary (it kept v1): the version is
    rejected with the reason, the canary is checked (not updated again), the vLLM member never sees v2."""
    from types import SimpleNamespace

    from agents.site.rollout import Rollout
    from agents.site.servers import ServerMember

    ta, tb = server("sglang", versions["v1"]), server("vllm", versions["v1"])
    rejected = []

    async def reject_version(artifact, version, previous, reason):
        rejected.append((version, previous, reason))

    site = SimpleNamespace(channels={"m": SimpleNamespace(channel="prod")}, registry=None,
                           layout=SimpleNamespace(version_dir=lambda a, v: versions.get(v, Path("/nonexistent")),
                                                  active=lambda a: None),
                           reject_version=reject_version)

    async def until(pred, ro):
        for _ in range(200):
            if pred():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(ro.status())

    async def scenario():
        ro = Rollout(site)
        tasks = [asyncio.create_task(ServerMember(ro, adapter(t, name=n).config).run())
                 for n, t in (("a", ta), ("b", tb))]
        try:
            await until(lambda: len(ro.workers) == 2, ro)
            await ro.on_activated("m", "v1", None)
            await until(lambda: ro.rollouts["m"].phase == "done", ro)
            ta.server.faults.add("update_fails")
            await ro.on_activated("m", "v2", "v1")
            await until(lambda: ro.rollouts["m"].phase == "rejected" and ro.workers["a"].state == "serving", ro)
            return ro.status()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        rows = {w["worker"]: w for w in asyncio.run(scenario())}
    finally:
        ta.stop()
        tb.stop()
    assert rejected and rejected[0][:2] == ("v2", "v1") and "canary a: server_refused" in rejected[0][2]
    assert ta.server.loads == [str(versions["v1"]), str(versions["v2"])]  # v2 tried once, v1 not updated again
    assert tb.server.loads == [str(versions["v1"])]  # never asked to load v2
    assert rows["a"]["serving"] == "v1" and rows["a"]["server"]["record"]["mode"] == "unchanged"
    assert rows["b"]["serving"] == "v1" and rows["b"]["server"]["kind"] == "vllm"


@pytest.mark.parametrize("kind, options, message", [
    ("vllm", {"pause_mode": "soon"}, "site.toml: servers a: options: pause_mode: must be one of wait, keep, abort"),
    ("vllm", {"extension": "yes"}, "site.toml: servers a: options: extension: must be true or false"),
    ("vllm", {"load_format": "auto"}, "site.toml: servers a: options: unknown keys ['load_format']"),
    ("sglang", {"load_format": 3}, "site.toml: servers a: options: load_format: must be a non-empty string"),
])
def test_bad_options_stop_the_config_naming_the_option(kind, options, message):
    with pytest.raises(ConfigError) as e:
        SiteConfig.from_dict({**BASE, "servers": [{**GOOD, "kind": kind, "options": options}]}, "site.toml")
    assert e.value.message.startswith(message)
