"""Site agents on loopback: real origin and agent processes, and the faults they survive.

(The same flows inside network namespaces with shaped links are in test_lab_e2e.py.)
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from agents.site.config import SiteConfig
from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.errors import ConfigError
from fabric.core.manifest import Manifest
from fabric.publish import publish
from fabric.pull import verify_tree
from fabric.store.store import open_store

from helpers.agent import SITE_TOKENS, AgentProcess, write_config
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, start_origin, tree_digest, write_token_file
from helpers.wait import wait_until

ALL_TOKENS = DEFAULT_TOKENS + SITE_TOKENS


def make_model(folder: Path, seed: int, tensors: int = 8, size: int = 1 << 20, changed: set[int] = frozenset()):
    """A safetensors model of `tensors` float32 tensors of `size` bytes; `changed` ones differ from seed 0's."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(tensors):
        rng = np.random.default_rng((seed if i in changed else 0, i))
        out[f"layer{i}.weight"] = rng.standard_normal(size // 4).astype(np.float32)
    save_file(out, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"layers": %d}' % tensors)
    return folder


def publish_to(origin_url: str, src: Path, artifact: str, version: str, channel: str = "prod"):
    with SyncOrigin(origin_url, PUBLISH_SECRET) as so:
        return publish(src, artifact=artifact, target=RemoteTarget(so), version=version, channel=channel)


@pytest.fixture
def origin(tmp_path):
    o = start_origin(tmp_path / "origin", ALL_TOKENS)
    yield o
    o.stop()


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    return write_token_file(tmp_path / "relay-tokens.toml", ALL_TOKENS)


# --- configuration -----------------------------------------------------------------------

def _cfg(**over) -> dict:
    base = {"site": "s1", "data": "/tmp/x", "listen": "127.0.0.1:7070", "origin": "http://127.0.0.1:7000",
            "token": "t" * 20, "follow": ["m:prod"]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("over, key", [
    ({"site": None}, "site"),
    ({"listen": "nowhere"}, "listen"),
    ({"origin": "ftp://x"}, "origin"),
    ({"follow": ["no-channel"]}, "follow"),
    ({"follow": []}, "follow"),
    ({"follow": ["m:prod", "m:canary"]}, "follow"),
    ({"token": None}, "token"),
    ({"token_file": "/nonexistent/token"}, "token"),
    ({"surprise": 1}, "surprise"),
    ({"retention": {"keep": 0}}, "keep"),
    ({"retention": {"high_watermark": 0.5, "low_watermark": 0.9}}, "low_watermark"),
    ({"sync": {"connections": 0}}, "connections"),
    ({"sync": {"max_rate": "fast"}}, "max_rate"),
    ({"upstreams": ["not-a-url"]}, "upstreams"),
])
def test_bad_config_names_the_key(over, key):
    with pytest.raises(ConfigError) as e:
        SiteConfig.from_dict(_cfg(**over), "site.toml")
    assert key in str(e.value)


def test_good_config_loads_with_defaults(tmp_path):
    cfg = SiteConfig.from_dict(_cfg(retention={"keep": 2}, sync={"max_rate": "50M"}), "site.toml", base=tmp_path)
    assert cfg.follow == (("m", "prod"),)
    assert cfg.retention.keep == 2 and cfg.sync.max_rate == 50e6
    assert cfg.topology is None and cfg.upstreams == ()


def test_agent_refuses_bad_config_and_missing_topology(tmp_path):
    from helpers.origin import fabric
    bad = write_config(tmp_path / "bad.toml", {"site": "s1", "data": str(tmp_path / "d"), "listen": "x"})
    p = fabric("agent", "--config", bad, timeout=60)
    assert p.returncode == 2 and "listen" in p.stderr
    cfg = _cfg(data=str(tmp_path / "d"), topology=str(tmp_path / "missing.toml"))
    p = fabric("agent", "--config", write_config(tmp_path / "t.toml", cfg), timeout=60)
    assert p.returncode == 2 and "missing.toml" in p.stderr
    topo = tmp_path / "topo.toml"
    topo.write_text('[[site]]\nname = "other"\nregion = "eu"\nupstream = "origin"\n')
    cfg = _cfg(data=str(tmp_path / "d"), topology=str(topo))
    p = fabric("agent", "--config", write_config(tmp_path / "t2.toml", cfg), timeout=60)
    assert p.returncode == 2 and "'s1' is not in the topology" in p.stderr


# --- the happy path through a relay tree -------------------------------------------------------

def test_tree_replicates_each_chunk_once_from_the_origin(tmp_path, origin, tokens_file):
    v1 = make_model(tmp_path / "v1", seed=1)
    v2 = make_model(tmp_path / "v2", seed=2, changed={0, 3})
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=["m:prod"], tokens=tokens_file).start()
    edges = [AgentProcess(tmp_path, name, origin.url, follow=["m:prod"], tokens=tokens_file,
                          upstreams=[hub.url]).start() for name in ("edge-a", "edge-b")]
    try:
        sent0 = origin.counter("fabric_bytes_sent_total")
        r1 = publish_to(origin.url, v1, "m", "v1")
        for a in [hub, *edges]:
            a.wait_active("m", "v1")
        sent1 = origin.counter("fabric_bytes_sent_total")
        r2 = publish_to(origin.url, v2, "m", "v2")
        for a in [hub, *edges]:
            a.wait_active("m", "v2")
        sent2 = origin.counter("fabric_bytes_sent_total")
        for a in [hub, *edges]:
            assert tree_digest(a.data / "current" / "m") == tree_digest(v2)
        # The origin sent each chunk once (to the hub), not once per site.
        v1_bytes = r1.bytes  # float32 noise barely compresses; stored == sent
        assert sent1 - sent0 <= 1.05 * v1_bytes
        assert sent2 - sent1 <= 1.05 * r2.new_bytes + 4096
        # Edges got their chunks from the hub.
        for e in edges:
            by_source = {k: v for k, v in e.metrics().items() if k.startswith("fabric_agent_bytes_by_source_total")}
            assert by_source.get(f'fabric_agent_bytes_by_source_total{{source="{hub.url}"}}', 0) > 0.9 * v1_bytes
        # Every site reports to the origin, and `fabric status` lists them.
        from helpers.origin import fabric_json

        def actives():  # reports go every report_interval, the edges' through the hub
            st = fabric_json("status", "--origin", origin.url, "--token", ADMIN_SECRET)  # every site: admin only
            shown = {s["site"]: s["channels"][0]["active"] for s in st["sites"]}
            return shown if shown == {"hub": "v2", "edge-a": "v2", "edge-b": "v2"} else None
        wait_until(actives, timeout=20, interval=0.2, what="every site's report of v2 in `fabric status`")
    finally:
        for a in [*edges, hub]:
            a.stop()


def test_retention_keeps_last_n_and_pins(tmp_path, origin, tokens_file):
    agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"], tokens=tokens_file,
                         retention={"keep": 2}).start()
    try:
        for i in range(1, 5):
            publish_to(origin.url, make_model(tmp_path / f"v{i}", seed=i, tensors=3, changed={0, 1, 2}), "m", f"v{i}")
            agent.wait_active("m", f"v{i}")
            if i == 1:
                from helpers.origin import fabric_json
                pins = fabric_json("pin", "m@v1", "--agent", agent.url, "--token", ADMIN_SECRET)
                assert pins["pins"] == ["m@v1"]
        def kept():  # retention runs after the activation
            return sorted(p.name for p in (agent.data / "versions" / "m").iterdir())
        wait_until(lambda: kept() == ["v1", "v3", "v4"], timeout=10,  # last two, plus the pinned v1
                   what="retention to keep v1, v3 and v4")
        store = open_store(agent.data / "store")
        # Chunks of dropped v2 are gone; every kept version is still complete.
        from fabric.store.registry import Registry
        reg = Registry(store)
        assert sorted(reg.versions("m")) == ["v1", "v3", "v4"]
        for v in ("v1", "v3", "v4"):
            assert not store.missing(reg.manifest("m", v).chunk_ids())
    finally:
        agent.stop()


# --- faults -------------------------------------------------------------------------------------

def test_kill_9_during_sync_never_activates_a_partial_version(tmp_path, origin, tokens_file):
    """20 trials: kill -9 the agent at random points of a sync; restart; it resumes and finishes."""
    v1 = make_model(tmp_path / "v1", seed=1, tensors=4, size=1 << 20)
    big = make_model(tmp_path / "v2", seed=2, tensors=24, size=2 << 20, changed=set(range(24)))
    publish_to(origin.url, v1, "m", "v1")
    agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"], tokens=tokens_file,
                         sync={"max_rate": "60M", "connections": 2})
    agent.start()
    agent.wait_active("m", "v1")
    publish_to(origin.url, big, "m", "v2")
    v1_tree = tree_digest(v1)
    rnd = random.Random(7)
    chunk_counts = []
    try:
        for trial in range(20):
            time.sleep(rnd.uniform(0.05, 0.6))
            agent.kill()
            active = agent.active("m")
            assert active in ("v1", "v2")
            if active == "v1":
                assert tree_digest(agent.data / "current" / "m") == v1_tree
            else:
                m = Manifest.from_bytes(open_store(agent.data / "store").get_manifest_bytes(
                    _manifest_id(agent, "v2")))
                verify_tree(m, agent.data / "current" / "m")
            chunk_counts.append(sum(len(f) for _, _, f in os.walk(agent.data / "store" / "chunks")))
            agent.start()
        agent.wait_active("m", "v2", timeout=120)
        assert tree_digest(agent.data / "current" / "m") == tree_digest(big)
        assert chunk_counts == sorted(chunk_counts)  # every restart kept what earlier runs fetched
    finally:
        agent.stop()


def _manifest_id(agent: AgentProcess, version: str) -> str:
    return (agent.data / "store" / "refs" / "m" / "versions" / version).read_text()


def test_origin_down_keeps_active_version_and_catches_up(tmp_path, origin, tokens_file):
    agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"], tokens=tokens_file).start()
    try:
        v1 = make_model(tmp_path / "v1", seed=1, tensors=3)
        publish_to(origin.url, v1, "m", "v1")
        agent.wait_active("m", "v1")
        origin.kill()
        time.sleep(3)  # the agent retries with backoff meanwhile
        assert agent.active("m") == "v1" and tree_digest(agent.data / "current" / "m") == tree_digest(v1)
        assert agent.proc.poll() is None
        origin.restart()
        publish_to(origin.url, make_model(tmp_path / "v2", seed=2, tensors=3, changed={1}), "m", "v2")
        agent.wait_active("m", "v2", timeout=60)
    finally:
        agent.stop()


def test_dead_relay_children_fall_back_to_the_origin(tmp_path, origin, tokens_file):
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=["other:prod"], tokens=tokens_file).start()
    edge = AgentProcess(tmp_path, "edge-a", origin.url, follow=["m:prod"], tokens=tokens_file,
                        upstreams=[hub.url], sync={"max_rate": "40M"}).start()
    try:
        v1 = make_model(tmp_path / "v1", seed=1, tensors=16, size=2 << 20)
        publish_to(origin.url, v1, "m", "v1")
        deadline = time.monotonic() + 30
        while not any((edge.data / "store" / "chunks").rglob("*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        hub.kill()  # mid-transfer
        edge.wait_active("m", "v1", timeout=90)
        assert tree_digest(edge.data / "current" / "m") == tree_digest(v1)
        m = edge.metrics()
        assert m.get(f'fabric_agent_bytes_by_source_total{{source="{origin.url}"}}', 0) > 0
    finally:
        edge.stop()
        hub.stop()


def test_corrupt_relay_is_detected_bypassed_and_reported(tmp_path, origin, tokens_file):
    v1 = make_model(tmp_path / "v1", seed=1, tensors=6)
    publish_to(origin.url, v1, "m", "v1")
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=["m:prod"], tokens=tokens_file).start()
    hub.wait_active("m", "v1")
    # Flip a byte of every chunk the hub holds, as a failing disk would: in its packs (the
    # version folder's files, which its store shares) and in any object of its own, with
    # the files' times kept, so nothing but the bytes tells.
    store = hub.data / "store"
    flipped = 0
    for path in [*(store / "packs").rglob("*"), *(store / "chunks").rglob("*")]:
        if path.is_file() and path.stat().st_size > 128:  # a pack, or an object (not a pack reference)
            st = path.stat()
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            with open(path, "r+b") as f:
                f.write(bytes(data))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            flipped += 1
    assert flipped >= 1
    edge = AgentProcess(tmp_path, "edge-a", origin.url, follow=["m:prod"], tokens=tokens_file,
                        upstreams=[hub.url]).start()
    try:
        edge.wait_active("m", "v1", timeout=60)
        assert tree_digest(edge.data / "current" / "m") == tree_digest(v1)
        bad = edge.metrics().get(f'fabric_agent_bad_chunks_total{{source="{hub.url}"}}', 0)
        assert bad >= 1
        from fabric.fsck import fsck
        assert fsck(open_store(edge.data / "store")).ok
    finally:
        edge.stop()
        hub.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_cleanly_and_keeps_active_version(tmp_path, origin, tokens_file, tiny_disk):
    small = make_model(tmp_path / "v1", seed=1, tensors=2, size=1 << 20)
    publish_to(origin.url, small, "m", "v1")
    agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"], tokens=tokens_file,
                         data=tiny_disk / "site").start()
    try:
        agent.wait_active("m", "v1")
        big = make_model(tmp_path / "v2", seed=2, tensors=12, size=1 << 20, changed=set(range(12)))
        publish_to(origin.url, big, "m", "v2")
        deadline = time.monotonic() + 30
        error = None
        while time.monotonic() < deadline and not error:
            error = agent.status()["channels"][0]["error"]
            time.sleep(0.2)
        assert error and "store_full" in error, agent.log_text()[-2000:]
        assert agent.active("m") == "v1"
        assert tree_digest(agent.data / "current" / "m") == tree_digest(small)
        assert not (agent.data / "versions" / "m" / "v2").exists()
    finally:
        agent.stop()


def test_site_token_without_pull_scope_is_a_clear_error(tmp_path, origin, tokens_file):
    tokens = ALL_TOKENS + [{"name": "no-pull", "secret": "no-pull-secret-5e1d0c9b8a", "scopes": ["publish"],
                            "artifacts": ["other-*"]}]
    origin.tokens.write_text("")
    write_token_file(origin.tokens, tokens)
    origin.restart()
    publish_to(origin.url, make_model(tmp_path / "v1", seed=1, tensors=2), "m", "v1")
    agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"], tokens=tokens_file,
                         token="no-pull-secret-5e1d0c9b8a").start()
    try:
        deadline = time.monotonic() + 20
        error = None
        while time.monotonic() < deadline and not error:
            error = agent.status()["channels"][0]["error"]
            time.sleep(0.2)
        assert error and "forbidden" in error
        assert agent.active("m") is None
        assert "no-pull-secret" not in agent.log_text()
    finally:
        agent.stop()


def test_hubs_under_the_origin_split_its_uplink_by_chunk_owner(tmp_path, origin, tokens_file):
    """Two hubs right under the origin: each chunk leaves the origin once, not once per hub."""
    from helpers.ports import free_port
    ports = {"hub": free_port(), "edge-a": free_port()}
    topo = tmp_path / "topo.toml"
    topo.write_text(f'[origin]\nurl = "{origin.url}"\n' + "".join(
        f'[[site]]\nname = "{name}"\nregion = "eu"\nupstream = "origin"\nurl = "http://127.0.0.1:{port}"\n'
        for name, port in ports.items()))
    hubs = [AgentProcess(tmp_path, name, origin.url, follow=["m:prod"], tokens=tokens_file, port=port,
                         topology=topo).start() for name, port in ports.items()]
    try:
        v1 = make_model(tmp_path / "v1", seed=1, tensors=12)
        sent0 = origin.counter("fabric_bytes_sent_total")
        r = publish_to(origin.url, v1, "m", "v1")
        for h in hubs:
            h.wait_active("m", "v1")
            assert tree_digest(h.data / "current" / "m") == tree_digest(v1)
        sent = origin.counter("fabric_bytes_sent_total") - sent0
        assert sent <= 1.05 * r.bytes, f"origin sent {sent} for a {r.bytes}-byte version"
        for h, other in ((hubs[0], hubs[1]), (hubs[1], hubs[0])):
            got = h.metrics().get(f'fabric_agent_bytes_by_source_total{{source="{other.url}"}}', 0)
            assert got > 0.2 * r.bytes  # about half its chunks came from the other hub
    finally:
        for h in hubs:
            h.stop()


def test_a_bug_in_one_status_report_does_not_end_the_reports():
    """The report loop outlives an exception that is not a FabricError (a bug in a report)."""
    import asyncio
    from types import SimpleNamespace

    from agents.site.agent import SiteAgent
    from fabric.errors import TransferError

    sent, calls = [], iter([KeyError("a bug"), TransferError("upstream down"), None, None])

    def status():
        e = next(calls)
        if e is not None:
            raise e
        return {"ok": True}

    async def report_site(site, body):
        sent.append(body)

    fake = SimpleNamespace(status=status, subtree=SimpleNamespace(bodies=lambda own: [own]),
                           control=SimpleNamespace(report_site=report_site),
                           cfg=SimpleNamespace(site="s1", report_interval=0.01))

    async def run():
        task = asyncio.create_task(SiteAgent.report_loop(fake))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(sent) >= 2:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(run())
    assert sent == [{"ok": True}, {"ok": True}]  # the reports after the bug and the failure went out
