"""When a site leaves its relay for the origin (`fabric.transfer`), and the follower's reconnect jitter.

A relay still fetching a chunk from its own upstream sends wait frames
(docs/protocol.md, "The chunk stream"): the site keeps waiting on it however long its
stall window is. A relay that sends nothing, or breaks the protocol with its waits, is
left for the origin. Fake relays on 127.0.0.1 sit before the real origin app.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from aiohttp import web

from agents.site.follow import Backoff
from fabric.store.registry import Registry
from fabric.store.store import Store, open_store
from fabric.transfer import FetchOptions, fetch_chunks
from fabric.wire import frames as wire
from fabric.wire.auth import TokenTable
from fabric.wire.client import OriginClient
from fabric.wire.protocol import CHUNK_STREAM, CHUNKS_FETCH, MAGIC, WAIT_HEADER

from helpers.files import random_bytes, write_tree
from helpers.sources import serve_origin
from helpers.store import publish_local

SECRET = "upstream-test-secret-0123456789"
TOKENS = TokenTable.from_dict({"token": [{"name": "site", "secret": SECRET, "scopes": ["pull"]}]})
STALL = 0.3  # the site's stall window in these tests: far shorter than the relay's waits


class WaitingRelay:
    """A relay holding `store`'s chunks that, before its first chunk, waits `delay` s.

    mode "waits": a wait frame for the chunk every 0.1 s meanwhile (a live relay);
    "silent": nothing at all (a dead one); "stray": a wait frame for an id not asked.
    """

    def __init__(self, store: Store, mode: str, delay: float = 1.0):
        self.store, self.mode, self.delay = store, mode, delay
        self.wait_headers: list[str | None] = []
        self.url, self._runner = "", None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(CHUNKS_FETCH, self._fetch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        self.wait_headers.append(request.headers.get(WAIT_HEADER))
        ids = json.loads(await request.read())["ids"]
        resp = web.StreamResponse(headers={"Content-Type": CHUNK_STREAM})
        await resp.prepare(request)
        await resp.write(MAGIC)
        first = len(self.wait_headers) == 1
        loop = asyncio.get_running_loop()
        until = loop.time() + (self.delay if first else 0)
        while loop.time() < until:
            if self.mode == "waits":
                await resp.write(wire.wait_frame(ids[0]))
            elif self.mode == "stray":
                await resp.write(wire.wait_frame("blake3:" + "ab" * 32))
            await asyncio.sleep(0.1)
        for cid in ids:
            data = await asyncio.to_thread(self.store.get_chunk, cid)
            await resp.write(wire.chunk_frame(cid, 0, len(data), data))
        await resp.write(wire.end_frame(len(ids)))
        return resp


async def _fetch_through(tmp_path, rng, mode: str):
    origin = open_store(tmp_path / "origin")
    src = write_tree(tmp_path / "src", {"weights.bin": random_bytes(rng, 1 << 20)})
    publish_local(origin, src, artifact="model", version="v1")
    sizes = Registry(origin).manifest("model", "v1").unique_chunks()
    runner, origin_url = await serve_origin(origin, TOKENS)
    relay = WaitingRelay(origin, mode)
    clients = [OriginClient(await relay.start(), SECRET), OriginClient(origin_url, SECRET)]
    site = open_store(tmp_path / "site")
    try:
        stats = await asyncio.wait_for(fetch_chunks(sizes, site, clients, FetchOptions(
            connections=1, stall_timeout=STALL, give_up_after=30)), 30)
    finally:
        for c in clients:
            await c.close()
        await relay.close()
        await runner.cleanup()
    assert site.missing(list(sizes)) == []
    return stats, relay, origin_url, sum(sizes.values())


def test_a_relay_that_says_it_is_still_fetching_is_never_left_for_the_origin(tmp_path, rng):
    stats, relay, origin_url, total = asyncio.run(_fetch_through(tmp_path, rng, "waits"))
    assert relay.wait_headers and set(relay.wait_headers) == {"1"}  # the site asks for wait frames
    # a second of waits, more than three stall windows: every byte still came from the relay
    assert stats.bytes_by_source == {relay.url: total}
    assert origin_url not in stats.bytes_by_source and stats.bad_chunks_by_source == {}


def test_a_silent_relay_is_left_for_the_origin_after_one_stall_window(tmp_path, rng):
    stats, relay, origin_url, total = asyncio.run(_fetch_through(tmp_path, rng, "silent"))
    assert stats.bytes_by_source.get(origin_url, 0) > 0  # dead as far as the site can tell
    assert sum(stats.bytes_by_source.values()) == total
    assert stats.seconds < 5  # one stall window, not the relay's patience


def test_a_wait_frame_for_a_chunk_not_asked_cuts_the_relay_off(tmp_path, rng):
    stats, relay, origin_url, total = asyncio.run(_fetch_through(tmp_path, rng, "stray"))
    assert stats.bad_chunks_by_source.get(relay.url) == 1
    assert stats.bytes_by_source.get(origin_url, 0) > 0


def test_wait_frames_are_refused_where_they_were_not_asked_for():
    stream = MAGIC + wire.wait_frame("blake3:" + "cd" * 32) + wire.end_frame(0)

    async def read(waits: bool) -> list:
        return [f async for f in wire.FrameReader(wire.bytes_reader(stream), waits=waits)]
    frames = asyncio.run(read(True))
    assert [(f.kind, f.chunk_id) for f in frames] == [(wire.FRAME_WAIT, "blake3:" + "cd" * 32)]  # not counted
    try:
        asyncio.run(read(False))  # e.g. an upload to the origin
    except wire.BadFrame as e:
        assert "unknown frame type 3" in str(e)
    else:
        raise AssertionError("a wait frame was accepted by a reader that did not ask for them")


# --- reconnect jitter ----------------------------------------------------------------------------

def test_backoff_is_full_jitter_so_a_thousand_sites_spread_their_reconnects():
    waits = [Backoff(first=0.5, longest=10).next() for _ in range(1000)]  # 1000 sites, first retry
    assert all(0 <= w <= 0.5 for w in waits)
    assert min(waits) < 0.05 and max(waits) > 0.45  # the whole window, not its upper half
    buckets = [0] * 10
    for w in waits:
        buckets[min(9, int(w / 0.05))] += 1
    assert max(buckets) < 160  # about 100 in each 50 ms: no wall of reconnects
    b = Backoff(first=0.5, longest=10)
    ceilings = [min(10, 0.5 * 2 ** n) for n in range(8)]
    draws = [b.next() for _ in ceilings]
    assert all(0 <= w <= c for w, c in zip(draws, ceilings))
    b.reset()
    assert b.failures == 0 and b.next() <= 0.5



# --- real agents: a hub whose own upstream is slow, and an edge below it ----------------------

def test_an_edge_stays_with_a_hub_that_waits_on_its_slow_upstream(tmp_path):
    """The hub's deploy fetches at 300 kB/s, so each 1 MiB chunk reaches it ~3 s after the
    last; the edge's stall window is 2 s. Only the hub's wait frames keep the edge on it."""
    from safetensors.numpy import save_file

    from fabric.publish import publish
    from fabric.wire.client import RemoteTarget, SyncOrigin
    from helpers.agent import SITE_TOKENS, AgentProcess
    from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, start_origin, tree_digest, write_token_file

    tokens = DEFAULT_TOKENS + SITE_TOKENS
    src = tmp_path / "v1"
    src.mkdir()
    rng = np.random.default_rng(7)
    save_file({f"layer{i}.weight": rng.standard_normal(1 << 18).astype(np.float32) for i in range(3)},
              str(src / "model.safetensors"))
    origin = start_origin(tmp_path / "origin", tokens)
    relay_tokens = write_token_file(tmp_path / "relay-tokens.toml", tokens)
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=["m:prod"], tokens=relay_tokens,
                       sync={"max_rate": "300K"}).start()
    edge = None
    try:
        with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
            published = publish(src, artifact="m", target=RemoteTarget(so), version="v1", channel="prod")
        deadline = time.monotonic() + 30  # the hub's throttled deploy has claimed every chunk …
        while not any(p.is_file() for p in (hub.data / "store" / "chunks").rglob("*")):
            assert time.monotonic() < deadline, "the hub never started fetching"
            time.sleep(0.05)
        edge = AgentProcess(tmp_path, "edge", origin.url, follow=["m:prod"], tokens=relay_tokens,
                            upstreams=[hub.url], sync={"stall_timeout": 2}).start()  # … so the edge waits on it
        edge.wait_active("m", "v1", timeout=60)
        assert tree_digest(edge.data / "current" / "m") == tree_digest(src)
        by_source = {k: v for k, v in edge.metrics().items() if k.startswith("fabric_agent_bytes_by_source_total")}
        from_hub = by_source.get(f'fabric_agent_bytes_by_source_total{{source="{hub.url}"}}', 0)
        assert from_hub >= 0.95 * sum(by_source.values()) and from_hub >= 0.95 * published.bytes, by_source
    finally:
        for a in (edge, hub):
            if a is not None:
                a.stop()
        origin.stop()
