"""KServe end to end: a real origin, a real site agent and a real KServe ModelServer, on loopback.

The agent's site.toml has one `[[servers]]` block of kind "kserve": the server is the
rollout's only member, so it is the canary. v1 then v2 reach it through the v2 model
repository API while a request loop hammers `/v2/models/mlp/infer`: no request fails and
every answer equals, within float rounding, what torch computes from v1's or v2's
safetensors, v1's first, then v2's. A version with a tensor of another shape (KServe
refuses the reload) and one whose golden answer is far from the record (it loads, the
health check rejects it) are each rejected at the site, and KServe is back on v2.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fabric.publish import publish
from fabric.wire.client import RemoteTarget, SyncOrigin
from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.files import toml_lines
from helpers.http import Session, request
from helpers.kserve import KserveServer, close, expected, golden_request, infer, write_mlp
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, start_origin
from helpers.ports import free_port

ARTIFACT, MODEL = "mlp", "mlp"
TOKEN = SITE_SECRETS["solo"]


def servers_block(kserve: KserveServer, expect: list[float]) -> str:
    """The `[[servers]]` block of site.toml for `kserve` (docs/serving.md "Triton and KServe")."""
    req = golden_request()["inputs"][0]
    lines = ["", "[[servers]]", *toml_lines({"name": "kserve-a", "kind": "kserve", "url": kserve.url,
                                            "model": MODEL}),
             "[servers.health]", *toml_lines({"expect": expect, "tolerance": 0.05}),
             "[[servers.health.request.inputs]]", *toml_lines(req),
             "[servers.timeouts]", *toml_lines({"connect": 2, "load": 30, "health": 10}),
             "[servers.options]", *toml_lines({"repository": str(kserve.repository)})]
    return "\n".join(lines) + "\n"


class Site:
    def __init__(self, root: Path):
        self.root, self.folders = root, {}
        self.origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
        self.kserve = KserveServer(root / "repository", MODEL, free_port(), root / "kserve.log").start()
        self.folders["v1"] = write_mlp(root / "weights" / "v1", seed=1)
        self.agent = AgentProcess(root, "solo", self.origin.url, follow=[f"{ARTIFACT}:prod"])
        with open(self.agent.config, "a") as f:
            f.write(servers_block(self.kserve, expected(self.folders["v1"])))

    def publish(self, version: str) -> None:
        with SyncOrigin(self.origin.url, PUBLISH_SECRET) as so:
            publish(self.folders[version], artifact=ARTIFACT, target=RemoteTarget(so), version=version,
                    channel="prod")

    def workers(self) -> dict:
        r = request(self.agent.url, "GET", "/v1/site/workers", token=TOKEN, timeout=5)
        assert r.status == 200, r
        return r.json()

    def wait(self, predicate, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.workers()
            if predicate(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"never reached: {what}\n{st}\n{self.agent.log_text()[-3000:]}\n"
                             f"{self.kserve.log_text()[-2000:]}")

    def close(self) -> None:
        self.agent.stop()
        self.kserve.stop()
        self.origin.stop()


def server_row(st: dict) -> dict:
    return next(w for w in st["workers"] if w["worker"] == "kserve-a")


def rollout_of(st: dict, version: str) -> dict | None:
    return next((r for r in st["rollouts"] if r["version"] == version), None)


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    site.publish("v1")
    site.agent.start()
    site.agent.wait_active(ARTIFACT, "v1")
    site.wait(lambda st: server_row(st)["serving"] == "v1", "KServe serves v1")
    yield site
    site.close()


def test_kserve_takes_v2_under_load_with_zero_failures_and_refuses_bad_versions(site):
    v1 = site.folders["v1"]
    v2 = site.folders["v2"] = write_mlp(site.root / "weights" / "v2", seed=2, base=1, step=1e-3)
    answers = {"v1": expected(v1), "v2": expected(v2)}
    assert not close(answers["v1"], answers["v2"])  # a mixed or stale answer cannot pass for the other

    results: list[tuple[int, str | None, list | str]] = []
    stop = threading.Event()

    def loop():
        s = Session(site.kserve.url, timeout=10)
        while not stop.is_set() and len(results) < 20000:
            r = s.request("POST", f"/v2/models/{MODEL}/infer", golden_request())
            body = r.json() if r.status == 200 else r.body.decode(errors="replace")
            results.append((r.status, body.get("model_version") if r.status == 200 else None,
                            body["outputs"][0]["data"] if r.status == 200 else body))
        s.close()

    t = threading.Thread(target=loop)
    t.start()
    try:
        time.sleep(0.5)
        site.publish("v2")
        st = site.wait(lambda st: server_row(st)["serving"] == "v2", "KServe serves v2")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(30)

    assert len(results) > 50
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    versions = [v for _, v, _ in results]
    first_v2 = versions.index("v2")
    assert set(versions[:first_v2]) == {"v1"} and set(versions[first_v2:]) == {"v2"}, "v1 answers, then v2"
    for _, version, data in results:
        assert close(data, answers[version]), version
    record = server_row(st)["server"]["record"]
    print(f"KServe v1 -> v2: {len(results)} requests, none failed; load record {record}")
    assert record["ok"] and record["version"] == "v2" and record["mode"] == "repository_load"
    assert record["bytes_read"] == (v2 / "model.safetensors").stat().st_size
    site.wait(lambda st: (rollout_of(st, "v2") or {}).get("phase") == "done", "the v2 rollout done")

    # a tensor of another shape: KServe refuses the reload and keeps v2; the site rejects the version
    site.folders["wide"] = write_mlp(site.root / "weights" / "wide", seed=3, hidden=16)
    site.publish("wide")
    st = site.wait(lambda st: (rollout_of(st, "wide") or {}).get("phase") == "rejected", "wide rejected")
    assert "does not fit the served v2" in rollout_of(st, "wide")["error"]
    st = site.wait(lambda st: server_row(st)["serving"] == "v2", "KServe back on v2")
    assert infer(site.kserve.url, MODEL)[:2] == (200, "v2")

    # weights that load but answer far from the recorded answer: the health check rejects them
    site.folders["far"] = write_mlp(site.root / "weights" / "far", seed=4, base=1, step=0.5)
    assert not close(expected(site.folders["far"]), answers["v1"], 0.05)
    site.publish("far")
    st = site.wait(lambda st: (rollout_of(st, "far") or {}).get("phase") == "rejected", "far rejected")
    assert "health" in rollout_of(st, "far")["error"]
    st = site.wait(lambda st: server_row(st)["serving"] == "v2" and server_row(st)["server"]["record"]["ok"],
                   "KServe restored to v2")
    status, version, data = infer(site.kserve.url, MODEL)
    assert (status, version) == (200, "v2") and close(data, answers["v2"])
    assert site.agent.active(ARTIFACT) == "v2"
    site_state = site.agent.status()
    assert {"wide", "far"} <= set(site_state["bad"].get(ARTIFACT, []))
    laid_out = sorted(p.name for p in (site.kserve.repository / MODEL).iterdir() if p.name.isdigit())
    assert len(laid_out) == 1  # only v2's folder is left for a KServe restart to load
