"""fabric.store: one store suite, run against every backend (a local folder and a real SeaweedFS bucket).

Every test that takes `store` runs once per backend: `local` (a folder in tmp_path) and
`s3` (a fresh prefix in the bucket of the session's one `weed mini`, `suite_weed`;
skipped only where the `weed` binary is absent). Where backends differ (temp files,
hard-linked packs, files for sendfile) the test asks the declared
`store.capabilities`, as the store itself does. Opening a local folder and a full disk
are local by nature; the S3-only cases (opening a prefix, conditional writes,
multipart, throttling, the ETag cache) are in test_store_s3.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid

import pytest

from fabric.core import digest
from fabric.core.manifest import FileEntry, Manifest
from fabric.errors import (ChunkNotFound, Conflict, CorruptChunk, InvalidChunkId, InvalidInput,
                           NotFound, StoreFull, VersionExists)
from fabric.fsck import fsck
from fabric.gc import gc
from fabric.store import Capabilities, LocalBackend, Registry, Store, chunk_key, manifest_key, open_store
from fabric.store.registry import now_rfc3339
from fabric.store.store import TAG_RAW, TAG_ZSTD

from helpers.files import random_bytes
from helpers.store import chunk_files, count_up_concurrently


def _put(store, data: bytes) -> str:
    cid = digest.digest(data)
    store.put_chunk(cid, data)
    return cid


# --- one fixture per backend ------------------------------------------------------------------

# `kind` and `make_store` (one store per backend) are in tests/store/conftest.py

@pytest.fixture
def store(make_store) -> Store:
    return make_store()


@pytest.fixture
def backend(store):
    return store.backend


# --- opening (a local folder) ----------------------------------------------------------------

def test_open_creates_a_marked_store(store_dir):
    open_store(store_dir)
    assert json.loads((store_dir / "fabric-store.json").read_text()) == {"format": "fabric.store/1"}
    open_store(store_dir, create=False)  # opens again


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(NotFound, match="no Fabric store"):
        open_store(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.txt").write_text("precious")
    with pytest.raises(InvalidInput, match="not a Fabric store"):
        open_store(tmp_path / "busy")
    assert sorted(os.listdir(tmp_path / "busy")) == ["thesis.txt"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "fabric-store.json").write_text('{"format": "fabric.store/99"}')
    with pytest.raises(InvalidInput, match="fabric.store/99"):
        open_store(tmp_path / "other")
    with pytest.raises(InvalidInput, match="no store"):
        open_store("")
    (tmp_path / "a-file").write_bytes(b"x")
    for create in (True, False):
        with pytest.raises(InvalidInput, match="not a folder"):
            open_store(tmp_path / "a-file", create=create)
    assert (tmp_path / "a-file").read_bytes() == b"x"


# --- declared capabilities ---------------------------------------------------------------------

def test_every_declared_capability_is_implemented(store, kind):
    caps = store.capabilities
    assert caps is store.backend.capabilities
    for name in caps.declared():
        for verb in Capabilities.VERBS[name]:
            assert callable(getattr(store.backend, verb, None)), f"{kind} declares {name} but lacks {verb}()"
    assert store.local == caps.files
    assert set(Capabilities.VERBS) == {f for f in Capabilities.__dataclass_fields__}


class _Undeclared:
    """A local backend that declares nothing: it has every extra verb, but the store must not use one."""

    capabilities = Capabilities()

    def __init__(self, inner: LocalBackend):
        self._inner = inner
        self.used: list[str] = []

    def __getattr__(self, name):
        if name in ("has_many", "put_parts", "flush", "size", "path", "link_in", "sweep_temp"):
            self.used.append(name)
        return getattr(self._inner, name)


def test_the_store_uses_only_declared_capabilities(tmp_path):
    inner = open_store(tmp_path / "store").backend
    b = _Undeclared(inner)
    store = Store(b)
    cid = _put(store, b"plain")
    store.put_chunk(digest.digest(b"later"), b"later", defer=True)
    store.flush()
    assert store.missing([cid, digest.digest(b"none")] * 3) == [digest.digest(b"none")]
    assert store.get_chunk(cid) == b"plain" and store.get_chunk(digest.digest(b"later")) == b"later"
    assert store.stored_sizes([cid]) is None and not store.local
    (tmp_path / "f").write_bytes(b"pack me")
    assert store.link_pack(tmp_path / "f") is None
    assert fsck(store, repair=True).ok
    assert b.used == []


# --- the backend protocol ----------------------------------------------------------------------

def test_has_get_put_delete(backend):
    assert not backend.has("x/one")
    with pytest.raises(NotFound) as e:
        backend.get("x/one")
    assert isinstance(e.value, FileNotFoundError)
    backend.put("x/one", b"1")
    backend.put("x/two", memoryview(b"22"))
    assert backend.has("x/one") and backend.get("x/one") == b"1" and backend.get("x/two") == b"22"
    backend.put("x/one", b"one again")  # put replaces
    assert backend.get("x/one") == b"one again"
    backend.delete("x/one")
    backend.delete("x/one")  # absent is fine
    assert not backend.has("x/one") and backend.has("x/two")


def test_empty_object_round_trips(backend):
    backend.put("x/empty", b"")
    assert backend.has("x/empty") and backend.get("x/empty") == b""


def test_list_matches_string_prefixes(store):
    b = store.backend
    for k in ("l/a/1", "l/a/2", "l/ab", "l/b/1", "other/1"):
        b.put(k, k.encode())
    assert sorted(i.key for i in b.list("l/a/")) == ["l/a/1", "l/a/2"]
    assert sorted(i.key for i in b.list("l/a")) == ["l/a/1", "l/a/2", "l/ab"]
    infos = {i.key: i for i in b.list("l/")}
    assert sorted(infos) == ["l/a/1", "l/a/2", "l/ab", "l/b/1"]
    assert infos["l/ab"].size == 4 and infos["l/ab"].mtime > 0
    assert {i.key: i.size for i in b.list("l/ab")} == {"l/ab": 4}
    assert list(b.list("nothing/")) == [] and list(b.list("l/zz")) == []
    store.cas_ref("art/versions/v1", b"x", None)
    store.cas_ref("artifact/versions/v1", b"y", None)
    assert store.list_refs("art/") == ["art/versions/v1"]  # not "artifact/…"


# --- chunks --------------------------------------------------------------------------------

def test_chunk_round_trip_and_layout(store, store_dir, rng):
    data = random_bytes(rng, 100_000)
    cid = digest.digest(data)
    assert not store.has_chunk(cid)
    written = store.put_chunk(cid, data)
    assert store.has_chunk(cid) and store.get_chunk(cid) == data
    h = cid.split(":")[1]
    assert chunk_key(cid) == f"chunks/{h[:2]}/{h}"
    stored = store.backend.get(chunk_key(cid))
    if store.capabilities.files:  # the key is the file's path under the store's folder
        assert (store_dir / "chunks" / h[:2] / h).read_bytes() == stored
    assert stored[0] == TAG_RAW and stored[1:] == data  # random bytes do not compress
    assert written == len(stored) == len(data) + 1
    assert [c for c, _ in store.iter_chunks()] == [cid]


def test_compressible_chunk_is_stored_smaller_and_round_trips(store):
    data = (b"fabric " * 200_000)[:1_000_000]
    cid = _put(store, data)
    stored = store.backend.get(chunk_key(cid))
    assert stored[0] == TAG_ZSTD
    assert len(stored) < len(data) // 10
    assert store.get_chunk_stored(cid) == stored
    assert store.get_chunk(cid) == data


def test_store_without_compression_keeps_chunks_raw(make_store):
    s = make_store(compress=False)
    cid = _put(s, bytes(10_000))
    assert s.backend.get(chunk_key(cid)) == b"\x00" + bytes(10_000)


def test_put_refuses_bytes_that_do_not_match_the_id(store, store_dir):
    cid = digest.digest(b"right")
    with pytest.raises(CorruptChunk, match="does not match"):
        store.put_chunk(cid, b"wrong")
    assert list(store.backend.list("chunks/")) == []
    if store.capabilities.files:
        assert chunk_files(store_dir) == []
    with pytest.raises(InvalidChunkId):
        store.put_chunk("sha1:abcd", b"x", verified=True)  # a key is never made from a bad id
    with pytest.raises(InvalidChunkId):
        store.has_chunk("blake3:" + "A" * 64)


def test_missing_lists_each_absent_id_once_in_order(store):
    have = _put(store, b"have")
    a, b = digest.digest(b"a"), digest.digest(b"b")
    assert store.missing([b, have, a, b, a]) == [b, a]


def test_missing_asks_about_many_chunks(store):
    ids = []
    for i in range(40):
        blob = f"chunk {i}".encode()
        ids.append(digest.digest(blob))
        if i % 3 == 0:
            store.put_chunk(ids[-1], blob)
    assert store.missing(ids + ids) == [c for i, c in enumerate(ids) if i % 3]


def test_deferred_chunks_are_there_after_flush(store):
    cids = [digest.digest(f"deferred {i}".encode()) for i in range(5)]
    for i, cid in enumerate(cids):
        store.put_chunk(cid, f"deferred {i}".encode(), defer=True)
    store.flush()
    assert store.missing(cids) == []
    assert [store.get_chunk(c) for c in cids] == [f"deferred {i}".encode() for i in range(5)]


def test_deferred_writes_flush_in_the_background_and_flush_reports_its_failure(tmp_path, monkeypatch):
    """Past the flush threshold a background flush makes them visible with no `flush()`
    call; one that fails (here a key under an object, so its folder cannot be made) is
    raised by the next `flush()`, after the other deferred writes are in place."""
    from fabric.store import local
    monkeypatch.setattr(local, "_FLUSH_BYTES", 1000)
    b = LocalBackend(tmp_path / "store")
    b.put_parts("a/x", [b"x" * 10], durable=False)
    assert not b.has("a/x")
    b.defer_bytes(2000)  # bytes written elsewhere in the store (a pack) count towards the threshold
    for _ in range(500):
        if b.has("a/x"):
            break
        threading.Event().wait(0.01)
    assert b.get("a/x") == b"x" * 10 and os.listdir(tmp_path / "store" / "tmp") == []
    b.put("file", b"an object")
    b.put_parts("file/under", [b"y" * 2000], durable=False)  # starts a flush that cannot rename it
    b.put_parts("b/ok", [b"z"], durable=False)
    with pytest.raises(OSError):
        for _ in range(500):
            b.flush()
            threading.Event().wait(0.01)
    b.flush()  # reported once
    assert b.get("b/ok") == b"z" and not b.has("file/under")


def test_get_absent_chunk_is_chunk_not_found(store):
    with pytest.raises(ChunkNotFound) as e:
        store.get_chunk(digest.digest(b"nothing"))
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "bad-tag", "bad-zstd"])
def test_damaged_chunk_is_detected_on_read_and_by_fsck(store, rng, damage):
    data = random_bytes(rng, 5000) if damage != "bad-zstd" else bytes(5000)
    cid = _put(store, data)
    good = _put(store, b"an intact neighbour")
    key = chunk_key(cid)
    raw = bytearray(store.backend.get(key))
    if damage == "flip":
        raw[100] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "empty":
        raw = bytearray()
    elif damage == "bad-tag":
        raw[0] = 7
    else:
        raw[5:15] = b"\xff" * 10
    store.backend.put(key, bytes(raw))
    with pytest.raises(CorruptChunk):
        store.get_chunk(cid)
    report = fsck(store)
    assert report.bad_chunks == [cid] and not report.ok
    assert store.backend.has(key)  # no repair without asking
    report = fsck(store, repair=True)
    assert report.removed == 1 and not store.backend.has(key)
    assert fsck(store).ok
    assert store.get_chunk(good) == b"an intact neighbour"


def test_packs_are_hard_linked_only_where_declared(store, tmp_path):
    src = tmp_path / "shard.bin"
    src.write_bytes(b"pulled bytes")
    key = store.link_pack(src)
    if not store.capabilities.link:
        assert key is None and list(store.iter_packs()) == []
        return
    assert key is not None and [i.key for i in store.iter_packs()] == [key]
    assert os.path.samefile(store.backend.path(key), src)


# --- manifests -----------------------------------------------------------------------------

def test_manifest_objects_are_checked_against_their_id(store):
    body = b'{"format":"fabric.manifest/1"}'
    mid = digest.digest(body)
    with pytest.raises(CorruptChunk):
        store.put_manifest(digest.digest(b"other"), body)
    with pytest.raises(NotFound):
        store.get_manifest_bytes(mid)
    store.put_manifest(mid, body)
    assert store.has_manifest(mid) and store.get_manifest_bytes(mid) == body
    store.backend.put(manifest_key(mid), body + b" ")
    with pytest.raises(CorruptChunk):
        store.get_manifest_bytes(mid)


# --- compare-and-swap ------------------------------------------------------------------------

def test_cas_ref_semantics(store):
    store.cas_ref("a/versions/v1", b"one", None)
    with pytest.raises(Conflict):
        store.cas_ref("a/versions/v1", b"other", None)       # must not exist, but does
    with pytest.raises(Conflict):
        store.cas_ref("a/versions/v1", b"two", b"stale")     # expected value is wrong
    with pytest.raises(Conflict):
        store.cas_ref("a/versions/v2", b"two", b"one")       # expected to exist, but does not
    assert store.get_ref("a/versions/v1") == b"one" and store.get_ref("a/versions/v2") is None
    store.cas_ref("a/versions/v1", b"two", b"one")
    assert store.get_ref("a/versions/v1") == b"two"
    assert store.list_refs("a/") == ["a/versions/v1"]  # lock files are not objects
    store.delete_ref("a/versions/v1")
    store.cas_ref("a/versions/v1", b"three", None)           # deleted: creatable again
    assert store.get_ref("a/versions/v1") == b"three"


def test_lock_files_never_shadow_objects(store):
    """A name may end in `.lock`: CAS locks must not collide with it or hide it."""
    store.cas_ref("a/versions/v1", b"one", None)
    store.cas_ref("a/versions/v1.lock", b"other", None)
    assert store.get_ref("a/versions/v1") == b"one" and store.get_ref("a/versions/v1.lock") == b"other"
    assert store.list_refs("a/") == ["a/versions/v1", "a/versions/v1.lock"]
    store.cas_ref("a/versions/v1", b"two", b"one")
    assert store.get_ref("a/versions/v1.lock") == b"other"


def test_concurrent_cas_increments_lose_nothing(store):
    key, threads, per_thread = "counter/channels/c", 6, 40
    store.cas_ref(key, b"0", None)
    final = count_up_concurrently(lambda: store.get_ref(key), lambda new, cur: store.cas_ref(key, new, cur),
                                  threads=threads, per_thread=per_thread)
    assert final == threads * per_thread


# --- the registry, gc and fsck on top ----------------------------------------------------------

def _commit(reg: Registry, version: str, payload: bytes) -> str:
    cid = digest.digest(payload)
    reg.store.put_chunk(cid, payload)
    m = Manifest(artifact="m", version=version, created=now_rfc3339(),
                 files=(FileEntry("f.bin", len(payload), 0o644, ((cid, len(payload)),)),))
    return reg.commit(m)


def test_registry_commit_promote_rollback(store):
    reg = Registry(store)
    mids = [_commit(reg, f"v{i}", f"weights {i}".encode()) for i in range(3)]
    assert reg.versions("m") == ["v0", "v1", "v2"] and reg.manifest_id("m", "v1") == mids[1]
    assert _commit(reg, "v1", b"weights 1") == mids[1]  # same content again: no-op
    with pytest.raises(VersionExists):
        _commit(reg, "v1", b"other weights")
    for v in ("v0", "v1", "v2"):
        reg.promote("m", v, "prod")
    assert reg.rollback("m", "prod").version == "v1"
    assert reg.rollback("m", "prod").version == "v0"
    assert [c.name for c in reg.channels("m")] == ["prod"]


def test_concurrent_promotes_through_two_stores_lose_no_update(store, make_store):
    """Two handles on one store (two origins on one folder or bucket) move one channel concurrently."""
    other = make_store()
    assert other is not store and other.backend is not store.backend
    regs = [Registry(store), Registry(other)]
    for i in range(2):
        for j in range(6):
            _commit(regs[0], f"r{i}-{j}", f"w{i}.{j}".encode())
    errors = []

    def worker(i):
        try:
            for j in range(6):
                regs[i].promote("m", f"r{i}-{j}", "prod")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    history = regs[1].channel("m", "prod").history
    assert sorted(e["version"] for e in history) == sorted(f"r{i}-{j}" for i in range(2) for j in range(6))


def test_gc_and_fsck_work_on_every_store(store):
    reg = Registry(store)
    for i in range(3):
        _commit(reg, f"v{i}", f"gc weights {i}".encode())
    reg.promote("m", "v2", "prod")
    assert fsck(store).ok and fsck(store).versions == 3
    report = gc(store, keep=1, grace=0)
    assert sorted(report.versions_deleted) == ["m@v0", "m@v1"] and report.chunks_deleted == 2
    assert reg.versions("m") == ["v2"] and fsck(store).ok
    bad = digest.digest(b"soon damaged")
    store.put_chunk(bad, b"soon damaged")
    store.backend.put(chunk_key(bad), b"\x00damaged!")
    assert fsck(store).bad_chunks == [bad]
    assert fsck(store, repair=True).removed == 1 and fsck(store).ok


def test_leftover_temp_files_are_swept_by_fsck_repair(store, store_dir):
    if not store.capabilities.temp_files:
        pytest.skip("this backend writes no temp files (its puts are atomic at the server)")
    cid = _put(store, b"kept")
    (store_dir / "tmp" / f"{uuid.uuid4().hex}.tmp").write_bytes(b"half a chunk")
    assert fsck(store).temp_swept == 0
    assert fsck(store, repair=True).temp_swept == 1
    assert os.listdir(store_dir / "tmp") == []
    assert store.get_chunk(cid) == b"kept"


# --- atomicity under failure (a local folder on a full disk) -------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs, so a write runs out of space part-way (needs root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_leaves_no_torn_chunk(tiny_fs, rng):
    store = open_store(tiny_fs / "store")
    root = tiny_fs / "store"
    too_big = random_bytes(rng, 3 << 20)
    with pytest.raises(StoreFull, match="full"):
        store.put_chunk(digest.digest(too_big), too_big)  # fails mid-write
    assert chunk_files(root) == [] and os.listdir(root / "tmp") == []
    stored = []
    with pytest.raises(StoreFull):
        for _ in range(100):  # fill the disk with chunks until a write fails part-way
            stored.append(_put(store, random_bytes(rng, 300_000)))
    assert 2 <= len(stored) < 10
    assert os.listdir(root / "tmp") == []
    on_disk = [c for c, _ in store.iter_chunks()]
    assert sorted(on_disk) == sorted(stored)  # the failed chunk is absent, not torn
    for cid in on_disk:
        assert store.get_chunk(cid)  # every chunk file matches its id
    assert fsck(store).ok
