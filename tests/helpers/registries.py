"""The Prometheus registry each server role serves at /metrics, from apps built in this
process (no sockets), and the metric names they expose."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from .agent import SITE_SECRETS, SITE_TOKENS
from .origin import DEFAULT_TOKENS

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "info": ("_info",), "summary": ("_sum", "_count")}


def server_registries(tmp: Path) -> dict[str, CollectorRegistry]:
    """{"origin"|"agent"|"hook": its registry}; `tmp` holds their stores and queue."""
    from agents.site.agent import SiteAgent
    from agents.site.app import create_app as agent_app
    from agents.site.config import SiteConfig
    from fabric.hook.app import create_app as hook_app
    from fabric.hook.config import HookConfig
    from fabric.origin.app import create_app as origin_app
    from fabric.store.store import open_store
    from fabric.wire.auth import TokenTable
    from fabric.wire.server import METRICS

    origin = origin_app(open_store(tmp / "o", create=True), TokenTable.from_dict({"token": DEFAULT_TOKENS + SITE_TOKENS}))
    site = SiteConfig.from_dict({"site": "solo", "data": str(tmp / "site"), "listen": "127.0.0.1:1",
                                 "origin": "http://127.0.0.1:1", "token": SITE_SECRETS["solo"], "follow": ["m:prod"]})
    agent = agent_app(SiteAgent(site))
    hook = hook_app(HookConfig.from_dict({"listen": "127.0.0.1:1", "token": "hook-token-0123456789",
                                          "store": str(tmp / "hs"), "queue": str(tmp / "q.db"),
                                          "s3": {"endpoint": "http://127.0.0.1:1"},
                                          "rule": [{"bucket": "b", "prefix": "r/{run}/", "artifact": "{run}",
                                                    "version": "v1", "complete": "dcp"}]}), start_worker=False)
    return {name: app[METRICS].registry for name, app in (("origin", origin), ("agent", agent), ("hook", hook))}


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can expose (a labelled metric before its first sample too)."""
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}
