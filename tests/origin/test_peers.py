"""fabric.origin.peers on a real store shared by two watchers: another origin's moves become
events here (a channel's version re-read from its ref), this origin's own are not echoed, and
a reader that fell behind pruned entries starts a new epoch (its followers re-sync)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from fabric.core import digest
from fabric.core.manifest import FileEntry, Manifest
from fabric.origin.peers import MoveWatch, SharingOptions
from fabric.store.movelog import entry_key
from fabric.store.registry import Registry, now_rfc3339
from fabric.store.store import open_store
from fabric.wire.events import EventLog


def _commit(reg: Registry, version: str) -> str:
    data = version.encode() * 100
    cid = digest.digest(data)
    reg.store.put_chunk(cid, data)
    m = Manifest(artifact="m", version=version, created=now_rfc3339(),
                 files=(FileEntry("w.bin", len(data), 0o644, ((cid, len(data)),)),))
    return reg.commit(m)


def test_the_move_log_is_on_by_default_only_off_a_local_folder(tmp_path):
    store = open_store(tmp_path / "s")
    assert not SharingOptions().uses_log(store)
    assert SharingOptions(move_log=True).uses_log(store)


def test_another_origins_moves_become_events_here_and_own_ones_are_not_echoed(tmp_path):
    store = open_store(tmp_path / "s")
    reg = Registry(store)

    async def run():
        a, b = EventLog(), EventLog()
        wa, wb = MoveWatch(store, a, CollectorRegistry()), MoveWatch(store, b, CollectorRegistry())
        mid = await asyncio.to_thread(_commit, reg, "v1")
        await asyncio.to_thread(_commit, reg, "v2")
        await wa.record({"type": "version", "artifact": "m", "version": "v1", "manifest_id": mid})
        for v in ("v1", "v2"):  # two moves through A; the channel is at v2 when B reads it
            await asyncio.to_thread(reg.promote, "m", v, "prod")
            await wa.record({"type": "channel", "artifact": "m", "channel": "prod", "version": v,
                             "action": "promote"})
        assert await wb.poll_once() == 2
        events, _ = b.since(0)
        assert [(e["type"], e.get("version")) for e in events] == [("version", "v1"), ("channel", "v2")]
        assert events[0]["manifest_id"] == mid and events[1]["action"] == "promote"
        assert await wa.poll_once() == 0 and a.since(0)[0] == []  # A's own entries: not emitted again
        assert await wb.poll_once() == 0  # nothing new
        epoch = b.epoch
        await asyncio.to_thread(reg.rollback, "m", "prod")
        seq = await asyncio.to_thread(wa.log.append, {"type": "channel", "artifact": "m", "channel": "prod",
                                                      "version": "v1", "action": "rollback"})
        await asyncio.to_thread(wa.log.append, {"type": "channel", "artifact": "m", "channel": "nope",
                                                "version": "v9", "action": "promote"})
        store.backend.delete(entry_key(seq))  # B falls behind an entry that is gone
        assert await wb.poll_once() == 0  # the channel `nope` does not exist: no event
        assert b.epoch != epoch  # so B's followers re-sync (and learn of the rollback there)
    asyncio.run(run())


def test_the_watch_outlives_a_poll_that_raises_anything(tmp_path):
    store = open_store(tmp_path / "s")

    async def run():
        watch = MoveWatch(store, EventLog(), CollectorRegistry(), poll=0.01)
        polls = []

        async def poll_once():
            polls.append(1)
            if len(polls) == 1:
                raise ValueError("an entry this code cannot take")
            return 0
        watch.poll_once = poll_once
        task = asyncio.create_task(watch.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(polls) >= 3:
                break
        alive = not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert alive and len(polls) >= 3
        assert watch.metrics.errors.labels("poll")._value.get() == 1
    asyncio.run(run())
