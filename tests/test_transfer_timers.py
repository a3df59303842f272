"""fabric.transfer against the real origin app on 127.0.0.1: a chunk fetch's body is watched
by the progress floor alone (aiohttp's per-read timer, re-armed on every socket read, is
off for it), and the next request on the same connection has its read timeout again."""

from __future__ import annotations

import asyncio

import fabric.transfer as transfer
from fabric.store.registry import Registry
from fabric.store.store import open_store
from fabric.transfer import FetchOptions, fetch_chunks
from fabric.wire.auth import TokenTable
from fabric.wire.client import READ_TIMEOUT, OriginClient

from helpers.files import random_bytes, write_tree
from helpers.sources import serve_origin
from helpers.store import publish_local

SECRET = "timer-test-secret-0123456789abcd"
TOKENS = TokenTable.from_dict({"token": [{"name": "site", "secret": SECRET, "scopes": ["pull"]}]})


def test_a_fetch_body_has_no_per_read_timer_and_the_next_request_has_its_own(tmp_path, rng, monkeypatch):
    origin = open_store(tmp_path / "origin")
    src = write_tree(tmp_path / "src", {"weights.bin": random_bytes(rng, 1 << 20)})
    publish_local(origin, src, artifact="model", version="v1")
    manifest = Registry(origin).manifest("model", "v1")
    site = open_store(tmp_path / "site")
    seen: list[tuple[object, float | None]] = []
    real = transfer._floor_only

    def watched(resp):
        real(resp)
        seen.append((resp.connection.protocol, resp.connection.protocol.read_timeout))

    monkeypatch.setattr(transfer, "_floor_only", watched)

    async def run():
        runner, url = await serve_origin(origin, TOKENS)
        try:
            async with OriginClient(url, SECRET, connections=1) as client:
                stats = await fetch_chunks(manifest.unique_chunks(), site, [client], FetchOptions(connections=1))
                fetched_on = seen[-1][0]
                async with client.session.get(f"{url}/livez") as resp:  # on the one pooled connection again
                    await resp.read()
                return stats, (fetched_on, fetched_on.read_timeout)
        finally:
            await runner.cleanup()

    stats, (_, timeout) = asyncio.run(run())
    assert stats.chunks_fetched == len(manifest.unique_chunks())
    assert site.missing(manifest.chunk_ids()) == []
    assert seen and all(t is None for _, t in seen)  # off while the floor watched each answer
    assert timeout == READ_TIMEOUT  # the connection's next request set its own again
