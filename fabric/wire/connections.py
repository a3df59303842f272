"""Connections: what every Fabric server gives one — caps per peer and in total, read deadlines.

aiohttp takes every connection it is offered and reads a request's headers and body
with no deadline: half-sent requests stay open forever, and a flood of them spends the
process's file descriptors until real clients time out. So `fabric.wire.server.serve`
runs every app (origin, site agent, hook, worker) on a `GuardedRunner`, whose sites
listen through a `ConnectionGuard` instead of aiohttp's own protocol factory. The guard
wraps each connection's aiohttp protocol in a `_Guarded` one, which forwards every call
and

* refuses a connection over `max_connections` open in total, or `max_per_peer` from one
  IP address: it answers `503 too_many_connections` (`Retry-After: 1`) and closes;
* closes a connection whose request headers are not complete `header_timeout` seconds
  after the request's first byte (for a new connection: after it opened);
* closes a connection whose request body, while the server waits for it, arrives slower
  than `body_min_rate` bytes/s over `body_timeout` seconds (a stall is 0 B/s). While
  aiohttp has paused reading (the handler is busy, its buffer full) the client is not to
  blame and the clock stops;
* lets aiohttp close a kept-alive connection idle for `idle_timeout` seconds.

One sweep task checks every open connection each tick (a fraction of the shortest
deadline); the cost per read is a counter add, and a search for the blank line only
while a request's headers are still coming. The values are `fabric.wire.protocol`'s
(docs/protocol.md "Limits"); `FABRIC_SERVER_LIMITS` overrides them
(`fabric.config.server_limits_env`). TLS handshakes keep asyncio's own 60 s deadline.
"""

from __future__ import annotations

import asyncio
import collections
import json
import resource
from dataclasses import dataclass, fields, replace

from aiohttp import web

from fabric.config import server_limits_env
from fabric.errors import ConfigError, TooManyConnections
from fabric.logs import get_logger
from fabric.wire.frames import error_body
from fabric.wire.protocol import (BODY_MIN_RATE, BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS,
                                  MAX_CONNECTIONS_PER_PEER)

log = get_logger("server")
_LINGER = 1.0  # seconds a refused connection may take to read its 503 before it is cut
_END_OF_HEADERS = b"\r\n\r\n"


@dataclass(frozen=True)
class ServerLimits:
    """What a server gives connections; the defaults are the protocol's."""

    max_connections: int = MAX_CONNECTIONS
    max_per_peer: int = MAX_CONNECTIONS_PER_PEER
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    body_min_rate: float = BODY_MIN_RATE
    idle_timeout: float = IDLE_TIMEOUT

    @classmethod
    def from_env(cls) -> "ServerLimits":
        """The defaults with `FABRIC_SERVER_LIMITS`'s overrides, fitted to the open-file limit."""
        overrides = server_limits_env()
        names = {f.name: f.type for f in fields(cls)}
        for key in overrides:
            if key not in names:
                raise ConfigError(f"FABRIC_SERVER_LIMITS: no limit named {key!r} (known: {', '.join(sorted(names))})")
        whole = {k: int(v) for k, v in overrides.items() if k.startswith("max_")}
        return cls(**{**overrides, **whole}).fitted()

    def fitted(self) -> "ServerLimits":
        """At most half the process's open files as connections: files and upstreams need the rest."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and self.max_connections > soft // 2:
            return replace(self, max_connections=max(1, soft // 2))
        return self

    @property
    def tick(self) -> float:
        return min(1.0, max(0.05, min(self.header_timeout, self.body_timeout) / 8))


class ConnectionGuard:
    """A protocol factory for `loop.create_server`: admits, watches and closes connections."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.factory = None  # aiohttp's web.Server, set once the runner is set up
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.per_peer: collections.Counter[str] = collections.Counter()
        self.lingering = 0
        self._refused: collections.Counter[str] = collections.Counter()  # since the last log line
        self._cut: collections.Counter[str] = collections.Counter()
        self._sweeper: asyncio.Task | None = None

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)

    def admit(self, conn: "_Guarded") -> tuple[str, str] | None:
        """None if `conn` may open; else (which cap, a message saying so)."""
        if len(self.open) >= self.limits.max_connections:
            return "total", f"the server holds {self.limits.max_connections} connections, its cap"
        if self.per_peer[conn.peer] >= self.limits.max_per_peer:
            return "per peer", f"{conn.peer} holds {self.limits.max_per_peer} connections, the cap per peer"
        self.open[conn.transport] = conn
        self.per_peer[conn.peer] += 1
        return None

    def release(self, conn: "_Guarded") -> None:
        if self.open.pop(conn.transport, None) is not None:
            self.per_peer[conn.peer] -= 1
            if self.per_peer[conn.peer] <= 0:
                del self.per_peer[conn.peer]

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Tells the connection a request is being handled (so its body is watched, its headers not)."""
        conn = self.open.get(request.transport)
        if conn is None:
            return await handler(request)
        conn.handling(request.content if request.body_exists else None)
        try:
            return await handler(request)
        except ConnectionResetError:
            if conn.reason is None:
                raise
            return web.Response(status=408)  # we cut it (the reason is logged): no traceback per connection
        finally:
            conn.handled()

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limits.tick)
            now = loop.time()
            for conn in list(self.open.values()):
                why = conn.overdue(now)
                if why:
                    self._cut[why] += 1
                    conn.cut(why)
            self._report()

    def _report(self) -> None:
        for why, n in self._cut.items():
            log.warning("closed slow connections", count=n, reason=why)
        for cap, n in self._refused.items():
            log.warning("refused connections over the cap", count=n, cap=cap)
        self._cut.clear()
        self._refused.clear()


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, with the clocks the guard checks."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.received = 0  # bytes, ever
        self.headers_since: float | None = None  # when the pending request began; None: not waiting for headers
        self.idle = False  # between requests: the next byte starts a request's headers
        self._tail = b""  # the last bytes seen while looking for the end of the headers
        self.body = None  # the request body being received (aiohttp's StreamReader)
        self._window: tuple[float, int] | None = None  # (since, bytes received then) while waiting for it
        self.reason: str | None = None  # why the guard cut it

    # --- asyncio's calls ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refused = self.guard.admit(self)
        if refused is not None:
            self._refuse(*refused)
            return
        self.headers_since = asyncio.get_running_loop().time()
        self.inner = self.guard.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return  # refused: read and dropped while the 503 goes out
        self.received += len(data)
        if self.idle:
            self.idle, self._tail = False, b""
            self.headers_since = asyncio.get_running_loop().time()
        if self.headers_since is not None:
            if _END_OF_HEADERS in self._tail + data[:3] or _END_OF_HEADERS in data:
                self.headers_since = None
            self._tail = data[-3:]
        self.inner.data_received(data)

    def eof_received(self):
        if self.inner is None:
            self.transport.close()
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        self.guard.release(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # --- the guard's ------------------------------------------------------------------

    def handling(self, body) -> None:
        self.headers_since, self.idle = None, False
        self.body = body if body is not None and not body.is_eof() else None
        self._window = None

    def handled(self) -> None:
        self.body, self._window, self.idle = None, None, True

    def overdue(self, now: float) -> str | None:
        """Why this connection must close now, or None."""
        limits = self.guard.limits
        if self.headers_since is not None and now - self.headers_since > limits.header_timeout:
            return f"request headers not complete within {limits.header_timeout:g}s"
        body = self.body
        if body is None:
            return None
        if body.is_eof() or body.exception() is not None:
            self.body = None
            return None
        if not self.transport.is_reading():  # aiohttp paused reading: the server is behind, not the client
            self._window = None
            return None
        if self._window is None:
            self._window = (now, self.received)
            return None
        since, then = self._window
        if now - since < limits.body_timeout:
            return None
        if self.received - then < limits.body_min_rate * (now - since):
            return f"request body slower than {limits.body_min_rate:g} B/s for {limits.body_timeout:g}s"
        self._window = (now, self.received)
        return None

    def cut(self, why: str) -> None:
        self.reason = why
        self.transport.abort()

    def _refuse(self, cap: str, why: str) -> None:
        guard, transport = self.guard, self.transport
        guard._refused[cap] += 1
        if guard.lingering >= guard.limits.max_connections:  # a flood of refusals: no answer, no linger
            transport.abort()
            return
        body = json.dumps(error_body(TooManyConnections(f"connection refused: {why}"))).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if transport.can_write_eof():
            transport.write_eof()
        guard.lingering += 1
        asyncio.get_running_loop().call_later(_LINGER, self._end_linger)

    def _end_linger(self) -> None:
        self.guard.lingering -= 1
        self.transport.abort()


class GuardedRunner(web.AppRunner):
    """An `AppRunner` whose sites listen through a `ConnectionGuard` (aiohttp's own `server`
    property is the protocol factory a `TCPSite` hands `loop.create_server`)."""

    def __init__(self, app: web.Application, limits: ServerLimits, **kwargs):
        super().__init__(app, keepalive_timeout=limits.idle_timeout, **kwargs)
        self.guard = ConnectionGuard(limits)
        if not app.frozen:
            app.middlewares.insert(0, self.guard.middleware)

    @property
    def server(self):
        server = super().server
        if server is None:
            return None
        self.guard.factory = server
        return self.guard

    async def setup(self) -> None:
        await super().setup()
        self.guard.start()

    async def cleanup(self) -> None:
        await self.guard.stop()
        await super().cleanup()
