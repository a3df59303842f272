"""Metrics: Prometheus's naming conventions on every server, `fabric_build_info`, the
origin's per-site gauges, and the token-free metrics listener (real processes)."""

from __future__ import annotations

import platform
import socket
import time

import pytest
from prometheus_client import CollectorRegistry

from agents.site.config import SiteConfig
from fabric.hook.config import HookConfig
from fabric.store.store import open_store

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, parse_metrics, start_origin
from helpers.ports import free_port
from helpers.registries import server_registries
from helpers.s3 import HookProcess, hook_config
from topology.lab import HOST_DISK_RETENTION

ALL_TOKENS = DEFAULT_TOKENS + SITE_TOKENS


def test_every_metric_follows_prometheus_naming(tmp_path):
    bad = []
    for role, registry in server_registries(tmp_path).items():
        for family in registry.collect():
            name, kind = family.name, family.type
            exposed = {s.name for s in family.samples}
            if kind == "counter" and not all(n.endswith(("_total", "_created")) for n in exposed):
                bad.append(f"{role}: counter {name}")
            if kind == "gauge" and name.endswith("_total"):
                bad.append(f"{role}: gauge {name} ends in _total")
            if kind == "histogram" and not name.endswith("_seconds"):
                bad.append(f"{role}: histogram {name} is not in seconds")
            if not name.startswith("fabric_"):
                bad.append(f"{role}: {name} lacks the fabric_ prefix")
    assert bad == []


def test_every_server_says_its_build(tmp_path):
    for role, registry in server_registries(tmp_path).items():
        [info] = [f for f in registry.collect() if f.name == "fabric_build_info"]
        [sample] = info.samples
        assert sample.value == 1, role
        assert sample.labels["python"] == platform.python_version(), role
        assert sample.labels["version"] not in ("", "unknown"), role


def test_the_agent_exposes_sync_bytes_expected_not_a_gauge_named_total(tmp_path):
    names = {f.name for f in server_registries(tmp_path)["agent"].collect()}
    assert {"fabric_agent_sync_bytes_expected", "fabric_agent_deploy_seconds", "fabric_agent_activation_seconds",
            "fabric_agent_canary_rejections", "fabric_agent_disk_high_watermark_ratio"} <= names
    assert "fabric_agent_sync_bytes_total" not in names


def test_the_origin_says_how_old_each_site_report_is_and_which_sites_are_stale(tmp_path):
    import asyncio
    from fabric.core.manifest import Manifest  # noqa: F401 - the registry's versions come from publish
    from fabric.publish import LocalTarget, publish
    from fabric.store.registry import Registry
    from fabric.origin.metrics import OriginMetrics
    store = open_store(tmp_path / "o", create=True)
    src = tmp_path / "src"
    src.mkdir()
    for v in ("v1", "v2"):
        (src / "f.txt").write_text(v)
        publish(src, artifact="m", version=v, target=LocalTarget(store), channel="prod")
    now = time.time()
    sites = {"fresh": {"site": "fresh", "received": now - 1, "channels": [{"artifact": "m", "channel": "prod",
                                                                          "active": "v2"}]},
             "behind": {"site": "behind", "received": now - 120, "channels": [{"artifact": "m", "channel": "prod",
                                                                              "active": "v1"}]},
             "odd": {"site": "odd", "received": now, "channels": [{"artifact": "gone", "channel": "x"}, 7]}}
    registry = CollectorRegistry()
    asyncio.run(OriginMetrics(registry).refresh(sites, Registry(store)))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples}
    assert got[("fabric_origin_site_report_age_seconds", (("site", "behind"),))] == pytest.approx(120, abs=5)
    assert got[("fabric_origin_site_report_age_seconds", (("site", "fresh"),))] < 5
    stale = {dict(k[1])["site"]: v for k, v in got.items() if k[0] == "fabric_origin_site_version_stale"}
    assert stale == {"fresh": 0, "behind": 1}  # "odd" follows no channel the origin has


def _with_settings(agent: AgentProcess, **settings: str) -> AgentProcess:
    """Put top-level keys first in the agent's config (before its [tables])."""
    head = "".join(f'{k} = "{v}"\n' for k, v in settings.items())
    agent.config.write_text(head + agent.config.read_text())
    return agent


def _scrape(url: str, token: str | None = None) -> tuple[int, str]:
    r = request(url, "GET", "/metrics", token=token, timeout=5)
    return r.status, r.body.decode(errors="replace")


def test_the_agent_metrics_listener_answers_without_a_token_and_the_main_one_still_refuses(tmp_path):
    origin = start_origin(tmp_path / "origin", ALL_TOKENS)
    mport = free_port()
    agent = _with_settings(AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"]),
                           metrics_listen=f"127.0.0.1:{mport}")
    try:
        agent.start()
        status, text = _scrape(f"http://127.0.0.1:{mport}")
        assert status == 200, text
        m = parse_metrics(text)
        # the configured watermark, as the test agent sets it (the host's disk is not the site's)
        assert m['fabric_agent_disk_high_watermark_ratio'] == pytest.approx(HOST_DISK_RETENTION["high_watermark"])
        assert any(k.startswith("fabric_build_info{") for k in m)
        assert _scrape(agent.url)[0] == 401  # the main listener: a token, as before
        assert _scrape(agent.url, SITE_SECRETS["solo"])[0] == 200
    finally:
        agent.stop()
        origin.stop()
    with pytest.raises(OSError):  # the metrics listener went away with the agent
        socket.create_connection(("127.0.0.1", mport), timeout=1).close()


def test_the_hook_metrics_listener_answers_without_a_token_and_the_main_one_still_refuses(tmp_path):
    port, mport = free_port(), free_port()
    cfg = hook_config(tmp_path, port=port, bucket="b", endpoint="http://127.0.0.1:1",
                      extra=f'metrics_listen = "127.0.0.1:{mport}"')
    with HookProcess(cfg, port) as hook:
        status, text = _scrape(f"http://127.0.0.1:{mport}")
        assert status == 200, text
        assert "fabric_hook_queue_depth" in text and "fabric_build_info{" in text
        assert _scrape(hook.url)[0] == 401
        assert _scrape(hook.url, "hook-secret-2f9a")[0] == 200


@pytest.mark.parametrize("where, raw", [
    ("agent", {"site": "s", "data": "/tmp/x", "listen": "127.0.0.1:7070", "origin": "http://o:1",
               "token": "t" * 20, "follow": ["m:prod"], "metrics_listen": "nowhere"}),
    ("hook", {"listen": "127.0.0.1:7100", "token": "hook-token-0123456789", "store": "/tmp/s",
              "metrics_listen": "nowhere", "rule": [{"bucket": "b", "prefix": "r/{run}/", "artifact": "{run}",
                                                     "version": "v1", "complete": "dcp"}]}),
])
def test_a_bad_metrics_listen_is_refused_naming_the_key(where, raw):
    from fabric.errors import ConfigError
    load = SiteConfig.from_dict if where == "agent" else HookConfig.from_dict
    with pytest.raises(ConfigError) as e:
        load(raw, f"{where}.toml")
    assert f"{where}.toml: metrics_listen: must be HOST:PORT" in e.value.message


def test_the_origin_metrics_listener_answers_without_a_token_and_the_main_one_still_refuses(tmp_path):
    from helpers.origin import OriginProcess, write_token_file
    mport = free_port()
    tokens = write_token_file(tmp_path / "tokens.toml", ALL_TOKENS)
    with OriginProcess(tmp_path / "store", tokens, tmp_path / "origin.log",
                       args=["--metrics-listen", f"127.0.0.1:{mport}"]) as origin:
        status, text = _scrape(f"http://127.0.0.1:{mport}")
        assert status == 200, text
        m = parse_metrics(text)
        assert m[f'fabric_build_info{{python="{platform.python_version()}",version="0.1.0"}}'] == 1
        assert _scrape(origin.url)[0] == 401
        assert origin.metrics(ADMIN_SECRET)["fabric_bytes_sent_total"] == 0
        assert request(f"http://127.0.0.1:{mport}", "GET", "/v1/artifacts", timeout=5).status == 404  # metrics only


def test_a_bad_metrics_listen_flag_is_refused_naming_the_flag(tmp_path):
    from helpers.origin import fabric, write_token_file
    tokens = write_token_file(tmp_path / "tokens.toml", ALL_TOKENS)
    p = fabric("origin", "--store", tmp_path / "s", "--tokens", tokens, "--metrics-listen", "nowhere", timeout=60)
    assert p.returncode == 2 and "--metrics-listen 'nowhere': expected HOST:PORT" in p.stderr, p.stderr
