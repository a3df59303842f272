"""Rollouts (agents/rollout.py): a real SiteAgent's worker API on loopback, real HotLoader workers.

The agent runs in-process on its own event loop thread, serving only its base app and
the worker routes (no origin: versions are published into its store and materialised
as a deploy would, then activated the way `SiteAgent.deploy` does). Workers are
`HotLoader`s over small torch modules, in threads of this process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch
from aiohttp import web
from safetensors.torch import save_file

from agents.site.config import SiteConfig
from agents.site.rollout import REPORT_FIELDS, WORKERS, Assignment, Rollout, RolloutOptions, RolloutState, Worker
from agents.site.agent import SiteAgent
from agents.worker.hotloader import HotLoader, LoadReport
from fabric.wire.auth import TokenTable
from fabric.core.manifest import Manifest
from fabric.pull import materialize
from fabric.store.registry import Registry
from fabric.wire.server import base_app

from helpers.store import publish_local
from helpers.http import request
from test_worker import Net, weights

SECRET = "rollout-test-secret-3c9d1e7a5b"
X = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))


class Agent:
    """A SiteAgent following m:prod, its worker API served from a thread's event loop."""

    def __init__(self, root: Path, options: RolloutOptions | None = None):
        cfg = SiteConfig.from_dict({"site": "solo", "data": str(root / "site"), "listen": "127.0.0.1:0",
                                    "origin": "http://127.0.0.1:9", "token": SECRET, "follow": ["m:prod"]})
        self.root = root
        self.agent = SiteAgent(cfg)
        if options:
            self.agent.rollout.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self.call(self._serve())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.sd: dict[str, dict] = {}

    async def _serve(self) -> web.AppRunner:
        tokens = TokenTable.from_dict({"token": [{"name": "solo", "secret": SECRET, "scopes": ["pull", "admin"]}]})
        app = base_app(store=self.agent.store, tokens=tokens)
        self.agent.rollout.add_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def publish(self, name: str, sd: dict) -> None:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"))
        publish_local(self.agent.store, src, artifact="m", version=name)
        materialize(self.agent.store, Registry(self.agent.store).manifest("m", name),
                    self.agent.layout.version_dir("m", name))
        self.sd[name] = sd

    def activate(self, name: str) -> None:
        """What SiteAgent.deploy does once a version is materialised."""
        async def go():
            ch = self.agent.channels["m"]
            previous, ch.active = ch.active, name
            self.agent.layout.activate("m", name)
            await self.agent.rollout.on_activated("m", name, previous)
        self.call(go())

    def workers(self, serving: str | None = None, timeout: float = 10.0) -> dict[str, dict]:
        """The agent's worker rows (once every worker reported serving `serving`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            r = request(self.url, "GET", WORKERS, token=SECRET)
            assert r.status == 200, r.body
            rows = {w["worker"]: w for w in r.json()["workers"]}
            if serving is None or time.monotonic() > deadline or all(
                    w["serving"] == serving and w["state"] == "serving" for w in rows.values()):
                return rows
            time.sleep(0.05)

    def rollout(self, phase: str | None = None, timeout: float = 20.0) -> dict:
        """The latest rollout (once it reaches `phase`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            ro = request(self.url, "GET", WORKERS, token=SECRET).json()["rollouts"][-1]
            if phase is None or ro["phase"] == phase or time.monotonic() > deadline:
                return ro
            time.sleep(0.05)


class Workers:
    """HotLoader workers w0, w1, … that record when each load starts."""

    def __init__(self, agent: Agent):
        self.agent, self.loaders, self.started = agent, {}, []
        self.slow: dict[str, float] = {}

    def start(self, n: int, **kw) -> list[HotLoader]:
        for i in range(len(self.loaders), len(self.loaders) + n):
            wid = f"w{i}"

            def before(version, wid=wid):
                self.started.append((wid, version, time.monotonic()))
                time.sleep(self.slow.get(wid, 0.0))
            self.loaders[wid] = HotLoader(self.agent.url, "m", "prod", Net().eval(), token=SECRET, worker_id=wid,
                                          poll_s=0.5, golden_input=X, before_load=before, **kw).start()
        return list(self.loaders.values())

    def wait_all(self, version: str, timeout: float = 20.0) -> None:
        for wid, loader in self.loaders.items():
            assert loader.wait_for(version, timeout), f"{wid} serves {loader.version}, not {version}"
            with loader.serving() as s:
                got = s.module.state_dict()
            assert all(torch.equal(got[k], v) for k, v in self.agent.sd[version].items()), wid

    def loads(self, wid: str) -> list[str]:
        return [v for w, v, _ in self.started if w == wid]

    def stop(self) -> None:
        for loader in self.loaders.values():
            loader.stop()


@pytest.fixture
def site(tmp_path):
    a = Agent(tmp_path)
    a.publish("v1", weights(1))
    a.publish("v2", weights(2, a.sd["v1"], ["layers.3.weight", "layers.6.bias"]))
    a.publish("v3", weights(3, a.sd["v2"], ["layers.0.weight"]))
    bad = dict(a.sd["v1"])
    bad["layers.7.bias"] = torch.full((64,), float("nan"))
    a.publish("vbad", bad)
    yield a
    a.close()


@pytest.fixture
def workers(site):
    w = Workers(site)
    yield w
    w.stop()


def test_joining_workers_get_the_active_version_and_status_shows_it(site, workers):
    site.activate("v1")
    workers.start(3)
    workers.wait_all("v1")
    rows = site.workers(serving="v1")
    assert sorted(rows) == ["w0", "w1", "w2"]
    assert all(r["serving"] == "v1" and r["state"] == "serving" and r["role"] == "join" for r in rows.values())
    assert [w["worker"] for w in site.agent.status()["workers"]] == ["w0", "w1", "w2"]


def test_a_new_version_goes_to_one_canary_first_then_the_rest(site, workers):
    site.activate("v1")
    workers.start(3)
    workers.wait_all("v1")
    workers.slow["w0"] = 0.5  # the canary (first by id) takes its time
    t0 = time.monotonic()
    site.activate("v2")
    workers.wait_all("v2")
    starts = {w: t for w, v, t in workers.started if v == "v2"}
    assert set(starts) == {"w0", "w1", "w2"}
    assert starts["w0"] >= t0
    assert min(starts["w1"], starts["w2"]) > starts["w0"] + 0.5, "the others started before the canary was done"
    ro = site.rollout("done")
    assert ro["version"] == "v2" and ro["canary"] == "w0" and ro["phase"] == "done" and ro["failed"] == []
    rows = site.workers()
    assert rows["w0"]["role"] == "canary" and rows["w1"]["role"] == "rollout"
    assert rows["w1"]["last_report"]["ok"] and rows["w1"]["last_report"]["tensors_changed"] == 2


def test_a_failing_canary_marks_the_version_bad_and_flips_back(site, workers):
    site.activate("v1")
    workers.start(3)
    workers.wait_all("v1")
    site.activate("vbad")
    ro = site.rollout("rejected")
    assert ro["phase"] == "rejected" and ro["canary"] == "w0" and "non-finite" in ro["error"]
    assert site.agent.state.bad == {"m": ["vbad"]}
    assert site.agent.layout.active("m") == "v1" and site.agent.channels["m"].active == "v1"
    workers.wait_all("v1")
    assert workers.loads("w0") == ["v1", "vbad"]
    assert workers.loads("w1") == ["v1"] and workers.loads("w2") == ["v1"], "only the canary may try it"
    report = site.workers()["w0"]["last_report"]
    assert report["serving"] == "v1"
    time.sleep(1.0)  # and nobody is told to load it afterwards
    assert workers.loads("w1") == ["v1"] and all(r["serving"] == "v1" for r in site.workers().values())


def test_a_canary_that_dies_mid_load_is_replaced(site, workers):
    site.activate("v1")
    workers.start(2)
    workers.wait_all("v1")
    # "a-ghost" sorts first, so it is the canary; it takes the assignment and is never heard from again
    r = request(site.url, "POST", WORKERS, {"worker": "a-ghost", "artifact": "m", "serving": "v1", "poll_s": 0.3},
                token=SECRET)
    assert r.status == 200 and r.json()["dead_after_s"] == pytest.approx(1.6)
    got = {}
    poll = threading.Thread(target=lambda: got.update(request(
        site.url, "GET", f"{WORKERS}/a-ghost/assignment?after=0&wait=0.3", token=SECRET).json()))
    site.activate("v2")
    poll.start()
    poll.join(10)
    assert got["assignment"]["version"] == "v2" and got["assignment"]["role"] == "canary"
    assert got["assignment"]["path"].endswith("versions/m/v2") and got["assignment"]["manifest"]["version"] == "v2"
    workers.wait_all("v2", timeout=20)
    ro = site.rollout("done")
    assert ro["phase"] == "done" and ro["canary"] == "w0" and site.agent.state.bad == {}
    assert site.workers()["a-ghost"]["state"] == "dead"


def test_two_activations_in_quick_succession_the_newest_wins(site, workers):
    site.activate("v1")
    workers.start(3)
    workers.wait_all("v1")
    for w in ("w0", "w1", "w2"):
        workers.slow[w] = 0.3
    site.activate("v2")
    time.sleep(0.1)  # the canary is loading v2
    site.activate("v3")
    workers.wait_all("v3")
    time.sleep(0.5)
    for w in ("w0", "w1", "w2"):
        loads = workers.loads(w)
        assert loads[-1] == "v3", (w, loads)
        assert "v2" not in loads[loads.index("v3"):], (w, loads)  # never back to the older one
    assert workers.loads("w1") == ["v1", "v3"] and workers.loads("w2") == ["v1", "v3"]
    ro = site.rollout("done")
    assert ro["version"] == "v3" and ro["phase"] == "done"


def test_a_rollback_activation_takes_every_worker_back(site, workers):
    site.activate("v1")
    workers.start(2, mode="double-buffered")
    workers.wait_all("v1")
    site.activate("v2")
    workers.wait_all("v2")
    site.activate("v1")  # what a channel rollback at the origin makes the agent do
    workers.wait_all("v1")
    assert site.rollout()["previous"] == "v2"


def test_worker_api_errors(site):
    r = request(site.url, "GET", f"{WORKERS}/nobody/assignment?after=0&wait=0.2", token=SECRET)
    assert r.status == 404 and r.error()["code"] == "not_found"
    r = request(site.url, "POST", WORKERS, {"worker": "w", "artifact": "m", "channel": "canary"}, token=SECRET)
    assert r.status == 409 and "m:prod" in r.error()["message"]
    r = request(site.url, "POST", WORKERS, {"worker": "../etc", "artifact": "m"}, token=SECRET)
    assert r.status == 422 and r.error()["code"] == "invalid_input"
    r = request(site.url, "POST", WORKERS, {"worker": "w", "artifact": "other"}, token=SECRET)
    assert r.status == 404
    r = request(site.url, "POST", WORKERS, {"worker": "w", "artifact": "m"})
    assert r.status == 401
    r = request(site.url, "GET", "/v1/site/manifests/m/v1", token=SECRET)
    assert r.status == 200 and r.json()["version"] == "v1"


# --- docs/hotload.md ----------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "hotload.md"


def test_the_docs_json_examples_match_the_code():
    import json
    import re
    from types import SimpleNamespace

    examples = [json.loads(b) for k, b in re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.S | re.M)
                if k == "json"]
    register, registered, poll, report, listing = examples
    site = SimpleNamespace(channels={"demo-mlp": SimpleNamespace(channel="prod")},
                           layout=SimpleNamespace(active=lambda a: None))
    assert Rollout(site).register(register) == registered
    a = poll["assignment"]
    assert set(a) == {"seq", "artifact", "version", "role", "previous", "path", "manifest"}
    assert Manifest.from_json(a["manifest"]).version == a["version"]
    assert set(report) == set(REPORT_FIELDS) | {"seq"} == set(LoadReport(None, None, "x").to_json()) | {"seq", "serving"}
    assert set(listing["workers"][0]) == set(Worker("w", "m").to_json())
    assert set(listing["rollouts"][0]) == set(RolloutState("m", "v", None).to_json())
    assert a["role"] in {"join", "canary", "rollout", "revert"} and Assignment(1, "m", "v", "join").role == "join"
