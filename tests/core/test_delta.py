"""Tensor-aware delta on the wire (fabric.wire.delta): planning references, encoding against
the sender's store, decoding against the receiver's, negotiation, rate control,
manifest patches, and a property test over random versions."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fabric.wire import delta
from fabric.core.codec import Encoding
from fabric.wire.delta import ChunkHint, EncodePolicy, Mode
from fabric.core.digest import digest
from fabric.errors import (BadFrame, Conflict, CorruptChunk, InvalidInput, InvalidName, NotFound,
                           ReferenceMismatch, UnknownEncoding)
from fabric.core.manifest import FileEntry, Manifest, TensorEntry
from fabric.publish import LocalTarget, publish
from fabric.store.registry import Registry
from fabric.store.store import Capabilities, ObjectInfo, Store, chunk_key, open_store

from conftest import safetensors_bytes

RNG = np.random.default_rng(42)


# --- an in-memory store, and versions built chunk by chunk ------------------------------------

class MemoryBackend:
    capabilities = Capabilities()  # the five verbs only

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def has(self, key: str) -> bool:
        return key in self.objects

    def get(self, key: str) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise NotFound(key) from None

    def put(self, key: str, data) -> None:
        self.objects[key] = bytes(data)

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        if self.objects.get(key) != expected:
            raise Conflict(key)
        self.objects[key] = bytes(data)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key, len(self.objects[key]), 0.0)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def describe(self) -> str:
        return "memory"


def mem_store() -> Store:
    return Store(MemoryBackend())


@dataclass
class Seg:
    """One chunk of a file: bytes, and the tensor it is a segment of (if any)."""

    data: bytes
    tensor: str | None = None
    dtype: str | None = None


def version(artifact: str, name: str, created: str, files: dict[str, list[Seg]],
            stores: tuple[Store, ...] = (), commit: bool = True) -> Manifest:
    """A manifest whose files are these chunks in order; chunks stored in `stores`."""
    entries, tensors = [], []
    for path, segs in files.items():
        chunks, offset, open_tensor = [], 0, None
        for seg in segs:
            cid = digest(seg.data)
            chunks.append((cid, len(seg.data)))
            if seg.tensor is not None:
                if open_tensor and open_tensor["name"] == seg.tensor:
                    open_tensor["chunks"].append(cid)
                    open_tensor["length"] += len(seg.data)
                else:
                    open_tensor = {"name": seg.tensor, "dtype": seg.dtype, "offset": offset,
                                   "length": len(seg.data), "chunks": [cid]}
                    tensors.append((path, open_tensor))
            else:
                open_tensor = None
            offset += len(seg.data)
            for s in stores:
                s.put_chunk(cid, seg.data, verified=True)
        entries.append(FileEntry(path, offset, 0o644, tuple(chunks)))
    m = Manifest(artifact=artifact, version=name, created=created, files=tuple(entries), tensors=tuple(
        TensorEntry(path, t["name"], t["dtype"], (t["length"] // _W.get(t["dtype"], 1),), t["offset"],
                    t["length"], tuple(t["chunks"])) for path, t in tensors))
    m.validate()
    if commit:
        for s in stores:
            Registry(s).commit(m)
    return m


_W = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "F64": 8}


def weights(n: int, dtype: str = "BF16", rng=RNG) -> np.ndarray:
    w = rng.normal(0, 0.02, n).astype(np.float32)
    return (w.view(np.uint32) >> 16).astype("<u2") if dtype == "BF16" else w


def step(arr: np.ndarray, rng=RNG) -> np.ndarray:
    """`arr` after a small optimizer step: the low bits of most elements move."""
    if arr.dtype == np.float32:
        return (arr + rng.normal(0, 2e-5, arr.shape).astype(np.float32)).astype(np.float32)
    out = arr.copy()
    idx = rng.integers(0, len(arr), len(arr) // 4)
    out[idx] ^= rng.integers(1, 4, len(idx)).astype(out.dtype)
    return out


def b(arr: np.ndarray) -> bytes:
    return arr.tobytes()


def hint(plan: delta.Plan, data: bytes) -> ChunkHint:
    return plan[digest(data)]


# --- planning ------------------------------------------------------------------------------------

def test_plan_picks_the_newest_held_version_with_the_tensor_same_segment():
    segs = [b(weights(300)) for _ in range(3)]
    v = {}
    for i, created in enumerate(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"]):
        segs = [b(step(np.frombuffer(s, "<u2"))) for s in segs]
        v[i] = version("m", f"v{i}", created, {"m.st": [Seg(s, "w", "BF16") for s in segs]})
    new = [b(step(np.frombuffer(s, "<u2"))) for s in segs]
    target = version("m", "v3", "2026-01-04T00:00:00Z", {"m.st": [Seg(s, "w", "BF16") for s in new]})
    plan = delta.plan_references(target, [v[0], v[2], v[1]])  # any order: newest by created wins
    for k, s in enumerate(new):
        assert hint(plan, s) == ChunkHint("BF16", v[2].tensors[0].chunks[k])
    older = delta.plan_references(target, [v[0], v[1]])
    assert [hint(older, s).reference for s in new] == list(v[1].tensors[0].chunks)
    assert delta.plan_references(target, []) == {digest(s): ChunkHint("BF16") for s in new}


def test_plan_skips_versions_without_the_tensor_or_the_segment():
    old_a, old_b = b(weights(400)), b(weights(400))
    v1 = version("m", "v1", "2026-01-01T00:00:00Z", {"f": [Seg(old_a, "a", "BF16"), Seg(old_b, "a", "BF16")]})
    v2 = version("m", "v2", "2026-01-02T00:00:00Z", {"f": [Seg(b(weights(10)), "other", "BF16")]})
    short = version("m", "v3", "2026-01-03T00:00:00Z", {"f": [Seg(b(weights(30)), "a", "BF16")]})
    new_a, new_b = b(weights(400)), b(weights(400))
    target = version("m", "v4", "2026-01-04T00:00:00Z", {"f": [Seg(new_a, "a", "BF16"), Seg(new_b, "a", "BF16")]})
    plan = delta.plan_references(target, [v1, v2, short])
    assert hint(plan, new_a).reference == short.tensors[0].chunks[0]  # newest with the tensor
    assert hint(plan, new_b).reference == digest(old_b)  # v3 has no segment 1: v1 does


def test_dtype_change_gives_no_reference_unless_an_older_version_matches():
    f32 = weights(256, "F32")
    v1 = version("m", "v1", "2026-01-01T00:00:00Z", {"f": [Seg(b(f32), "w", "F32")]})
    v2 = version("m", "v2", "2026-01-02T00:00:00Z", {"f": [Seg(b(weights(512)), "w", "BF16")]})
    new = b(step(f32))
    target = version("m", "v3", "2026-01-03T00:00:00Z", {"f": [Seg(new, "w", "F32")]})
    assert hint(delta.plan_references(target, [v2]), new) == ChunkHint("F32", None)
    assert hint(delta.plan_references(target, [v1, v2]), new) == ChunkHint("F32", digest(b(f32)))


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
    plan = delta.plan_references(new, [old])
    assert hint(plan, w2) == ChunkHint("BF16", None)
    assert hint(plan, u2) == ChunkHint("BF16", digest(u))  # the only tensor named "u"
    assert hint(plan, x2) == ChunkHint("BF16", None)  # two tensors named "dup": ambiguous


def test_unchanged_chunks_get_no_reference_and_keep_their_dtype():
    same, moved = b(weights(300)), b(weights(300))
    old = version("m", "v1", "2026-01-01T00:00:00Z", {"f": [Seg(same, "a", "BF16"), Seg(moved, "b", "BF16")]})
    new = version("m", "v2", "2026-01-02T00:00:00Z", {"f": [Seg(moved, "b", "BF16"), Seg(same, "a", "BF16")]})
    plan = delta.plan_references(new, [old])
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
        plan = delta.plan_references(new, [old])
        assert plan[digest(b'{"a": 2}')] == ChunkHint(None, digest(b'{"a": 1}'))
        assert all(plan[digest(c)].dtype is None for c in chunks)
        return [plan[digest(c)].reference for c in chunks]

    assert refs(edited) == [None] * 4 + [ids[4], ids[5]] + [None] * 4
    assert refs(inserted)[3] == ids[2]  # the bytes before it
    assert refs(appended)[9:] == [ids[9], ids[9]]
    assert refs(replaced)[0] == ids[0]
    # a file the held version lacks has no references
    other = version("d", "v3", "2026-01-03T00:00:00Z", {"other.jsonl": [Seg(rows[0] + b".")]})
    assert delta.plan_references(other, [old]) == {digest(rows[0] + b"."): ChunkHint()}


def test_region_references_when_content_moved():
    a, b_, c, d = (bytes([i]) * 1000 for i in range(4))
    old = FileEntry("f", 4000, 0o644, tuple((digest(x), len(x)) for x in (a, b_, c, d)))
    new_chunks = [d, b"changed" * 100, a]  # anchors out of order: line up by offset
    new = FileEntry("f", sum(map(len, new_chunks)), 0o644, tuple((digest(x), len(x)) for x in new_chunks))
    refs = delta._region_references(new, old)
    assert refs[0] is None and refs[2] is None and refs[1] in {digest(x) for x in (a, b_, c, d)}


# --- encoding and decoding with stores ---------------------------------------------------------------

@pytest.fixture
def pair():
    """A sender's store and a receiver's (in memory)."""
    return mem_store(), mem_store()


def sent(sender: Store, receiver: Store, cid: str, h: ChunkHint, **kw) -> tuple[int, bytes]:
    tag, raw_size, payload = delta.encode_chunk(sender, cid, h, **kw)
    assert isinstance(payload, (bytes, memoryview))
    data = delta.decode_chunk(receiver, cid, tag, raw_size, payload, expected_size=raw_size)
    assert digest(data) == cid
    return tag, data


def test_every_encoding_travels_and_decodes_against_the_receivers_store(pair):
    sender, receiver = pair
    w = weights(50_000)
    text = b"".join(b'{"id": %d, "text": "some words here"}\n' % i for i in range(3000))
    old = {"w": b(w), "text": text, "noise": RNG.bytes(5000)}
    v1 = version("m", "v1", "2026-01-01T00:00:00Z", {
        "m.st": [Seg(old["w"], "w", "BF16")], "d.jsonl": [Seg(old["text"])], "n.bin": [Seg(old["noise"])]},
        stores=(sender, receiver))
    new = {"w": b(step(w)), "fresh": b(weights(50_000)), "text": text[:5000] + b"EDIT" + text[5000:],
           "tiny": b"\x01\x02", "noise": RNG.bytes(5000), "zeros": bytes(20_000)}
    v2 = version("m", "v2", "2026-01-02T00:00:00Z", {
        "m.st": [Seg(new["w"], "w", "BF16"), Seg(new["fresh"], "fresh", "BF16")],
        "d.jsonl": [Seg(new["text"])], "n.bin": [Seg(new["noise"])], "t.bin": [Seg(new["tiny"])],
        "z.bin": [Seg(new["zeros"])]}, stores=(sender,))
    plan = delta.plan_references(v2, [v1])
    tags = {}
    for key, data in new.items():
        tags[key], out = sent(sender, receiver, digest(data), plan[digest(data)])
        assert out == data
    assert tags == {"w": Encoding.XOR, "fresh": Encoding.BYTEGROUP, "text": Encoding.PATCH,
                    "tiny": Encoding.RAW, "noise": Encoding.RAW, "zeros": Encoding.ZSTD}
    # allow_entropy=False still sends the xor of a small step, with stored exponent planes
    assert sent(sender, receiver, digest(new["w"]), plan[digest(new["w"])], allow_entropy=False)[0] == Encoding.XOR


def test_stream_tags_0_and_1_are_the_stores_forms(pair):
    sender, receiver = pair
    for data in (RNG.bytes(3000), b"abc" * 5000):
        cid = digest(data)
        sender.put_chunk(cid, data)
        stored = sender.get_chunk_stored(cid)
        tag, raw_size, payload = delta.stored_frame(stored)
        assert (tag, raw_size, bytes(payload)) == (stored[0], len(data), stored[1:])
        assert delta.decode_chunk(receiver, cid, tag, raw_size, payload) == data
        assert delta.decode_chunk(None, cid, tag, raw_size, payload) == data  # no reference, no store needed


def test_a_reference_the_sender_lacks_means_standalone(pair):
    sender, receiver = pair
    w = weights(20_000)
    new = b(step(w))
    sender.put_chunk(digest(new), new)
    tag, data = sent(sender, receiver, digest(new), ChunkHint("BF16", digest(b(w))))
    assert tag == Encoding.BYTEGROUP and data == new


def test_a_reference_the_receiver_lacks_or_holds_corrupt_is_a_mismatch_never_garbage(tmp_path):
    sender, receiver = open_store(tmp_path / "s"), open_store(tmp_path / "r")
    w = weights(20_000)
    old, new = b(w), b(step(w))
    for s in (sender, receiver):
        s.put_chunk(digest(old), old)
    sender.put_chunk(digest(new), new)
    tag, raw_size, payload = delta.encode_chunk(sender, digest(new), ChunkHint("BF16", digest(old)))
    assert tag == Encoding.XOR
    assert delta.decode_chunk(receiver, digest(new), tag, raw_size, payload) == new
    with pytest.raises(ReferenceMismatch):
        delta.decode_chunk(mem_store(), digest(new), tag, raw_size, payload)
    with pytest.raises(ReferenceMismatch):
        delta.decode_chunk(None, digest(new), tag, raw_size, payload)
    # the receiver's copy of the reference rots on disk: refused, not decoded into garbage
    path = tmp_path / "r" / chunk_key(digest(old))
    rotten = bytearray(path.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    path.write_bytes(bytes(rotten))
    with pytest.raises(ReferenceMismatch):
        delta.decode_chunk(receiver, digest(new), tag, raw_size, payload)


def test_the_sender_with_a_rotten_reference_is_caught_by_the_chunk_id(tmp_path):
    for compress in (False, True):
        sender, receiver = open_store(tmp_path / f"s{compress}", compress=compress), mem_store()
        w = weights(20_000)
        old, new = b(w), b(step(w))
        sender.put_chunk(digest(old), old)
        receiver.put_chunk(digest(old), old)
        sender.put_chunk(digest(new), new)
        path = tmp_path / f"s{compress}" / chunk_key(digest(old))
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0x40  # the sender does not verify its reference
        path.write_bytes(bytes(raw))
        tag, raw_size, payload = delta.encode_chunk(sender, digest(new), ChunkHint("BF16", digest(old)))
        if tag == Encoding.XOR:  # xor against the rotten bytes: the receiver's check refuses it
            with pytest.raises(CorruptChunk):
                delta.decode_chunk(receiver, digest(new), tag, raw_size, payload)
        else:  # the stored form did not even decompress: sent standalone
            assert delta.decode_chunk(receiver, digest(new), tag, raw_size, payload) == new
        assert compress or tag == Encoding.XOR


def test_decode_refuses_bad_frames(pair):
    sender, receiver = pair
    w = weights(5000)
    old, new = b(w), b(step(w))
    for s in (sender, receiver):
        s.put_chunk(digest(old), old)
    sender.put_chunk(digest(new), new)
    cid = digest(new)
    tag, raw_size, payload = delta.encode_chunk(sender, cid, ChunkHint("BF16", digest(old)))
    payload = bytes(payload)
    with pytest.raises(BadFrame):
        delta.decode_chunk(receiver, cid, tag, raw_size, payload, expected_size=raw_size + 2)
    with pytest.raises(BadFrame):
        delta.decode_chunk(receiver, cid, tag, raw_size + 2, payload)
    with pytest.raises(BadFrame):
        delta.decode_chunk(receiver, cid, tag, raw_size, payload[:-1])
    with pytest.raises(BadFrame):  # a reference id that is not an id
        delta.decode_chunk(receiver, cid, tag, raw_size, payload[:5] + b"md5:" + payload[9:])
    with pytest.raises(UnknownEncoding):
        delta.decode_chunk(receiver, cid, 9, raw_size, payload)
    with pytest.raises(CorruptChunk):
        delta.decode_chunk(receiver, digest(b"other"), tag, raw_size, payload)


# --- negotiation ----------------------------------------------------------------------------------

@pytest.fixture
def origin_and_site():
    """An origin holding v1..v3 of `m`, a site holding v1 and v2 (both registries committed)."""
    origin, site = mem_store(), mem_store()
    arrays = [weights(4000) for _ in range(3)]
    versions = []
    for i in range(3):
        arrays = [step(a) for a in arrays]
        stores = (origin, site) if i < 2 else (origin,)
        versions.append(version("m", f"v{i + 1}", f"2026-01-0{i + 1}T00:00:00Z", {
            "m.st": [Seg(b(a), f"t{k}", "BF16") for k, a in enumerate(arrays)],
            "cfg": [Seg(b'{"step": %d}' % i)]}, stores=stores))
    return origin, site, versions


def test_the_receiver_lists_what_it_holds_newest_first(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    fields = delta.request_fields(site, v3)
    assert fields == {"artifact": "m", "version": "v3", "have": ["v2", "v1"],
                      "encodings": ["raw", "zstd", "bytegroup", "xor", "patch"]}
    assert delta.request_fields(site, v2)["have"] == ["v1"]
    assert delta.request_fields(mem_store(), v3)["have"] == []
    ids = list(v3.unique_chunks())
    assert delta.fetch_body(ids, None) == {"ids": ids}
    body = delta.fetch_body(ids, fields, standalone={ids[1], "blake3:" + "0" * 64})
    assert body["standalone"] == [ids[1]] and body["have"] == ["v2", "v1"]


def test_plan_request_plans_against_the_newest_held_version(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    ids = list(v3.unique_chunks())
    body = delta.fetch_body(ids, delta.request_fields(site, v3))
    plan = delta.plan_request(origin, body)
    for t in v3.tensors:
        old = next(o for o in v2.tensors if o.name == t.name)
        assert plan.hint(t.chunks[0]) == ChunkHint("BF16", old.chunks[0])
    assert plan.hint("blake3:" + "1" * 64) == delta.STANDALONE  # not in the version: standalone
    assert delta.plan_request(origin, body).hints is plan.hints  # cached by manifest ids
    # the receiver could not decode one against its reference: it asks for it standalone
    again = delta.plan_request(origin, delta.fetch_body(ids, delta.request_fields(site, v3), {v3.tensors[0].chunks[0]}))
    assert again.hint(v3.tensors[0].chunks[0]) == ChunkHint("BF16")
    assert again.hint(v3.tensors[1].chunks[0]).reference is not None


def test_plan_request_falls_back_to_stored_forms(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    ids = list(v3.unique_chunks())
    fields = delta.request_fields(site, v3)
    assert delta.plan_request(origin, {"ids": ids}) is None  # an old receiver
    assert delta.plan_request(site, delta.fetch_body(ids, fields)) is None  # the sender lacks v3
    assert delta.plan_request(origin, delta.fetch_body(ids, fields), may=lambda a: False) is None
    assert delta.plan_request(origin, delta.fetch_body(ids, dict(fields, encodings=["raw"]))) is None
    unknown = delta.plan_request(origin, delta.fetch_body(ids, dict(fields, have=["v9", "v1"])))
    assert unknown.hint(v3.tensors[0].chunks[0]).reference == v1.tensors[0].chunks[0]
    planes_only = delta.plan_request(origin, delta.fetch_body(ids, dict(fields, encodings=["raw", "zstd", "bytegroup"])))
    assert planes_only.hint(v3.tensors[0].chunks[0]) == ChunkHint("BF16")
    assert planes_only.names == ["raw", "zstd", "bytegroup"]
    future = delta.plan_request(origin, delta.fetch_body(ids, dict(fields, encodings=fields["encodings"] + ["lz9"])))
    assert future.names == fields["encodings"]  # names it does not know are ignored


@pytest.mark.parametrize("bad, error", [
    ({"encodings": "xor"}, InvalidInput), ({"encodings": [1]}, InvalidInput), ({"have": "v1"}, InvalidInput),
    ({"have": ["../x"]}, InvalidName), ({"artifact": None}, InvalidName), ({"standalone": "x"}, InvalidInput),
])
def test_malformed_delta_fields_are_refused(origin_and_site, bad, error):
    origin, site, (v1, v2, v3) = origin_and_site
    body = dict(delta.fetch_body(list(v3.unique_chunks()), delta.request_fields(site, v3)), **bad)
    with pytest.raises(error):
        delta.plan_request(origin, body)


def test_plan_for_request_runs_off_the_loop(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    body = delta.fetch_body(list(v3.unique_chunks()), delta.request_fields(site, v3))
    assert asyncio.run(delta.plan_for_request(origin, {"ids": []})) is None
    assert asyncio.run(delta.plan_for_request(origin, body)).hints


def test_serving_getter_encodes_and_reports_to_the_policy(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    body = delta.fetch_body(list(v3.unique_chunks()), delta.request_fields(site, v3))
    plan = delta.plan_request(origin, body)
    policy = EncodePolicy()

    async def get(cid):
        try:
            return origin.get_chunk_stored(cid)
        except NotFound:
            return None

    async def run():
        serve = delta.serving_getter(get, origin, plan, policy)
        assert await serve("blake3:" + "2" * 64) is None
        out = {}
        for cid in body["ids"]:
            out[cid] = await serve(cid)
        return out

    frames = asyncio.run(run())
    for cid, (tag, raw_size, payload) in frames.items():
        assert delta.decode_chunk(site, cid, tag, raw_size, payload) == origin.get_chunk(cid)
    assert {t for t, _, _ in frames.values()} >= {Encoding.XOR}
    assert sum(policy.chosen.values()) == len(frames)


# --- rate control ----------------------------------------------------------------------------------

def feed(policy: EncodePolicy, chunks: int, *, link_s_per_byte: float, codec_s_per_byte: float = 1e-9,
         ratio: float = 0.4, light_ratio: float = 0.6) -> list[Mode]:
    """Simulate a response: each chunk is 8 MiB, encoded in the mode chosen, then written."""
    modes = []
    raw = 8 << 20
    for _ in range(chunks):
        mode = policy.choose()
        modes.append(mode)
        wire = raw if mode == Mode.STORED else int(raw * (ratio if mode == Mode.FULL else light_ratio))
        seconds = 0.0 if mode == Mode.STORED else raw * codec_s_per_byte * (1 if mode == Mode.FULL else 0.5)
        policy.encoded(mode, raw, wire, seconds, stored=raw)
        policy.wrote(wire, wire * link_s_per_byte)
    return modes


def test_policy_starts_compact_and_keeps_compressing_on_a_slow_link():
    policy = EncodePolicy()
    assert policy.choose() == Mode.FULL  # nothing measured yet: fewest bytes
    modes = feed(EncodePolicy(), 64, link_s_per_byte=1e-8)  # 100 MB/s link, 1 GB/s codec
    assert modes.count(Mode.FULL) >= 56


def test_policy_stops_encoding_when_the_link_outruns_the_codec():
    modes = feed(EncodePolicy(), 64, link_s_per_byte=1e-11, codec_s_per_byte=2e-9)  # writes never wait
    assert modes[-16:].count(Mode.STORED) >= 14
    assert Mode.FULL in modes[16:]  # it keeps probing


def test_policy_picks_light_when_it_is_the_fastest():
    modes = feed(EncodePolicy(), 96, link_s_per_byte=1.6e-9, codec_s_per_byte=2e-9)
    # FULL: max(2, 0.64) = 2 ns/B; LIGHT: max(1, 0.96) = 1 ns/B; STORED: 1.6 ns/B
    assert modes[-32:].count(Mode.LIGHT) >= 28


def test_policy_sends_incompressible_data_stored_even_on_a_slow_link():
    # the codec gains nothing (ratio 1): every mode waits on the link alike, and the tie
    # goes to the one that spends no codec time
    modes = feed(EncodePolicy(), 64, link_s_per_byte=1e-8, ratio=1.0, light_ratio=1.0)
    assert modes[-16:].count(Mode.STORED) >= 14


def test_policy_per_peer():
    assert delta.policy_for(("site-a", "10.0.0.1")) is delta.policy_for(("site-a", "10.0.0.1"))
    assert delta.policy_for(("site-b", "10.0.0.2")) is not delta.policy_for(("site-a", "10.0.0.1"))


# --- manifests as patches ------------------------------------------------------------------------------

def test_manifest_patch_round_trip_and_refusals(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    base = delta.manifest_base(site, "m", exclude="v3")
    assert base.version == "v2" and base.canonical == v2.canonical()
    body, ctype, headers = delta.serve_manifest(origin, "m", "v3", base.version)
    assert ctype == delta.MANIFEST_PATCH and headers[delta.BASE_HEADER] == v2.id
    assert len(body) < len(v3.canonical()) // 2
    assert delta.read_manifest_body(body, ctype, headers, base) == v3.canonical()
    # the server holds no such base, or none is offered: canonical JSON, as before
    for offered in (None, "v7", "v3"):
        plain, ctype2, headers2 = delta.serve_manifest(origin, "m", "v3", offered)
        assert ctype2 == "application/json" and plain == v3.canonical() and delta.BASE_HEADER not in headers2
        assert delta.read_manifest_body(plain, ctype2, headers2, base) == v3.canonical()
    with pytest.raises(NotFound):
        delta.serve_manifest(origin, "m", "v9", "v1")
    with pytest.raises(BadFrame):  # a patch against a base the receiver did not offer
        delta.read_manifest_body(body, ctype, headers, delta.ManifestBase("v1", v1.id, v1.canonical()))
    with pytest.raises(BadFrame):
        delta.read_manifest_body(body[:-3], ctype, headers, base)
    with pytest.raises(BadFrame):
        delta.read_manifest_body(body, ctype, dict(headers, **{"X-Fabric-Manifest-Id": v2.id}), base)
    assert delta.manifest_base(mem_store(), "m") is None


# --- publishing -------------------------------------------------------------------------------------------

def test_upload_encoding_is_standalone_and_only_what_the_origin_decodes():
    w = b(weights(50_000))
    assert delta.encode_upload(w, "BF16")[0] in (Encoding.RAW, Encoding.ZSTD)  # default: every origin decodes
    tag, raw_size, payload = delta.encode_upload(w, "BF16", encodings=delta.ENCODINGS)
    assert tag == Encoding.BYTEGROUP and len(payload) < 0.8 * len(w)
    assert delta.decode_chunk(None, digest(w), tag, raw_size, payload) == w
    text = b"hello world " * 1000
    assert delta.encode_upload(text, None, encodings=delta.ENCODINGS)[0] == Encoding.ZSTD


# --- a real publish: safetensors files through the publisher ---------------------------------------

def test_published_safetensors_versions_plan_and_travel(tmp_path):
    sender, receiver = open_store(tmp_path / "origin"), open_store(tmp_path / "site")
    arrays = {f"layers.{i}.weight": RNG.normal(0, 0.02, (64, 256)).astype(np.float32) for i in range(4)}
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "model.safetensors").write_bytes(safetensors_bytes(list(arrays.items())))
    moved = {k: step(v) for k, v in arrays.items()}
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "model.safetensors").write_bytes(safetensors_bytes(list(reversed(list(moved.items())))))
    for v in ("v1", "v2"):
        publish(tmp_path / v, artifact="m", version=v, target=LocalTarget(sender))
    publish(tmp_path / "v1", artifact="m", version="v1", target=LocalTarget(receiver))
    v2 = Registry(sender).manifest("m", "v2")
    body = delta.fetch_body(receiver.missing(v2.chunk_ids()), delta.request_fields(receiver, v2))
    plan = delta.plan_request(sender, body)
    wire = raw = 0
    tags = []
    for cid in body["ids"]:
        tag, raw_size, payload = delta.encode_chunk(sender, cid, plan.hint(cid), encodings=plan.names)
        receiver.put_chunk(cid, delta.decode_chunk(receiver, cid, tag, raw_size, payload), verified=True)
        wire, raw = wire + len(payload), raw + raw_size
        tags.append(tag)
    assert sorted(tags) == [Encoding.XOR] * 4 + [Encoding.PATCH]  # the tensors, and the reordered header
    assert wire < 0.65 * raw  # fp32 after a 1e-3 relative step: the low mantissa bytes are noise
    assert not receiver.missing(v2.chunk_ids())


# --- the property: random versions round-trip through plan → encode → decode -------------------------

DTYPES = ["BF16", "F16", "F32", "I8", "U8", "I32", "F64"]


def tensor_bytes(rng, dtype: str, count: int) -> bytes:
    """`count` elements that look like weights of `dtype` (noise for the byte types)."""
    w = rng.normal(0, 0.02, count)
    if dtype in ("F32", "F64"):
        return w.astype("<f4" if dtype == "F32" else "<f8").tobytes()
    if dtype == "F16":
        return w.astype("<f2").tobytes()
    if dtype == "BF16":
        return (w.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if dtype == "I32":
        return rng.integers(-1000, 1000, count).astype("<i4").tobytes()
    return rng.bytes(count)


def text(rng, n: int) -> bytes:
    words = ["alpha", "beta", "gamma", "delta", "layer", "weight", "step"]
    return " ".join(rng.choice(words, n)).encode()


@st.composite
def histories(draw):
    """2-3 versions of a model: tensors (1-3 segments each) that change, move, vanish, change dtype."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    names = [f"t{i}" for i in range(draw(st.integers(1, 5)))]
    state = {}
    for n in names:
        dtype = draw(st.sampled_from(DTYPES))
        state[n] = (draw(st.sampled_from(["a.st", "b.st"])), dtype,
                    [tensor_bytes(rng, dtype, int(rng.integers(1, 300))) for _ in range(int(rng.integers(1, 4)))])
    out = []
    for v in range(draw(st.integers(2, 3))):
        files: dict[str, list[Seg]] = {"a.st": [Seg(b"header-a" + bytes([v]))], "b.st": [Seg(b"header-b")],
                                       "notes.txt": [Seg(text(rng, int(rng.integers(1, 200))))]}
        for n, (path, dtype, segs) in state.items():
            files[path] += [Seg(s, n, dtype) for s in segs]
        out.append(files)
        for n in list(state):  # the next version
            path, dtype, segs = state[n]
            action = draw(st.sampled_from(["same", "step", "step", "grow", "shrink", "dtype", "move", "drop"]))
            if action == "step":
                segs = [bytes(x ^ (1 if rng.random() < 0.2 else 0) for x in s) for s in segs]
            elif action == "grow":
                segs = segs + [tensor_bytes(rng, dtype, 7)]
            elif action == "shrink" and len(segs) > 1:
                segs = segs[:-1]
            elif action == "dtype":
                dtype = draw(st.sampled_from(DTYPES))
                segs = [s[: len(s) - len(s) % _W[dtype]] or bytes(_W[dtype]) for s in segs]
            elif action == "move":
                path = "b.st" if path == "a.st" else "a.st"
            elif action == "drop":
                del state[n]
                continue
            state[n] = (path, dtype, segs)
        if draw(st.booleans()):
            state[f"new{v}"] = ("a.st", "BF16", [tensor_bytes(rng, "BF16", 64)])
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), held=st.integers(0, 2), allow_entropy=st.booleans(), lose=st.booleans())
def test_property_plan_encode_decode_round_trips(history, held, allow_entropy, lose):
    sender, receiver = mem_store(), mem_store()
    manifests = []
    for i, files in enumerate(history):
        last = i == len(history) - 1
        stores = (sender,) if last or i > held else (sender, receiver)
        manifests.append(version("m", f"v{i}", f"2026-01-0{i + 1}T00:00:00Z", files, stores=stores))
    target = manifests[-1]
    body = delta.fetch_body(receiver.missing(target.chunk_ids()), delta.request_fields(receiver, target))
    if lose and body["have"]:  # the receiver lost a chunk it claims: a mismatch, then standalone
        held_chunks = [c for c in Registry(receiver).manifest("m", body["have"][0]).unique_chunks()]
        receiver.delete_chunk(held_chunks[-1])
    plan = delta.plan_request(sender, body)
    assert plan is not None
    retry = set()
    for cid in body["ids"]:
        tag, raw_size, payload = delta.encode_chunk(sender, cid, plan.hint(cid), allow_entropy=allow_entropy,
                                                    encodings=plan.names)
        event(Encoding(tag).name.lower())
        try:
            data = delta.decode_chunk(receiver, cid, tag, raw_size, payload,
                                      expected_size=target.unique_chunks()[cid])
        except ReferenceMismatch:
            assert lose
            event("reference lost")
            retry.add(cid)
            continue
        assert data == sender.get_chunk(cid)
    if retry:
        again = delta.plan_request(sender, delta.fetch_body(sorted(retry), delta.request_fields(receiver, target), retry))
        for cid in retry:
            assert again.hint(cid).reference is None
            tag, raw_size, payload = delta.encode_chunk(sender, cid, again.hint(cid), encodings=again.names)
            assert delta.decode_chunk(receiver, cid, tag, raw_size, payload) == sender.get_chunk(cid)


def test_upload_encoder_follows_its_policy(monkeypatch):
    w = b(weights(50_000))
    chunks = [(digest(w), w, "BF16"), (digest(b"cfg" * 100), b"cfg" * 100, None)]
    full = delta.UploadEncoder(EncodePolicy(fixed=Mode.FULL))
    frames = full.frames(chunks, delta.ENCODINGS)
    assert [f[1] for f in frames] == [Encoding.BYTEGROUP, Encoding.ZSTD]
    for cid, tag, raw_size, payload in frames:
        assert delta.decode_chunk(None, cid, tag, raw_size, payload) == dict((c, d) for c, d, _ in chunks)[cid]
    assert [f[1] for f in full.frames(chunks, None)] == [Encoding.ZSTD, Encoding.ZSTD]  # an old origin
    stored = delta.UploadEncoder(EncodePolicy(fixed=Mode.STORED)).frames(chunks, delta.ENCODINGS)
    assert [(f[1], bytes(f[3])) for f in stored] == [(Encoding.RAW, w), (Encoding.RAW, b"cfg" * 100)]
    auto = delta.UploadEncoder(EncodePolicy())
    auto.frames(chunks, delta.ENCODINGS)
    auto.uploaded(10 << 20, 0.0)  # a link that takes no time: stop encoding
    assert {f[1] for f in auto.frames(chunks * 4, delta.ENCODINGS)[:-1]} == {Encoding.RAW}


def test_fabric_encode_pins_the_mode(monkeypatch):
    monkeypatch.setenv("FABRIC_ENCODE", "stored")
    assert delta.configured_mode() is Mode.STORED
    assert delta.policy_for(("pinned", 1)).choose() is Mode.STORED
    monkeypatch.setenv("FABRIC_ENCODE", "auto")
    assert delta.configured_mode() is None
    monkeypatch.setenv("FABRIC_ENCODE", "fastest")
    with pytest.raises(InvalidInput):
        delta.configured_mode()


def test_parse_encodings_header():
    assert delta.parse_encodings("raw,zstd,bytegroup,xor,patch") == list(delta.ENCODINGS)
    assert delta.parse_encodings(" raw , zstd,bytegroup,lz9") == ["raw", "zstd", "bytegroup"]
    assert delta.parse_encodings(None) == ["raw", "zstd"]
    assert delta.parse_encodings("bytegroup") == ["raw", "zstd"]  # an origin must decode raw and zstd
