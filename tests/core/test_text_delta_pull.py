"""Text deltas end to end with real processes: a `fabric origin` (FABRIC_ENCODE=full, as over
a slow link), `fabric publish --origin` and `fabric pull --origin --store --json`.

A jsonl dataset v1, and v2 = v1 with a block of lines deleted in the middle: the chunk
that joins the head of one old chunk to the tail of a later one travels as `multipatch`
(both old chunks as its prefix), so the second pull receives a small fraction of the
new chunks' bytes (a single-reference `patch` would send half of that chunk compressed),
and the files are byte-identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.http import request
from helpers.origin import PUBLISH_SECRET, PULL_SECRET, OriginProcess, fabric_json, tree_digest, write_token_file

pytestmark = pytest.mark.timeout(300)

WORDS = ("the of and to in is was for on that with model weight layer token train data loss step "
         "river mountain city music history science garden window paper market engine signal").split()


def rows(rng: np.random.Generator, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS, int(rng.integers(8, 40))))
        out.append(json.dumps({"id": i, "text": text, "score": round(float(rng.random()), 6)},
                              separators=(",", ":")).encode() + b"\n")
    return out


def new_bytes(origin: OriginProcess, old: str, new: str) -> int:
    def chunks(version: str) -> list:
        r = request(origin.url, "GET", f"/v1/artifacts/data/versions/{version}", token=PULL_SECRET)
        assert r.status == 200
        return [c for f in r.json()["files"] for c in f["chunks"]]
    held = {c for c, _ in chunks(old)}
    return sum(n for c, n in chunks(new) if c not in held)


def test_a_deletion_travels_as_a_multipatch_against_both_sides(tmp_path):
    lines = rows(np.random.default_rng(3), 12_000)  # about 2.3 MB: some 35 chunks
    deleted = lines[:5000] + lines[7000:]  # about 380 KB, several whole chunks, gone
    for name, content in (("v1", lines), ("v2", deleted)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.jsonl").write_bytes(b"".join(content))
    origin = OriginProcess(tmp_path / "origin-store", write_token_file(tmp_path / "tokens.toml"),
                           tmp_path / "origin.log")
    origin.env = {"FABRIC_ENCODE": "full"}
    origin.start()
    try:
        for v in ("v1", "v2"):
            fabric_json("publish", tmp_path / v, "--artifact", "data", "--version", v, "--origin", origin.url,
                        "--token", PUBLISH_SECRET)
        site = tmp_path / "site"
        for v in ("v1", "v2"):
            got = fabric_json("pull", f"data@{v}", tmp_path / f"dest-{v}", "--origin", origin.url,
                              "--token", PULL_SECRET, "--store", site)
            assert tree_digest(tmp_path / f"dest-{v}") == tree_digest(tmp_path / v)
        raw = new_bytes(origin, "v1", "v2")
        assert 0 < got["chunks_fetched"] <= 3 and raw > 20_000
        assert got["bytes_received"] < 0.05 * raw, (got, raw)
    finally:
        origin.stop()
