"""fabric.wire.frames: the chunk-stream format, and the client and server halves of the protocol
talking to each other over a real loopback connection (the origin app, in-process)."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import numpy as np
import pytest
import zstandard

from fabric.core import codec, digest
from fabric.core.codec import Encoding

from fabric.wire import frames as wire
from fabric.wire import protocol
from fabric.wire.auth import TokenTable
from fabric.wire.client import OriginClient
from fabric.errors import (ArtifactNotFound, BadFrame, CorruptChunk, Forbidden, IntegrityError, ReferenceMismatch,
                           InvalidChunkId, TransferError, Unauthorized)
from fabric.store import packs
from fabric.store.store import open_store

from helpers.files import random_bytes
from helpers.ports import free_port
from helpers.sources import serve_origin


def collect(data: bytes, **kw) -> list[wire.Frame]:
    async def go():
        return [f async for f in wire.FrameReader(wire.bytes_reader(data), **kw)]
    return asyncio.run(go())


def chunk(data: bytes, encoding: int = 0) -> bytes:
    payload = zstandard.ZstdCompressor().compress(data) if encoding == 1 else data
    return wire.chunk_frame(digest.digest(data), encoding, len(data), payload)


# --- the format -------------------------------------------------------------------------------------

def test_ids_round_trip_through_32_bytes():
    cid = digest.digest(b"x")
    raw = wire.id_bytes(cid)
    assert len(raw) == 32 and wire.id_from_bytes(raw) == cid
    with pytest.raises(InvalidChunkId):
        wire.id_bytes("sha256:" + "0" * 64)


def test_stream_round_trip(rng):
    blobs = [random_bytes(rng, n) for n in (0, 1, 1000, 70_000)]
    absent = digest.digest(b"absent")
    frames = [chunk(b) for b in blobs] + [wire.missing_frame(absent), chunk(bytes(5000), encoding=1)]
    data = wire.encode_stream(frames)
    assert data.startswith(protocol.MAGIC) and data.endswith(wire.end_frame(len(frames)))
    got = collect(data)
    assert [f.kind for f in got] == [wire.FRAME_CHUNK] * 4 + [wire.FRAME_MISSING, wire.FRAME_CHUNK]
    assert [wire.decode_frame(f) for f in got[:4]] == blobs
    assert got[4].chunk_id == absent and got[4].payload == b""
    assert got[5].encoding == 1 and wire.decode_frame(got[5], 5000) == bytes(5000)
    assert collect(wire.encode_stream([])) == []


def test_frame_layout_is_the_documented_one():
    data = b"hello"
    f = chunk(data)
    assert f[0] == wire.FRAME_CHUNK
    assert f[1:33] == wire.id_bytes(digest.digest(data))
    assert struct.unpack(">BII", f[33:42]) == (0, 5, 5) and f[42:] == data
    assert wire.missing_frame(digest.digest(data)) == b"\x02" + f[1:33]
    assert wire.end_frame(7) == b"\x00\x00\x00\x00\x07"


@pytest.mark.parametrize("data, match", [
    (b"", "ended early"),
    (b"FBC2" + wire.end_frame(0), "magic"),
    (protocol.MAGIC, "ended early"),
    (protocol.MAGIC + b"\x07", "unknown frame type 7"),
    (protocol.MAGIC + wire.end_frame(1), "end frame counts 1"),
    (protocol.MAGIC + chunk(b"a") + wire.end_frame(2), "end frame counts 2"),
    (protocol.MAGIC + chunk(b"a"), "ended early"),
    (protocol.MAGIC + b"\x02" + bytes(31), "ended early"),
])
def test_malformed_streams_are_bad_frames(data, match):
    with pytest.raises(BadFrame, match=match):
        collect(data)


def test_every_truncation_of_a_valid_stream_is_a_bad_frame(rng):
    data = wire.encode_stream([chunk(random_bytes(rng, 50)), wire.missing_frame(digest.digest(b"m")),
                               chunk(b"tail", encoding=1)])
    for cut in range(len(data)):
        with pytest.raises(BadFrame):
            collect(data[:cut])
    assert len(collect(data)) == 3


def test_lengths_are_bounded_before_anything_is_read():
    """A frame claiming a huge payload is refused from its header: the payload is never asked for."""
    asked: list[int] = []
    base = wire.bytes_reader(protocol.MAGIC + b"\x01" + bytes(32) + struct.pack(">BII", 0, 10, 0xFFFFFFFF))

    async def read(n):
        asked.append(n)
        return await base(n)

    async def go():
        return [f async for f in wire.FrameReader(read)]
    with pytest.raises(BadFrame, match="out of range"):
        asyncio.run(go())
    assert max(asked) <= protocol.MAX_PAYLOAD and 0xFFFFFFFF not in asked

    raw_too_big = protocol.MAGIC + b"\x01" + bytes(32) + struct.pack(">BII", 0, protocol.MAX_CHUNK + 1, 1) + b"x"
    with pytest.raises(BadFrame, match="out of range"):
        collect(raw_too_big)


def test_frame_count_is_bounded():
    frames = [wire.missing_frame(digest.digest(bytes([i]))) for i in range(5)]
    assert len(collect(wire.encode_stream(frames), max_frames=5)) == 5
    with pytest.raises(BadFrame, match="more than 4 frames"):
        collect(wire.encode_stream(frames), max_frames=4)


def test_reader_stops_at_the_end_frame():
    reader_data = wire.encode_stream([chunk(b"a")]) + b"trailing garbage"
    assert len(collect(reader_data)) == 1


# --- decoding a frame ---------------------------------------------------------------------------------

def _frame(data: bytes, *, encoding=0, raw_size=None, payload=None, cid=None) -> wire.Frame:
    return wire.Frame(wire.FRAME_CHUNK, cid or digest.digest(data), encoding,
                      len(data) if raw_size is None else raw_size,
                      data if payload is None else payload)


def test_decode_checks_bytes_sizes_and_encodings():
    data = b"some chunk bytes" * 100
    assert wire.decode_frame(_frame(data)) == data
    assert wire.decode_frame(_frame(data, raw_size=0)) == data  # 0: size not stated
    with pytest.raises(CorruptChunk):  # right size, wrong bytes: the digest catches it
        wire.decode_frame(_frame(data, payload=b"S" + data[1:]))
    with pytest.raises(BadFrame, match="expected 5 bytes"):
        wire.decode_frame(_frame(data, raw_size=5))
    with pytest.raises(BadFrame, match="expected 3 bytes"):
        wire.decode_frame(_frame(data), expected_size=3)
    with pytest.raises(IntegrityError):  # unknown encoding tag
        wire.decode_frame(_frame(data, encoding=max(Encoding) + 1))
    with pytest.raises((IntegrityError, BadFrame)):  # not zstd at all
        wire.decode_frame(_frame(data, encoding=1))
    with pytest.raises(BadFrame):
        wire.decode_frame(wire.Frame(wire.FRAME_MISSING, digest.digest(data)))


def test_a_delta_is_decoded_against_its_reference_where_a_local_store_keeps_it(tmp_path):
    # A chunk the store holds raw, in its own file or in a pack, is read from there a piece at
    # a time (`codec.FileReference`), not copied into memory first (a relay's peak, issue 17),
    # and the decode closes the file; one held as zstd comes whole, as before.
    rng = np.random.default_rng(3)
    weights = rng.standard_normal(1 << 20).astype(np.float32) * 0.02
    old = (weights.view(np.uint32) & 0xFFFF0000).tobytes()  # 4 MiB of F32 from BF16: half zeros
    new = (np.frombuffer(old, np.float32) + np.float32(1e-4)).tobytes()
    enc = codec.encode_as("deltapack", new, dtype="F32", reference=old)
    frame = _frame(new, encoding=enc.tag, payload=bytes(enc.body))
    raw = open_store(tmp_path / "raw", compress=False)
    raw.put_chunk(digest.digest(old), old)
    packed = open_store(tmp_path / "packed")
    (tmp_path / "version.bin").write_bytes(b"head" + old)
    key = packed.link_pack(tmp_path / "version.bin")
    packed.put_packed(digest.digest(old), packs.PackRef(key, 4, len(old)))
    zstd_held = open_store(tmp_path / "zstd")
    zstd_held.put_chunk(digest.digest(old), old)  # compressible: the store keeps it as zstd
    for store, form in ((raw, codec.FileReference), (packed, codec.FileReference), (zstd_held, bytes)):
        given = []

        def references(ref_id, read=wire.store_references(store)):
            given.append(read(ref_id))
            return given[-1]

        assert wire.decode_frame(frame, references=references) == new
        assert type(given[0]) is form, store
        if form is codec.FileReference:
            assert given[0].file.closed
    with open(tmp_path / "version.bin", "r+b") as f:  # the pack's copy changes under the store
        f.seek(4 + len(old) - 1)
        f.write(b"\x00" if old[-1] else b"\x01")
    with pytest.raises(ReferenceMismatch):
        wire.decode_frame(frame, references=wire.store_references(packed))


def _zstd_bomb_header(claimed: int) -> bytes:
    """A zstd frame header claiming `claimed` content bytes, then one tiny RLE block."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", claimed)
    return header + (1 | (1 << 1) | ((128 << 10) << 3)).to_bytes(3, "little") + b"\0"


@pytest.mark.parametrize("claimed", [protocol.MAX_CHUNK + 1, 1 << 40])
def test_zstd_frame_claiming_a_huge_size_is_refused_before_allocating(claimed):
    f = _frame(b"", encoding=1, raw_size=0, payload=_zstd_bomb_header(claimed),
               cid=digest.digest(b"whatever"))
    with pytest.raises(BadFrame, match="claims"):
        wire.decode_frame(f)


def test_zstd_payload_larger_than_max_chunk_without_size_is_refused():
    big = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(protocol.MAX_CHUNK + 10))
    with pytest.raises(IntegrityError):
        wire.decode_frame(_frame(b"", encoding=1, raw_size=0, payload=big, cid=digest.digest(b"z")))


def test_error_body():
    assert wire.error_body(Forbidden("no")) == {"code": "forbidden", "message": "no"}


# --- both halves over a real connection ---------------------------------------------------------------

SECRET = "wire-test-secret-0123456789abc"
TOKENS = TokenTable.from_dict({"token": [
    # admin: these tests fetch chunks they uploaded but no version names yet, which only admin may see
    {"name": "pub", "secret": SECRET, "scopes": ["publish", "pull", "admin"]},
    {"name": "other", "secret": "other-secret-0123456789", "scopes": ["pull"], "artifacts": ["x-*"]},
]})


def _with_origin(tmp_path, body):
    async def go():
        store = open_store(tmp_path / "origin")
        runner, url = await serve_origin(store, TOKENS)
        try:
            async with OriginClient(url, SECRET) as client:
                return await body(client, store, url)
        finally:
            await runner.cleanup()
    return asyncio.run(go())


def test_upload_has_fetch_over_http(tmp_path, rng):
    blobs = [random_bytes(rng, 1000 + i) for i in range(10)] + [bytes(100_000)]
    ids = [digest.digest(b) for b in blobs]
    absent = digest.digest(b"nobody has this")

    async def body(client: OriginClient, store, url):
        assert set(await client.missing(ids)) == set(ids)
        sent = await client.upload([(cid, 0, len(b), b) for cid, b in zip(ids, blobs)])
        assert sent == sum(map(len, blobs))
        assert await client.missing(ids + [absent]) == [absent]
        assert all(store.get_chunk(c) == b for c, b in zip(ids, blobs))
        async with client.session.post(f"{url}/v1/chunks/fetch", json={"ids": [ids[0], absent, ids[-1]]}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == protocol.CHUNK_STREAM
            frames = [f async for f in wire.FrameReader(r.content.readexactly)]
        assert [f.kind for f in frames] == [wire.FRAME_CHUNK, wire.FRAME_MISSING, wire.FRAME_CHUNK]
        assert wire.decode_frame(frames[0]) == blobs[0]
        assert frames[1].chunk_id == absent
        # the zeros were stored compressed and travel compressed, with their raw size stated
        assert frames[2].encoding == 1 and frames[2].raw_size == 100_000 and len(frames[2].payload) < 1000
        assert wire.decode_frame(frames[2], 100_000) == blobs[-1]
    _with_origin(tmp_path, body)


def test_client_asks_has_in_batches_of_max_ids(tmp_path):
    ids = [digest.digest(i.to_bytes(4, "big")) for i in range(protocol.MAX_IDS * 2 + 3)]

    async def body(client, store, url):
        assert await client.missing(ids) == ids
    _with_origin(tmp_path, body)


def test_client_raises_typed_errors_from_json_bodies(tmp_path):
    async def body(client: OriginClient, store, url):
        with pytest.raises(ArtifactNotFound):
            await client.resolve("nothing", None, None)
        with pytest.raises(ArtifactNotFound):
            await client.manifest("nothing", "v1")
        async with OriginClient(url, "wrong-token-0123456789") as bad:
            with pytest.raises(Unauthorized):
                await bad.artifacts()
        async with OriginClient(url, "other-secret-0123456789") as other:
            with pytest.raises(Forbidden):
                await other.versions("model")
            assert await other.artifacts() == []
    _with_origin(tmp_path, body)


def test_client_connection_refused_is_a_transfer_error():
    async def go():
        async with OriginClient(f"http://127.0.0.1:{free_port()}", SECRET) as client:
            await client.artifacts()
    with pytest.raises(TransferError):
        asyncio.run(go())


def test_client_non_json_error_is_a_transfer_error(tmp_path):
    """A proxy's HTML error page (not a Fabric JSON body) still becomes a FabricError."""
    from aiohttp import web

    async def go():
        app = web.Application()
        async def bad_gateway(_):
            return web.Response(status=502, text="<html>bad gateway</html>")
        app.router.add_get("/v1/artifacts", bad_gateway)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with OriginClient(f"http://127.0.0.1:{runner.addresses[0][1]}") as c:
                await c.artifacts()
        finally:
            await runner.cleanup()
    with pytest.raises(TransferError, match="HTTP 502"):
        asyncio.run(go())


def test_fetch_stream_from_origin_reads_with_aiohttp_reader(tmp_path, rng):
    """Many chunks in one response: the reader gets every frame in order over a real socket."""
    blobs = [random_bytes(rng, 20_000) for _ in range(200)]
    ids = [digest.digest(b) for b in blobs]

    async def body(client: OriginClient, store, url):
        await client.upload([(c, 0, len(b), b) for c, b in zip(ids, blobs)])
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {SECRET}"}) as s:
            async with s.post(f"{url}/v1/chunks/fetch", json={"ids": ids}) as r:
                frames = [f async for f in wire.FrameReader(r.content.readexactly)]
        assert [f.chunk_id for f in frames] == ids
        assert [wire.decode_frame(f) for f in frames] == blobs
    _with_origin(tmp_path, body)
