"""fabric.transfer.sync against real servers on 127.0.0.1: the real origin app, and
misbehaving chunk sources (tests/helpers/sources.py) placed before it in the source list.

Every scenario ends the same way: the site store holds every chunk, `fsck` finds nothing
wrong (so nothing corrupt was stored), and the materialised files equal the source.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.wire.auth import TokenTable
from fabric.wire.client import OriginClient
from fabric.errors import TransferError
from fabric.fsck import fsck
from fabric.pull import materialize
from fabric.store.registry import Registry
from fabric.store.store import Store, open_store
from fabric.transfer import FetchOptions, RateLimit, sync

from helpers.files import assert_same_tree, random_bytes, write_tree
from helpers.store import publish_local
from helpers.ports import free_port
from helpers.sources import MisbehavingSource, serve_origin

SECRET = "transfer-test-secret-0123456789"
TOKENS = TokenTable.from_dict({"token": [{"name": "site", "secret": SECRET, "scopes": ["pull"]}]})
SMALL_BATCH = 256 << 10  # ~4 CDC chunks per request, so a transfer makes many requests


@dataclass
class Lab:
    origin: Store
    site: Store
    manifest: object
    src: Path
    root: Path

    def check(self) -> None:
        """The site store is complete and clean, and materialises to the source's bytes."""
        assert self.site.missing(self.manifest.chunk_ids()) == []
        report = fsck(self.site)
        assert report.ok and not report.bad_chunks, report
        dest = self.root / f"dest-{time.monotonic_ns()}"
        materialize(self.site, self.manifest, dest)
        assert_same_tree(self.src, dest)


@pytest.fixture
def lab(tmp_path, rng) -> Lab:
    origin = open_store(tmp_path / "origin")
    src = write_tree(tmp_path / "src", {"weights.bin": random_bytes(rng, 3 << 20),
                                        "config.json": b'{"layers": 4}'})
    publish_local(origin, src, artifact="model", version="v1")
    m = Registry(origin).manifest("model", "v1")
    assert len(m.unique_chunks()) >= 20  # enough chunks that batches and workers matter
    return Lab(origin, open_store(tmp_path / "site"), m, src, tmp_path)


async def _run(lab: Lab, kinds: list[str], *, good: int = 0, timeout: float = 60, **opts):
    """sync() with sources of the given kinds, in order; returns (stats, {kind: fake}, urls)."""
    runner, origin_url = await serve_origin(lab.origin, TOKENS)
    fakes: dict[str, MisbehavingSource] = {}
    clients, urls = [], {}
    try:
        for kind in kinds:
            if kind == "origin":
                url = origin_url
            elif kind == "down":
                url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
            else:
                fakes[kind] = MisbehavingSource(lab.origin, kind, good=good)
                url = await fakes[kind].start()
            urls[kind] = url
            clients.append(OriginClient(url, SECRET))
        stats = await asyncio.wait_for(sync(lab.manifest, lab.site, clients, FetchOptions(**opts)), timeout)
        return stats, fakes, urls
    finally:
        for c in clients:
            await c.close()
        for f in fakes.values():
            await f.close()
        await runner.cleanup()


def run(lab: Lab, kinds: list[str], **kw):
    return asyncio.run(_run(lab, kinds, **kw))


# --- the plain path ---------------------------------------------------------------------------

def test_sync_fetches_every_chunk_then_reuses_them(lab):
    total = len(lab.manifest.unique_chunks())
    stats, _, urls = run(lab, ["origin"], batch_bytes=SMALL_BATCH)
    assert (stats.chunks_total, stats.chunks_fetched, stats.chunks_reused) == (total, total, 0)
    assert stats.bytes_raw == sum(lab.manifest.unique_chunks().values())
    assert stats.bytes_by_source == {urls["origin"]: stats.bytes_received} and stats.bytes_received > 0
    assert stats.bad_chunks_by_source == {} and stats.sources_dropped == []
    lab.check()

    again, _, _ = run(lab, ["origin"])
    assert (again.chunks_fetched, again.chunks_reused, again.bytes_received) == (0, total, 0)


def test_sync_resumes_from_the_chunks_a_store_already_holds(lab):
    sizes = lab.manifest.unique_chunks()
    held = list(sizes)[::2]
    for cid in held:
        lab.site.put_chunk(cid, lab.origin.get_chunk(cid))
    stats, _, _ = run(lab, ["origin"], batch_bytes=SMALL_BATCH)
    assert stats.chunks_reused == len(held)
    assert stats.chunks_fetched == len(sizes) - len(held)
    assert stats.bytes_raw == sum(n for c, n in sizes.items() if c not in held)
    lab.check()


def test_max_rate_limits_the_transfer(lab):
    size = sum(lab.manifest.unique_chunks().values())
    rate = size / 2  # the bucket starts full (one second's worth), so ≥ ~1 s for the rest
    stats, _, _ = run(lab, ["origin"], batch_bytes=SMALL_BATCH, max_rate=rate)
    assert stats.seconds >= 0.8, stats.seconds
    lab.check()


def test_rate_limit_bucket():
    async def go():
        limit = RateLimit(1_000_000)
        t0 = time.monotonic()
        await limit.take(1_000_000)  # the first second's worth is free
        free = time.monotonic() - t0
        await limit.take(300_000)  # then it sleeps ~0.3 s
        return free, time.monotonic() - t0
    free, total = asyncio.run(go())
    assert free < 0.1 and 0.25 <= total < 1.0


# --- faulty sources placed before the origin -------------------------------------------------------

def test_lying_source_first_is_caught_dropped_and_nothing_corrupt_is_stored(lab):
    stats, fakes, urls = run(lab, ["lie", "origin"], batch_bytes=SMALL_BATCH, max_bad=3)
    liar = urls["lie"]
    assert fakes["lie"].frames_sent > 0  # it did send lies
    assert stats.bad_chunks_by_source.get(liar, 0) >= 3
    assert liar in stats.sources_dropped
    assert liar not in stats.bytes_by_source  # not one of its chunks was accepted
    assert stats.bytes_by_source[urls["origin"]] == stats.bytes_received
    assert stats.chunks_fetched == len(lab.manifest.unique_chunks())
    lab.check()


def test_lying_source_is_not_asked_again_after_being_dropped(lab):
    stats, fakes, urls = run(lab, ["lie", "origin"], batch_bytes=SMALL_BATCH, max_bad=1, connections=1)
    assert stats.sources_dropped == [urls["lie"]]
    assert fakes["lie"].requests == 1  # one request, then dropped for the rest of the transfer
    lab.check()


def test_source_answering_missing_is_skipped_per_chunk(lab):
    stats, fakes, urls = run(lab, ["missing", "origin"], batch_bytes=SMALL_BATCH)
    asked = set(fakes["missing"].ids_asked)
    assert asked  # it was asked first ...
    assert set(stats.bytes_by_source) == {urls["origin"]}  # ... and everything came from the origin
    assert stats.bad_chunks_by_source == {} and stats.sources_dropped == []
    assert len(fakes["missing"].ids_asked) == len(asked)  # no chunk asked of it twice
    lab.check()


def test_source_stalling_mid_body_is_abandoned_for_the_next(lab):
    t0 = time.monotonic()
    stats, fakes, urls = run(lab, ["stall", "origin"], good=1, batch_bytes=SMALL_BATCH,
                             stall_timeout=0.5, give_up_after=30)
    elapsed = time.monotonic() - t0
    assert fakes["stall"].requests >= 1
    assert stats.bytes_by_source[urls["origin"]] > 0
    # the staller's one good frame per request may be kept; the half frame never is
    assert stats.bytes_by_source.get(urls["stall"], 0) <= fakes["stall"].frames_sent * (300 << 10)
    assert elapsed < 20, elapsed  # far less than the default 30 s stall timeout: it was applied
    lab.check()


def test_source_that_is_down_is_skipped(lab):
    stats, _, urls = run(lab, ["down", "origin"], batch_bytes=SMALL_BATCH)
    assert set(stats.bytes_by_source) == {urls["origin"]}
    assert stats.chunks_fetched == len(lab.manifest.unique_chunks())
    lab.check()


def test_source_answering_an_empty_stream_does_not_loop_forever(lab):
    """A well-formed answer that simply omits the chunks asked for (end frame counts 0)."""
    stats, fakes, urls = run(lab, ["omit", "origin"], batch_bytes=SMALL_BATCH, timeout=30)
    assert fakes["omit"].requests >= 1
    assert set(stats.bytes_by_source) == {urls["origin"]}
    assert fakes["omit"].requests < 50  # asked a bounded number of times, not in a hot loop
    lab.check()


def test_source_sending_a_chunk_not_asked_for_is_benched(lab):
    stats, fakes, urls = run(lab, ["foreign", "origin"], batch_bytes=SMALL_BATCH)
    assert fakes["foreign"].requests >= 1
    assert set(stats.bytes_by_source) == {urls["origin"]}
    lab.check()


def test_every_source_and_several_faults_at_once(lab):
    stats, _, urls = run(lab, ["down", "lie", "missing", "stall", "origin"], batch_bytes=SMALL_BATCH,
                         stall_timeout=0.5, max_bad=2)
    assert urls["lie"] in stats.sources_dropped
    assert set(stats.bytes_by_source) <= {urls["origin"], urls["stall"]}
    lab.check()


# --- giving up -----------------------------------------------------------------------------------

def test_no_source_has_the_chunks_fails_fast(lab):
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="could not be fetched"):
        run(lab, ["missing"], give_up_after=60)
    assert time.monotonic() - t0 < 10  # hopeless is known at once, not after give_up_after
    assert lab.site.missing(lab.manifest.chunk_ids())  # nothing pretends to be complete
    assert fsck(lab.site).bad_chunks == []


def test_every_source_down_gives_up_after_the_deadline(lab):
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        run(lab, ["down", "down"], give_up_after=1.0)
    assert 0.9 <= time.monotonic() - t0 < 15


def test_only_liars_fail_with_nothing_stored(lab):
    with pytest.raises(TransferError):
        run(lab, ["lie"], max_bad=2, give_up_after=5)
    report = fsck(lab.site)
    assert report.chunks == 0 and report.bad_chunks == []


def test_sync_needs_a_source(lab):
    with pytest.raises(TransferError):
        asyncio.run(sync(lab.manifest, lab.site, []))
