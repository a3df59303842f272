"""The link measured by what the peer acknowledged (fabric.wire.linkrate), on real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from fabric.core.policy import EncodePolicy
from fabric.wire import linkrate

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO counters are Linux's")
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux


async def _send(total: int, piece: int, *, pace: float | None = None,
                reader_rate: float | None = None) -> tuple[EncodePolicy, list[float], float]:
    """Write `total` bytes in `piece`s over loopback, each write reported to a metered policy.

    `pace`: the sender's TCP pacing (SO_MAX_PACING_RATE, bytes/s), a link of that speed;
    `reader_rate`: the reader takes at most this. Returns the policy, each write's
    seconds, and the rate the reader really got."""
    done = asyncio.Event()
    took: list[float] = []

    async def reader(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got, t0 = 0, asyncio.get_running_loop().time()
        while got < total:
            data = await r.read(256 << 10)
            if not data:
                break
            got += len(data)
            if reader_rate:
                await asyncio.sleep(len(data) / reader_rate)
        took.append(got / (asyncio.get_running_loop().time() - t0))
        w.close()
        done.set()

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)  # acked ~ read, as across a link
    listening.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(reader, sock=listening)
    port = listening.getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    if pace:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, int(pace))
    policy = EncodePolicy(workers=2)
    metered = linkrate.metered(policy, writer.transport)
    write_s = []
    loop = asyncio.get_running_loop()
    for _ in range(total // piece):
        t0 = loop.time()
        writer.write(b"\0" * piece)
        await writer.drain()
        write_s.append(loop.time() - t0)
        metered.wrote(piece, write_s[-1])
    await asyncio.wait_for(done.wait(), 30)
    writer.close()
    server.close()
    await server.wait_closed()
    return policy, write_s, took[0]


@linux
def test_counters_count_what_the_peer_acknowledged():
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    try:
        before = linkrate.read_counters(a)
        assert before is not None
        a.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(b.recv(1 << 20))
        for _ in range(100):  # the ack follows the data
            after = linkrate.read_counters(a)
            if after[0] - before[0] >= 100_000:
                break
        assert after[0] - before[0] == 100_000
    finally:
        a.close()
        b.close()


@linux
def test_a_slow_link_is_measured_at_its_rate_not_at_the_speed_of_writes():
    # the sender paced at 20 MB/s: a link of that speed, the send buffer (MBs) in front of it
    # (on a loaded machine the reader may fall behind: its window's hold-ups do not count)
    policy, _, _ = asyncio.run(_send(12 << 20, 1 << 20, pace=20e6))
    measured = policy.link_seconds_per_byte
    assert measured is not None
    rate = 1 / measured
    assert 10e6 <= rate <= 25e6, f"{rate / 1e6:.1f} MB/s measured on a 20 MB/s link"


@linux
def test_a_slow_receiver_is_not_a_slow_link():
    # the reader takes 20 MB/s, the link (loopback) is far faster: time held back by the
    # receiver's window does not count, so fewer bytes that it must decode are not chosen for it
    policy, _, actual = asyncio.run(_send(8 << 20, 1 << 20, reader_rate=20e6))
    measured = policy.link_seconds_per_byte
    assert measured is None or 1 / measured > 3 * actual


def test_without_counters_the_write_time_stands_in():
    policy = EncodePolicy()
    metered = linkrate.metered(policy, None)
    metered.wrote(1 << 20, 0.1)
    assert policy.link_seconds_per_byte == pytest.approx(0.1 / (1 << 20))
    assert linkrate.metered(None, None) is None
