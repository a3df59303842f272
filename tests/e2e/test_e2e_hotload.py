"""Hot-load end to end: a real origin, a real site agent and `fabric worker demo` processes on loopback.

Names say what each test survives: a swap under load with zero failed requests; a
version whose canary fails (rolled back at the site, the other workers never touch
it), `fabric rollback` moving every worker back, and a canary killed mid-load.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.publish import publish
from agents.worker.reference import fixed_input, make_weights, model_from

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.http import Session, request
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, fabric, fabric_json, free_port, start_origin
from helpers.process import ServerProcess

ARTIFACT = "demo-mlp"
TOKEN = SITE_SECRETS["solo"]


class WorkerProcess(ServerProcess):
    """`fabric worker demo` serving on a free loopback port."""

    def __init__(self, root: Path, wid: str, agent_url: str, *, mode: str = "in-place", slow_load: float = 0.0):
        self.wid, port = wid, free_port()
        super().__init__(["worker", "demo", "--agent", agent_url, "--artifact", ARTIFACT, "--channel", "prod",
                          "--listen", f"127.0.0.1:{port}", "--mode", mode, "--worker-id", wid,
                          "--token", TOKEN, "--poll", "0.5", "--slow-load", str(slow_load)],
                         port, root / f"worker-{wid}.log", name=f"worker {wid}")

    def start(self) -> "WorkerProcess":
        return self.spawn()  # it answers only once it serves a version: callers wait for that

    def status(self) -> dict | None:
        try:
            r = request(self.url, "GET", "/status", timeout=5)
        except OSError:
            return None
        return r.json() if r.status == 200 else None

    def wait_version(self, version: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.wid} exited:\n{self.log()[-3000:]}")
            st = self.status()
            if st and st["version"] == version:
                return st
            time.sleep(0.1)
        raise AssertionError(f"worker {self.wid} serves {st and st['version']}, not {version}\n{self.log()[-3000:]}")

    def loaded(self) -> list[tuple[str, bool]]:
        """(version, ok) of every load this worker attempted."""
        return [(r["version"], r["ok"]) for r in self.status()["loads"] if r["tensors_changed"] or not r["ok"]]

    def log(self) -> str:
        return self.log_text()


class Lab:
    def __init__(self, root: Path):
        self.root = root
        self.origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
        self.agent = AgentProcess(root, "solo", self.origin.url, follow=[f"{ARTIFACT}:prod"])
        self.workers: dict[str, WorkerProcess] = {}
        self.folders: dict[str, Path] = {}

    def weights(self, version: str, seed: int, **kw) -> Path:
        self.folders[version] = make_weights(self.root / "weights" / version, seed, **kw)
        return self.folders[version]

    def publish(self, version: str) -> None:
        with SyncOrigin(self.origin.url, PUBLISH_SECRET) as so:
            publish(self.folders[version], artifact=ARTIFACT, target=RemoteTarget(so), version=version,
                    channel="prod")

    def start_workers(self, *ids: str, **kw) -> list[WorkerProcess]:
        new = [WorkerProcess(self.root, wid, self.agent.url, **kw).start() for wid in ids]
        self.workers.update({w.wid: w for w in new})
        return new

    def site_workers(self) -> dict[str, dict]:
        return {w["worker"]: w for w in self.agent.status()["workers"]}

    def wait_site(self, predicate, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.agent.status()
            if predicate(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"site never reached: {what}\n{st}\n{self.agent.log_text()[-3000:]}")

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.agent.stop()
        self.origin.stop()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    p = fabric("worker", "demo", "--make-weights", tmp_path / "weights" / "v1", "--seed", "1", timeout=120)
    assert p.returncode == 0, p.stderr
    lab.folders["v1"] = tmp_path / "weights" / "v1"
    lab.publish("v1")
    lab.agent.start()
    lab.agent.wait_active(ARTIFACT, "v1")
    yield lab
    lab.close()


def expected_outputs(lab: Lab) -> dict[str, torch.Tensor]:
    return {v: model_from(folder)(fixed_input()).detach() for v, folder in lab.folders.items()}


def test_workers_swap_under_load_with_zero_failed_requests(lab):
    lab.weights("v2", seed=2, base=lab.folders["v1"], change=0.25)
    lab.start_workers("w1", "w3")
    lab.start_workers("w2", mode="double-buffered")
    for w in lab.workers.values():
        w.wait_version("v1")
    expected = expected_outputs(lab)
    assert (expected["v1"] - expected["v2"]).abs().max() > 1e-2  # a wrong or mixed answer cannot pass

    results: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client(worker: WorkerProcess):
        s = Session(worker.url, timeout=10)
        for _ in range(4000):
            if stop.is_set():
                break
            r = s.request("POST", "/infer")
            results.append((r.status, r.json()))
        s.close()

    threads = [threading.Thread(target=client, args=(w,)) for w in lab.workers.values()]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        lab.publish("v2")
        for w in lab.workers.values():
            w.wait_version("v2")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    assert len(results) > 300
    failed = [(status, body) for status, body in results if status != 200]
    assert not failed, failed[:3]
    for _, body in results:
        got = torch.tensor(body["output"])
        assert torch.allclose(got, expected[body["version"]], rtol=0, atol=1e-5), body["version"]
    assert {b["version"] for _, b in results} == {"v1", "v2"}
    site = lab.site_workers()
    assert {w: r["serving"] for w, r in site.items()} == {"w1": "v2", "w2": "v2", "w3": "v2"}
    assert site["w1"]["role"] == "canary" and site["w2"]["role"] == "rollout"
    report = site["w2"]["last_report"]
    assert report["ok"] and report["mode"] == "double-buffered" and report["tensors_changed"] == 2
    assert report["bytes_read"] == report["bytes_changed"] < 0.5 * lab.folders["v2"].joinpath("model.safetensors").stat().st_size


def test_a_bad_version_fails_its_canary_then_rollback_and_a_dead_worker(lab):
    lab.weights("v2", seed=2, base=lab.folders["v1"], change=0.25)
    lab.weights("vbad", seed=3, base=lab.folders["v2"], change=0.25, nan=True)
    lab.weights("v4", seed=4, base=lab.folders["v1"], change=0.5)
    w1, w2, w3 = lab.start_workers("w1", "w2", "w3")
    lab.publish("v2")
    for w in (w1, w2, w3):
        w.wait_version("v2")

    # a version whose canary fails: marked bad here, current flips back, the others never load it
    lab.publish("vbad")
    st = lab.wait_site(lambda s: "vbad" in s["bad"].get(ARTIFACT, []), "vbad marked bad")
    assert lab.agent.active(ARTIFACT) == "v2"
    assert st["channels"][0]["active"] == "v2" and st["channels"][0]["target"] == "vbad"
    assert ("vbad", False) in w1.loaded()
    assert w1.status()["version"] == "v2" and w1.status()["failed"] == 0
    time.sleep(1.0)
    assert all(v != "vbad" for v, _ in w2.loaded() + w3.loaded())
    rows = lab.site_workers()
    assert {w: r["serving"] for w, r in rows.items()} == {"w1": "v2", "w2": "v2", "w3": "v2"}
    failures = [r for r in w1.status()["loads"] if not r["ok"]]
    assert len(failures) == 1 and "non-finite" in failures[0]["error"]
    rollout = request(lab.agent.url, "GET", "/v1/site/workers", token=TOKEN).json()["rollouts"][-1]
    assert rollout["phase"] == "rejected" and rollout["canary"] == "w1" and "non-finite" in rollout["error"]

    # `fabric rollback` at the origin: first back off vbad (v2 stays), then to v1 (every worker moves)
    for want in ("v2", "v1"):
        r = fabric_json("rollback", ARTIFACT, "--channel", "prod", "--origin", lab.origin.url,
                        "--token", PUBLISH_SECRET)
        assert r["version"] == want
    for w in (w1, w2, w3):
        w.wait_version("v1")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sites = fabric_json("status", "--origin", lab.origin.url, "--token", ADMIN_SECRET)["sites"]
        serving = {w["worker"]: w["serving"] for w in sites[0].get("workers", [])}
        if serving == {"w1": "v1", "w2": "v1", "w3": "v1"}:
            break
        time.sleep(0.5)
    assert serving == {"w1": "v1", "w2": "v1", "w3": "v1"}
    p = fabric("status", "--origin", lab.origin.url, "--token", ADMIN_SECRET)
    assert p.returncode == 0 and "w1=v1" in p.stdout

    # a canary killed mid-load: the agent notices (no heartbeat) and carries on with the others
    (slow,) = lab.start_workers("a-slow", slow_load=60)  # sorts first: it will be the canary
    slow.wait_version("v1")
    lab.publish("v4")
    lab.wait_site(lambda s: any(w["worker"] == "a-slow" and w["assigned"] == "v4" for w in s["workers"]),
                  "v4 assigned to a-slow")
    slow.kill()
    for w in (w1, w2, w3):
        w.wait_version("v4", timeout=30)
    st = lab.wait_site(lambda s: {w["worker"]: w["state"] for w in s["workers"]}.get("a-slow") == "dead",
                       "a-slow dead")
    assert lab.agent.active(ARTIFACT) == "v4" and "v4" not in st["bad"].get(ARTIFACT, [])
