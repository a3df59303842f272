"""README "Deploy" matches deploy/: every file it names exists, its site.toml loads with
the agent's checker, and the paths it gives are the ones the units use."""

from __future__ import annotations

import re
from pathlib import Path

from agents.site.config import SiteConfig
from fabric.wire.auth import TokenTable

ROOT = Path(__file__).resolve().parents[2]


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Deploy")
    return text[start:text.index("\n## ", start + 1)]


def _block_after(marker: str) -> str:
    """The body of the first code block whose text contains `marker` ("$ cat FILE" output)."""
    for block in re.findall(r"```\w*\n(.*?)```", _section(), re.S):
        if marker in block:
            return block
    raise AssertionError(f"no code block with {marker!r}")


def _cat(block: str, name: str) -> str:
    lines = block.splitlines()
    start = lines.index(f"$ cat {name}") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("$ "))
    return "\n".join(lines[start:end]) + "\n"


def test_every_deploy_file_the_readme_names_exists():
    named = set(re.findall(r"deploy/[\w./*-]*\w", _section()))  # fabric-*.service: a glob
    missing = sorted(p for p in named if not list(ROOT.glob(p)))
    assert named and missing == []


def test_the_readme_site_toml_loads_and_its_paths_are_the_units(tmp_path):
    text = _cat(_block_after("$ cat /etc/fabric/site.toml"), "/etc/fabric/site.toml")
    unit = (ROOT / "deploy/systemd/fabric-agent.service").read_text()
    assert "--config /etc/fabric/site.toml" in unit and "StateDirectory=fabric/site" in unit
    (tmp_path / "site.token").write_text("fra-secret-change-me\n")
    text = text.replace("/etc/fabric/site.token", str(tmp_path / "site.token"))
    text = text.replace("/var/lib/fabric/site", str(tmp_path / "data"))
    (tmp_path / "site.toml").write_text(text)
    assert SiteConfig.load(tmp_path / "site.toml").site == "fra-edge-1"


def test_the_readme_tokens_toml_loads_and_names_both_sites(tmp_path):
    (tmp_path / "tokens.toml").write_text(_cat(_block_after("$ cat tokens.toml"), "tokens.toml"))
    table = TokenTable.from_file(tmp_path / "tokens.toml")
    assert table.authenticate("Bearer fra-secret-change-me").name == "fra-edge-1"
    assert table.authenticate("Bearer ams-secret-change-me").name == "ams-edge-1"
    assert "--tokens /etc/fabric/tokens.toml" in (ROOT / "deploy/systemd/fabric-origin.service").read_text()
