"""Reference planning (fabric.core.refplan): for every chunk of a new version, the chunk
of a held version most like it."""

from __future__ import annotations

import json

import numpy as np

from fabric.core import refplan
from fabric.core.digest import digest
from fabric.core.manifest import FileEntry
from fabric.core.refplan import ChunkHint, PlanCache, plan_references

from helpers.versions import Seg, b, hint, step, version, weights


def test_plan_picks_the_newest_held_version_with_the_tensor_same_segment():
    segs = [b(weights(300)) for _ in range(3)]
    v = {}
    for i, created in enumerate(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"]):
        segs = [b(step(np.frombuffer(s, "<u2"))) for s in segs]
        v[i] = version("m", f"v{i}", created, {"m.st": [Seg(s, "w", "BF16") for s in segs]})
    new = [b(step(np.frombuffer(s, "<u2"))) for s in segs]
    target = version("m", "v3", "2026-01-04T00:00:00Z", {"m.st": [Seg(s, "w", "BF16") for s in new]})
    plan = plan_references(target, [v[0], v[2], v[1]])  # any order: newest by created wins
    for k, s in enumerate(new):
        assert hint(plan, s) == ChunkHint("BF16", v[2].tensors[0].chunks[k])
    older = plan_references(target, [v[0], v[1]])
    assert [hint(older, s).reference for s in new] == list(v[1].tensors[0].chunks)
    assert plan_references(target, []) == {digest(s): ChunkHint("BF16") for s in new}


def test_plan_skips_versions_without_the_tensor_or_the_segment():
    old_a, old_b = b(weights(400)), b(weights(400))
    v1 = version("m", "v1", "2026-01-01T00:00:00Z", {"f": [Seg(old_a, "a", "BF16"), Seg(old_b, "a", "BF16")]})
    v2 = version("m", "v2", "2026-01-02T00:00:00Z", {"f": [Seg(b(weights(10)), "other", "BF16")]})
    short = version("m", "v3", "2026-01-03T00:00:00Z", {"f": [Seg(b(weights(30)), "a", "BF16")]})
    new_a, new_b = b(weights(400)), b(weights(400))
    target = version("m", "v4", "2026-01-04T00:00:00Z", {"f": [Seg(new_a, "a", "BF16"), Seg(new_b, "a", "BF16")]})
    plan = plan_references(target, [v1, v2, short])
    assert hint(plan, new_a).reference == short.tensors[0].chunks[0]  # newest with the tensor
    assert hint(plan, new_b).reference == digest(old_b)  # v3 has no segment 1: v1 does


def test_dtype_change_gives_no_reference_unless_an_older_version_matches():
    f32 = weights(256, "F32")
    v1 = version("m", "v1", "2026-01-01T00:00:00Z", {"f": [Seg(b(f32), "w", "F32")]})
    v2 = version("m", "v2", "2026-01-02T00:00:00Z", {"f": [Seg(b(weights(512)), "w", "BF16")]})
    new = b(step(f32))
    target = version("m", "v3", "2026-01-03T00:00:00Z", {"f": [Seg(new, "w", "F32")]})
    assert hint(plan_references(target, [v2]), new) == ChunkHint("F32", None)
    assert hint(plan_references(target, [v1, v2]), new) == ChunkHint("F32", digest(b(f32)))


def test_renamed_and_moved_tensors():
    w, u, x = b(weights(300)), b(weights(300)), b(weights(300))
    old = version("m", "v1", "2026-01-01T00:00:00Z", {
        "a.st": [Seg(w, "w", "BF16"), Seg(u, "u", "BF16"), Seg(x, "dup", "BF16")],
        "b.st": [Seg(b(weights(300)), "dup", "BF16")],
    })
    w2, u2, x2 = (b(step(np.frombuffer(s, "<u2"))) for s in (w, u, x))
    new = version("m", "v2", "2026-01-02T00:00:00Z", {
        "a.st": [Seg(w2, "w.renamed", "BF16")],  # renamed: no reference
        "c.st": [Seg(u2, "u", "BF16"), Seg(x2, "dup", "BF16")],  # moved to another file
    })
    plan = plan_references(new, [old])
    assert hint(plan, w2) == ChunkHint("BF16", None)
    assert hint(plan, u2) == ChunkHint("BF16", digest(u))  # the only tensor named "u"
    assert hint(plan, x2) == ChunkHint("BF16", None)  # two tensors named "dup": ambiguous


def test_unchanged_chunks_get_no_reference_and_keep_their_dtype():
    same, moved = b(weights(300)), b(weights(300))
    old = version("m", "v1", "2026-01-01T00:00:00Z", {"f": [Seg(same, "a", "BF16"), Seg(moved, "b", "BF16")]})
    new = version("m", "v2", "2026-01-02T00:00:00Z", {"f": [Seg(moved, "b", "BF16"), Seg(same, "a", "BF16")]})
    plan = plan_references(new, [old])
    assert plan == {digest(same): ChunkHint("BF16"), digest(moved): ChunkHint("BF16")}


def test_non_tensor_chunks_refer_to_the_same_region_of_the_file():
    rows = [json.dumps({"id": i, "text": "row %d of the data" % i}).encode() * 20 for i in range(12)]
    old = version("d", "v1", "2026-01-01T00:00:00Z", {"data.jsonl": [Seg(r) for r in rows[:10]],
                                                       "cfg.json": [Seg(b'{"a": 1}')]})
    edited = rows[:4] + [rows[4] + b"!", rows[5] + b"?"] + rows[6:10]  # chunks 4 and 5 changed
    inserted = rows[:3] + [b"new row" * 50] + rows[3:10]  # a pure insertion
    appended = rows[:9] + [rows[9] + rows[10], rows[11]]  # the last chunk grew, then one more
    replaced = [b"x" * 300] + rows[1:10]  # the first chunk
    ids = [digest(r) for r in rows]

    def refs(chunks: list[bytes]) -> list[str | None]:
        new = version("d", "v2", "2026-01-02T00:00:00Z", {"data.jsonl": [Seg(c) for c in chunks],
                                                           "cfg.json": [Seg(b'{"a": 2}')]})
        plan = plan_references(new, [old])
        assert plan[digest(b'{"a": 2}')] == ChunkHint(None, digest(b'{"a": 1}'))
        assert all(plan[digest(c)].dtype is None for c in chunks)
        return [plan[digest(c)].reference for c in chunks]

    assert refs(edited) == [None] * 4 + [ids[4], ids[5]] + [None] * 4
    assert refs(inserted)[3] == ids[2]  # the bytes before it
    assert refs(appended)[9:] == [ids[9], ids[9]]
    assert refs(replaced)[0] == ids[0]
    # a file the held version lacks has no references
    other = version("d", "v3", "2026-01-03T00:00:00Z", {"other.jsonl": [Seg(rows[0] + b".")]})
    assert plan_references(other, [old]) == {digest(rows[0] + b"."): ChunkHint()}


def test_region_references_when_content_moved():
    a, b_, c, d = (bytes([i]) * 1000 for i in range(4))
    old = FileEntry("f", 4000, 0o644, tuple((digest(x), len(x)) for x in (a, b_, c, d)))
    new_chunks = [d, b"changed" * 100, a]  # anchors out of order: line up by offset
    new = FileEntry("f", sum(map(len, new_chunks)), 0o644, tuple((digest(x), len(x)) for x in new_chunks))
    refs = refplan._region_references(new, old)
    assert refs[0] == (None, ()) and refs[2] == (None, ()) and refs[1][0] in {digest(x) for x in (a, b_, c, d)}


def test_a_chunk_joining_two_old_chunks_across_a_deletion_names_both():
    rows = [json.dumps({"id": i, "text": "row %d of the data" % i}).encode() * 20 for i in range(10)]
    old = version("d", "v1", "2026-01-01T00:00:00Z", {"data.jsonl": [Seg(r) for r in rows]})
    joined = rows[4][:200] + rows[6][300:]  # rows 4's head, 5 deleted, row 6's tail
    new = version("d", "v2", "2026-01-02T00:00:00Z",
                  {"data.jsonl": [Seg(r) for r in rows[:4] + [joined] + rows[7:]]})
    assert plan_references(new, [old])[digest(joined)] == ChunkHint(None, digest(rows[4]), (digest(rows[6]),))
    # an edit that replaced as many chunks as it has names one reference, as before
    edited = version("d", "v3", "2026-01-03T00:00:00Z",
                     {"data.jsonl": [Seg(r) for r in rows[:4] + [rows[4] + b"!"] + rows[5:]]})
    assert plan_references(edited, [old])[digest(rows[4] + b"!")] == ChunkHint(None, digest(rows[4]))


def test_the_plan_cache_keeps_plans_by_manifest_ids():
    cache = PlanCache(size=1)
    plan = {digest(b"x"): ChunkHint("BF16")}
    assert cache.get("blake3:" + "1" * 64, []) is None
    cache.put("blake3:" + "1" * 64, ["blake3:" + "2" * 64], plan)
    assert cache.get("blake3:" + "1" * 64, ("blake3:" + "2" * 64,)) is plan
    cache.put("blake3:" + "3" * 64, [], {})  # the oldest goes
    assert cache.get("blake3:" + "1" * 64, ["blake3:" + "2" * 64]) is None
