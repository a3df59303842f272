"""A publish killed with SIGKILL part-way leaves a sound store and no half version,
and publishing again completes, reusing what the killed run stored."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import blake3
import numpy as np
import pytest

from helpers.cli import FABRIC, cli_json, run_cli
from helpers.files import write_safetensors
from helpers.store import chunk_files

MB = 1 << 20


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    """About 300 MB: four random binaries (FastCDC) and one safetensors file (8 MiB segments)."""
    rng = np.random.default_rng(300)
    root = tmp_path_factory.mktemp("crash") / "src"
    root.mkdir()
    for i in range(4):
        (root / f"shard-{i}.bin").write_bytes(rng.integers(0, 256, 60 * MB, dtype=np.uint8).tobytes())
    write_safetensors(root / "model.safetensors",
                      {f"w{i}": rng.standard_normal(5 * MB).astype(np.float32) for i in range(3)})
    return root


def _file_digests(root) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = blake3.blake3(open(p, "rb").read(), max_threads=2).hexdigest()
    return out


def _objects(st, kind: str) -> list:
    return [f for f in (st / kind).rglob("*") if f.is_file() and not f.name.startswith(".")]


def test_kill_9_mid_publish_leaves_no_half_version(tmp_path, big_src):
    st = tmp_path / "store"
    total = sum(p.stat().st_size for p in big_src.iterdir())
    assert total > 290 * MB
    proc = subprocess.Popen(FABRIC + ["publish", str(big_src), "-a", "big", "--version", "v1",
                                      "--store", str(st), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(chunk_files(st)) < 150:  # some chunks stored, most not
            assert proc.poll() is None, f"publish ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "publish stored no chunks in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    survivors = {p.name for p in chunk_files(st)}
    assert len(survivors) >= 150

    # the store is sound: every chunk matches its id, and no version half-exists
    report = cli_json("fsck", store=st)
    assert report["ok"] is True and report["versions"] == 0 and report["chunks"] == len(survivors)
    assert cli_json("ls", store=st)["items"] == []
    p = run_cli("ls", "big", store=st)
    assert p.returncode == 3 and p.stderr.startswith("error[artifact_not_found]")
    p = run_cli("pull", "big@v1", tmp_path / "half", store=st)
    assert p.returncode == 3 and not (tmp_path / "half").exists()
    assert _objects(st, "manifests") == [] and _objects(st, "refs") == []

    # publishing again completes and reuses every chunk the killed run stored
    r = cli_json("publish", big_src, "-a", "big", "--version", "v1", store=st)
    assert r["bytes"] == total and r["files"] == 5
    assert r["new_chunks"] == r["chunks"] - len(survivors)
    assert r["new_bytes"] < total and r["dedup_ratio"] > 0
    report = cli_json("fsck", "--repair", store=st)  # sweeps the killed writer's temp file, if any
    assert report["ok"] is True and report["versions"] == 1 and report["removed"] == 0
    assert os.listdir(st / "tmp") == []

    cli_json("pull", "big@v1", tmp_path / "out", store=st)
    assert _file_digests(tmp_path / "out") == _file_digests(big_src)
