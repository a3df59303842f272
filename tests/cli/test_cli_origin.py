"""The CLI against a real origin process: exit codes for auth and network failures,
--dry-run and rollback --to/--steps over HTTP, `status` with no sites and with hostile
site reports, and Ctrl-C in the middle of a rate-limited pull."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers.cli import FABRIC, cli_json, run_cli
from helpers.http import request
from helpers.files import assert_same_tree, random_bytes, write_tree
from helpers.origin import ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, PULL_SECRET, start_origin
from helpers.ports import free_port

SITE_SECRET = "site-x-secret-0123456789abcdef"
TOKENS = DEFAULT_TOKENS + [{"name": "site-x", "secret": SITE_SECRET, "scopes": ["pull"], "site": "x"}]


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    with start_origin(tmp_path_factory.mktemp("cli-origin"), TOKENS) as o:
        yield o


def _publish(origin, src, *args):
    return cli_json("publish", src, *args, env={"FABRIC_ORIGIN": origin.url, "FABRIC_TOKEN": PUBLISH_SECRET})


def test_auth_and_network_failures_have_their_exit_codes(origin, tmp_path):
    p = run_cli("ls", "--origin", origin.url, "--token", "wrong-token-0123456789")
    assert p.returncode == 4 and p.stderr.startswith("error[unauthorized]"), p.stderr
    write_tree(tmp_path / "s", {"f": b"x"})
    p = run_cli("publish", tmp_path / "s", "-a", "m", "--origin", origin.url, "--token", PULL_SECRET)
    assert p.returncode == 4 and p.stderr.startswith("error[forbidden]"), p.stderr
    p = run_cli("ls", "--origin", f"http://127.0.0.1:{free_port()}", "--json")
    assert p.returncode == 5 and json.loads(p.stdout)["error"]["code"] == "transfer_failed"
    p = run_cli("pin", "m@v1", env={"FABRIC_AGENT": f"http://127.0.0.1:{free_port()}"})
    assert p.returncode == 5 and "error[transfer_failed]" in p.stderr  # FABRIC_AGENT was the URL used


def test_dry_runs_against_the_origin_send_and_store_nothing(origin, tmp_path):
    rng = np.random.default_rng(3)
    src = write_tree(tmp_path / "src", {"w.bin": random_bytes(rng, 300_000)})
    env = {"FABRIC_ORIGIN": origin.url, "FABRIC_TOKEN": PUBLISH_SECRET}
    plan = cli_json("publish", src, "-a", "dry", "--version", "v1", "--dry-run", env=env)
    assert plan["bytes_new"] == 300_000 and plan["chunks_present"] == 0 and plan["target"] == origin.url
    assert "dry" not in [i["artifact"] for i in cli_json("ls", env=env)["items"]]
    _publish(origin, src, "-a", "dry", "--version", "v1")
    (src / "more.txt").write_bytes(b"12345")
    plan = cli_json("publish", src, "-a", "dry", "--version", "v2", "--dry-run", env=env)
    assert (plan["chunks_new"], plan["bytes_new"], plan["bytes_present"]) == (1, 5, 300_000)
    assert cli_json("ls", "dry", env=env)["items"][-1]["version"] == "v1"
    st = tmp_path / "store"
    plan = cli_json("pull", "dry@v1", tmp_path / "out", "--dry-run", store=st, env=env)
    assert (plan["chunks_present"], plan["bytes_new"]) == (0, 300_000)
    assert not st.exists() and not (tmp_path / "out").exists()


def test_rollback_steps_and_to_over_http(origin, tmp_path):
    env = {"FABRIC_ORIGIN": origin.url, "FABRIC_TOKEN": PUBLISH_SECRET}
    for v in ("v1", "v2", "v3"):
        _publish(origin, write_tree(tmp_path / v, {"f": v.encode()}), "-a", "rb", "--version", v, "--channel", "prod")
    assert cli_json("rollback", "rb", "-c", "prod", "--steps", "2", env=env)["version"] == "v1"
    cli_json("promote", "rb@v3", "-c", "prod", env=env)
    assert cli_json("rollback", "rb", "-c", "prod", "--to", "v1", env=env)["version"] == "v1"
    p = run_cli("rollback", "rb", "-c", "prod", "--steps", "5", env=env)
    assert p.returncode == 2 and "error[invalid_input]" in p.stderr
    r = request(origin.url, "POST", "/v1/artifacts/rb/channels/prod", {"action": "rollback", "steps": "two"},
                token=PUBLISH_SECRET)
    assert r.status == 422 and r.error()["code"] == "invalid_input"


def test_status_with_no_sites_and_with_hostile_reports(tmp_path):
    with start_origin(tmp_path / "o", TOKENS) as o:
        p = run_cli("status", "--origin", o.url, "--token", ADMIN_SECRET)
        assert p.returncode == 0 and "no sites have reported" in p.stdout
        hostile = {"channels": [{"artifact": "[/]", "channel": "[bold]x", "active": {"a": 1}, "syncing": "[/]",
                                 "bytes_total": "lots", "bytes_done": None, "error": "[red]bad[/red] [/]",
                                 "staged": {"version": "[/]v9", "state": "fetching", "bytes_total": "lots"}},
                                {"channel": 5, "staged": {"version": ["v"], "state": 3}}, {"staged": "v2"},
                                "not a dict", None],
                   "workers": [{"worker": "[/]w", "artifact": "[/]", "state": ["x"]}, 7],
                   "received": "yesterday"}
        r = request(o.url, "POST", "/v1/sites/x", hostile, token=SITE_SECRET)
        assert r.status == 200, r.body
        p = run_cli("status", "--origin", o.url, "--token", ADMIN_SECRET, env={"COLUMNS": "300"})
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert "[/]:[bold]x" in p.stdout and "[red]bad[/red]" in p.stdout and "[/]w" in p.stdout
        assert "staged [/]:[bold]x [/]v9: held at 0 of 1 site(s) following it, 1 fetching" in p.stdout, p.stdout
        for body in ({"channels": "nope", "workers": {"a": 1}}, {"channels": [{"syncing": 1, "bytes_total": 0}]}):
            assert request(o.url, "POST", "/v1/sites/x", body, token=SITE_SECRET).status == 200
            p = run_cli("status", "--origin", o.url, "--token", ADMIN_SECRET)
            assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


def test_one_ctrl_c_stops_a_pull_cleanly_and_the_next_pull_resumes(origin, tmp_path):
    rng = np.random.default_rng(11)
    src = write_tree(tmp_path / "big", {"w.bin": random_bytes(rng, 12 << 20)})
    _publish(origin, src, "-a", "big", "--version", "v1")
    st, dest = tmp_path / "store", tmp_path / "out"
    cmd = FABRIC + ["pull", "big@v1", str(dest), "--store", str(st), "--origin", origin.url,
                    "--token", PULL_SECRET, "--max-rate", "2M"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list((st / "chunks").rglob("*"))) < 20:  # mid-transfer
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr
    assert time.monotonic() - t0 < 5  # at once, not at the end of the transfer
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    again = cli_json("pull", "big@v1", dest, store=st, env={"FABRIC_ORIGIN": origin.url, "FABRIC_TOKEN": PULL_SECRET})
    assert again["chunks_reused"] > 0 and again["bytes_received"] < 11 << 20, again
    assert_same_tree(src, dest)


def _with_terminal_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run `fabric` with stderr on a pseudo-terminal (so progress bars draw); stdout a pipe."""
    import os
    import pty
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="160", TERM="xterm")
    proc = subprocess.Popen(FABRIC + args, stdout=subprocess.PIPE, stderr=slave, env=env, text=True)
    os.close(slave)
    drawn = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        drawn += data
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    return proc.returncode, out, drawn.decode(errors="replace")


def test_progress_with_json_draws_on_a_terminal_in_iec_units_counting_reused_chunks(origin, tmp_path):
    rng = np.random.default_rng(12)
    src = write_tree(tmp_path / "p", {"w.bin": random_bytes(rng, 4 << 20)})
    _publish(origin, src, "-a", "prog", "--version", "v1")
    st = tmp_path / "store"
    base = ["--store", str(st), "--origin", origin.url, "--token", PULL_SECRET, "--json"]
    rc, out, drawn = _with_terminal_stderr(["pull", "prog@v1", str(tmp_path / "a"), "--max-rate", "8M", *base])
    assert rc == 0 and json.loads(out)["chunks_fetched"] > 0
    assert "MiB" in drawn and " MB" not in drawn and " kB" not in drawn, drawn[-500:]
    rc, out, drawn = _with_terminal_stderr(["pull", "prog@v1", str(tmp_path / "b"), *base])
    assert rc == 0 and "chunks reused" in drawn, drawn[-500:]
