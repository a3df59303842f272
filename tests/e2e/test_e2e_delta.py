"""Delta on the wire, end to end with real processes: a `fabric origin` subprocess,
`fabric publish --origin` and `fabric pull --origin --store --json` as subprocesses.

* v1 and v2 of a bf16 model (v2 = v1 after a small step of every weight) are published;
  a site store pulls v1, then v2: the second pull's `bytes_received` is well under the
  raw bytes of the chunks it fetched (xor against v1), and the files are byte-identical.
* A site whose copy of a v1 chunk is gone gets that chunk standalone after the
  reference mismatch, and still ends byte-identical; a site with nothing gets
  standalone byte-grouped chunks.
* A second site pulling v2 after v1 gets the frames the origin encoded for the first
  (`fabric.wire.framecache`): the same bytes, none encoded again; and the first site too
  gets frames encoded before it asked, at the publish (`fabric.wire.warming`).
* With `FABRIC_ENCODE` unset (auto) on loopback the origin falls back to stored forms
  once it measures a link faster than its codec: never more bytes than before.

The server side is `fabric.wire.chunks` (planning and encoding per request), the
receiving side `fabric.wire.negotiate.request_fields` and `fabric.wire.frames.decode`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.origin import (FABRIC, PUBLISH_SECRET, PULL_SECRET, OriginProcess, clean_env, fabric_json,
                            tree_digest, write_token_file)

pytestmark = pytest.mark.timeout(300)

TENSORS = 6
ELEMENTS = 1 << 21  # 4 MiB of bf16 per tensor


def bf16(x: np.ndarray) -> np.ndarray:
    """fp32 → bf16 bit patterns, round to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def write_model(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A safetensors file of BF16 tensors (bit patterns in uint16 arrays), and a config."""
    header, pos, blobs = {}, 0, []
    for name, a in arrays.items():
        buf = a.tobytes()
        header[name] = {"dtype": "BF16", "shape": [len(a) // 1024, 1024], "data_offsets": [pos, pos + len(buf)]}
        blobs.append(buf)
        pos += len(buf)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(len(js).to_bytes(8, "little") + js + b"".join(blobs))
    (folder / "config.json").write_text(json.dumps({"tensors": len(arrays)}))
    return folder


class Origin(OriginProcess):
    """The helper's origin process, with extra environment (FABRIC_ENCODE)."""

    def __init__(self, *a, env: dict | None = None, **kw):
        super().__init__(*a, **kw)
        self.env = env or {}

    def start(self, timeout: float = 30.0):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                FABRIC + ["origin", "--store", str(self.store), "--listen", f"127.0.0.1:{self.port}",
                          "--tokens", str(self.tokens)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env(**self.env))
        if not self._wait_live(timeout):
            self.stop()
            raise RuntimeError(f"origin did not come up:\n{self.log_text()[-3000:]}")
        return self


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta-models")
    rng = np.random.default_rng(7)
    base = {f"layers.{i}.weight": rng.normal(0, 0.02, ELEMENTS).astype(np.float32) for i in range(TENSORS)}
    stepped = {k: v * (1 + rng.normal(0, 4e-3, v.shape)).astype(np.float32) for k, v in base.items()}
    v1 = write_model(root / "v1", {k: bf16(v) for k, v in base.items()})
    v2 = write_model(root / "v2", {k: bf16(v) for k, v in stepped.items()})
    return root, v1, v2


def start(root: Path, **env) -> Origin:
    root.mkdir(parents=True, exist_ok=True)
    tokens = write_token_file(root / "tokens.toml")
    return Origin(root / "origin-store", tokens, root / "origin.log", env=env).start()


def publish(origin: Origin, src: Path, version: str) -> dict:
    return fabric_json("publish", src, "--artifact", "model", "--version", version,
                       "--origin", origin.url, "--token", PUBLISH_SECRET)


def pull(origin: Origin, version: str, dest: Path, store: Path) -> dict:
    return fabric_json("pull", f"model@{version}", dest, "--origin", origin.url, "--token", PULL_SECRET,
                       "--store", store)


def manifest(origin: Origin, version: str) -> dict:
    from helpers.http import request
    r = request(origin.url, "GET", f"/v1/artifacts/model/versions/{version}", token=PULL_SECRET)
    assert r.status == 200
    return r.json()


def new_bytes(origin: Origin, old: str, new: str) -> int:
    held = {c for f in manifest(origin, old)["files"] for c, _ in f["chunks"]}
    return sum(n for f in manifest(origin, new)["files"] for c, n in f["chunks"] if c not in held)


@pytest.fixture(scope="module")
def compact(models):
    """An origin that always encodes (as over a slow WAN link), with v1 and v2 published."""
    root, v1, v2 = models
    origin = start(root / "compact", FABRIC_ENCODE="full")
    publish(origin, v1, "v1")
    publish(origin, v2, "v2")
    yield root / "compact", origin, v1, v2
    origin.stop()


def test_second_pull_carries_the_xor_delta_and_files_are_identical(compact):
    root, origin, v1, v2 = compact
    site = root / "site"
    r1 = pull(origin, "v1", root / "dest-v1", site)
    assert tree_digest(root / "dest-v1") == tree_digest(v1)
    assert r1["bytes_received"] < 0.9 * r1["bytes"]  # even a first sync sends byte planes
    r2 = pull(origin, "v2", root / "dest-v2", site)
    raw = new_bytes(origin, "v1", "v2")
    assert r2["chunks_fetched"] == TENSORS  # every tensor changed (the header did not)
    assert r2["bytes_received"] < 0.5 * raw, (r2, raw)
    assert tree_digest(root / "dest-v2") == tree_digest(v2)


def test_a_receiver_missing_the_reference_gets_standalone_chunks_that_verify(compact):
    root, origin, v1, v2 = compact
    site = root / "site-lost"
    pull(origin, "v1", root / "lost-v1", site)
    t0 = manifest(origin, "v1")["tensors"][0]["chunks"][0]
    h = t0.split(":", 1)[1]
    (site / "chunks" / h[:2] / h).unlink()  # the site lost one chunk of v1 (still listed as held)
    r2 = pull(origin, "v2", root / "lost-v2", site)
    assert tree_digest(root / "lost-v2") == tree_digest(v2)
    assert r2["bytes_received"] < 0.7 * new_bytes(origin, "v1", "v2")  # the others still travelled as xor
    fresh = pull(origin, "v2", root / "fresh-v2", root / "site-fresh")  # nothing held: byte planes only
    assert tree_digest(root / "fresh-v2") == tree_digest(v2)
    assert fresh["bytes_received"] < 0.9 * fresh["bytes"]


def test_a_second_site_gets_the_deltas_the_origin_encoded_for_the_first(compact):
    root, origin, v1, v2 = compact
    reused = "fabric_encoded_frames_reused_total"
    got = []
    for name in ("cache-a", "cache-b"):
        pull(origin, "v1", root / f"{name}-v1", root / name)
        before = origin.counter(reused)
        got.append(pull(origin, "v2", root / f"{name}-v2", root / name))
        assert tree_digest(root / f"{name}-v2") == tree_digest(v2)
    assert origin.counter(reused) - before == TENSORS  # the second site's deltas were not encoded again
    assert got[1]["bytes_received"] == got[0]["bytes_received"] < 0.5 * new_bytes(origin, "v1", "v2")


def test_the_first_site_gets_the_deltas_the_origin_encoded_at_the_publish(models):
    root, v1, v2 = models
    origin = start(root / "warm")  # the default mode, auto
    try:
        publish(origin, v1, "v1")
        publish(origin, v2, "v2")
        deadline = time.monotonic() + 60
        while origin.counter("fabric_frame_warm_jobs") or origin.counter("fabric_frames_warmed_total") < TENSORS:
            assert time.monotonic() < deadline, origin.log_text()[-2000:]
            time.sleep(0.1)
        assert origin.counter("fabric_frames_warmed_total") == TENSORS  # v2's deltas against v1, nothing else
        reused = "fabric_encoded_frames_reused_total"
        site = root / "warm-site"
        pull(origin, "v1", root / "warm-v1", site)
        before = origin.counter(reused)
        r2 = pull(origin, "v2", root / "warm-v2", site)
        assert origin.counter(reused) - before == TENSORS  # none encoded for this first site
        assert tree_digest(root / "warm-v2") == tree_digest(v2)
        assert r2["bytes_received"] < 0.5 * new_bytes(origin, "v1", "v2")
    finally:
        origin.stop()


def test_auto_on_loopback_never_sends_more_than_the_stored_forms(models):
    root, v1, v2 = models
    origin = start(root / "auto")
    try:
        publish(origin, v1, "v1")
        publish(origin, v2, "v2")
        site = root / "auto-site"
        pull(origin, "v1", root / "auto-v1", site)
        r2 = pull(origin, "v2", root / "auto-v2", site)
        assert tree_digest(root / "auto-v2") == tree_digest(v2)
        stored = sum((Path(origin.store) / "chunks" / c.split(":")[1][:2] / c.split(":")[1]).stat().st_size - 1
                     for f in manifest(origin, "v2")["files"] for c, _ in f["chunks"]
                     if c not in {x for g in manifest(origin, "v1")["files"] for x, _ in g["chunks"]})
        assert r2["bytes_received"] <= stored
    finally:
        origin.stop()


def test_environment_is_clean():
    assert "FABRIC_ENCODE" not in clean_env()
    assert os.environ.get("FABRIC_ENCODE") in (None, "", "auto")
