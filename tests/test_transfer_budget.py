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


def test_a_delta_is_charged_the_chunk_it_decodes_to_and_its_reference(tmp_path, monkeypatch):
    """A codec frame's payload is small, but decoding it holds the chunk and its reference
    (`fabric.wire.frames.memory`): the budget counts those, so a site decodes few at once."""
    from fabric.core.codec import Encoding
    from fabric.wire import frames as wire_frames, negotiate
    from helpers.versions import Seg, b, step, version, weights

    WatchedBudget.made = []
    monkeypatch.setattr(transfer, "ByteBudget", WatchedBudget)
    monkeypatch.setenv("FABRIC_ENCODE", "full")  # deltas, as on a WAN link
    charged = []
    real_memory = wire_frames.memory

    def memory(encoding, raw_size, length):
        charged.append((encoding, raw_size, length))
        return real_memory(encoding, raw_size, length)
    monkeypatch.setattr(wire_frames, "memory", memory)
    origin, site = open_store(tmp_path / "origin"), open_store(tmp_path / "site")
    old = [weights(1 << 18) for _ in range(4)]
    version("m", "v1", "2026-01-01T00:00:00Z", {"m.st": [Seg(b(w), f"t{i}", "BF16") for i, w in enumerate(old)]},
            stores=(origin, site))
    v2 = version("m", "v2", "2026-01-02T00:00:00Z",
                 {"m.st": [Seg(b(step(w)), f"t{i}", "BF16") for i, w in enumerate(old)]}, stores=(origin,))
    sizes = {c: n for c, n in v2.unique_chunks().items() if not site.has_chunk(c)}

    async def run():
        runner, url = await serve_origin(origin, TOKENS)
        try:
            async with OriginClient(url, SECRET) as client:
                return await fetch_chunks(sizes, site, [client], FetchOptions(memory=1),
                                          delta_fields=negotiate.request_fields(site, v2))
        finally:
            await runner.cleanup()

    stats = asyncio.run(run())
    assert stats.chunks_fetched == len(sizes) == 4 and site.missing(list(sizes)) == []
    deltas = [(raw, length) for enc, raw, length in charged if enc > Encoding.ZSTD]
    assert len(deltas) == 4 and all(length < raw for raw, length in deltas)  # small payloads...
    (budget,) = WatchedBudget.made
    assert budget.peak >= max(length + 2 * raw for raw, length in deltas)  # ...charged what they decode to
    assert budget.used == 0  # and all of it given back


def test_stored_forms_are_charged_their_payload_only():
    from fabric.wire.frames import memory
    assert memory(0, 1000, 1000) == memory(1, 5000, 1000) == 1000
    assert memory(7, 5000, 1000) == 11000
