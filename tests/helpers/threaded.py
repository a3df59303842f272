"""A loopback aiohttp proxy on its own event loop thread, so blocking tests can use it.

    class Mine(ThreadedProxy):
        async def _handle(self, request): ...  # every method, every path; self._session to upstream

`start()` (or `with`) serves on 127.0.0.1:`port` (a free one) and opens `_session`, a
client session that does not decompress; `stop()` closes both and ends the thread.
Subclasses tune `_session_options`, `_runner_options` and `_stop_wait`.
`tests/helpers/lying_origin.py` and `tests/helpers/s3.py`'s `ThrottlingProxy` are two.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web

from .ports import free_port


class ThreadedProxy:
    _session_options: dict = {}  # more aiohttp.ClientSession arguments
    _runner_options: dict = {}  # more web.AppRunner arguments
    _stop_wait = 10.0  # seconds stop() waits for the runner and session to close

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False, **self._session_options)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, **self._runner_options)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def start(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(self._stop_wait)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
