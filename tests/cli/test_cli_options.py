"""The CLI's global flags and settings, run as real processes on a local store: --version,
completion, --quiet, --dry-run, rollback --to/--steps, usage errors (with --json), `config
show`, FABRIC_CONFIG, --origin and --max-rate checks, names with rich markup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.cli import cli_json, run_cli
from helpers.files import random_bytes, write_tree


@pytest.fixture
def src(tmp_path):
    rng = np.random.default_rng(5)
    return write_tree(tmp_path / "src", {"a.bin": random_bytes(rng, 200_000), "b.txt": b"hello"})


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_version_and_completion():
    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("fabric 0.") and p.stdout.strip() != "fabric unknown"
    bash = run_cli("completion", "bash")
    assert bash.returncode == 0
    assert "_FABRIC_COMPLETE=complete_bash" in bash.stdout and "complete -o default -F" in bash.stdout
    assert "compdef" in run_cli("completion", "zsh").stdout
    bad = run_cli("completion", "tcsh")
    assert bad.returncode == 2 and "error[invalid_input]" in bad.stderr and "bash, zsh, fish" in bad.stderr
    # the script's protocol answers: completing `fabric pu` offers pull and publish
    done = run_cli(env={"_FABRIC_COMPLETE": "complete_bash", "COMP_WORDS": "fabric pu", "COMP_CWORD": "1"})
    assert set(done.stdout.split()) == {"publish", "pull"}


def test_usage_errors_exit_2_and_honour_json(tmp_path):
    p = run_cli("pull", "--no-such-flag")
    assert p.returncode == 2 and "No such option" in p.stderr and p.stdout == ""
    p = run_cli("pull", "m@v1", "--no-such-flag", "--json")
    assert p.returncode == 2
    err = json.loads(p.stdout)["error"]
    assert err["code"] == "invalid_input" and "--no-such-flag" in err["message"]
    p = run_cli("publish", tmp_path, "--json")  # a required option missing
    assert p.returncode == 2 and "--artifact" in json.loads(p.stdout)["error"]["message"]


def test_quiet_prints_nothing_but_errors(tmp_path, src):
    st = tmp_path / "store"
    p = run_cli("publish", src, "-a", "m", "--version", "v1", "--quiet", store=st)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""
    p = run_cli("pull", "m@v1", tmp_path / "out", "-q", store=st)
    assert p.returncode == 0 and p.stdout == "" and (tmp_path / "out" / "b.txt").read_bytes() == b"hello"
    p = run_cli("pull", "m@v9", tmp_path / "out2", "-q", store=st)
    assert p.returncode == 3 and p.stderr.startswith("error[version_not_found]")
    assert cli_json("publish", src, "-a", "m", "--version", "v2", "-q", store=st)["new_bytes"] == 0


def test_publish_dry_run_writes_nothing_and_counts_new_vs_present(tmp_path, src):
    st = tmp_path / "store"
    plan = cli_json("publish", src, "-a", "m", "--version", "v1", "--dry-run", store=st)
    assert plan["dry_run"] is True and plan["chunks_present"] == 0 and plan["bytes_present"] == 0
    assert plan["bytes_new"] == 200_005 and plan["chunks_new"] >= 2 and plan["files"] == 2
    assert not st.exists()  # not even the store folder
    cli_json("publish", src, "-a", "m", "--version", "v1", store=st)
    before = _files(st)
    (src / "c.txt").write_bytes(b"new file")
    plan = cli_json("publish", src, "-a", "m", "--version", "v2", "--dry-run", store=st)
    assert (plan["chunks_new"], plan["bytes_new"]) == (1, 8)
    assert plan["bytes_present"] == 200_005 and plan["chunks_present"] >= 2
    assert _files(st) == before
    human = run_cli("publish", src, "-a", "m", "--version", "v2", "--dry-run", store=st)
    assert "would publish m@v2" in human.stdout and "nothing written" in human.stdout
    assert "195.3 KiB" in human.stdout  # IEC units, as every size the CLI prints


def test_pull_dry_run_writes_nothing(tmp_path, src):
    st = tmp_path / "store"
    cli_json("publish", src, "-a", "m", "--version", "v1", store=st)
    before = _files(st)
    plan = cli_json("pull", "m@v1", tmp_path / "out", "--dry-run", store=st)
    assert plan["chunks_new"] == 0 and plan["bytes_present"] == 200_005 and plan["version"] == "v1"
    assert not (tmp_path / "out").exists() and _files(st) == before
    write_tree(tmp_path / "full", {"x": b"x"})
    p = run_cli("pull", "m@v1", tmp_path / "full", "--dry-run", store=st)
    assert p.returncode == 7 and "error[destination_exists]" in p.stderr


def test_rollback_steps_and_to(tmp_path, src):
    st = tmp_path / "store"
    for i, v in enumerate(("v1", "v2", "v3", "v4")):
        (src / "b.txt").write_bytes(f"hello {i}".encode())
        cli_json("publish", src, "-a", "m", "--version", v, "--channel", "prod", store=st)
    assert cli_json("rollback", "m", "-c", "prod", "--steps", "2", store=st)["version"] == "v2"
    for v in ("v3", "v4"):
        cli_json("promote", f"m@{v}", "-c", "prod", store=st)
    ch = cli_json("rollback", "m", "-c", "prod", "--to", "v1", store=st)
    assert ch["version"] == "v1" and [e["action"] for e in ch["history"][-3:]] == ["rollback"] * 3
    p = run_cli("rollback", "m", "-c", "prod", "--to", "v4", store=st)  # v4 is above, not below
    assert p.returncode == 2 and "no earlier version 'v4'" in p.stderr
    p = run_cli("rollback", "m", "-c", "prod", "--steps", "1", store=st)
    assert p.returncode == 2 and "no earlier version" in p.stderr
    p = run_cli("rollback", "m", "-c", "prod", "--steps", "0", store=st)
    assert p.returncode == 2 and "--steps must be at least 1" in p.stderr
    p = run_cli("rollback", "m", "-c", "prod", "--steps", "1", "--to", "v1", store=st)
    assert p.returncode == 2 and "not both" in p.stderr


def test_config_show_and_sources(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'store = "{tmp_path / "s"}"\ntoken = "file-token-0123456789abcdef"\n')
    env = {"FABRIC_CONFIG": str(cfg), "FABRIC_ORIGIN": "http://origin.example:7000"}
    shown = cli_json("config", "show", "--agent", "http://agent.example:7070", env=env)["settings"]
    assert shown["store"] == {"value": str(tmp_path / "s"), "source": f"file {cfg}"}
    assert shown["origin"] == {"value": "http://origin.example:7000", "source": "env FABRIC_ORIGIN"}
    assert shown["token"] == {"value": "****cdef", "source": f"file {cfg}"}
    assert shown["agent"] == {"value": "http://agent.example:7070", "source": "flag"}
    human = run_cli("config", "show", env=env)
    assert "file-token" not in human.stdout and "default" in human.stdout and "FABRIC_ORIGIN" in human.stdout


def test_bad_settings_are_clear_errors(tmp_path):
    p = run_cli("ls", env={"FABRIC_CONFIG": str(tmp_path / "missing.toml")})
    assert p.returncode == 2 and "FABRIC_CONFIG names" in p.stderr and "missing.toml" in p.stderr
    p = run_cli("ls", "--origin", "localhost:7000")
    assert p.returncode == 2 and "--origin" in p.stderr and "http://localhost:7000" in p.stderr
    p = run_cli("pin", "m@v1", env={"FABRIC_AGENT": "agent:7070"})
    assert p.returncode == 2 and "env FABRIC_AGENT" in p.stderr
    for rate in ("fast", "0", "-5M", "nan"):
        p = run_cli("pull", "m@v1", tmp_path / "d", "--max-rate", rate, store=tmp_path / "st")
        assert p.returncode == 2 and "--max-rate" in p.stderr, (rate, p.stderr)
    assert not (tmp_path / "st").exists()


def test_a_file_named_like_rich_markup_does_not_crash_show(tmp_path):
    write_tree(tmp_path / "odd", {"x[/]y": b"one", "[bold]z": b"two"})
    st = tmp_path / "store"
    cli_json("publish", tmp_path / "odd", "-a", "m", "--version", "v1", "--meta", "note=[/]oops", store=st)
    p = run_cli("show", "m@v1", store=st)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "x[/]y" in p.stdout and "[bold]z" in p.stdout and "[/]oops" in p.stdout
    p = run_cli("pull", "m@v1", tmp_path / "out[/]d", store=st)
    assert p.returncode == 0 and "out[/]d" in p.stdout, p.stderr


def test_help_texts_say_what_each_option_does():
    for cmd, needle in ((["promote"], "The channel to move"), (["rollback"], "--steps"),
                        (["pin"], "Bearer token for --agent"), (["pull"], "bytes per second"),
                        (["gc"], "delete nothing")):
        p = run_cli(*cmd, "--help", env={"COLUMNS": "200"})
        assert p.returncode == 0 and needle in p.stdout, (cmd, p.stdout)
