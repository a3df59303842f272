"""Inference servers in a rollout, end to end: a real origin, a real agent process, and three
[[servers]] (two vLLM stand-ins, one with Fabric's worker extension, and an SGLang stand-in)
driven by the agent through their documented endpoints (tests/helpers/inference_servers.py).

What it proves: a good version rolls out canary-first to every server, the extension server
reading only the changed tensor (the agent's manifest diff); a version whose golden answer is
wrong is rejected at the canary, the canary is loaded back onto the previous version, the other
servers never receive the bad version's load request, and status (GET /v1/site/workers and
`fabric status`) says what each serves and why the version was rejected.
"""

from __future__ import annotations

import time

import pytest

from fabric.publish import publish
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.inference_servers import InferenceServer, ServerThread
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, fabric_json, start_origin
from helpers.tiny_vllm_model import D, checkpoint, write_version

ARTIFACT = "tiny"
TOKEN = SITE_SECRETS["solo"]
SERVERS = (("a-vllm", "vllm", {}), ("b-sglang", "sglang", {}), ("c-vllm", "vllm", {"extension": True}))


def server_block(name: str, kind: str, url: str, options: dict) -> str:
    lines = ["[[servers]]", f'name = "{name}"', f'kind = "{kind}"', f'url = "{url}"', 'model = "tiny"',
             "[servers.health]", 'request = { prompt = "The capital of France is", max_tokens = 2 }',
             'expect = " Paris"', "[servers.timeouts]", "load = 10", "health = 10", "pause = 5"]
    if options:
        lines += ["[servers.options]"] + [f"{k} = {str(v).lower()}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


class Lab:
    def __init__(self, root):
        self.root = root
        self.origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
        self.servers = {name: ServerThread(InferenceServer(kind, extension=bool(opts))).start()
                        for name, kind, opts in SERVERS}
        self.agent = AgentProcess(root, "solo", self.origin.url, follow=[f"{ARTIFACT}:prod"])
        with open(self.agent.config, "a") as f:
            for name, kind, opts in SERVERS:
                f.write(server_block(name, kind, self.servers[name].url, opts))
        self.agent.start()

    def publish(self, version: str, folder) -> None:
        with SyncOrigin(self.origin.url, PUBLISH_SECRET) as so:
            publish(folder, artifact=ARTIFACT, target=RemoteTarget(so), version=version, channel="prod")

    def listing(self) -> dict:
        return request(self.agent.url, "GET", "/v1/site/workers", token=TOKEN).json()

    def wait(self, predicate, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.listing()
            if predicate(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"never reached: {what}\n{st}\n{self.agent.log_text()[-3000:]}")

    def close(self) -> None:
        self.agent.stop()
        for t in self.servers.values():
            t.stop()
        self.origin.stop()


def serving(st: dict) -> dict[str, str | None]:
    return {w["worker"]: w["serving"] for w in st["workers"]}


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def test_servers_roll_out_canary_first_and_a_bad_version_stops_at_the_canary(lab, tmp_path):
    v1 = write_version(tmp_path / "w" / "v1", checkpoint(1, base=1), " Paris")
    v2 = write_version(tmp_path / "w" / "v2", checkpoint(2, ("q_proj",), base=1), " Paris")
    v3 = write_version(tmp_path / "w" / "v3", checkpoint(3, ("o_proj",), base=2), " Berlin")
    names = [n for n, _, _ in SERVERS]

    lab.publish("v1", v1)
    lab.wait(lambda st: serving(st) == dict.fromkeys(names, "v1"), "every server on v1")

    # a good version: canary first, then the rest; the extension reads only the changed tensor
    lab.publish("v2", v2)
    st = lab.wait(lambda st: serving(st) == dict.fromkeys(names, "v2"), "every server on v2")
    rows = {w["worker"]: w for w in st["workers"]}
    ro = st["rollouts"][-1]
    assert (ro["version"], ro["phase"], ro["canary"]) == ("v2", "done", "a-vllm")
    assert rows["a-vllm"]["role"] == "canary" and rows["b-sglang"]["role"] == rows["c-vllm"]["role"] == "rollout"
    records = {n: rows[n]["server"]["record"] for n in names}
    assert all(r["ok"] and r["version"] == "v2" for r in records.values()), records
    assert records["a-vllm"]["at"] < min(records["b-sglang"]["at"], records["c-vllm"]["at"])  # canary first
    assert records["c-vllm"]["mode"] == "changed_tensors" and records["c-vllm"]["bytes_read"] == D * D * 4
    assert records["a-vllm"]["bytes_read"] == (v2 / "model.safetensors").stat().st_size
    assert all(r["seconds_to_new_answers"] > 0 and r["pause_ms"] is not None for r in records.values())
    assert rows["b-sglang"]["server"]["kind"] == "sglang" and lab.servers["b-sglang"].server.weight_version == "v2"

    # a bad version: its golden answer is wrong; rejected at the canary, which goes back to v2
    lab.publish("v3", v3)
    st = lab.wait(lambda st: st["rollouts"][-1]["version"] == "v3" and st["rollouts"][-1]["phase"] == "rejected",
                  "v3 rejected")
    lab.wait(lambda st: {w["worker"]: w["state"] for w in st["workers"]} == dict.fromkeys(names, "serving"),
             "the canary back in service")
    ro = lab.listing()["rollouts"][-1]
    assert ro["canary"] == "a-vllm" and "health_check_failed" in ro["error"] and "Berlin" in ro["error"]
    canary = lab.servers["a-vllm"].server
    assert canary.loads[-2:] == [str(lab.agent.data / "versions" / ARTIFACT / v) for v in ("v3", "v2")]
    assert canary.answer == " Paris"  # loaded v2 again: it had changed
    for other in ("b-sglang", "c-vllm"):  # never asked to load v3
        assert not any(p.endswith("/v3") for p in lab.servers[other].server.loads), other
    assert serving(lab.listing()) == dict.fromkeys(names, "v2") and lab.agent.active(ARTIFACT) == "v2"

    # `fabric status` shows each server, what it serves and its last record
    deadline = time.monotonic() + 20
    while True:
        sites = fabric_json("status", "--origin", lab.origin.url, "--token", ADMIN_SECRET, "--json")["sites"]
        workers = {w["worker"]: w for w in sites[0]["workers"]} if sites else {}
        if sites and "v3" in sites[0]["bad"].get(ARTIFACT, []) and all(
                (workers.get(n) or {}).get("serving") == "v2" for n in names):
            break
        assert time.monotonic() < deadline, sites
        time.sleep(0.5)
    assert workers["a-vllm"]["server"]["record"]["version"] == "v2" and workers["a-vllm"]["server"]["url"]
    assert any(r["version"] == "v3" and "Berlin" in (r["error"] or "") for r in sites[0]["rollouts"])
