"""fabric.transfer against the real origin app on 127.0.0.1: the payloads a fetch holds
(read, not yet verified and stored) stay under its budget, which for a fetch of its own is
`FetchOptions.memory` and lets several payloads be stored while more are read, and for
fetches sharing an `Inflight` is the shared (site) budget."""

from __future__ import annotations

import asyncio
import time

import pytest

import fabric.transfer as transfer
from fabric.pacing import MEMORY_BUDGET, ByteBudget
from fabric.store.registry import Registry
from fabric.store.store import open_store
from fabric.transfer import FetchOptions, Inflight, fetch_chunks, store_sink
from fabric.wire.auth import TokenTable
from fabric.wire.client import OriginClient

from helpers.files import random_bytes, write_tree
from helpers.sources import serve_origin
from helpers.store import publish_local

SECRET = "budget-test-secret-0123456789abc"
TOKENS = TokenTable.from_dict({"token": [{"name": "site", "secret": SECRET, "scopes": ["pull"]}]})


class WatchedBudget(ByteBudget):
    """A `ByteBudget` that remembers its limit and the most it ever held."""

    made: list["WatchedBudget"] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.peak = 0
        WatchedBudget.made.append(self)

    async def take(self, n: int) -> None:
        await super().take(n)
        self.peak = max(self.peak, self.used)


@pytest.fixture
def lab(tmp_path, rng, monkeypatch):
    WatchedBudget.made = []
    monkeypatch.setattr(transfer, "ByteBudget", WatchedBudget)
    origin = open_store(tmp_path / "origin")
    src = write_tree(tmp_path / "src", {"weights.bin": random_bytes(rng, 4 << 20)})
    publish_local(origin, src, artifact="model", version="v1")
    return origin, Registry(origin).manifest("model", "v1"), tmp_path


def _fetch(lab, options: FetchOptions, inflight: Inflight | None = None):
    origin, manifest, root = lab
    site = open_store(root / f"site-{time.monotonic_ns()}")
    sizes = manifest.unique_chunks()
    inner = store_sink(site)

    def slow_sink(chunk_id: str, data: bytes) -> None:  # a slow disk: payloads pile up behind it
        time.sleep(0.004)
        inner(chunk_id, data)

    async def run():
        runner, url = await serve_origin(origin, TOKENS)
        try:
            async with OriginClient(url, SECRET, connections=options.connections) as client:
                return await fetch_chunks(sizes, site, [client], options, sink=slow_sink, inflight=inflight)
        finally:
            await runner.cleanup()

    stats = asyncio.run(run())
    assert stats.chunks_fetched == len(sizes)
    assert site.missing(list(sizes)) == []
    return max(sizes.values())


def test_a_fetch_of_its_own_holds_several_payloads_but_never_more_than_its_memory(lab):
    options = FetchOptions(connections=4, batch_bytes=256 << 10, memory=2 << 20)
    largest = _fetch(lab, options)
    (budget,) = WatchedBudget.made
    assert budget.limit == options.memory
    assert budget.peak <= options.memory
    assert budget.peak > 2 * largest  # payloads were read while earlier ones were still being stored
    assert budget.used == 0


def test_a_small_memory_holds_one_payload_at_a_time(lab):
    options = FetchOptions(connections=4, batch_bytes=256 << 10, memory=1)
    largest = _fetch(lab, options)
    (budget,) = WatchedBudget.made
    assert budget.peak <= largest  # one taker alone may exceed the limit: never two


def test_fetches_sharing_an_inflight_share_its_site_budget(lab):
    inflight = Inflight()
    _fetch(lab, FetchOptions(connections=4, batch_bytes=256 << 10), inflight)
    (budget,) = WatchedBudget.made  # the Inflight's; the fetch made none of its own
    assert budget is inflight.budget and budget.limit == MEMORY_BUDGET
    assert FetchOptions().memory > MEMORY_BUDGET  # a pull of its own may hold more than a site's fetches
