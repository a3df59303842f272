"""End to end with real processes: a `fabric origin` subprocess, `fabric publish --origin`
and `fabric pull --origin --store` as subprocesses, bytes counted at the server.

* v1 and v2 (v2 changes three tensors) are published and pulled at a site store; the
  second pull moves exactly the chunks v2 added, counted by the origin's /metrics and by
  the pull's --json report; republishing the same folder uploads nothing.
* A 200 MiB pull survives the origin being SIGKILLed and restarted on the same port and
  store mid-transfer, in the same pull process.
* A pull SIGKILLed mid-transfer, rerun, reuses the chunks it had already stored.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers.http import request
from helpers.origin import (PUBLISH_SECRET, PULL_SECRET, OriginProcess, chunk_count, fabric_json,
                            fabric_popen, start_origin, stored_payload_size, tree_digest)

from helpers.files import write_safetensors

pytestmark = pytest.mark.timeout(240)

TENSOR = 2 << 20  # bytes per tensor of the small model
CHANGED = (3, 7, 11)  # tensors v2 changes
BIG_TENSOR = 8 << 20  # one 8 MiB segment per tensor: one chunk each
BIG_TENSORS = 25  # 200 MiB
RATE = "40M"  # slow enough to interrupt after a few chunks, fast enough to finish in seconds


def make_model(folder: Path, *, tensors: int, tensor_bytes: int, seed: int, changed=()) -> Path:
    """A safetensors model of random float32 tensors (incompressible) and a small config file."""
    arrays = {}
    for i in range(tensors):
        rng = np.random.default_rng((seed if i in changed else 0) * 10_000 + i)
        arrays[f"layers.{i:03d}.weight"] = np.frombuffer(rng.bytes(tensor_bytes), dtype=np.float32).reshape(-1, 256)
    write_safetensors(folder / "model.safetensors", arrays, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"layers": tensors, "hidden": 256}))
    return folder


@dataclass
class Lab:
    root: Path
    origin: OriginProcess

    def counters(self) -> dict[str, float]:
        m = self.origin.metrics()
        return {k: m.get(f"fabric_{k}_total", 0.0)
                for k in ("bytes_sent", "chunks_served", "bytes_received", "chunks_received")}

    def manifest(self, ref_artifact: str, version: str) -> dict:
        r = request(self.origin.url, "GET", f"/v1/artifacts/{ref_artifact}/versions/{version}", token=PULL_SECRET)
        assert r.status == 200, r
        return r.json()

    def publish(self, src: Path, artifact: str, version: str) -> dict:
        return fabric_json("publish", src, "--artifact", artifact, "--version", version,
                           "--origin", self.origin.url, "--token", PUBLISH_SECRET)

    def pull_args(self, ref: str, dest: Path, store: Path, *extra) -> list:
        return ["pull", ref, dest, "--origin", self.origin.url, "--token", PULL_SECRET, "--store", store, *extra]


def unique_chunks(manifest: dict) -> set[str]:
    return {cid for f in manifest["files"] for cid, _ in f["chunks"]}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    o = start_origin(root)
    yield Lab(root, o)
    o.stop()


@pytest.fixture(scope="module")
def big(lab):
    src = make_model(lab.root / "big-src", tensors=BIG_TENSORS, tensor_bytes=BIG_TENSOR, seed=5)
    r = lab.publish(src, "big", "v1")
    assert r["bytes_sent"] >= BIG_TENSORS * BIG_TENSOR
    m = lab.manifest("big", "v1")
    return src, unique_chunks(m), tree_digest(src)


# --- delta replication, counted at the server -----------------------------------------------------------

def test_publish_and_pull_move_only_what_changed(lab):
    v1 = make_model(lab.root / "v1", tensors=16, tensor_bytes=TENSOR, seed=1)
    v2 = make_model(lab.root / "v2", tensors=16, tensor_bytes=TENSOR, seed=2, changed=CHANGED)
    site = lab.root / "site"

    c0 = lab.counters()
    p1 = lab.publish(v1, "model", "v1")
    c1 = lab.counters()
    assert delta(c1, c0)["bytes_received"] == p1["bytes_sent"] <= p1["new_bytes"]  # the header is compressed
    assert p1["new_bytes"] >= 16 * TENSOR
    assert delta(c1, c0)["chunks_received"] == p1["new_chunks"] == p1["chunks"]

    p2 = lab.publish(v2, "model", "v2")
    c2 = lab.counters()
    assert p2["parent"] == "v1"
    assert delta(c2, c1)["bytes_received"] == p2["bytes_sent"] == len(CHANGED) * TENSOR  # only the new tensors
    assert delta(c2, c1)["chunks_received"] == p2["new_chunks"] == len(CHANGED)

    again = lab.publish(v2, "model", "v2")  # the same folder again: nothing to upload
    c3 = lab.counters()
    assert again["bytes_sent"] == 0 and again["new_chunks"] == 0
    assert again["manifest_id"] == p2["manifest_id"]
    assert delta(c3, c2)["bytes_received"] == 0 and delta(c3, c2)["chunks_received"] == 0

    m1, m2 = lab.manifest("model", "v1"), lab.manifest("model", "v2")
    ids1, ids2 = unique_chunks(m1), unique_chunks(m2)
    added = ids2 - ids1
    assert len(added) == len(CHANGED)
    store = lab.origin.store

    r1 = fabric_json(*lab.pull_args("model@v1", lab.root / "dest-v1", site))
    c4 = lab.counters()
    sent_v1 = sum(stored_payload_size(store, c) for c in ids1)
    assert (r1["chunks_fetched"], r1["chunks_reused"]) == (len(ids1), 0)
    assert delta(c4, c3)["chunks_served"] == len(ids1)
    assert delta(c4, c3)["bytes_sent"] == r1["bytes_received"] <= sent_v1
    assert tree_digest(lab.root / "dest-v1") == tree_digest(v1)

    r2 = fabric_json(*lab.pull_args("model@v2", lab.root / "dest-v2", site))
    c5 = lab.counters()
    sent_v2 = sum(stored_payload_size(store, c) for c in added)
    assert (r2["chunks_fetched"], r2["chunks_reused"]) == (len(added), len(ids2) - len(added))
    assert delta(c5, c4)["chunks_served"] == len(added)  # the server sent only v2's new chunks ...
    assert delta(c5, c4)["bytes_sent"] == r2["bytes_received"] <= sent_v2  # ... and only their bytes
    assert sent_v2 <= 0.25 * sent_v1
    assert tree_digest(lab.root / "dest-v2") == tree_digest(v2)

    r3 = fabric_json(*lab.pull_args("model@v2", lab.root / "dest-v2b", site))  # all local now
    assert (r3["chunks_fetched"], r3["bytes_received"]) == (0, 0)
    assert delta(lab.counters(), c5)["bytes_sent"] == 0
    assert fabric_json("fsck", "--store", site)["ok"]


# --- faults in the middle of a transfer ----------------------------------------------------------------

def _wait_for_chunks(store: Path, n: int, proc, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = chunk_count(store)
        if have >= n:
            return have
        assert proc.poll() is None, f"pull ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"only {chunk_count(store)} chunks after {timeout}s")


def test_pull_survives_the_origin_killed_and_restarted(lab, big):
    src, ids, digest_src = big
    site, dest = lab.root / "site-origin-kill", lab.root / "dest-origin-kill"
    pull = fabric_popen(*lab.pull_args("big@v1", dest, site, "--max-rate", RATE, "--json"))
    try:
        _wait_for_chunks(site, 8, pull)
        lab.origin.kill(signal.SIGKILL)
        at_kill = chunk_count(site)
        assert 0 < at_kill < len(ids) and pull.poll() is None  # killed mid-transfer
        time.sleep(0.5)  # the pull sees refused connections for a while
        assert pull.poll() is None  # ... and keeps retrying
        port = lab.origin.port
        lab.origin.restart()  # same port, same store
        assert lab.origin.port == port
        out, err = pull.communicate(timeout=180)
    finally:
        if pull.poll() is None:
            pull.kill()
    assert pull.returncode == 0, err
    report = json.loads(out)
    assert (report["chunks_fetched"], report["chunks_reused"]) == (len(ids), 0)  # all in this one process
    # the restarted origin served what was still missing (less any chunks already in the pull's
    # memory, waiting on --max-rate, when the first origin died)
    assert 0 < lab.counters()["chunks_served"] <= len(ids) - at_kill
    assert tree_digest(dest) == digest_src
    assert fabric_json("fsck", "--store", site)["ok"]


def test_pull_killed_midway_then_rerun_reuses_what_it_stored(lab, big):
    src, ids, digest_src = big
    site, dest = lab.root / "site-pull-kill", lab.root / "dest-pull-kill"
    pull = fabric_popen(*lab.pull_args("big@v1", dest, site, "--max-rate", RATE, "--json"))
    try:
        _wait_for_chunks(site, 6, pull)
    finally:
        pull.kill()
        pull.wait(timeout=30)
    held = chunk_count(site)
    assert 0 < held < len(ids)
    assert not dest.exists()  # killed before materialising: nothing half-written at DEST

    c0 = lab.counters()
    report = fabric_json(*lab.pull_args("big@v1", dest, site))
    assert report["chunks_reused"] == held > 0
    assert report["chunks_fetched"] == len(ids) - held
    assert delta(lab.counters(), c0)["chunks_served"] == len(ids) - held
    assert tree_digest(dest) == digest_src
    assert fabric_json("fsck", "--store", site)["ok"]
