"""The protocol's limits (docs/protocol.md "Limits"), each against a real peer on loopback.

Servers (`fabric.wire.connections` under `serve`): caps per peer and in total, the
header deadline, the body rate floor, and what they must not cut (a slow but steady
body, a long answer to a silent client). Clients (`fabric.wire.client`,
`fabric.wire.events`): bounded answers and event streams from lying servers. The
follower's reconnect schedule. The sync engine (`fabric.transfer`): a source repeating
a frame, and a source dripping bytes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest
from aiohttp import web

from fabric.errors import ConfigError, TransferError
from fabric.store.registry import Registry
from fabric.store.store import open_store
from fabric.transfer import FetchOptions, fetch_chunks
from fabric.wire.auth import TokenTable
from fabric.wire.client import OriginClient
from fabric.wire.connections import ServerLimits
from fabric.wire.protocol import EVENTS, MAX_EVENT, MAX_MANIFEST
from fabric.wire.server import bound_port, serve
from agents.site.follow import Backoff, ChannelStatus, Follower

from helpers.files import random_bytes, safetensors_bytes, write_tree
from helpers.store import publish_local
from helpers.sources import MisbehavingSource, serve_origin

SECRET = "limits-test-secret-0123456789"
TOKENS = TokenTable.from_dict({"token": [{"name": "site", "secret": SECRET, "scopes": ["pull"]}]})
FAST = ServerLimits(max_connections=40, max_per_peer=8, header_timeout=1.0, body_timeout=1.0,
                    body_min_rate=1000, idle_timeout=30)


# --- servers ------------------------------------------------------------------------------

def _echo_app() -> web.Application:
    app = web.Application()

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"n": len(await request.read())})

    async def slow_answer(request: web.Request) -> web.StreamResponse:  # like the event stream
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(int(request.query.get("n", "30"))):
            await resp.write(b".")
            await asyncio.sleep(0.1)
        return resp

    app.router.add_post("/echo", echo)
    app.router.add_get("/slow", slow_answer)
    return app


async def _open(port: int, source: str, head: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    await loop.sock_connect(s, ("127.0.0.1", port))
    if head:
        await loop.sock_sendall(s, head)
    return s


async def _closed_within(s: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing `s`; fails if it is still open after `seconds`."""
    loop, got = asyncio.get_running_loop(), b""
    deadline = loop.time() + seconds
    while True:
        try:
            piece = await asyncio.wait_for(loop.sock_recv(s, 65536), deadline - loop.time())
        except ConnectionResetError:
            return got
        if not piece:
            return got
        got += piece


def _guarded(body):
    async def go():
        runner = await serve(_echo_app(), "127.0.0.1", 0, limits=FAST)
        try:
            return await body(bound_port(runner), f"http://127.0.0.1:{bound_port(runner)}")
        finally:
            await runner.cleanup()
    return asyncio.run(go())


async def _echo(url: str, data: bytes = b"x" * 100) -> tuple[int, float]:
    t0 = time.monotonic()
    async with OriginClient(url) as client:
        async with client.session.post(f"{url}/echo", data=data) as resp:
            await resp.read()
            return resp.status, time.monotonic() - t0


def test_half_sent_headers_are_closed_at_the_deadline_and_real_requests_still_pass():
    async def body(port, url):
        t0 = time.monotonic()
        loris = [await _open(port, "127.0.0.2", b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: ") for _ in range(8)]
        silent = await _open(port, "127.0.0.2", b"")  # over the cap per peer: refused at once
        assert b"503" in (await _closed_within(silent, 1.0)).split(b"\r\n")[0]
        status, took = await _echo(url)  # another peer (127.0.0.1) is not held up
        assert status == 200 and took < 0.5, took
        for s in loris:
            assert await _closed_within(s, 3.0) == b""  # closed, without an answer
            s.close()
        assert 0.9 < time.monotonic() - t0 < 3.0
        status, _ = await _echo(url)
        assert status == 200
    _guarded(body)


def test_a_header_dripped_byte_by_byte_is_still_cut_at_the_deadline():
    async def body(port, url):
        s = await _open(port, "127.0.0.1", b"G")
        loop, t0 = asyncio.get_running_loop(), time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for c in b"ET /echo HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100:
                await loop.sock_sendall(s, bytes([c]))
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 3.0
    _guarded(body)


def test_the_total_cap_refuses_with_503_too_many_connections():
    async def body(port, url):
        held = [await _open(port, f"127.0.0.{2 + i // 8}", b"") for i in range(FAST.max_connections)]
        await asyncio.sleep(0.1)
        refused = await _open(port, "127.0.0.99", b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await _closed_within(refused, 2.0)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert json.loads(payload)["code"] == "too_many_connections"
        for s in held:
            s.close()
        await asyncio.sleep(0.2)
        assert (await _echo(url))[0] == 200  # the cap frees as connections close
    _guarded(body)


def test_a_stalled_body_is_cut_a_slow_steady_one_and_a_long_answer_are_not():
    async def body(port, url):
        stalled = await _open(port, "127.0.0.1",
                              b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        t0 = time.monotonic()
        assert await _closed_within(stalled, 4.0) == b""
        assert time.monotonic() - t0 < 3.0

        async def steady():  # 5 KB/s for 2.5 s: above the 1000 B/s floor
            for _ in range(25):
                yield b"y" * 500
                await asyncio.sleep(0.1)
        async with OriginClient(url) as client:
            async with client.session.post(f"{url}/echo", data=steady()) as resp:
                assert resp.status == 200 and (await resp.json())["n"] == 12500
            async with client.session.get(f"{url}/slow", params={"n": "30"}) as resp:  # 3 s, the client silent
                assert len(await resp.read()) == 30
    _guarded(body)


def test_server_limits_from_the_environment(monkeypatch):
    monkeypatch.setenv("FABRIC_SERVER_LIMITS", "header_timeout=2.5, max_per_peer=16")
    limits = ServerLimits.from_env()
    assert (limits.header_timeout, limits.max_per_peer) == (2.5, 16) and isinstance(limits.max_per_peer, int)
    for bad in ("header_timeout=soon", "no_such_limit=1", "max_connections=-1"):
        monkeypatch.setenv("FABRIC_SERVER_LIMITS", bad)
        with pytest.raises(ConfigError, match="FABRIC_SERVER_LIMITS"):
            ServerLimits.from_env()


# --- clients -------------------------------------------------------------------------------

class Liar:
    """An aiohttp app on loopback answering with whatever a test hands it; counts what it wrote."""

    def __init__(self):
        self.written = 0
        self.app = web.Application()
        self.runner = None

    async def stream(self, request, pieces, headers=None):
        resp = web.StreamResponse(headers=headers or {"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for piece in pieces:
                await resp.write(piece)
                self.written += len(piece)
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away: what a bounded client does
        return resp

    async def __aenter__(self):
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def test_a_lying_manifest_is_refused_at_max_manifest_without_reading_the_rest():
    piece = b" " * (1 << 20)

    async def go():
        liar = Liar()
        liar.app.router.add_get("/v1/artifacts/m/versions/v1",
                                lambda r: liar.stream(r, (piece for _ in range(4 * (MAX_MANIFEST >> 20)))))

        async def declared(request):
            return web.Response(body=b"{}", headers={"Content-Length": str(10 << 30)})
        liar.app.router.add_get("/v1/artifacts/m/versions", declared)
        async with liar:
            async with OriginClient(liar.url) as client:
                with pytest.raises(TransferError, match="MAX_MANIFEST"):
                    await client.manifest("m", "v1")
                with pytest.raises(TransferError, match="MAX_ANSWER"):
                    await client.versions("m")
            return liar.written

    written = asyncio.run(go())
    assert written < MAX_MANIFEST + (32 << 20), written  # the limit, a read buffer and the sockets'


def _event_server(liar: Liar, first: list[bytes], later: list[bytes]):
    calls = []

    async def events(request):
        calls.append(time.monotonic())
        pieces = first if len(calls) == 1 else later
        return await liar.stream(request, pieces, headers={"Content-Type": "text/event-stream"})

    liar.app.router.add_get(EVENTS, events)
    return calls


HELLO = b'event: hello\ndata: {"epoch": "e1", "seq": 0, "complete": true}\n\n'


@pytest.mark.parametrize("bad", [
    b"data: " + b"x" * (2 * MAX_EVENT),  # one line without end
    b"data: {}\n" * (MAX_EVENT // 5),  # data lines, never a blank one
    b"data: " + b"[" * 5000 + b"]" * 5000 + b"\n\n",  # nested too deeply
    b"data: [1, 2]\n\n",  # not an object
    b"data: \xff\xfe\n\n",  # not UTF-8
], ids=["long-line", "no-blank-line", "deep-json", "not-an-object", "not-utf8"])
def test_an_event_stream_breaking_the_limits_is_a_transfer_error(bad):
    async def go():
        liar = Liar()
        _event_server(liar, [HELLO, bad], [HELLO])
        async with liar:
            got = []
            async with OriginClient(liar.url) as client:
                with pytest.raises(TransferError, match="event stream"):
                    async for item in client.events():
                        got.append(item)
            return got, liar.written

    got, written = asyncio.run(go())
    assert got == [("hello", {"epoch": "e1", "seq": 0, "complete": True})]
    assert written < 2 * MAX_EVENT + (16 << 20)


def test_backoff_doubles_with_jitter_and_starts_over():
    b = Backoff(first=0.5, longest=10)
    waits = [b.next() for _ in range(8)]
    for n, w in enumerate(waits):
        ceiling = min(10, 0.5 * 2 ** n)
        assert 0 <= w <= ceiling  # full jitter (agents.site.follow.Backoff)
    assert len({round(Backoff().next(), 6) for _ in range(20)}) > 10  # sites do not wait alike
    b.reset()
    assert b.next() <= 0.5


def test_the_follower_reconnects_after_a_bad_stream_and_takes_the_next_event():
    channel = b'event: channel\nid: 1\ndata: {"artifact": "m", "channel": "prod", "version": "v2"}\n\n'

    async def go():
        liar = Liar()
        bad = b"event: channel\ndata: [1, 2]\n\n"  # valid JSON, not an object: it broke the old follower
        calls = _event_server(liar, [HELLO, bad], [HELLO, channel])

        async def channel_read(request):
            return web.json_response({"artifact": "m", "channel": "prod", "version": "v1", "history": []})
        liar.app.router.add_get("/v1/artifacts/m/channels/prod", channel_read)
        async with liar:
            ch = ChannelStatus("m", "prod")
            async with OriginClient(liar.url) as client:
                follower = Follower(client, {"m": ch}, resync_interval=3600, wake=lambda a: None)
                task = asyncio.create_task(follower.follow_events())
                try:
                    for _ in range(100):
                        if ch.target == "v2":
                            break
                        await asyncio.sleep(0.05)
                finally:
                    task.cancel()
            return ch.target, calls

    target, calls = asyncio.run(go())
    assert target == "v2" and len(calls) >= 2
    assert calls[1] - calls[0] < 2.0  # reconnected after one short jittered wait


# --- the sync engine -------------------------------------------------------------------------

def _fetch_from(tmp_path, rng, mode: str, **source_kw):
    """Fetch a published version's two 8 MiB chunks (one tensor, two safetensors segments)
    from a misbehaving source, then the origin."""
    origin = open_store(tmp_path / "origin", compress=False)
    weights = np.frombuffer(random_bytes(rng, 16 << 20), dtype=np.float32)
    src = write_tree(tmp_path / "src", {"model.safetensors": safetensors_bytes([("w", weights)])})
    publish_local(origin, src, artifact="model", version="v1")
    sizes = {c: n for c, n in Registry(origin).manifest("model", "v1").unique_chunks().items() if n >= 8 << 20}
    assert len(sizes) == 2
    site = open_store(tmp_path / "site")
    size = 8 << 20

    async def go():
        runner, origin_url = await serve_origin(origin, TOKENS)
        fake = MisbehavingSource(origin, mode, **source_kw)
        await fake.start()
        clients = [OriginClient(fake.url, SECRET), OriginClient(origin_url, SECRET)]
        t0 = time.monotonic()
        try:
            stats = await asyncio.wait_for(fetch_chunks(sizes, site, clients, FetchOptions(
                connections=1, stall_timeout=1.0, batch_bytes=4 * size)), 60)
            return stats, fake, time.monotonic() - t0
        finally:
            for c in clients:
                await c.close()
            await fake.close()
            await runner.cleanup()

    stats, fake, took = asyncio.run(go())
    assert site.missing(list(sizes)) == []
    return stats, fake, took


def test_a_source_repeating_a_frame_is_cut_off_and_counted(tmp_path, rng):
    stats, fake, _ = _fetch_from(tmp_path, rng, "repeat", copies=25)  # 200 MiB of one 8 MiB frame
    assert stats.bad_chunks_by_source[fake.url] >= 1  # each answer is cut at its second copy
    assert fake.bytes_sent < 64 << 20, fake.bytes_sent  # not 200 MiB: the client stopped reading it


def test_a_dripping_source_loses_the_batch_within_the_stall_window(tmp_path, rng):
    stats, fake, took = _fetch_from(tmp_path, rng, "drip", drip=100)  # 1 kB/s, under 8 KiB/s
    assert took < 4.0, took  # one 1 s window (+ a tick), not 1 s per MiB of the 8 MiB frame
    assert fake.bytes_sent < 10_000
    assert stats.bytes_by_source.get(fake.url, 0) == 0
