"""gc racing a commit: a chunk a committed version names is never deleted, on every backend.

The race of issue 13: a publish reuses a chunk uploaded long ago and never committed
(`has` says present), a gc running meanwhile collects it by its age, and the version
commits without it. Each test pins one interleaving with events, never with sleeps:
gc paused between its mark and its sweep (`fabric.gc._sweep`), or a commit paused
after it wrote its intent (`fabric.store.fence.wait_for_sweeps`). Every test runs on
a local folder and on a real SeaweedFS (`make_store`, tests/store/conftest.py).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from fabric import gc as gc_mod
from fabric.core import digest
from fabric.core.manifest import FileEntry, Manifest
from fabric.errors import GcLeaseLost, GcRunning, MissingChunks
from fabric.fsck import fsck
from fabric.gc import gc
from fabric.store import Registry, chunk_key, fence
from fabric.store.registry import now_rfc3339

KEEP = 100  # versions gc keeps: these tests are about chunks, not versions


def _orphan(store, kind, data: bytes) -> str:
    """A chunk stored "long ago" by a publish that never committed."""
    cid = digest.digest(data)
    store.put_chunk(cid, data)
    if kind == "s3":
        time.sleep(1.1)  # S3's LastModified has whole seconds: make it older than gc's lease
    else:
        old = time.time() - 10  # older than gc's lease, whatever the file system's clock tick
        os.utime(store.backend.path(chunk_key(cid)), (old, old))
    return cid


def _manifest(version: str, cid: str, size: int) -> Manifest:
    return Manifest("m", version, now_rfc3339(), (FileEntry("w.bin", size, 0o644, ((cid, size),)),))


class _Run(threading.Thread):
    """Run `fn` in a thread and keep its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.error = e


def _pause(monkeypatch, owner, name):
    """Make `owner.name` stop at its start until `go` is set; `reached` says it got there."""
    reached, go = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def paused(*args, **kw):
        reached.set()
        assert go.wait(30), "the test never let it go on"
        return original(*args, **kw)
    monkeypatch.setattr(owner, name, paused)
    return reached, go


def test_a_commit_between_gc_s_mark_and_sweep_never_commits_a_version_without_its_chunks(
        make_store, kind, monkeypatch):
    store = make_store()
    data = b"uploaded long ago, never committed " * 100
    cid = _orphan(store, kind, data)
    reached, go = _pause(monkeypatch, gc_mod, "_sweep")
    sweeping = _Run(lambda: gc(store, keep=KEEP, grace=0))
    assert reached.wait(30)  # gc has marked: nothing references the chunk yet
    assert not store.missing([cid])  # the publisher's `has`: present
    committing = _Run(lambda: Registry(store).commit(_manifest("v1", cid, len(data))))
    committing.join(0.5)
    assert committing.is_alive(), "a commit must not finish while a gc is between its mark and its sweep"
    go.set()
    sweeping.join(30)
    committing.join(30)
    assert sweeping.error is None and sweeping.result.chunks_deleted == 1
    # the sweep took the chunk; the commit checked after the sweep and refused
    assert isinstance(committing.error, MissingChunks), committing.error
    assert Registry(store).artifacts() == [] and fsck(store).ok
    assert not list(store.backend.list(fence.INTENTS))
    store.put_chunk(cid, data)  # the publisher uploads what it was told is missing, and commits again
    Registry(store).commit(_manifest("v1", cid, len(data)))
    assert Registry(store).versions("m") == ["v1"] and store.get_chunk(cid) == data
    assert fsck(store).ok


def test_gc_keeps_the_chunks_of_a_commit_that_wrote_its_intent(make_store, kind, monkeypatch):
    store = make_store()
    data = b"reused by a publish in progress " * 100
    cid = _orphan(store, kind, data)
    reached, go = _pause(monkeypatch, fence, "wait_for_sweeps")
    committing = _Run(lambda: Registry(store).commit(_manifest("v1", cid, len(data))))
    assert reached.wait(30)  # manifest and intent written, chunks not yet checked
    report = gc(store, keep=KEEP, grace=0)  # a whole sweep, start to end
    assert report.chunks_deleted == 0 and report.manifests_deleted == 0 and store.has_chunk(cid)
    go.set()
    committing.join(30)
    assert committing.error is None
    assert Registry(store).versions("m") == ["v1"] and fsck(store).ok
    assert not list(store.backend.list(fence.INTENTS))
    assert gc(store, keep=KEEP, grace=0).chunks_deleted == 0  # and now the ref keeps it


def test_a_dead_gc_s_lease_is_broken_so_commits_go_on(make_store, kind, monkeypatch):
    store = make_store()
    data = b"committed while a dead gc's lease lies there " * 10
    store.put_chunk(digest.digest(data), data)
    dead = b'{"beat": 7, "id": "0123", "owner": "gone:1", "state": "held"}'
    store.backend.put_if(fence.SWEEP_KEY, dead, None)
    monkeypatch.setattr(fence, "LEASE", 0.5)
    t0 = time.monotonic()
    Registry(store).commit(_manifest("v1", digest.digest(data), len(data)))
    assert 0.5 <= time.monotonic() - t0 < 20  # it waited one lease for a renewal, then broke it
    assert b'"broken"' in store.backend.get(fence.SWEEP_KEY)
    assert gc(store, keep=KEEP, grace=0, lease=0.5).chunks_deleted == 0  # the next gc takes it over
    assert b'"released"' in store.backend.get(fence.SWEEP_KEY) and fsck(store).ok


def test_gc_stops_deleting_once_its_lease_is_broken(make_store, kind, monkeypatch):
    store = make_store()
    data = b"an orphan a lease-less gc must not delete " * 10
    cid = _orphan(store, kind, data)
    reached, go = _pause(monkeypatch, gc_mod, "_sweep")
    sweeping = _Run(lambda: gc(store, keep=KEEP, grace=0, lease=0.4))
    assert reached.wait(30)
    held = store.backend.get(fence.SWEEP_KEY)
    store.backend.put_if(fence.SWEEP_KEY, b'{"state": "broken"}', held)  # a committer judged it dead
    time.sleep(0.4)  # a renewal is due every lease/4: it fails, the lease is lost
    go.set()
    sweeping.join(30)
    assert isinstance(sweeping.error, GcLeaseLost), sweeping.error
    assert store.has_chunk(cid)


def test_one_gc_at_a_time(make_store, kind, monkeypatch):
    store = make_store()
    reached, go = _pause(monkeypatch, gc_mod, "_sweep")
    first = _Run(lambda: gc(store, keep=KEEP, grace=0, lease=0.4))
    assert reached.wait(30)
    with pytest.raises(GcRunning, match="another gc"):
        gc(store, keep=KEEP, grace=0, lease=0.4)  # it sees the first one renew its lease
    go.set()
    first.join(30)
    assert first.error is None
    gc(store, keep=KEEP, grace=0, lease=0.4)  # released: the next one runs


def test_an_intent_older_than_its_ttl_protects_nothing(store_dir):
    from fabric.store import open_store
    store = open_store(store_dir)
    data = b"the intent of a commit that crashed a day ago " * 10
    cid = digest.digest(data)
    store.put_chunk(cid, data)
    m = _manifest("v1", cid, len(data))
    store.put_manifest(m.id, m.canonical())
    intent = fence.write_intent(store, m.id)
    assert gc(store, keep=KEEP, grace=0).chunks_deleted == 0  # a live intent is a root
    old = time.time() - fence.INTENT_TTL - 60
    os.utime(store.backend.path(intent.key), (old, old))
    r = gc(store, keep=KEEP, grace=0)
    assert (r.intents_expired, r.chunks_deleted, r.manifests_deleted) == (1, 1, 1)
    assert not list(store.backend.list(fence.INTENTS))
