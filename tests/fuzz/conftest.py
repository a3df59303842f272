"""The generated-input suite's fleet: one real origin, one site agent and one push hook.

`--fuzz-cases N` (tests/conftest.py; default 1500, `make fuzz` 10000) is the number of
generated inputs the suite sends in all; `budget(share)` is one test's part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.publish import publish
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.files import write_tree
from helpers.http import request
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, start_origin, write_token_file
from helpers.ports import free_port
from helpers.s3 import HookProcess, hook_config

HOOK_TOKEN = "hook-secret-2f9a"  # helpers.s3.hook_config's default
MAX_RSS = 1 << 30  # no process of the fleet may grow past this while it is fuzzed


@dataclass
class Fleet:
    origin: object
    agent: AgentProcess
    hook: HookProcess
    root: Path

    def procs(self) -> dict:
        return {"origin": self.origin, "agent": self.agent, "hook": self.hook}

    def publish(self, version: str, data: bytes) -> None:
        src = write_tree(self.root / f"src-{version}", {"model.bin": data, "config.json": b"{}"})
        with SyncOrigin(self.origin.url, PUBLISH_SECRET) as so:
            publish(src, artifact="m", target=RemoteTarget(so), version=version, channel="prod")

    def check_alive(self) -> dict[str, int]:
        """Every process runs, answers /livez, and stays under MAX_RSS; returns each one's RSS."""
        rss = {}
        for name, p in self.procs().items():
            assert p.proc.poll() is None, f"{name} died:\n{p.log_text()[-3000:]}"
            assert request(p.url, "GET", "/livez", timeout=10).status == 200, name
            rss[name] = rss_of(p.proc.pid)
            assert rss[name] < MAX_RSS, (name, rss[name])
        return rss


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="session")
def fuzz_cases(pytestconfig) -> int:
    return pytestconfig.getoption("--fuzz-cases")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-fleet")
    origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
    fleet = Fleet(origin, None, None, root)  # type: ignore[arg-type]
    fleet.publish("v1", b"one" * 3000)
    tokens = write_token_file(root / "agent-tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    fleet.agent = AgentProcess(root, "solo", origin.url, follow=["m:prod"], tokens=tokens).start()
    fleet.agent.wait_active("m", "v1")
    port = free_port()
    (root / "hook").mkdir()
    cfg = hook_config(root / "hook", port=port, bucket="fuzz", endpoint="http://127.0.0.1:9",
                      origin=(origin.url, PUBLISH_SECRET))
    fleet.hook = HookProcess(cfg, port).start()
    try:
        yield fleet
    finally:
        for p in (fleet.hook, fleet.agent, origin):
            p.stop()


__all__ = ["Fleet", "HOOK_TOKEN", "MAX_RSS", "SITE_SECRETS", "rss_of"]
