"""docs/README.md's endpoint index names exactly the routes each role's app registers.

Each role's real app is built (the origin, a site agent, the push hook, the reference
worker) and its router read; the index must list every route, and nothing more.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INDEX = (ROOT / "docs" / "README.md").read_text()


def documented(role: str) -> set[str]:
    """`METHOD /path` of every row of the role's table under "### {role}"."""
    section = INDEX.split(f"### {role}", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    routes = set()
    for row in rows:
        first_cell = row.split("|")[1]
        routes.update(re.findall(r"`([A-Z]+ /[^`]*)`", first_cell))
    return routes


def registered(app) -> set[str]:
    return {f"{r.method} {r.resource.canonical}" for r in app.router.routes() if r.method not in ("HEAD", "*")}


def test_origin_routes(tmp_path):
    from fabric.origin.app import create_app
    from fabric.store import open_store
    from fabric.wire.auth import TokenTable
    tokens = TokenTable.from_dict({"token": [{"name": "ops", "secret": "x" * 32, "scopes": ["admin"]}]})
    assert registered(create_app(open_store(tmp_path / "store"), tokens)) == documented("Origin")


def test_site_agent_routes(tmp_path):
    from agents.site.agent import SiteAgent
    from agents.site.app import create_app
    from agents.site.config import SiteConfig
    cfg = SiteConfig.from_dict({"site": "fra-edge-1", "data": str(tmp_path / "site"), "listen": "127.0.0.1:0",
                                "origin": "http://127.0.0.1:9", "token": "t" * 32,
                                "follow": ["demo-mlp:prod"]}, "site.toml", tmp_path)
    assert registered(create_app(SiteAgent(cfg))) == documented("Site agent")


def test_hook_routes(tmp_path):
    from fabric.hook.app import create_app
    from fabric.hook.config import HookConfig
    cfg = HookConfig.from_dict({"listen": "127.0.0.1:0", "token": "h" * 32, "origin": "http://127.0.0.1:9",
                                "origin_token": "o" * 32, "queue": str(tmp_path / "queue.db"),
                                "s3": {"endpoint": "http://127.0.0.1:9"},
                                "rule": [{"bucket": "ckpt", "prefix": "runs/{run}/", "artifact": "{run}", "version": "v1",
                                          "complete": "marker:DONE"}]},
                               "hook.toml", tmp_path)
    assert registered(create_app(cfg, start_worker=False)) == documented("Push hook")


def test_reference_worker_routes():
    pytest.importorskip("torch")
    from agents.worker.hotloader import HotLoader
    from agents.worker.reference import DemoModel, create_app
    loader = HotLoader("http://127.0.0.1:9", "demo-mlp", "prod", DemoModel())
    assert registered(create_app(loader)) == documented("Reference worker")
