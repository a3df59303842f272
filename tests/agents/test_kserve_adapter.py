"""The v2 model repository adapter (agents/serving/kserve.py) against a real KServe ModelServer.

One KServe process (PyPI `kserve`, serving Fabric's KServe model) for the module; each test
drives its own model name in the shared repository, so they do not depend on each other.
Answers are compared with what torch computes from the same safetensors.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from fabric.errors import ConfigError
from helpers.kserve import KserveServer, close, expected, golden_request, infer, write_mlp
from helpers.ports import free_port

from agents.serving import v2_repository
from agents.serving.base import HealthCheck, ServerConfig, Timeouts, parse_servers
from agents.serving.kserve import KserveAdapter


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    base = tmp_path_factory.mktemp("kserve")
    with KserveServer(base / "repository", "boot", free_port(), base / "kserve.log") as server:
        yield server


def adapter(server, model: str, *, expect=None, tolerance=0.0, kind="kserve", url=None, **options) -> KserveAdapter:
    health = HealthCheck(request=golden_request(), expect=expect, tolerance=tolerance)
    return KserveAdapter(ServerConfig(name=f"ks-{model}", kind=kind, url=url or server.url, model=model,
                                      health=health, timeouts=Timeouts(connect_s=2, load_s=30, health_s=10),
                                      extras={"repository": str(server.repository), **options}))


def laid_out(server, model: str) -> dict[str, str]:
    """number -> Fabric version of the version folders on disk."""
    d = server.repository / model
    index = json.loads((d / "fabric-versions.json").read_text())["versions"]
    return {n: index.get(n, "?") for n in sorted(os.listdir(d)) if n.isdigit()}


def test_load_then_update_then_refuse_a_wrong_shape_then_revert_a_wrong_answer(kserve, tmp_path):
    v1 = write_mlp(tmp_path / "v1", seed=1)
    v2 = write_mlp(tmp_path / "v2", seed=2, base=1, step=1e-3)  # a fine-tune: close to v1's answers
    wide = write_mlp(tmp_path / "wide", seed=3, hidden=16)  # a tensor of another shape
    far = write_mlp(tmp_path / "far", seed=4, base=1, step=0.5)  # loads, but answers far from the record
    a = adapter(kserve, "mlp", expect=expected(v1), tolerance=0.05)

    async def scenario():
        try:
            assert await a.serving() is None  # nothing loaded yet
            r1 = await a.load("v1", v1, None)
            assert r1.ok, r1.error
            assert await a.serving() == "v1"
            assert r1.bytes_read == (v1 / "model.safetensors").stat().st_size
            assert r1.seconds_to_new_answers is not None and r1.pause_ms is not None

            r2 = await a.load("v2", v2, ("v1", v1))
            assert r2.ok, r2.error
            assert await a.serving() == "v2"
            assert r2.pause_ms < 5000  # KServe swaps the model without holding requests
            assert sorted(laid_out(kserve, "mlp").values()) == ["v1", "v2"]  # the previous stays for a restore

            r3 = await a.load("wide", wide, ("v2", v2))
            assert not r3.ok and r3.error.startswith("server_error") and "does not fit the served v2" in r3.error, r3.error
            assert not r3.changed
            assert await a.serving() == "v2"  # a refused reload keeps the old model serving
            back = await a.restore(("v2", v2))
            assert back.ok, back.error
            assert list(laid_out(kserve, "mlp").values()) == ["v2"]

            r4 = await a.load("far", far, ("v2", v2))
            assert not r4.ok and r4.error.startswith("health_check_failed"), r4.error
            assert r4.changed and await a.serving() == "far"  # it had switched: a restore must load again
            back = await a.restore(("v2", v2))
            assert back.ok, back.error
            assert await a.serving() == "v2"
            assert list(laid_out(kserve, "mlp").values()) == ["v2"]
        finally:
            await a.close()

    asyncio.run(scenario())
    status, version, data = infer(kserve.url, "mlp")
    assert (status, version) == (200, "v2") and close(data, expected(v2))
    assert not close(data, expected(v1))  # v2 really is another version


def test_kserve_reloads_the_newest_laid_out_version_when_it_restarts(kserve, tmp_path):
    v1 = write_mlp(tmp_path / "v1", seed=5)
    a = adapter(kserve, "boot")
    assert asyncio.run(_load_and_close(a, "v1", v1)).ok
    kserve.stop()
    kserve.start()  # --model boot: loads the newest version folder at start
    status, version, data = infer(kserve.url, "boot")
    assert (status, version) == (200, "v1") and close(data, expected(v1))


async def _load_and_close(a, version, folder, previous=None):
    try:
        return await a.load(version, folder, previous)
    finally:
        await a.close()


def test_a_first_load_that_fails_leaves_nothing_laid_out_or_loaded(kserve, tmp_path):
    far = write_mlp(tmp_path / "far", seed=6)
    a = adapter(kserve, "first", expect=[0.0] * 6, tolerance=1e-9)
    rec = asyncio.run(_load_and_close(a, "far", far))
    assert not rec.ok and rec.error.startswith("health_check_failed"), rec.error
    assert laid_out(kserve, "first") == {}
    status, _, _ = infer(kserve.url, "first")
    assert status == 404  # unloaded: a bad version does not keep serving


def test_a_version_folder_that_cannot_be_read_is_refused_before_the_server_sees_it(kserve, tmp_path):
    a = adapter(kserve, "missing")
    rec = asyncio.run(_load_and_close(a, "v1", tmp_path / "nowhere"))
    assert not rec.ok and rec.error.startswith("server_refused") and "nowhere" in rec.error, rec.error


def test_a_server_that_is_down_is_unreachable(kserve, tmp_path):
    v1 = write_mlp(tmp_path / "v1", seed=7)
    a = adapter(kserve, "down", url=f"http://127.0.0.1:{free_port()}")
    rec = asyncio.run(_load_and_close(a, "v1", v1))
    assert not rec.ok and rec.error.startswith("server_unreachable"), rec.error
    assert rec.changed  # it cannot know what the server holds


def test_an_answer_from_another_version_is_a_wrong_version(kserve, tmp_path):
    v1 = write_mlp(tmp_path / "v1", seed=8)
    a = adapter(kserve, "other")

    async def go():
        try:
            assert (await a.load("v1", v1, None)).ok
            with pytest.raises(Exception) as e:
                await a.check("v9")
            return e.value
        finally:
            await a.close()

    err = asyncio.run(go())
    assert getattr(err, "code", None) == "server_wrong_version" and "v1" in str(err)


def test_a_triton_version_policy_other_than_latest_one_is_refused(kserve, tmp_path):
    v1 = write_mlp(tmp_path / "v1", seed=9)
    (kserve.repository / "tri").mkdir(parents=True)
    (kserve.repository / "tri" / "config.pbtxt").write_text(
        'backend: "python"\n# version_policy: { latest: { num_versions: 1 } }\nversion_policy: { all { } }\n')
    rec = asyncio.run(_load_and_close(adapter(kserve, "tri", kind="triton"), "v1", v1))
    assert not rec.ok and rec.error.startswith("server_refused") and "version_policy" in rec.error, rec.error


@pytest.mark.parametrize("options, key", [({"repository": ""}, "repository"), ({"bogus": 1}, "bogus"),
                                          ({"probe_interval": 0}, "probe_interval")])
def test_options_are_checked_naming_the_key(kserve, options, key):
    with pytest.raises(ConfigError, match=key):
        adapter(kserve, "cfg", **options)


# --- docs/serving.md "Triton and KServe" follows the code ----------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def _section_blocks(lang: str) -> list[str]:
    text = DOC.read_text()
    section = text.split("## Triton and KServe", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{lang}\n(.*?)^```", section, re.S | re.M)


def test_the_documented_site_toml_block_configures_this_adapter(tmp_path):
    (block,) = _section_blocks("toml")
    cfg = parse_servers(tomllib.loads(block)["servers"], "site.toml", tmp_path, ("mlp",))[0]
    a = KserveAdapter(cfg)
    assert (cfg.kind, cfg.model, a.model_dir) == ("kserve", "mlp", Path("/srv/models/mlp"))
    assert a.health_request() == golden_request()  # the documented golden request is the tests' one
    assert cfg.timeouts.load_s == 600 and cfg.health.tolerance == 0.05


def test_the_documented_index_is_what_the_layout_writes(tmp_path):
    (example,) = _section_blocks("json")
    d = tmp_path / "mlp"
    for version in ("v0", "v1", "v2"):
        v2_repository.lay_out(d, version, write_mlp(tmp_path / version, seed=1))
    v2_repository.keep_only(d, {2, 3})
    assert json.loads((d / v2_repository.INDEX).read_text()) == json.loads(example)
    assert v2_repository.newest(d)[::2] == (3, "v2")


# --- kind "triton": Triton's documented REST behaviour, as a stand-in --------------------------

class TritonStandIn:
    """Explicit model control as Triton documents it: a load serves the highest numbered folder
    (version policy latest 1), a failed load answers 400 and keeps the loaded version, infer
    answers the number as `model_version`, and `versions/<n>/ready` is per version."""

    kind = "triton"

    def __init__(self, repository: Path):
        self.repository, self.loaded = repository, {}  # model -> (number, Dense)

    def app(self):
        from aiohttp import web

        async def load(request):
            from agents.serving.dense import Dense
            name = request.match_info["m"]
            found = v2_repository.newest(self.repository / name)
            try:
                self.loaded[name] = (found[0], Dense.from_folder(found[1]))
            except (TypeError, ValueError, OSError) as e:
                return web.json_response({"error": f"failed to load '{name}': {e}"}, status=400)
            return web.json_response({})

        async def ready(request):
            got = self.loaded.get(request.match_info["m"])
            return web.Response(status=200 if got and str(got[0]) == request.match_info["n"] else 400)

        async def infer(request):
            import numpy as np
            n, net = self.loaded[request.match_info["m"]]
            x = (await request.json())["inputs"][0]
            y = net.forward(np.array(x["data"], dtype=np.float32).reshape(x["shape"]))
            return web.json_response({"model_name": request.match_info["m"], "model_version": str(n),
                                      "outputs": [{"name": "output", "datatype": "FP32", "shape": list(y.shape),
                                                   "data": y.flatten().tolist()}]})

        app = web.Application()
        app.router.add_post("/v2/repository/models/{m}/load", load)
        app.router.add_get("/v2/models/{m}/versions/{n}/ready", ready)
        app.router.add_post("/v2/models/{m}/infer", infer)
        return app


def test_triton_numbers_map_back_to_fabric_versions_and_a_refused_load_keeps_the_old(tmp_path):
    from helpers.inference_servers import ServerThread

    v1, v2 = write_mlp(tmp_path / "v1", seed=1), write_mlp(tmp_path / "v2", seed=2, base=1, step=1e-3)
    empty = tmp_path / "empty"  # no weights: the backend fails to load it
    empty.mkdir()
    (empty / "README.md").write_text("no weights here\n")
    triton = TritonStandIn(tmp_path / "repository")
    with ServerThread(triton) as server:
        a = KserveAdapter(ServerConfig(name="tri", kind="triton", url=server.url, model="mlp",
                                       health=HealthCheck(request=golden_request(), expect=expected(v1),
                                                          tolerance=0.05),
                                       timeouts=Timeouts(connect_s=2, load_s=10, health_s=5),
                                       extras={"repository": str(triton.repository)}))

        async def go():
            try:
                assert (await a.load("v1", v1, None)).ok
                assert (await a.load("v2", v2, ("v1", v1))).ok
                assert triton.loaded["mlp"][0] == 2 and await a.serving() == "v2"  # "2" maps back to v2
                bad = await a.load("empty", empty, ("v2", v2))
                assert not bad.ok and bad.error.startswith("server_refused") and not bad.changed, bad.error
                assert await a.serving() == "v2"
                back = await a.restore(("v2", v2))
                assert back.ok and await a.serving() == "v2", back.error
                assert v2_repository.numbers(triton.repository / "mlp") == [2]
            finally:
                await a.close()

        asyncio.run(go())
