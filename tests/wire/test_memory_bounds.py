"""Memory bounds of a fetching site (issue 17): what a connection reads ahead, and what its
fetches hold together.

A client connection's read-ahead (aiohttp's StreamReader, `fabric.wire.client.READ_BUFFER`)
against a real server on loopback that sends faster than the client reads, for raw bytes and
for a chunk stream read by `fabric.wire.frames.FrameReader` in its pieces; the shared
payload budget (`fabric.pacing.ByteBudget`) under many concurrent takers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from aiohttp import web

from fabric.core import digest
from fabric.pacing import ByteBudget, MEMORY_BUDGET
from fabric.wire import frames
from fabric.wire.client import READ_BUFFER, OriginClient
from tests.helpers.ports import free_port

BODY = 32 << 20
PAYLOAD = 8 << 20  # the chunk stream's frames: the largest chunks a manifest lists by default
CHUNK = b"\x5a" * PAYLOAD
CHUNK_ID = digest.digest(CHUNK)


async def _serve_fast() -> tuple[web.AppRunner, str]:
    async def send(request: web.Request, parts) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client may stop reading and close
            for part in parts:
                await resp.write(part)
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        return await send(request, [b"\xa5" * (1 << 20)] * (BODY >> 20))

    async def stream(request: web.Request) -> web.StreamResponse:
        count = BODY // PAYLOAD
        frame = [frames.chunk_header(CHUNK_ID, 0, PAYLOAD, PAYLOAD), CHUNK]
        return await send(request, [frames.MAGIC, *frame * count, frames.end_frame(count)])

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_a_slow_reader_holds_at_most_twice_the_read_buffer():
    async def main() -> tuple[int, int]:
        runner, url = await _serve_fast()
        client = OriginClient(url, "t" * 24)
        try:
            async with client.session.get(f"{url}/big") as resp:
                first = await resp.content.readexactly(1)
                assert first == b"\xa5"
                for _ in range(200):  # the reader is elsewhere (e.g. waiting on its budget) until
                    await asyncio.sleep(0.025)  # aiohttp stops reading this connection
                    if resp.connection.protocol._reading_paused:
                        break
                assert resp.connection.protocol._reading_paused
                held = resp.content._size  # bytes aiohttp read ahead and holds for this connection
                rest = 0
                while block := await resp.content.read(1 << 20):
                    rest += len(block)
                return held, rest
        finally:
            await client.close()
            await runner.cleanup()

    held, rest = asyncio.run(main())
    assert rest == BODY - 1  # the whole body still comes
    assert 0 < held <= 2 * READ_BUFFER + (256 << 10), held  # 4 MiB buffers let it hold 8 MiB


def test_a_frame_reader_waiting_on_its_budget_holds_at_most_twice_the_read_buffer():
    """aiohttp raises a connection's read-ahead to twice the largest read it is asked for, so
    the frame reader reads a payload in pieces no larger than the read buffer: 1 MiB pieces
    let a connection hold 2 MiB more while its reader waits (a relay's peak, issue 17)."""
    async def main() -> tuple[int, int]:
        runner, url = await _serve_fast()
        client = OriginClient(url, "t" * 24)
        budget, reserved = asyncio.Event(), []

        async def reserve(n: int) -> None:
            reserved.append(n)
            if len(reserved) == 2:  # the second payload waits until the first is "stored"
                await budget.wait()

        try:
            async with client.session.get(f"{url}/stream") as resp:
                reader = frames.FrameReader(resp.content.readexactly, reserve=reserve)
                first = await reader.__anext__()
                assert len(first.payload) == PAYLOAD and digest.digest(first.payload) == CHUNK_ID
                waiting = asyncio.ensure_future(reader.__anext__())
                sizes = [-1]
                for _ in range(200):  # until aiohttp has stopped reading and the buffer settled
                    await asyncio.sleep(0.025)
                    if resp.connection.protocol._reading_paused and len(reserved) == 2:
                        sizes.append(resp.content._size)
                        if sizes[-4:] == [sizes[-1]] * 4:
                            break
                assert resp.connection.protocol._reading_paused
                held = resp.content._size
                budget.set()
                count = 1 + len([await waiting] + [f async for f in reader])
                return held, count
        finally:
            await client.close()
            await runner.cleanup()

    held, count = asyncio.run(main())
    assert count == BODY // PAYLOAD  # every frame still comes
    assert 0 < held <= 2 * READ_BUFFER + (256 << 10) <= 1 << 20, held  # 1 MiB pieces let it hold 2.25 MiB


def test_the_payload_budget_is_never_exceeded_by_concurrent_takers():
    budget = ByteBudget(1 << 20)
    peak = [0]

    async def taker(rng: random.Random) -> None:
        for _ in range(5):
            n = rng.randrange(64 << 10, 400 << 10)
            await budget.take(n)
            peak[0] = max(peak[0], budget.used)
            await asyncio.sleep(rng.random() / 200)
            budget.give(n)

    async def main() -> None:
        rng = random.Random(17)
        await asyncio.gather(*(taker(random.Random(rng.random())) for _ in range(40)))
        await asyncio.wait_for(budget.take(3 << 20), 1)  # larger than the limit, alone: it still comes
        budget.give(3 << 20)

    asyncio.run(main())
    assert 0 < peak[0] <= 1 << 20, peak[0]
    assert budget.used == 0
    assert MEMORY_BUDGET <= 16 << 20  # a relay's peak (issue 17): 32 MiB took a third of 100 MiB
