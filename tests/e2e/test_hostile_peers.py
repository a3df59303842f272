"""Hostile peers against real `fabric` processes: each server survives a slowloris flood,
and a site agent survives an event stream that breaks the protocol's limits.

The servers run with short deadlines (`FABRIC_SERVER_LIMITS`), the flood comes from
127.0.0.2 and the real requests from 127.0.0.1, so the cap per peer holds the flood
back while real clients pass.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
from aiohttp import ClientSession, web

from fabric.wire.protocol import EVENTS, MAX_EVENT

from helpers.agent import AgentProcess, SITE_TOKENS
from helpers.files import random_bytes, write_tree
from helpers.http import request
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, OriginProcess, write_token_file
from helpers.cli import run_cli
from helpers.ports import free_port
from helpers.process import ServerProcess
from helpers.s3 import hook_config

LIMITS = "header_timeout=1.5,body_timeout=1.5,max_per_peer=10,max_connections=200"


def _flood(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        out.append(s)
    return out


def _closed(s: socket.socket) -> bytes:
    got = b""
    try:
        while piece := s.recv(65536):
            got += piece
    except (ConnectionResetError, socket.timeout):
        pass
    return got


def _survives_a_flood(port: int) -> None:
    t0 = time.monotonic()
    held = _flood(port, 10)
    refused = _flood(port, 3)  # over the cap per peer
    for s in refused:
        assert _closed(s).startswith(b"HTTP/1.1 503")
    t = time.monotonic()
    r = request(f"http://127.0.0.1:{port}", "GET", "/livez", timeout=5)
    assert r.status == 200 and time.monotonic() - t < 1.0
    for s in held:
        assert _closed(s) == b""  # cut at the header deadline, without an answer
    assert time.monotonic() - t0 < 5.0


def test_origin_agent_and_hook_survive_a_slowloris_flood(tmp_path):
    tokens = write_token_file(tmp_path / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    origin = OriginProcess(tmp_path / "origin-store", tokens, tmp_path / "origin.log")
    origin.env["FABRIC_SERVER_LIMITS"] = LIMITS
    origin.start()
    try:
        agent = AgentProcess(tmp_path, "solo", origin.url, follow=["m:prod"])
        agent.env["FABRIC_SERVER_LIMITS"] = LIMITS
        hook_port = free_port()
        cfg = hook_config(tmp_path, port=hook_port, bucket="b", endpoint=f"http://127.0.0.1:{free_port()}")
        hook = ServerProcess(["hook", "--config", str(cfg)], hook_port, tmp_path / "hook.log", name="hook")
        hook.env["FABRIC_SERVER_LIMITS"] = LIMITS
        with agent, hook:
            for port in (origin.port, agent.port, hook_port):
                _survives_a_flood(port)
    finally:
        origin.stop()


class LyingEvents:
    """A reverse proxy to the real origin whose first event stream sends a line over MAX_EVENT
    (and over the 8 MiB at which aiohttp's own line reader gives up with a ValueError)."""

    def __init__(self, origin_url: str):
        self.origin_url, self.streams = origin_url, 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self):
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self._session = ClientSession()
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        first = request.path == EVENTS and self.streams == 0
        if request.path == EVENTS:
            self.streams += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.origin_url + request.path_qs,
                                         headers=headers, data=await request.read()) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get(
                "Content-Type", "application/octet-stream")})
            await resp.prepare(request)
            try:
                async for piece in up.content.iter_any():
                    await resp.write(piece)
                    if first and b"\n\n" in piece:  # after the hello: a line over MAX_EVENT, never ended
                        await resp.write(b"data: " + b"x" * (9 * MAX_EVENT))
                        await asyncio.sleep(30)
            except (ConnectionResetError, RuntimeError):
                pass
            return resp

    def close(self):
        async def stop():
            await self._runner.cleanup()
            await self._session.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_an_agent_reconnects_after_a_lying_event_stream_and_deploys_the_next_version(tmp_path):
    tokens = write_token_file(tmp_path / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    with OriginProcess(tmp_path / "origin-store", tokens, tmp_path / "origin.log") as origin:
        liar = LyingEvents(origin.url)
        try:
            agent = AgentProcess(tmp_path, "solo", f"http://127.0.0.1:{liar.port}", follow=["m:prod"],
                                 sync={"resync_interval": 3600})  # only events can bring v1 soon
            with agent:
                deadline = time.monotonic() + 10
                while liar.streams < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert liar.streams >= 2, agent.log_text()[-2000:]  # it came back after the bad line
                src = write_tree(tmp_path / "src", {"w.bin": random_bytes(np.random.default_rng(1), 1 << 16)})
                done = run_cli("publish", str(src), "--artifact", "m", "--version", "v1", "--channel", "prod",
                               "--origin", origin.url, "--token", PUBLISH_SECRET)
                assert done.returncode == 0, done.stderr
                agent.wait_active("m", "v1", timeout=15)
        finally:
            liar.close()
