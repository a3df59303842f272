"""The `fabric` command line, run as a real process: JSON reports, errors, FABRIC_STORE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fabric.store.store import chunk_key

from helpers.cli import FABRIC, cli_json, run_cli
from helpers.files import assert_same_tree, random_bytes, random_tensors, write_safetensors, write_tree


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    rng = np.random.default_rng(99)
    root = tmp_path_factory.mktemp("cli") / "src"
    write_safetensors(root / "model.safetensors", random_tensors(rng, 6))
    write_tree(root, {"config.json": b'{"layers": 6}', "data/blob.bin": random_bytes(rng, 300_000),
                      "data/empty": b""})
    return root


@pytest.fixture(scope="module")
def src_size(src):
    return sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


# The exit code each error code should give (README "Using the CLI"): 2 usage, 3 not found,
# 4 auth, 5 network, 6 integrity, 7 conflict.
EXIT = {"artifact_not_found": 3, "version_not_found": 3, "channel_not_found": 3, "not_found": 3,
        "invalid_name": 2, "invalid_input": 2, "invalid_config": 2, "bad_source": 2, "invalid_safetensors": 2,
        "version_exists": 7, "destination_exists": 7, "missing_chunks": 7}


def _error_line(p: subprocess.CompletedProcess, code: str) -> str:
    assert p.returncode == EXIT[code], p
    first = p.stderr.splitlines()[0]
    assert first.startswith(f"error[{code}]: "), p.stderr
    assert "Traceback" not in p.stderr
    return first


# --- the happy path, as JSON ------------------------------------------------------------------

def test_publish_and_pull_json_reports(tmp_path, src, src_size):
    st = tmp_path / "store"
    r1 = cli_json("publish", src, "-a", "llama", "--version", "v1", "--meta", "step=10", store=st)
    assert {"files", "bytes", "new_bytes", "dedup_ratio"} <= r1.keys()
    assert (r1["files"], r1["bytes"], r1["new_bytes"], r1["dedup_ratio"]) == (4, src_size, src_size, 0.0)
    r2 = cli_json("publish", src, "-a", "llama", "--version", "v2", store=st)
    assert (r2["new_bytes"], r2["dedup_ratio"], r2["parent"]) == (0, 1.0, "v1")
    p = cli_json("pull", "llama@v1", tmp_path / "out", store=st)
    assert {"bytes_received", "chunks_fetched", "chunks_reused", "seconds"} <= p.keys()
    assert p["bytes"] == src_size and p["files"] == 4 and p["chunks_reused"] > 0
    assert isinstance(p["seconds"], (int, float))
    assert_same_tree(src, tmp_path / "out")


def test_ls_show_promote_rollback_gc_fsck_json(tmp_path, src):
    st = tmp_path / "store"
    for v in ("v1", "v2", "v3"):
        cli_json("publish", src, "-a", "llama", "--version", v, store=st)
        ch = cli_json("promote", f"llama@{v}", "--channel", "prod", store=st)
        assert (ch["channel"], ch["version"], len(ch["history"])) == ("prod", v, int(v[1]))
    rb = cli_json("rollback", "llama", "--channel", "prod", store=st)
    assert rb["version"] == "v2" and rb["history"][-1]["action"] == "rollback"
    assert cli_json("rollback", "llama", "-c", "prod", store=st)["version"] == "v1"
    ls = cli_json("ls", store=st)
    assert ls["items"] == [{"artifact": "llama", "versions": 3, "latest": "v3", "channels": {"prod": "v1"}}]
    lv = cli_json("ls", "llama", store=st)["items"]
    assert [r["version"] for r in lv] == ["v1", "v2", "v3"] and lv[0]["channels"] == ["prod"]
    show = cli_json("show", "llama:prod", store=st)
    assert {"manifest_id", "manifest", "changes_vs_parent", "channels"} <= show.keys()
    assert show["manifest"]["version"] == "v1" and show["manifest_id"].startswith("blake3:")
    assert {t["name"] for t in show["manifest"]["tensors"]} == {f"layer.{i:03d}" for i in range(6)}
    gc = cli_json("gc", "--keep", "1", "--grace", "0", store=st)
    assert gc["versions_deleted"] == ["llama@v2"]  # v1 is on prod, v3 the newest
    fs = cli_json("fsck", store=st)
    assert fs["ok"] is True and fs["versions"] == 2 and fs["bad_chunks"] == []


def test_human_output_for_every_command(tmp_path, src):
    st = tmp_path / "store"
    cmds = [("publish", src, "-a", "m", "--version", "v1", "--channel", "prod"),
            ("publish", src, "-a", "m", "--version", "v2"),
            ("promote", "m@v2", "-c", "prod"), ("rollback", "m", "-c", "prod"),
            ("ls",), ("ls", "m"), ("show", "m@v2"), ("pull", "m:prod", tmp_path / "out"),
            ("gc", "--keep", "1", "--dry-run"), ("fsck",)]
    for cmd in cmds:
        p = run_cli(*cmd, store=st)
        assert p.returncode == 0 and p.stdout.strip(), (cmd, p.stderr)
    assert_same_tree(src, tmp_path / "out")


def test_store_from_the_environment(tmp_path, src):
    env = {"FABRIC_STORE": str(tmp_path / "envstore")}
    assert cli_json("publish", src, "-a", "m", "--version", "v1", env=env)["files"] == 4
    assert cli_json("ls", env=env)["items"][0]["artifact"] == "m"
    assert (tmp_path / "envstore" / "fabric-store.json").exists()
    # --store wins over FABRIC_STORE
    assert cli_json("ls", store=tmp_path / "other", env=env, expect_rc=3)["error"]["code"] == "not_found"


def test_store_from_the_config_file(tmp_path, src):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'store = "{tmp_path / "cfgstore"}"\n')
    env = {"FABRIC_CONFIG": str(cfg)}
    cli_json("publish", src, "-a", "m", "--version", "v1", env=env)
    assert cli_json("ls", env=env)["items"][0]["versions"] == 1
    cfg.write_text('stor = "typo"\n')
    _error_line(run_cli("ls", env=env), "invalid_config")


# --- errors: `error[code]: message`, the exit code for its kind, nothing half-written ------------------------------------

@pytest.fixture
def st(tmp_path, src):
    st = tmp_path / "store"
    cli_json("publish", src, "-a", "m", "--version", "v1", store=st)
    return st


@pytest.fixture(scope="module")
def ro_store(tmp_path_factory, src):
    """A store with m@v1, shared by the error tests (none of which may change it)."""
    root = tmp_path_factory.mktemp("cli-errors")
    st = root / "store"
    cli_json("publish", src, "-a", "m", "--version", "v1", store=st)
    write_tree(root / "src2", {"other.bin": b"different content"})
    return st


def _store_files(st: Path) -> list[str]:
    """Manifests and refs: what a version is made of (a failed publish may leave orphan
    chunks, which gc collects; lock files are not objects)."""
    return sorted(p.relative_to(st).as_posix() for d in ("manifests", "refs") for p in (st / d).rglob("*")
                  if p.is_file() and not p.name.startswith("."))


ERRORS = [
    (("pull", "ghost", "{tmp}/d"), "artifact_not_found", "'ghost'"),
    (("pull", "ghost@v1", "{tmp}/d"), "artifact_not_found", "'ghost'"),
    (("pull", "m@v9", "{tmp}/d"), "version_not_found", "'v9'"),
    (("pull", "m:prod", "{tmp}/d"), "channel_not_found", "m:prod"),
    (("pull", "bad/name", "{tmp}/d"), "invalid_name", "bad/name"),
    (("show", "m@v9"), "version_not_found", "v9"),
    (("ls", "ghost"), "artifact_not_found", "ghost"),
    (("promote", "m@v9", "-c", "prod"), "version_not_found", "v9"),
    (("promote", "m", "-c", "prod"), "invalid_input", "NAME@VERSION"),
    (("rollback", "m", "-c", "prod"), "invalid_input", "no earlier version"),
    (("gc", "--keep", "0"), "invalid_input", "at least 1"),
    (("publish", "{tmp}/nope", "-a", "m"), "bad_source", "does not exist"),
    (("publish", "{tmp}/src2", "-a", "m", "--version", "v1"), "version_exists", "m@v1 already exists"),
    (("publish", "{tmp}/src2", "-a", "m", "--meta", "novalue"), "invalid_input", "key=value"),
    (("publish", "{tmp}/src2", "-a", "no good"), "invalid_name", "'no good'"),
]


@pytest.mark.parametrize("args, code, needle", ERRORS)
def test_errors(ro_store, args, code, needle):
    tmp = ro_store.parent
    before = _store_files(ro_store)
    p = run_cli(*[a.format(tmp=tmp) for a in args], store=ro_store)
    line = _error_line(p, code)
    assert needle in line and p.stdout == ""
    assert _store_files(ro_store) == before  # nothing half-written, nothing added
    assert not (tmp / "d").exists()


@pytest.mark.parametrize("args, code, needle", [ERRORS[0], ERRORS[9], ERRORS[11], ERRORS[12]])
def test_errors_as_json(ro_store, args, code, needle):
    p = run_cli(*[a.format(tmp=ro_store.parent) for a in args], "--json", store=ro_store)
    assert p.returncode == EXIT[code] and p.stderr == ""
    err = json.loads(p.stdout)["error"]
    assert err["code"] == code and needle in err["message"]


def test_long_error_messages_stay_on_one_line(ro_store, tmp_path):
    name = "v" + "x" * 120
    p = run_cli("pull", f"m@{name}", tmp_path / ("a-long-destination-" * 5), store=ro_store)
    line = _error_line(p, "version_not_found")
    assert name in line


def test_no_store_given(tmp_path, src):
    p = run_cli("ls")
    assert "--store" in _error_line(p, "invalid_input")
    p = run_cli("ls", store=tmp_path / "absent")
    _error_line(p, "not_found")
    assert not (tmp_path / "absent").exists()
    (tmp_path / "a-file").write_text("x")
    p = run_cli("publish", src, "-a", "m", store=tmp_path / "a-file")
    assert "is not a folder" in _error_line(p, "invalid_input")


def test_bad_source_creates_no_store(tmp_path):
    p = run_cli("publish", tmp_path / "nope", "-a", "m", store=tmp_path / "store")
    _error_line(p, "bad_source")
    assert not (tmp_path / "store").exists()


def test_invalid_safetensors_via_cli(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model-00002-of-00002.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    p = run_cli("publish", tmp_path / "bad", "-a", "m", store=tmp_path / "store")
    line = _error_line(p, "invalid_safetensors")
    assert "model-00002-of-00002.safetensors" in line and "longer than the file" in line
    assert cli_json("ls", store=tmp_path / "store")["items"] == []


def test_destination_exists_and_force(st, tmp_path, src):
    dest = write_tree(tmp_path / "dest", {"keep.txt": b"mine"})
    p = run_cli("pull", "m@v1", dest, store=st)
    assert str(dest) in _error_line(p, "destination_exists")
    assert "--force" in p.stderr
    assert (dest / "keep.txt").read_bytes() == b"mine"
    cli_json("pull", "m@v1", dest, "--force", store=st)
    assert_same_tree(src, dest)


def test_fsck_exit_status_and_repair(st):
    victim = next(p for p in (st / "chunks").rglob("*") if p.is_file())
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    bad = cli_json("fsck", store=st, expect_rc=6)  # integrity
    cid = "blake3:" + victim.name
    assert bad["ok"] is False and bad["bad_chunks"] == [cid]
    assert chunk_key(cid) == victim.relative_to(st).as_posix()
    p = run_cli("fsck", store=st)
    assert p.returncode == 6 and cid in p.stdout
    fixed = cli_json("fsck", "--repair", store=st)
    assert fixed["removed"] == 1 and not victim.exists()
    assert fixed["bad_versions"] == ["m@v1: 1 chunk(s) missing"]
    _error_line(run_cli("pull", "m@v1", st.parent / "after", store=st), "missing_chunks")


def test_concurrent_promotes_from_processes(st):
    for v in ("v2", "v3"):
        cli_json("publish", _tiny(st.parent, v), "-a", "m", "--version", v, store=st)
    procs = [subprocess.Popen(FABRIC + ["promote", f"m@{v}", "-c", "prod", "--store", str(st), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for v in ("v1", "v2", "v3") for _ in range(2)]
    for p in procs:
        out, errs = p.communicate(timeout=60)
        assert p.returncode == 0, errs
    hist = cli_json("promote", "m@v1", "-c", "prod", store=st)["history"]
    assert len(hist) == 7 and sorted(e["version"] for e in hist[:6]) == sorted(["v1", "v2", "v3"] * 2)


def _tiny(root: Path, v: str) -> Path:
    return write_tree(root / f"tiny-{v}", {"f.txt": v.encode()})


def _main_with(argv: list[str], prelude: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `fabric.cli.main()` (the console script's entry) in a child, after `prelude`."""
    code = (f"import sys, fabric.cli\n{prelude}\nsys.argv = ['fabric', *{argv!r}]\nfabric.cli.main()\n"
            "print('not reached')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "FABRIC_CONFIG": os.devnull})


def test_the_entry_point_exits_fast_but_runs_what_a_normal_exit_does(tmp_path):
    # main skips the interpreter's teardown (os._exit), after the atexit handlers, logging's
    # flush and stdout's: nothing a caller sees is lost, and the status is the command's
    prelude = ("import atexit, logging\n"
               f"h = logging.FileHandler({str(tmp_path / 'log.txt')!r}, delay=False)\n"
               "logging.getLogger('probe').addHandler(h); logging.getLogger('probe').error('logged before exit')\n"
               "atexit.register(lambda: print('atexit ran'))\n"
               "sys.stdout.write('buffered, not flushed ')\n")
    ok = _main_with(["--version"], prelude, tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("buffered, not flushed fabric ")
    assert "atexit ran" in ok.stdout and "not reached" not in ok.stdout
    assert (tmp_path / "log.txt").read_text() == "logged before exit\n"
    usage = _main_with(["pull", "--json"], prelude, tmp_path)  # a usage error: exit 2, a JSON error on stdout
    assert usage.returncode == 2 and '"code": "invalid_input"' in usage.stdout and "atexit ran" in usage.stdout
    failed = _main_with(["show", "m@v1", "--store", str(tmp_path / "none"), "--json"], "", tmp_path)
    assert failed.returncode not in (0, 2) and json.loads(failed.stdout)["error"]["code"]
