"""Events: what changed, announced so followers need not poll.

An `EventLog` keeps the last few thousand events in memory, each with a sequence
number that grows by one. Followers read them as server-sent events
(`GET /v1/events?after=SEQ`, or the `Last-Event-ID` header on reconnect). Every
stream opens with a `hello` event naming the log's `epoch`, which changes when the
server restarts: a follower that sees a new epoch, or that asks for events older
than the log holds, re-syncs from scratch instead of trusting the sequence.

`read_events` is the client's side: it parses a stream of server-sent events, each
line and each event at most `MAX_EVENT` bytes, each event's data one JSON object; a
stream that breaks a rule raises `TransferError`, so the follower reconnects.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, AsyncIterable, AsyncIterator, Callable

from fabric.core.boundedjson import decode as decode_json
from fabric.errors import InvalidInput, TransferError
from fabric.wire.protocol import MAX_EVENT

if TYPE_CHECKING:  # the server side's; a client (the CLI) reads events without importing aiohttp's server
    from aiohttp import web

_KEEP = 4096
_KEEPALIVE = 15.0  # seconds between comment lines on an idle stream


class Followed:
    """What `sse_handler` follows: `epoch`, `seq`, `closed`, `wait`, `close` here; `since` in
    each kind (`EventLog`; a relay's `agents.site.event_relay.EventRelay`)."""

    def __init__(self, epoch: str | None):
        self.epoch = epoch
        self.seq = 0
        self.closed = False
        # bumped when open streams must end though the epoch stays: a relay whose upstream, on a
        # reconnect with the same epoch, said `complete: false` (each child reconnects and re-syncs)
        self.restarts = 0
        self._changed = asyncio.Condition()

    def stream(self) -> tuple[str | None, int]:
        """What an open stream follows: it ends when this changes (a new epoch, or a restart)."""
        return self.epoch, self.restarts

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        """End every open stream (at server shutdown, so it need not wait for them)."""
        self.closed = True
        await self._notify()

    async def wait(self, after: int, timeout: float) -> None:
        """Until an event past `after`, a close, a new epoch or a restart; at most `timeout` seconds."""
        stream = self.stream()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.seq > after or self.closed or self.stream() != stream), timeout)
            except asyncio.TimeoutError:
                pass


class EventLog(Followed):
    def __init__(self, keep: int = _KEEP):
        super().__init__(uuid.uuid4().hex[:12])
        self._events: deque[dict] = deque(maxlen=keep)

    def append(self, event: dict) -> dict:
        self.seq += 1
        event = dict(event, seq=self.seq, at=time.time())
        self._events.append(event)
        asyncio.get_running_loop().create_task(self._notify())
        return event

    def since(self, after: int) -> tuple[list[dict], bool]:
        """Events with seq > after, and whether the log still held all of them."""
        complete = not self._events or self._events[0]["seq"] <= after + 1
        return [e for e in self._events if e["seq"] > after], complete

    def new_epoch(self) -> None:
        """Start a new epoch (this log missed events it should have carried): every open
        stream ends, and each follower, reconnecting, sees the new epoch and re-syncs."""
        self.epoch = uuid.uuid4().hex[:12]
        asyncio.get_running_loop().create_task(self._notify())


def sse_handler(key: web.AppKey, require: Callable[[web.Request], None],
                visible: Callable[[web.Request, dict], bool] = lambda request, event: True):
    """A handler streaming the app's EventLog at `key` as server-sent events.

    `require` checks the caller may follow at all; `visible` filters events per caller
    (a token sees only the artifacts its patterns allow).
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        require(request)
        log: EventLog = request.app[key]
        # a follower cannot have seen events past the head: its `after` comes from another epoch (another
        # origin, or this one before a restart), and every event from now on is new to it
        after = min(_after(request), log.seq)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events, complete = log.since(after)
        stream = log.stream()
        await _send(resp, "hello", {"epoch": log.epoch, "seq": log.seq, "complete": complete})
        # a relayed log changes epoch with its upstream's, and restarts when its upstream lost events
        while not log.closed and log.stream() == stream:
            for e in events:
                if visible(request, e):
                    await _send(resp, e["type"], e, event_id=e["seq"])
                after = e["seq"]
            await log.wait(after, _KEEPALIVE)
            events, _ = log.since(after)
            if not events and not log.closed:
                await resp.write(b": keepalive\n\n")
        return resp

    return handler


def _after(request: web.Request) -> int:
    raw = request.query.get("after") or request.headers.get("Last-Event-ID") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"'after' must be an integer event sequence, got {raw[:40]!r}") from None
    if value < 0:
        raise InvalidInput("'after' must not be negative")
    return value


async def _send(resp: web.StreamResponse, event: str, data: dict, event_id: int | None = None) -> None:
    lines = f"event: {event}\n"
    if event_id is not None:
        lines += f"id: {event_id}\n"
    lines += f"data: {json.dumps(data)}\n\n"
    await resp.write(lines.encode())


# --- the client's side ------------------------------------------------------------------

async def read_events(chunks: AsyncIterable[bytes], *, source: str, limit: int = MAX_EVENT
                      ) -> AsyncIterator[tuple[str, dict]]:
    """Server-sent events from `chunks` (a response body's pieces) as (type, data object).

    Comment lines (`: keepalive`) and fields other than `event` and `data` are skipped.
    Raises `TransferError` (naming `source`) for a line or an event over `limit` bytes,
    bytes that are not UTF-8, or data that is not one JSON object.
    """
    buf, start = bytearray(), 0
    event, data, size = "message", [], 0
    async for chunk in chunks:
        buf += chunk
        while (end := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            if not line:
                if data:
                    yield event, _data(event, data, source)
                event, data, size = "message", [], 0
                continue
            size += len(line)
            if size > limit:
                raise TransferError(f"{source}: an event over MAX_EVENT ({limit} bytes) with no blank line to end it")
            name, _, value = _text(line, source).partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        del buf[:start]
        start = 0
        if len(buf) > limit:
            raise TransferError(f"{source}: an event line over MAX_EVENT ({limit} bytes)")


def _text(line: bytes, source: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise TransferError(f"{source}: an event line that is not UTF-8") from None


def _data(event: str, data: list[str], source: str) -> dict:
    obj = decode_json("\n".join(data), what=f"{source}: event {event[:40]!r}", error=TransferError)
    if not isinstance(obj, dict):
        raise TransferError(f"{source}: event {event[:40]!r} carries {type(obj).__name__}, not a JSON object")
    return obj
