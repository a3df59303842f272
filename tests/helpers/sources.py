"""Chunk sources that misbehave on purpose: real aiohttp servers on 127.0.0.1.

Each speaks the chunk-stream protocol of `POST /v1/chunks/fetch` (see fabric.wire.frames),
serving chunks from a real `Store`, but:

* ``lie``      — every chunk frame carries the right id and size but wrong bytes
                 (one byte flipped), so only the digest check can catch it;
* ``missing``  — answers a "missing" frame for every id;
* ``stall``    — sends `good` correct frames, then the head and half the payload of the
                 next frame, then stops sending (the connection stays open) until closed;
* ``omit``     — a well-formed but empty answer: no frames, end frame counting 0;
* ``foreign``  — answers with a chunk frame for an id nobody asked for;
* ``repeat``   — sends the first asked chunk's (valid) frame `copies` times over;
* ``drip``     — sends correct frames, `drip` bytes every 0.1 s.

Also `serve_origin`, the real origin app served in-process on a free port.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from fabric.core import digest

from fabric.wire import frames as wire
from fabric.wire.protocol import CHUNK_STREAM, CHUNKS_FETCH, MAGIC
from fabric.wire.auth import TokenTable
from fabric.origin.app import create_app
from fabric.wire.server import bound_port, serve
from fabric.store.store import Store

MODES = ("lie", "missing", "stall", "omit", "foreign", "repeat", "drip")


class MisbehavingSource:
    def __init__(self, store: Store, mode: str, *, good: int = 0, copies: int = 100, drip: int = 100):
        assert mode in MODES, mode
        self.store, self.mode, self.good = store, mode, good
        self.copies, self.drip = copies, drip
        self.bytes_sent = 0  # written by `repeat` and `drip` (as far as the client let them)
        self.requests = 0
        self.ids_asked: list[str] = []
        self.frames_sent = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(CHUNKS_FETCH, self._fetch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        ids = json.loads(await request.read())["ids"]
        self.ids_asked += ids
        resp = web.StreamResponse(headers={"Content-Type": CHUNK_STREAM})
        await resp.prepare(request)
        await resp.write(MAGIC)
        if self.mode == "omit":
            await resp.write(wire.end_frame(0))
            return resp
        if self.mode == "foreign":
            junk = b"not asked for"
            await resp.write(wire.chunk_frame(digest.digest(junk), 0, len(junk), junk))
            await resp.write(wire.end_frame(1))
            return resp
        if self.mode == "repeat":
            data = await asyncio.to_thread(self.store.get_chunk, ids[0])
            frame = wire.chunk_frame(ids[0], 0, len(data), data)
            for _ in range(self.copies):
                await resp.write(frame)
                self.bytes_sent += len(frame)
                self.frames_sent += 1
            await resp.write(wire.end_frame(self.copies))
            return resp
        sent = 0
        for cid in ids:
            if self.mode == "drip":
                data = await asyncio.to_thread(self.store.get_chunk, cid)
                frame = wire.chunk_frame(cid, 0, len(data), data)
                for i in range(0, len(frame), self.drip):
                    await resp.write(frame[i:i + self.drip])
                    self.bytes_sent += len(frame[i:i + self.drip])
                    await asyncio.sleep(0.1)
                sent += 1
                continue
            if self.mode == "missing":
                await resp.write(wire.missing_frame(cid))
                sent += 1
                continue
            data = await asyncio.to_thread(self.store.get_chunk, cid)
            if self.mode == "stall" and sent >= self.good:
                frame = wire.chunk_frame(cid, 0, len(data), data)
                await resp.write(frame[:len(frame) - len(data) // 2])
                try:
                    await asyncio.wait_for(self._release.wait(), 60)
                except asyncio.TimeoutError:
                    pass
                return resp
            if self.mode == "lie":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            await resp.write(wire.chunk_frame(cid, 0, len(data), data))
            sent += 1
            self.frames_sent += 1
        await resp.write(wire.end_frame(sent))
        return resp


async def serve_origin(store: Store, tokens: TokenTable) -> tuple[web.AppRunner, str]:
    """The real origin app, served by this event loop on a free loopback port."""
    runner = await serve(create_app(store, tokens), "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{bound_port(runner)}"
