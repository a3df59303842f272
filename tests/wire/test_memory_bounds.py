"""Memory bounds of a fetching site (issue 17): what a connection reads ahead, and what its
fetches hold together.

A client connection's read-ahead (aiohttp's StreamReader, `fabric.wire.client.READ_BUFFER`)
against a real server on loopback that sends faster than the client reads; the shared
payload budget (`fabric.pacing.ByteBudget`) under many concurrent takers.
"""

from __future__ import annotations

import asyncio
import random

from aiohttp import web

from fabric.pacing import ByteBudget, MEMORY_BUDGET
from fabric.wire.client import READ_BUFFER, OriginClient
from tests.helpers.ports import free_port

BODY = 32 << 20


async def _serve_fast() -> tuple[web.AppRunner, str]:
    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        block = b"\xa5" * (1 << 20)
        try:
            for _ in range(BODY >> 20):
                await resp.write(block)
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    app = web.Application()
    app.router.add_get("/big", big)
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
