"""Serving chunks (fabric.wire.chunks) and decoding them (fabric.wire.frames.decode):
encoding against the sender's store, decoding against the receiver's, planning a
request, the serving getter, uploads, and a property test over random versions."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fabric.core import codec
from fabric.core.codec import TAG_PACKED, Encoding
from fabric.core.digest import digest
from fabric.core.policy import EncodePolicy, Mode
from fabric.core.refplan import STANDALONE, ChunkHint, PlanCache, plan_references
from fabric.errors import BadFrame, ConfigError, CorruptChunk, NotFound, ReferenceMismatch, UnknownEncoding
from fabric.publish import LocalTarget, publish
from fabric.store.registry import Registry
from fabric.store.store import Store, chunk_key, open_store
from fabric.wire import chunks, client, negotiate, protocol
from fabric.wire import frames as wire_frames
from fabric.wire.framecache import Forwarded, FrameCache, key as frame_key

from helpers.files import safetensors_bytes
from helpers.versions import RNG, Seg, _W, b, mem_store, origin_and_site_stores, receive, step, version, weights


@pytest.fixture
def pair():
    """A sender's store and a receiver's (in memory)."""
    return mem_store(), mem_store()


def sent(sender: Store, receiver: Store, cid: str, h: ChunkHint, **kw) -> tuple[int, bytes]:
    tag, raw_size, payload = chunks.encode_chunk(sender, cid, h, **kw)
    assert isinstance(payload, (bytes, memoryview))
    data = receive(receiver, cid, tag, raw_size, payload, expected_size=raw_size)
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
    plan = plan_references(v2, [v1])
    tags = {}
    for key, data in new.items():
        tags[key], out = sent(sender, receiver, digest(data), plan[digest(data)])
        assert out == data
    assert tags == {"w": Encoding.DELTAPACK, "fresh": Encoding.BYTEGROUP, "text": Encoding.PATCH,
                    "tiny": Encoding.RAW, "noise": Encoding.RAW, "zeros": Encoding.ZSTD}
    # allow_entropy=False still sends the xor of a small step, with stored exponent planes
    assert sent(sender, receiver, digest(new["w"]), plan[digest(new["w"])], allow_entropy=False)[0] in (
        Encoding.XOR, Encoding.DELTAPACK)


def test_stream_tags_0_and_1_are_the_stores_forms(pair):
    sender, receiver = pair
    for data in (RNG.bytes(3000), b"abc" * 5000):
        cid = digest(data)
        sender.put_chunk(cid, data)
        stored = sender.get_chunk_stored(cid)
        tag, raw_size, payload = chunks.stored_frame(stored)
        assert (tag, raw_size, bytes(payload)) == (stored[0], len(data), stored[1:])
        assert receive(receiver, cid, tag, raw_size, payload) == data
        assert receive(None, cid, tag, raw_size, payload) == data  # no reference, no store needed


def test_a_reference_the_sender_lacks_means_standalone(pair):
    sender, receiver = pair
    w = weights(20_000)
    new = b(step(w))
    sender.put_chunk(digest(new), new)
    tag, data = sent(sender, receiver, digest(new), ChunkHint("BF16", digest(b(w))))
    assert tag == Encoding.BYTEGROUP and data == new


def test_the_frame_budget_is_the_roles_unless_the_environment_gives_one(monkeypatch):
    from aiohttp import web
    from fabric.store.chunk_index import ChunkIndex
    from fabric.wire.framecache import ORIGIN_BYTES
    from fabric.wire.server import STORE

    def budget() -> int:
        app = web.Application()
        app[STORE] = mem_store()
        chunks.chunk_routes(app, index=ChunkIndex(lambda: {}))
        return app[chunks.FRAMES].budget
    monkeypatch.delenv("FABRIC_FRAME_CACHE_MB", raising=False)
    assert budget() == ORIGIN_BYTES
    monkeypatch.setenv("FABRIC_FRAME_CACHE_MB", "0")
    assert budget() == 0
    monkeypatch.setenv("FABRIC_FRAME_CACHE_MB", "lots")
    with pytest.raises(ConfigError, match="FABRIC_FRAME_CACHE_MB"):
        budget()


def test_requests_asking_at_once_for_a_frame_being_encoded_wait_for_it_and_it_is_encoded_once(origin_and_site,
                                                                                               monkeypatch):
    origin, site, (v1, v2, v3) = origin_and_site
    body = negotiate.fetch_body(list(v3.unique_chunks()), negotiate.request_fields(site, v3))
    plan = chunks.plan_request(origin, body)
    cache, encoded = FrameCache(64 << 20), []
    real = chunks._serve_one

    def counting(store, chunk_id, *a):
        encoded.append(chunk_id)
        return real(store, chunk_id, *a)
    monkeypatch.setattr(chunks, "_serve_one", counting)

    async def get(cid):
        await asyncio.sleep(0)  # a read yields to the loop, as a store's does: others arrive meanwhile
        return origin.get_chunk_stored(cid)

    async def children(n):
        serves = [chunks.serving_getter(get, origin, plan, EncodePolicy(fixed=Mode.FULL), cache=cache)
                  for _ in range(n)]
        return await asyncio.gather(*(serve(cid) for serve in serves for cid in body["ids"]))

    frames = asyncio.run(children(4))
    assert sorted(encoded) == sorted(body["ids"])  # each chunk encoded once for the four
    by_id = {}  # gather's order: child by child, each in the order of the ids
    for idx, frame in enumerate(frames):
        by_id.setdefault(body["ids"][idx % len(body["ids"])], set()).add((frame[0], frame[1], bytes(frame[2])))
    assert all(len(v) == 1 for v in by_id.values())  # the same frame to every child
    for cid, ((tag, raw_size, payload),) in by_id.items():
        assert receive(site, cid, tag, raw_size, payload) == origin.get_chunk(cid)


def test_when_the_encoding_request_fails_the_waiting_one_encodes_for_itself(origin_and_site, monkeypatch):
    origin, site, (v1, v2, v3) = origin_and_site
    body = negotiate.fetch_body(list(v3.unique_chunks()), negotiate.request_fields(site, v3))
    plan, cache, calls = chunks.plan_request(origin, body), FrameCache(64 << 20), []
    real = chunks._serve_one

    def first_fails(*a):
        calls.append(a[1])
        if len(calls) == 1:
            raise OSError("disk went away")
        return real(*a)
    monkeypatch.setattr(chunks, "_serve_one", first_fails)

    async def get(cid):
        return origin.get_chunk_stored(cid)

    async def two():
        cid = body["ids"][0]
        serves = [chunks.serving_getter(get, origin, plan, EncodePolicy(fixed=Mode.FULL), cache=cache)
                  for _ in range(2)]
        return await asyncio.gather(*(serve(cid) for serve in serves), return_exceptions=True)

    failed, frame = asyncio.run(asyncio.wait_for(two(), 10))
    assert isinstance(failed, OSError) and len(calls) == 2
    assert receive(site, body["ids"][0], frame[0], frame[1], frame[2]) == origin.get_chunk(body["ids"][0])
    assert len(cache) == 1


def test_a_sender_without_the_reference_keeps_no_frame_and_keeps_the_delta_once_it_holds_it(pair):
    sender, receiver = pair
    w = weights(20_000)
    old, new = b(w), b(step(w))
    sender.put_chunk(digest(new), new)
    receiver.put_chunk(digest(old), old)
    hint = ChunkHint("BF16", digest(old))
    plan = chunks.RequestPlan({digest(new): hint}, frozenset(Encoding), frozenset())
    cache = FrameCache(1 << 20)

    async def get(cid):
        return sender.get_chunk_stored(cid)

    async def serve():
        return await chunks.serving_getter(get, sender, plan, EncodePolicy(fixed=Mode.FULL), cache=cache)(digest(new))

    assert asyncio.run(serve())[0] == Encoding.BYTEGROUP and len(cache) == 0  # a relay still fetching `old`
    sender.put_chunk(digest(old), old)
    tag, raw_size, payload = asyncio.run(serve())
    assert codec.body_reference(tag, payload) == digest(old) and len(cache) == 1
    assert receive(receiver, digest(new), tag, raw_size, payload) == new


def test_a_reference_the_receiver_lacks_or_holds_corrupt_is_a_mismatch_never_garbage(tmp_path):
    sender, receiver = open_store(tmp_path / "s"), open_store(tmp_path / "r")
    w = weights(20_000)
    old, new = b(w), b(step(w))
    for s in (sender, receiver):
        s.put_chunk(digest(old), old)
    sender.put_chunk(digest(new), new)
    tag, raw_size, payload = chunks.encode_chunk(sender, digest(new), ChunkHint("BF16", digest(old)))
    assert tag in (Encoding.XOR, Encoding.DELTAPACK)
    assert receive(receiver, digest(new), tag, raw_size, payload) == new
    with pytest.raises(ReferenceMismatch):
        receive(mem_store(), digest(new), tag, raw_size, payload)
    with pytest.raises(ReferenceMismatch):
        receive(None, digest(new), tag, raw_size, payload)
    # the receiver's copy of the reference rots on disk: refused, not decoded into garbage
    path = tmp_path / "r" / chunk_key(digest(old))
    rotten = bytearray(path.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    path.write_bytes(bytes(rotten))
    with pytest.raises(ReferenceMismatch):
        receive(receiver, digest(new), tag, raw_size, payload)


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
        tag, raw_size, payload = chunks.encode_chunk(sender, digest(new), ChunkHint("BF16", digest(old)))
        if tag in (Encoding.XOR, Encoding.DELTAPACK):  # against the rotten bytes: the receiver's check refuses it
            with pytest.raises(CorruptChunk):
                receive(receiver, digest(new), tag, raw_size, payload)
        else:  # the stored form did not even decompress: sent standalone
            assert receive(receiver, digest(new), tag, raw_size, payload) == new
        assert compress or tag in (Encoding.XOR, Encoding.DELTAPACK)


def test_decode_refuses_bad_frames(pair):
    sender, receiver = pair
    w = weights(5000)
    old, new = b(w), b(step(w))
    for s in (sender, receiver):
        s.put_chunk(digest(old), old)
    sender.put_chunk(digest(new), new)
    cid = digest(new)
    tag, raw_size, payload = chunks.encode_chunk(sender, cid, ChunkHint("BF16", digest(old)))
    payload = bytes(payload)
    with pytest.raises(BadFrame):
        receive(receiver, cid, tag, raw_size, payload, expected_size=raw_size + 2)
    with pytest.raises(BadFrame):
        receive(receiver, cid, tag, raw_size + 2, payload)
    with pytest.raises(BadFrame):
        receive(receiver, cid, tag, raw_size, payload[:-1])
    with pytest.raises(BadFrame):  # a reference id that is not an id
        receive(receiver, cid, tag, raw_size, payload[:5] + b"md5:" + payload[9:])
    with pytest.raises(UnknownEncoding):  # the codec knows no tag 9...
        codec.decode_body(9, payload, raw_size=raw_size)
    with pytest.raises(CorruptChunk, match="unknown stored encoding 9"):  # ...nor does a frame (as before)
        receive(receiver, cid, 9, raw_size, payload)
    with pytest.raises(CorruptChunk, match="unknown stored encoding 255"):  # a pack reference never travels
        receive(receiver, cid, TAG_PACKED, raw_size, payload)
    with pytest.raises(CorruptChunk):
        receive(receiver, digest(b"other"), tag, raw_size, payload)


# --- planning a request ----------------------------------------------------------------------

@pytest.fixture
def origin_and_site():
    """An origin holding v1..v3 of `m`, a site holding v1 and v2 (both registries committed)."""
    return origin_and_site_stores()


def test_plan_request_plans_against_the_newest_held_version(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    ids = list(v3.unique_chunks())
    body = negotiate.fetch_body(ids, negotiate.request_fields(site, v3))
    cache = PlanCache()
    plan = chunks.plan_request(origin, body, cache=cache)
    for t in v3.tensors:
        old = next(o for o in v2.tensors if o.name == t.name)
        assert plan.hint(t.chunks[0]) == ChunkHint("BF16", old.chunks[0])
    assert plan.hint("blake3:" + "1" * 64) == STANDALONE  # not in the version: standalone
    assert chunks.plan_request(origin, body, cache=cache).hints is plan.hints  # cached by manifest ids
    assert chunks.plan_request(origin, body).hints is not plan.hints  # no cache, no sharing
    # the receiver could not decode one against its reference: it asks for it standalone
    again = chunks.plan_request(origin, negotiate.fetch_body(ids, negotiate.request_fields(site, v3), {v3.tensors[0].chunks[0]}))
    assert again.hint(v3.tensors[0].chunks[0]) == ChunkHint("BF16")
    assert again.hint(v3.tensors[1].chunks[0]).reference is not None


def test_plan_request_falls_back_to_stored_forms(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    ids = list(v3.unique_chunks())
    fields = negotiate.request_fields(site, v3)
    assert chunks.plan_request(origin, {"ids": ids}) is None  # an old receiver
    assert chunks.plan_request(site, negotiate.fetch_body(ids, fields)) is None  # the sender lacks v3
    assert chunks.plan_request(origin, negotiate.fetch_body(ids, fields), may=lambda a: False) is None
    assert chunks.plan_request(origin, negotiate.fetch_body(ids, dict(fields, encodings=["raw"]))) is None
    unknown = chunks.plan_request(origin, negotiate.fetch_body(ids, dict(fields, have=["v9", "v1"])))
    assert unknown.hint(v3.tensors[0].chunks[0]).reference == v1.tensors[0].chunks[0]
    planes_only = chunks.plan_request(origin, negotiate.fetch_body(ids, dict(fields, encodings=["raw", "zstd", "bytegroup"])))
    assert planes_only.hint(v3.tensors[0].chunks[0]) == ChunkHint("BF16")
    assert planes_only.names == ["raw", "zstd", "bytegroup"]
    future = chunks.plan_request(origin, negotiate.fetch_body(ids, dict(fields, encodings=fields["encodings"] + ["lz9"])))
    assert future.names == fields["encodings"]  # names it does not know are ignored


def test_a_relay_plans_a_version_it_is_still_fetching_from_its_pending_manifest(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    ids = list(v3.unique_chunks())
    body = negotiate.fetch_body(ids, negotiate.request_fields(site, v3))  # a child holding v1 and v2
    assert chunks.plan_request(site, body) is None  # v3 is not in the site's registry yet
    assert chunks.plan_request(site, body, pending=lambda artifact, version: None) is None
    fetching = {(v3.artifact, v3.version): v3}
    plan = chunks.plan_request(site, body, pending=lambda artifact, version: fetching.get((artifact, version)))
    for t in v3.tensors:  # against the newest version the site holds, as the origin plans it
        old = next(o for o in v2.tensors if o.name == t.name)
        assert plan.hint(t.chunks[0]) == ChunkHint("BF16", old.chunks[0])
    assert plan.hints == chunks.plan_request(origin, body).hints
    cache = PlanCache()  # kept by the pending manifest's id, like a committed one's
    assert chunks.plan_request(site, body, cache=cache, pending=lambda a, v: v3).hints is \
        chunks.plan_request(site, body, cache=cache, pending=lambda a, v: v3).hints


def test_plan_for_request_runs_off_the_loop(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    body = negotiate.fetch_body(list(v3.unique_chunks()), negotiate.request_fields(site, v3))
    assert asyncio.run(chunks.plan_for_request(origin, {"ids": []})) is None
    assert asyncio.run(chunks.plan_for_request(origin, body)).hints


def test_serving_getter_encodes_and_reports_to_the_policy(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    body = negotiate.fetch_body(list(v3.unique_chunks()), negotiate.request_fields(site, v3))
    plan = chunks.plan_request(origin, body)
    policy = EncodePolicy()

    async def get(cid):
        try:
            return origin.get_chunk_stored(cid)
        except NotFound:
            return None

    async def run():
        serve = chunks.serving_getter(get, origin, plan, policy)
        assert await serve("blake3:" + "2" * 64) is None
        out = {}
        for cid in body["ids"]:
            out[cid] = await serve(cid)
        return out

    frames = asyncio.run(run())
    for cid, (tag, raw_size, payload) in frames.items():
        assert receive(site, cid, tag, raw_size, payload) == origin.get_chunk(cid)
    assert {t for t, _, _ in frames.values()} & {Encoding.XOR, Encoding.DELTAPACK}
    assert sum(policy.chosen.values()) == len(frames)


def test_serving_getter_serves_a_full_frame_again_from_the_cache_without_reading_or_encoding(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    body = negotiate.fetch_body(list(v3.unique_chunks()), negotiate.request_fields(site, v3))
    plan = chunks.plan_request(origin, body)
    cache = FrameCache(64 << 20)
    reads = []

    async def get(cid):
        reads.append(cid)
        return origin.get_chunk_stored(cid)

    async def serve_all(mode):
        policy = EncodePolicy(fixed=mode)
        serve = chunks.serving_getter(get, origin, plan, policy, cache=cache)
        return {cid: await serve(cid) for cid in body["ids"]}, policy

    asyncio.run(serve_all(Mode.LIGHT))
    assert len(cache) == 0  # only `full` frames are kept
    first, _ = asyncio.run(serve_all(Mode.FULL))
    assert len(cache) == len(body["ids"]) and cache.bytes == sum(len(p) for _, _, p in first.values())
    reads.clear()
    again, policy = asyncio.run(serve_all(Mode.STORED))  # a hit is sent whatever the policy would pick
    assert reads == [] and sum(policy.chosen.values()) == 0  # nothing read, nothing encoded
    assert {cid: (t, n, bytes(p)) for cid, (t, n, p) in first.items()} == again
    for cid, (tag, raw_size, payload) in again.items():
        assert receive(site, cid, tag, raw_size, payload) == origin.get_chunk(cid)
    other = chunks.RequestPlan(plan.hints, frozenset(plan.encodings) - {Encoding.DELTAPACK}, plan.standalone)
    assert cache.holds_all(frame_key(cid, plan.hint(cid), chunks.LEVEL, plan.names) for cid in body["ids"])
    # a receiver that accepts other encodings gets frames made for it, not these
    assert not cache.holds_all(frame_key(cid, other.hint(cid), chunks.LEVEL, other.names) for cid in body["ids"])
    k0 = frame_key(body["ids"][0], plan.hint(body["ids"][0]), chunks.LEVEL, plan.names)
    zero = FrameCache(0)  # a zero budget keeps nothing
    zero.put(k0, first[body["ids"][0]])
    assert zero.get(k0) is None and not zero.holds_all([k0]) and len(zero) == 0


# --- publishing (fabric.wire.client) -------------------------------------------------------------------------------------------

def test_upload_encoding_is_standalone_and_only_what_the_origin_decodes():
    w = b(weights(50_000))
    assert client.encode_upload(w, "BF16")[0] in (Encoding.RAW, Encoding.ZSTD)  # default: every origin decodes
    tag, raw_size, payload = client.encode_upload(w, "BF16", encodings=protocol.ENCODINGS)
    assert tag == Encoding.BYTEGROUP and len(payload) < 0.8 * len(w)
    assert receive(None, digest(w), tag, raw_size, payload) == w
    text = b"hello world " * 1000
    assert client.encode_upload(text, None, encodings=protocol.ENCODINGS)[0] == Encoding.ZSTD


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
    body = negotiate.fetch_body(receiver.missing(v2.chunk_ids()), negotiate.request_fields(receiver, v2))
    plan = chunks.plan_request(sender, body)
    wire = raw = 0
    tags = []
    for cid in body["ids"]:
        tag, raw_size, payload = chunks.encode_chunk(sender, cid, plan.hint(cid), encodings=plan.names)
        receiver.put_chunk(cid, receive(receiver, cid, tag, raw_size, payload), verified=True)
        wire, raw = wire + len(payload), raw + raw_size
        tags.append(tag)
    assert sorted(tags) == [Encoding.PATCH] + [Encoding.DELTAPACK] * 4  # the reordered header, and the tensors
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
    body = negotiate.fetch_body(receiver.missing(target.chunk_ids()), negotiate.request_fields(receiver, target))
    if lose and body["have"]:  # the receiver lost a chunk it claims: a mismatch, then standalone
        held_chunks = [c for c in Registry(receiver).manifest("m", body["have"][0]).unique_chunks()]
        receiver.delete_chunk(held_chunks[-1])
    plan = chunks.plan_request(sender, body)
    assert plan is not None
    retry = set()
    for cid in body["ids"]:
        tag, raw_size, payload = chunks.encode_chunk(sender, cid, plan.hint(cid), allow_entropy=allow_entropy,
                                                    encodings=plan.names)
        event(Encoding(tag).name.lower())
        try:
            data = receive(receiver, cid, tag, raw_size, payload,
                                      expected_size=target.unique_chunks()[cid])
        except ReferenceMismatch:
            assert lose
            event("reference lost")
            retry.add(cid)
            continue
        assert data == sender.get_chunk(cid)
    if retry:
        again = chunks.plan_request(sender, negotiate.fetch_body(sorted(retry), negotiate.request_fields(receiver, target), retry))
        for cid in retry:
            assert again.hint(cid).reference is None
            tag, raw_size, payload = chunks.encode_chunk(sender, cid, again.hint(cid), encodings=again.names)
            assert receive(receiver, cid, tag, raw_size, payload) == sender.get_chunk(cid)


def test_upload_encoder_follows_its_policy(monkeypatch):
    w = b(weights(50_000))
    chunks = [(digest(w), w, "BF16"), (digest(b"cfg" * 100), b"cfg" * 100, None)]
    full = client.UploadEncoder(EncodePolicy(fixed=Mode.FULL))
    frames = full.frames(chunks, protocol.ENCODINGS)
    assert [f[1] for f in frames] == [Encoding.BYTEGROUP, Encoding.ZSTD]
    for cid, tag, raw_size, payload in frames:
        assert receive(None, cid, tag, raw_size, payload) == dict((c, d) for c, d, _ in chunks)[cid]
    assert [f[1] for f in full.frames(chunks, None)] == [Encoding.ZSTD, Encoding.ZSTD]  # an old origin
    stored = client.UploadEncoder(EncodePolicy(fixed=Mode.STORED)).frames(chunks, protocol.ENCODINGS)
    assert [(f[1], bytes(f[3])) for f in stored] == [(Encoding.RAW, w), (Encoding.RAW, b"cfg" * 100)]
    auto = client.UploadEncoder(EncodePolicy())
    auto.frames(chunks, protocol.ENCODINGS)
    auto.uploaded(10 << 20, 0.0)  # a link that takes no time: stop encoding
    assert {f[1] for f in auto.frames(chunks * 4, protocol.ENCODINGS)[:-1]} == {Encoding.RAW}


# --- a relay's frames: sendfile inside a chunked answer, wait frames, a file cut short -----------

def _relay_fetch(tmp_path, ids_of, ready, *, open_chunk=None, monkeypatch=None, fields=None, **routes):
    """Serve a local store through `chunk_routes` as a relay does (prepare and ready given), fetch
    `ids_of(store)` with wait frames asked for (and the delta fields `fields()` gives, if given;
    `routes`: more `chunk_routes` arguments), and return (frames read, the response's headers, the error that
    ended the read or None)."""
    import aiohttp
    from aiohttp import web
    from fabric.store.chunk_index import ChunkIndex
    from fabric.wire.auth import TokenTable
    from fabric.wire.server import base_app
    from tests.helpers.ports import free_port

    secret = "relay-test-secret-0123456789"
    store = open_store(tmp_path / "store")
    ids = ids_of(store)
    if open_chunk is not None:
        monkeypatch.setattr(chunks, "_open_chunk", open_chunk)

    async def prepare(request, asked) -> None:
        return None

    async def main():
        app = base_app(tokens=TokenTable.from_dict({"token": [{"name": "ops", "secret": secret, "scopes": ["admin"]}]}),
                       store=store)
        chunks.chunk_routes(app, index=ChunkIndex(lambda: {}), prepare=prepare, ready=ready, **routes)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        got, error = [], None
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}{protocol.CHUNKS_FETCH}",
                                        json=negotiate.fetch_body(ids, fields() if fields else None),
                                        headers={"Authorization": f"Bearer {secret}",
                                                 protocol.WAIT_HEADER: "1"}) as resp:
                    assert resp.status == 200
                    headers = dict(resp.headers)
                    try:
                        async for frame in wire_frames.FrameReader(resp.content.readexactly, waits=True):
                            got.append(frame)
                    except (BadFrame, aiohttp.ClientPayloadError) as e:
                        error = e
        finally:
            await runner.cleanup()
        return got, headers, error

    return asyncio.run(main()), ids


def test_a_relay_sends_held_chunks_by_sendfile_in_arrival_order_with_waits_while_one_is_fetched(tmp_path):
    rng = np.random.default_rng(3)
    data = {}

    def ids_of(store: Store) -> list[str]:
        for blob in (rng.bytes(300_000), rng.bytes(700_001), bytes(500_000)):  # raw, raw, zstd
            cid = digest(blob)
            store.put_chunk(cid, blob)
            data[cid] = blob
        return [*data, digest(b"never held here")]

    async def ready(cid: str) -> None:  # the second chunk is still "being fetched upstream" for 1.5 s
        if cid == list(data)[1]:
            await asyncio.sleep(1.5)

    (got, headers, error), ids = _relay_fetch(tmp_path, ids_of, ready)
    assert error is None
    assert headers.get("Transfer-Encoding") == "chunked"
    kinds = [(f.kind, f.chunk_id) for f in got]
    first, second, third, absent = ids
    waits = [c for k, c in kinds if k == wire_frames.FRAME_WAIT]
    assert waits and set(waits) == {second}  # the relay said it is alive while it waited
    chunk_frames = [f for f in got if f.kind == wire_frames.FRAME_CHUNK]
    assert [f.chunk_id for f in chunk_frames] == [first, third, second]  # as they were held
    assert {f.encoding for f in chunk_frames} == {0, 1}  # the stores' forms, tag 0 and 1
    for f in chunk_frames:
        assert wire_frames.decode_frame(f, expected_size=len(data[f.chunk_id])) == data[f.chunk_id]
    assert (wire_frames.FRAME_MISSING, absent) in kinds
    assert kinds[-1] == (wire_frames.FRAME_CHUNK, second)


def test_a_relay_sends_its_upstreams_delta_frames_for_a_version_it_is_fetching_and_encodes_nothing(tmp_path,
                                                                                                    monkeypatch):
    # The relay holds v1 and v2's chunks, v2 not yet committed (it is still fetching it: `pending`).
    # It kept the origin's frames for t0 and t1 against v1, and for t2 one against another chunk
    # than the child's plan names; the child, holding v1, asks for all of v2.
    origin, child = mem_store(), mem_store()
    arrays = [weights(4000) for _ in range(3)]
    kept, made = Forwarded(), {}

    def ids_of(relay: Store) -> list[str]:
        v1 = version("m", "v1", "2026-01-01T00:00:00Z",
                     {"m.st": [Seg(b(a), f"t{k}", "BF16") for k, a in enumerate(arrays)]},
                     stores=(origin, child, relay))
        v2 = version("m", "v2", "2026-01-02T00:00:00Z",
                     {"m.st": [Seg(b(step(a)), f"t{k}", "BF16") for k, a in enumerate(arrays)],
                      "cfg": [Seg(b'{"step": 2}')]}, stores=(origin,))
        for cid in v2.chunk_ids():
            relay.put_chunk(cid, origin.get_chunk(cid))
        ids = list(v2.unique_chunks())
        plan = chunks.plan_request(origin, negotiate.fetch_body(ids, negotiate.request_fields(child, v2)))
        for t in v2.tensors[:2]:
            kept.put(t.chunks[0], *chunks.encode_chunk(origin, t.chunks[0], plan.hint(t.chunks[0])))
        wrong = ChunkHint("BF16", v1.tensors[0].chunks[0])  # t2 against t0's old chunk: not the child's plan
        kept.put(v2.tensors[2].chunks[0], *chunks.encode_chunk(origin, v2.tensors[2].chunks[0], wrong))
        made.update(v1=v1, v2=v2)
        return ids

    async def ready(cid):
        return None

    monkeypatch.setattr(chunks, "_serve_one", lambda *a: pytest.fail("a relay encoded"))
    (got, _, error), ids = _relay_fetch(
        tmp_path, ids_of, ready, fields=lambda: negotiate.request_fields(child, made["v2"]),
        pending=lambda artifact, name: made["v2"] if (artifact, name) == ("m", "v2") else None, forwarded=kept)
    assert error is None
    by_id = {f.chunk_id: f for f in got if f.kind == wire_frames.FRAME_CHUNK}
    assert set(by_id) == set(ids)
    t0, t1, t2 = (t.chunks[0] for t in made["v2"].tensors)
    for cid in (t0, t1):  # the kept frames, decoded against the child's v1
        f = by_id[cid]
        assert f.encoding not in (Encoding.RAW, Encoding.ZSTD)
        assert receive(child, cid, f.encoding, f.raw_size, f.payload) == origin.get_chunk(cid)
    for cid in set(ids) - {t0, t1}:  # t2's kept frame names another reference, cfg has none: stored forms
        assert by_id[cid].encoding in (Encoding.RAW, Encoding.ZSTD)
        assert wire_frames.decode_frame(by_id[cid]) == origin.get_chunk(cid)


def test_a_relay_whose_chunk_file_is_cut_short_ends_the_answer_without_an_end_frame(tmp_path, monkeypatch):
    blob = np.random.default_rng(4).bytes(400_000)
    cid = digest(blob)

    def ids_of(store: Store) -> list[str]:
        store.put_chunk(cid, blob)
        return [cid]

    real = chunks._open_chunk

    def open_then_cut(store, chunk_id):  # the file shrinks between its opening and its sending
        opened = real(store, chunk_id)
        os.truncate(opened[0].file.name, 1000)
        return opened

    async def ready(c: str) -> None:
        return None

    (got, _, error), _ = _relay_fetch(tmp_path, ids_of, ready, open_chunk=open_then_cut, monkeypatch=monkeypatch)
    assert error is not None  # the client sees a broken answer, never a short chunk or an end frame
    assert not [f for f in got if f.kind == wire_frames.FRAME_CHUNK]


def test_an_error_after_the_answer_began_cuts_the_connection_instead_of_leaving_the_client_waiting(tmp_path,
                                                                                                  monkeypatch):
    """The edge turns an unexpected error into a 500, but not once the chunk stream is under way:
    a second response inside the first one's chunked body left the client waiting for its rest."""
    blob = np.random.default_rng(5).bytes(100_000)
    cid = digest(blob)

    def ids_of(store: Store) -> list[str]:
        store.put_chunk(cid, blob)
        return [cid]

    def broken_open(store, chunk_id):
        raise OSError(5, "Input/output error")

    async def ready(c: str) -> None:
        return None

    (got, _, error), _ = asyncio.run(asyncio.wait_for(asyncio.to_thread(
        _relay_fetch, tmp_path, ids_of, ready, open_chunk=broken_open, monkeypatch=monkeypatch), 20))
    assert error is not None and got == []
