"""Warming an origin's frame cache (fabric.wire.warming): the frames a site holding the base
asks for are kept before it asks, and a fetch then encodes nothing; a commit, a promote and
a stage queue jobs; budgets, the `stored` pin and a lost chunk."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry

from fabric.core.policy import EncodePolicy, Mode
from fabric.store.registry import Registry
from fabric.store.store import chunk_key
from fabric.wire import chunks, negotiate
from fabric.wire.framecache import FrameCache
from fabric.wire.warming import Job, Warmer

from helpers.versions import origin_and_site_stores, receive


@pytest.fixture
def origin_and_site():
    return origin_and_site_stores()


def warmer(store, budget: int = 64 << 20, **kw) -> Warmer:
    return Warmer(Registry(store), FrameCache(budget), CollectorRegistry(), **kw)


async def idle(w: Warmer, done=lambda: True) -> None:
    """Wait (5 s at most) until `w` has no job left and `done()` holds."""
    for _ in range(500):
        await asyncio.sleep(0.01)
        if w.pending._value.get() == 0 and done():
            return
    raise AssertionError("still warming")


@contextlib.asynccontextmanager
async def running(w: Warmer):
    """`w.run()` as a task for the block's length."""
    task = asyncio.create_task(w.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def fetched_by_site(origin, site, target, cache, monkeypatch) -> tuple[list[str], dict]:
    """What a site holding its versions gets for `target`'s chunks it lacks: (ids encoded, frames)."""
    wanted = [cid for cid in target.unique_chunks() if not site.has_chunk(cid)]
    body = negotiate.fetch_body(wanted, negotiate.request_fields(site, target))
    plan, encoded, real = chunks.plan_request(origin, body), [], chunks._serve_one

    def counting(store, chunk_id, *a):
        encoded.append(chunk_id)
        return real(store, chunk_id, *a)
    monkeypatch.setattr(chunks, "_serve_one", counting)

    async def get(cid):
        return origin.get_chunk_stored(cid)

    async def fetch():
        serve = chunks.serving_getter(get, origin, plan, EncodePolicy(fixed=Mode.FULL), cache=cache)
        return {cid: await serve(cid) for cid in wanted}
    return encoded, asyncio.run(fetch())


def test_a_warmed_version_is_fetched_by_the_first_site_without_encoding(origin_and_site, monkeypatch):
    origin, site, (v1, v2, v3) = origin_and_site
    w = warmer(origin)
    put, size = asyncio.run(w.warm(Job("m", "v3", "v2")))
    deltas = [cid for cid in v3.unique_chunks() if cid not in set(v2.chunk_ids())]
    assert put == len(deltas) > 0 and size > 0
    assert w.warmed._value.get() == put and w.cpu._value.get() > 0
    encoded, frames = fetched_by_site(origin, site, v3, w.cache, monkeypatch)
    assert encoded == []  # every delta the site asked for was kept already
    for cid, (tag, raw_size, payload) in frames.items():
        assert receive(site, cid, tag, raw_size, payload) == origin.get_chunk(cid)


def test_without_warming_the_first_site_encodes_each_delta(origin_and_site, monkeypatch):
    origin, site, (v1, v2, v3) = origin_and_site
    encoded, _ = fetched_by_site(origin, site, v3, FrameCache(64 << 20), monkeypatch)
    assert len(encoded) == len([c for c in v3.unique_chunks() if c not in set(v2.chunk_ids())])


def test_a_job_is_queued_once_and_a_version_without_a_parent_warms_nothing(origin_and_site):
    origin, _, (v1, v2, v3) = origin_and_site
    w = warmer(origin)
    w.pending.set(0)  # as `run` leaves it when start-up found nothing
    w.add(Job("m", "v3", "v3"))  # a version against itself
    assert w.pending._value.get() == 0
    w.add(Job("m", "v3", "v2"))
    w.add(Job("m", "v3", "v2"))
    assert w.pending._value.get() == 1
    assert v3.parent is None and asyncio.run(w.warm(Job("m", "v3"))) == (0, 0)  # no parent: no base
    assert asyncio.run(w.warm(Job("m", "v3", "v2")))[0] > 0
    assert asyncio.run(w.warm(Job("m", "v3", "v2"))) == (0, 0)  # kept already: skipped


def test_the_events_that_call_for_warming_and_the_base_each_one_gets(origin_and_site):
    origin, _, _ = origin_and_site
    reg, w = Registry(origin), warmer(origin)
    for event in ({"type": "version", "artifact": "m", "version": "v3"},
                  {"type": "channel", "artifact": "m", "channel": "prod", "version": "v2", "action": "promote"},
                  {"type": "channel", "artifact": "m", "channel": "prod", "version": "v2", "action": "stage",
                   "staged": "v3"},
                  {"type": "channel", "artifact": "m", "channel": "prod", "version": "v1", "action": "rollback"},
                  {"type": "site", "site": "s1"}, {"type": "version", "artifact": 7, "version": "v1"}):
        w.saw(event)
    assert w._jobs == [Job("m", "v3"), Job("m", "v2", channel="prod"), Job("m", "v3", channel="prod")]
    reg.promote("m", "v1", "prod")
    reg.promote("m", "v2", "prod")
    reg.stage("m", "v3", "prod")
    v3 = reg.manifest("m", "v3")
    assert [w._base(job, v3) for job in w._jobs[1:]] == ["v1", "v2"]  # the promote's previous, the stage's current


def test_a_move_through_another_origin_over_the_store_warms_here_too(origin_and_site, tmp_path):
    from fabric.origin.peers import MoveWatch
    from fabric.store.store import open_store
    from fabric.wire.events import EventLog
    from helpers.versions import Seg, b, step, version, weights
    store = open_store(tmp_path / "shared")  # a store two origins share, with their move log
    arrays = [weights(4000) for _ in range(3)]
    for i, name in enumerate(("v1", "v2")):
        arrays = [step(a) for a in arrays]
        version("m", name, f"2026-01-0{i + 1}T00:00:00Z",
                {"m.st": [Seg(b(a), f"t{k}", "BF16") for k, a in enumerate(arrays)]}, stores=(store,))
    here, there = EventLog(), EventLog()
    w = Warmer(Registry(store), FrameCache(64 << 20), CollectorRegistry())

    async def main() -> int:
        mine, theirs = MoveWatch(store, here, CollectorRegistry()), MoveWatch(store, there, CollectorRegistry())
        follower = asyncio.create_task(w.follow(here))
        try:
            for v in ("v1", "v2"):  # promoted through the other origin
                await asyncio.to_thread(Registry(store).promote, "m", v, "prod")
                await theirs.record({"type": "channel", "artifact": "m", "channel": "prod", "version": v,
                                     "action": "promote"})
            assert await mine.poll_once() == 1  # the channel read once, at v2
            for _ in range(100):
                await asyncio.sleep(0.01)
                if w._jobs:
                    break
        finally:
            follower.cancel()
        assert w._jobs == [Job("m", "v2", channel="prod")]
        return (await w.warm(w._jobs[0]))[0]

    v1, v2 = (Registry(store).manifest("m", v) for v in ("v1", "v2"))
    assert asyncio.run(main()) == len(set(v2.unique_chunks()) - set(v1.chunk_ids())) > 0


def test_a_job_stops_at_half_the_budget(origin_and_site):
    origin, _, _ = origin_and_site
    full = asyncio.run(warmer(origin).warm(Job("m", "v3", "v2")))
    one_frame = full[1] // full[0]
    put, size = asyncio.run(warmer(origin, budget=2 * one_frame).warm(Job("m", "v3", "v2")))
    assert 1 <= put < full[0] and size >= one_frame


def test_warming_is_off_without_a_budget_or_under_the_stored_pin(origin_and_site):
    origin, _, _ = origin_and_site
    for w in (warmer(origin, budget=0), warmer(origin, enabled=False)):
        w.add(Job("m", "v3", "v2"))
        assert not w.enabled and w.pending._value.get() == 0
        asyncio.run(asyncio.wait_for(w.run(), 5))  # returns at once: nothing to run


def test_run_warms_each_channels_version_at_start_and_queued_jobs_then_idles(origin_and_site, monkeypatch):
    origin, site, (v1, v2, v3) = origin_and_site
    for v in ("v2", "v3"):
        Registry(origin).promote("m", v, "prod")  # the site follows prod: it holds v2, fetches v3
    w = warmer(origin)

    async def run_until_done():
        async with running(w):
            await idle(w, lambda: w.warmed._value.get() > 0)
            w.add(Job("m", "v2", "v1"))  # a promote's job after start-up
            await idle(w)
    asyncio.run(run_until_done())
    encoded, _ = fetched_by_site(origin, site, v3, w.cache, monkeypatch)
    assert encoded == []  # start-up warmed prod's v3 against v2, what the site holds
    assert w.pending._value.get() == 0 and len(w.cache) > len(set(v3.chunk_ids()) - set(v2.chunk_ids()))


def test_a_lost_chunk_ends_the_job_with_a_log_line_and_the_next_job_runs(origin_and_site):
    origin, _, (v1, v2, v3) = origin_and_site
    lost = next(c for c in v3.unique_chunks() if c not in set(v2.chunk_ids()))
    origin.backend.delete(chunk_key(lost))
    w = warmer(origin)

    async def two_jobs():
        w.add(Job("m", "v3", "v2"))
        w.add(Job("m", "v2", "v1"))
        async with running(w):
            await idle(w)
    asyncio.run(two_jobs())
    assert w.pending._value.get() == 0
    assert w.warmed._value.get() > 0  # the second job (and chunks before the lost one) still warmed


def test_a_job_that_raises_anything_ends_only_itself(origin_and_site, monkeypatch):
    origin, _, _ = origin_and_site
    w = warmer(origin)
    real = w._plan

    def plan(job):
        if job.version == "v3":
            raise ValueError("a bug in planning")
        return real(job)
    monkeypatch.setattr(w, "_plan", plan)

    async def two_jobs():
        w.add(Job("m", "v3", "v2"))
        w.add(Job("m", "v2", "v1"))
        async with running(w):
            await idle(w, lambda: w.warmed._value.get() > 0)
    asyncio.run(two_jobs())
    assert w.pending._value.get() == 0 and w.warmed._value.get() > 0  # v2's job ran after v3's failed


def test_start_up_warms_channels_only_the_most_recently_moved_first(origin_and_site):
    origin, _, _ = origin_and_site
    reg = Registry(origin)
    assert warmer(origin)._startup_jobs() == []  # no channel: nothing to guess (a commit warms its own)
    reg.promote("m", "v1", "old")
    reg.promote("m", "v2", "old")
    reg.promote("m", "v2", "prod")
    reg.promote("m", "v3", "prod")
    reg.stage("m", "v3", "old")
    jobs = warmer(origin)._startup_jobs()
    assert jobs == [Job("m", "v3", "v2"), Job("m", "v2", "v1")]  # the stage and prod's move (same job), then old's


def test_a_promote_and_a_stage_through_the_origin_queue_warming_of_what_sites_fetch_next(origin_and_site):
    import aiohttp
    from fabric.origin.app import WARMER
    from fabric.wire.auth import TokenTable
    from helpers.sources import serve_origin
    origin, _, (v1, v2, v3) = origin_and_site
    secret = "warming-admin-secret-0123456789"
    tokens = TokenTable.from_dict({"token": [{"name": "admin", "secret": secret, "scopes": ["admin"]}]})
    Registry(origin).promote("m", "v1", "prod")  # one version on the channel: nothing to warm at start-up

    async def main() -> list[float]:
        runner, url = await serve_origin(origin, tokens)
        seen = []
        try:
            w = runner.app[WARMER]
            await idle(w)
            seen.append(w.warmed._value.get())
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as s:
                for body in ({"action": "promote", "version": "v2"}, {"action": "stage", "version": "v3"}):
                    async with s.post(f"{url}/v1/artifacts/m/channels/prod", json=body) as r:
                        assert r.status == 200, await r.text()
                    await idle(w)
                    seen.append(w.warmed._value.get())
        finally:
            await runner.cleanup()
        return seen

    def changed(new, old) -> int:
        return len(set(new.unique_chunks()) - set(old.chunk_ids()))

    start, promoted, staged = asyncio.run(main())
    assert start == 0
    assert promoted == changed(v2, v1)  # v2's deltas against v1, which prod's sites held
    assert staged - promoted == changed(v3, v2)  # the staged v3 against v2, prod's version now
