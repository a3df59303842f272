"""A relay's re-served event stream (agents.site.event_relay.EventRelay) on a real server:
idle means idle, whatever `seq` the upstream's hello named.

The upstream's hello (and events a relay does not re-serve, such as `site`) raise the
relay's `seq` with nothing in its log to send; a child stream that woke for that wrote
`: keepalive` in a loop (120 kB a second per child on loopback, 1.2x of a 3 MB artifact on
the lab's hub-to-edge links, and a busy CPU at every relay until the first real event).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from agents.site.event_relay import EventRelay
from fabric.wire.events import sse_handler

LOG = web.AppKey("log", EventRelay)


async def _serve(relay: EventRelay) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app[LOG] = relay
    app.router.add_get("/v1/events", sse_handler(LOG, require=lambda request: None))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/events"


async def _read_for(url: str, seconds: float, after: int = 0, ended: list | None = None) -> bytes:
    """What the stream sent in `seconds`; `ended` gets True if the server ended it before then."""
    got = bytearray()
    async with aiohttp.ClientSession() as session:
        async with session.get(url, params={"after": str(after)}) as resp:
            try:
                async with asyncio.timeout(seconds):
                    async for block in resp.content.iter_any():
                        got += block
                if ended is not None:
                    ended.append(True)
            except TimeoutError:
                pass
    return bytes(got)


def test_an_idle_relayed_stream_sends_its_hello_and_no_keepalive_loop():
    async def main():
        relay = EventRelay()
        relay.feed("hello", {"epoch": "e1", "seq": 5, "complete": True}, False)  # seq 5, nothing kept
        relay.feed("site", {"type": "site", "site": "hub", "seq": 6}, True)  # not re-served
        runner, url = await _serve(relay)
        try:
            idle = await _read_for(url, 1.0)
            later = asyncio.ensure_future(_read_for(url, 1.0))
            await asyncio.sleep(0.3)
            relay.feed("channel", {"type": "channel", "artifact": "m", "channel": "prod", "version": "v1",
                                   "seq": 7}, True)
            return idle, await later
        finally:
            await relay.close()
            await runner.cleanup()
    idle, later = asyncio.run(main())
    assert b"event: hello" in idle and idle.count(b"keepalive") == 0 and len(idle) < 200, idle[:300]
    assert b"event: channel" in later and b'"version": "v1"' in later and later.count(b"keepalive") == 0


def test_an_upstream_that_lost_events_under_the_same_epoch_ends_every_child_stream():
    """The upstream's hello on a reconnect says `complete: false` with the epoch unchanged: the
    relay held nothing of what was lost, so its children must re-sync, not carry on as if resumed."""
    async def main():
        relay = EventRelay()
        relay.feed("hello", {"epoch": "e1", "seq": 5, "complete": True}, False)
        runner, url = await _serve(relay)
        try:
            ended: list = []
            open_stream = asyncio.ensure_future(_read_for(url, 3.0, after=5, ended=ended))
            await asyncio.sleep(0.3)
            relay.feed("hello", {"epoch": "e1", "seq": 9, "complete": False}, False)  # events 6-9 lost
            first = await open_stream
            again = await _read_for(url, 0.5, after=5)  # the child reconnects from what it had seen
            return first, ended, again
        finally:
            await relay.close()
            await runner.cleanup()
    first, ended, again = asyncio.run(main())
    assert ended == [True] and first.count(b"event: hello") == 1, first  # ended well before 3 s
    assert b'"epoch": "e1"' in again and b'"complete": false' in again and b'"seq": 9' in again, again
