"""Fuzzing the wire with hypothesis.

* `FrameReader` on random and mutated streams raises nothing but `BadFrame`, never asks
  its source for more than MAX_PAYLOAD bytes at once (so a hostile length is refused
  before anything is allocated), and never hangs.
* `decode_frame` on random frames raises nothing but Fabric's own errors.
* A real origin process (one for the module) given random bodies on its JSON endpoints
  (has, fetch, channel moves, commit, site reports) and its upload endpoint never
  answers 500, and every error it gives is a JSON {"code", "message"}.
"""

from __future__ import annotations

import asyncio
import json
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.core import digest

from fabric.wire import frames as wire
from fabric.wire import protocol
from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.errors import BadFrame, FabricError
from fabric.publish import publish

from helpers.files import write_tree
from helpers.http import Session
from helpers.origin import ADMIN_SECRET, PUBLISH_SECRET, start_origin

pytestmark = pytest.mark.timeout(120)

FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def fast(examples: int) -> settings:
    return settings(FAST, max_examples=examples)


# --- streams ------------------------------------------------------------------------------------------

class Recorder:
    """A read_exactly over bytes that records the largest request it was given."""

    def __init__(self, data: bytes):
        self._read = wire.bytes_reader(data)
        self.largest = 0

    async def __call__(self, n: int) -> bytes:
        self.largest = max(self.largest, n)
        return await self._read(n)


def parse(data: bytes, max_frames: int = 1 << 20) -> tuple[list[wire.Frame] | None, int]:
    """(frames, largest read) — frames is None when the stream was refused with BadFrame."""
    rec = Recorder(data)

    async def go():
        return [f async for f in wire.FrameReader(rec, max_frames=max_frames)]
    try:
        frames = asyncio.run(asyncio.wait_for(go(), 5))
    except BadFrame:
        frames = None
    return frames, rec.largest


ids = st.binary(min_size=32, max_size=32).map(wire.id_from_bytes)
payloads = st.binary(max_size=300)


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["chunk", "missing", "real"]))
    if kind == "missing":
        return wire.missing_frame(draw(ids))
    data = draw(payloads)
    if kind == "real":
        return wire.chunk_frame(digest.digest(data), 0, len(data), data)
    return wire.chunk_frame(draw(ids), draw(st.integers(0, 3)), draw(st.integers(0, 1 << 20)), data)


valid_streams = st.lists(frames(), max_size=6).map(wire.encode_stream)


@st.composite
def mutated(draw, base=valid_streams):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice_len"]))
        if not data:
            data += draw(st.binary(max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        else:  # a plausible big length somewhere: the reader must refuse it, not allocate it
            data[i:i + 4] = draw(st.sampled_from([0xFFFFFFFF, protocol.MAX_PAYLOAD + 1, protocol.MAX_CHUNK,
                                                  1 << 31])).to_bytes(4, "big")
    return bytes(data)


def _check_reader(data: bytes) -> None:
    got, largest = parse(data)
    assert largest <= protocol.MAX_PAYLOAD
    if got is not None:
        for f in got:
            assert f.kind in (wire.FRAME_CHUNK, wire.FRAME_MISSING)
            assert digest.is_valid(f.chunk_id)
            assert len(f.payload) <= protocol.MAX_PAYLOAD


@fast(1500)
@given(st.binary(max_size=400) | st.binary(max_size=200).map(lambda b: protocol.MAGIC + b))
def test_frame_reader_on_random_bytes(data):
    _check_reader(data)


@fast(1500)
@given(mutated())
def test_frame_reader_on_mutated_streams(data):
    _check_reader(data)


@fast(300)
@given(valid_streams)
def test_frame_reader_round_trips_valid_streams(data):
    got, _ = parse(data)
    assert got is not None
    assert wire.encode_stream([wire.chunk_frame(f.chunk_id, f.encoding, f.raw_size, f.payload)
                               if f.kind == wire.FRAME_CHUNK else wire.missing_frame(f.chunk_id)
                               for f in got]) == data


@fast(200)
@given(st.lists(st.just(wire.missing_frame("blake3:" + "0" * 64)), min_size=0, max_size=20), st.integers(0, 20))
def test_frame_limit_is_enforced(frame_list, limit):
    got, _ = parse(wire.encode_stream(frame_list), max_frames=limit)
    assert (got is not None) == (len(frame_list) <= limit)


@fast(200)
@given(st.integers(0, 255), st.integers(0, 1 << 32 - 1), st.integers(0, 1 << 32 - 1))
def test_reader_refuses_big_lengths_before_reading_them(kind, raw_size, length):
    """However big the header says the payload is, the reader asks for at most MAX_PAYLOAD."""
    head = protocol.MAGIC + bytes([kind]) + bytes(32) + bytes([0]) + raw_size.to_bytes(4, "big") + length.to_bytes(4, "big")
    got, largest = parse(head + b"x" * 64)
    assert largest <= protocol.MAX_PAYLOAD


@fast(600)
@given(st.integers(0, 255), st.integers(0, 1 << 21), st.binary(max_size=200) | st.sampled_from([
    b"\x28\xb5\x2f\xfd\xe0" + (1 << 40).to_bytes(8, "little") + b"\x0b\x00\x10\x00",  # zstd claiming 1 TiB
    b"\x28\xb5\x2f\xfd", b"\x28\xb5\x2f\xfd\x20\x00\x01\x00\x00"]))
def test_decode_frame_raises_only_fabric_errors(encoding, raw_size, payload):
    frame = wire.Frame(wire.FRAME_CHUNK, digest.digest(payload[:3]), encoding, raw_size, payload)
    try:
        data = wire.decode_frame(frame)
    except FabricError:
        return
    assert digest.digest(data) == frame.chunk_id


# --- one real origin for the HTTP fuzzing ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_origin(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    o = start_origin(root)
    src = write_tree(root / "src", {"a.bin": b"a" * 4000, "b/c.txt": b"hello"})
    with SyncOrigin(o.url, PUBLISH_SECRET) as so:
        r = publish(src, artifact="base", target=RemoteTarget(so), version="v1", channel="prod")
        base = so.manifest("base", "v1").to_json()
    session = Session(o.url, PUBLISH_SECRET)
    yield o, session, base
    session.close()
    o.stop()
    assert r.manifest_id


def check_reply(r) -> None:
    assert r.status != 500 and r.status < 500, (r.status, r.body[:300])
    if r.status >= 400:
        r.error()  # exactly {"code", "message"}, as JSON


json_leaf = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | \
    st.text(max_size=20) | st.sampled_from(["blake3:" + "0" * 64, "promote", "rollback", "v1", "prod", "\ud800"])
json_values = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(["ids", "action", "version"]),
                                             kids, max_size=4), max_leaves=12)


def as_body(value) -> bytes:
    return json.dumps(value).encode()


bodies = json_values.map(as_body) | st.binary(max_size=200) | \
    st.fixed_dictionaries({"ids": st.lists(st.sampled_from(["blake3:" + "0" * 64, "blake3:" + "f" * 64])
                                           | st.text(max_size=70) | json_leaf, max_size=6)}).map(as_body) | \
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
names = st.sampled_from(["base", "m", "prod", "v1", "-x", ".x", "a" * 129, "%2e%2e", "%00", "a%2Fb"]) | \
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)


@fast(600)
@given(st.sampled_from(["/v1/chunks/has", "/v1/chunks/fetch"]), bodies)
def test_chunk_endpoints_never_500(fuzz_origin, path, body):
    o, s, _ = fuzz_origin
    r = s.request("POST", path, body, headers={"Content-Type": "application/json"})
    check_reply(r)
    if r.status == 200 and path.endswith("fetch"):
        got, _ = parse(r.body)
        assert got is not None  # a 200 chunk stream is always well formed


@fast(400)
@given(names, names, bodies | st.fixed_dictionaries(
    {"action": st.sampled_from(["promote", "rollback"]) | json_leaf, "version": names | json_leaf}).map(as_body))
def test_channel_moves_never_500(fuzz_origin, artifact, channel, body):
    o, s, _ = fuzz_origin
    check_reply(s.request("POST", f"/v1/artifacts/{artifact}/channels/{channel}", body))


def _mutate(obj, data, depth=0):
    if isinstance(obj, dict) and obj and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(obj)))
        obj = dict(obj)
        if data.draw(st.integers(0, 3)) == 0:
            del obj[key]
        else:
            obj[key] = _mutate(obj[key], data, depth + 1)
        return obj
    if isinstance(obj, list) and obj and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(obj) - 1))
        obj = list(obj)
        obj[i] = _mutate(obj[i], data, depth + 1)
        return obj
    return data.draw(json_values)


@fast(800)
@given(st.data())
def test_commit_never_500(fuzz_origin, data):
    o, s, base = fuzz_origin
    kind = data.draw(st.sampled_from(["mutate", "mutate", "random"]))
    if kind == "mutate":
        m = base
        for _ in range(data.draw(st.integers(1, 3))):
            m = _mutate(m, data)
        body = as_body(m)
    else:
        body = data.draw(bodies)
    artifact = data.draw(st.sampled_from(["base", "fuzzed"]) | names)
    version = data.draw(st.sampled_from(["v1", "v2"]) | names)
    check_reply(s.request("PUT", f"/v1/artifacts/{artifact}/versions/{version}", body))


@fast(600)
@given(st.binary(max_size=300) | mutated(st.lists(frames(), max_size=4).map(wire.encode_stream)))
def test_upload_never_500(fuzz_origin, body):
    o, s, _ = fuzz_origin
    r = s.request("POST", "/v1/chunks/upload", body, headers={"Content-Type": protocol.CHUNK_STREAM})
    check_reply(r)
    if r.status == 200:
        assert set(r.json()) == {"stored", "bytes"}


def _opens_a_stream(after: str) -> bool:
    try:
        return not after or int(after) >= 0  # a valid sequence: the event stream would stay open
    except ValueError:
        return False


@fast(200)
@given(names, bodies, st.text(max_size=30))
def test_site_reports_and_bad_event_queries_never_500(fuzz_origin, site, body, after):
    o, s, _ = fuzz_origin
    check_reply(s.request("POST", f"/v1/sites/{site}", body, token=ADMIN_SECRET))
    if not _opens_a_stream(after):
        r = s.request("GET", f"/v1/events?after={quote(after)}")
        assert r.status == 422, r
        check_reply(r)


def test_origin_logged_no_unhandled_error_and_no_500(fuzz_origin):
    """Run last: across everything above, the origin never hit its catch-all."""
    o, s, _ = fuzz_origin
    assert "unhandled error" not in o.log_text()
    m = o.metrics()
    assert not any('status="500"' in k and v > 0 for k, v in m.items()), \
        {k: v for k, v in m.items() if 'status="500"' in k}
    assert m.get('fabric_errors_total{code="internal"}', 0) == 0
    assert sum(v for k, v in m.items() if k.startswith("fabric_http_requests_total")) > 1000
