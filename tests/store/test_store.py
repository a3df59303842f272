"""fabric.store.store: the local content-addressed store (atomic writes, CAS, compression, checks)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from fabric.core import digest
from fabric.errors import (ChunkNotFound, Conflict, CorruptChunk, InvalidChunkId, InvalidInput,
                           NotFound, StoreFull)
from fabric.fsck import fsck
from fabric.store.store import TAG_RAW, TAG_ZSTD, chunk_key, manifest_key, open_store

from conftest import chunk_files, count_up_concurrently, random_bytes


def _put(store, data: bytes) -> str:
    cid = digest.digest(data)
    store.put_chunk(cid, data)
    return cid


# --- opening -------------------------------------------------------------------------------

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


# --- chunks --------------------------------------------------------------------------------

def test_chunk_round_trip_and_layout(store, store_dir, rng):
    data = random_bytes(rng, 100_000)
    cid = digest.digest(data)
    assert not store.has_chunk(cid)
    written = store.put_chunk(cid, data)
    assert store.has_chunk(cid) and store.get_chunk(cid) == data
    h = cid.split(":")[1]
    stored = (store_dir / "chunks" / h[:2] / h).read_bytes()
    assert chunk_key(cid) == f"chunks/{h[:2]}/{h}"
    assert stored[0] == TAG_RAW and stored[1:] == data  # random bytes do not compress
    assert written == len(stored) == len(data) + 1
    assert [c for c, _ in store.iter_chunks()] == [cid]


def test_compressible_chunk_is_stored_smaller_and_round_trips(store, store_dir):
    data = (b"fabric " * 200_000)[:1_000_000]
    cid = _put(store, data)
    stored = (store_dir / chunk_key(cid)).read_bytes()
    assert stored[0] == TAG_ZSTD
    assert len(stored) < len(data) // 10
    assert store.get_chunk(cid) == data


def test_store_without_compression_keeps_chunks_raw(store_dir):
    s = open_store(store_dir, compress=False)
    cid = _put(s, bytes(10_000))
    assert (store_dir / chunk_key(cid)).read_bytes() == b"\x00" + bytes(10_000)


def test_put_refuses_bytes_that_do_not_match_the_id(store, store_dir):
    cid = digest.digest(b"right")
    with pytest.raises(CorruptChunk, match="does not match"):
        store.put_chunk(cid, b"wrong")
    assert chunk_files(store_dir) == []
    with pytest.raises(InvalidChunkId):
        store.put_chunk("sha1:abcd", b"x", verified=True)  # a key is never made from a bad id
    with pytest.raises(InvalidChunkId):
        store.has_chunk("blake3:" + "A" * 64)


def test_missing_lists_each_absent_id_once_in_order(store):
    have = _put(store, b"have")
    a, b = digest.digest(b"a"), digest.digest(b"b")
    assert store.missing([b, have, a, b, a]) == [b, a]


def test_get_absent_chunk_is_chunk_not_found(store):
    with pytest.raises(ChunkNotFound) as e:
        store.get_chunk(digest.digest(b"nothing"))
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "bad-tag", "bad-zstd"])
def test_damaged_chunk_is_detected_on_read_and_by_fsck(store, store_dir, rng, damage):
    data = random_bytes(rng, 5000) if damage != "bad-zstd" else bytes(5000)
    cid = _put(store, data)
    good = _put(store, b"an intact neighbour")
    path = store_dir / chunk_key(cid)
    raw = bytearray(path.read_bytes())
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
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunk):
        store.get_chunk(cid)
    report = fsck(store)
    assert report.bad_chunks == [cid] and not report.ok
    assert path.exists()  # no repair without asking
    report = fsck(store, repair=True)
    assert report.removed == 1 and not path.exists()
    assert fsck(store).ok
    assert store.get_chunk(good) == b"an intact neighbour"


# --- manifests -----------------------------------------------------------------------------

def test_manifest_objects_are_checked_against_their_id(store, store_dir):
    body = b'{"format":"fabric.manifest/1"}'
    mid = digest.digest(body)
    with pytest.raises(CorruptChunk):
        store.put_manifest(digest.digest(b"other"), body)
    with pytest.raises(NotFound):
        store.get_manifest_bytes(mid)
    store.put_manifest(mid, body)
    assert store.has_manifest(mid) and store.get_manifest_bytes(mid) == body
    (store_dir / manifest_key(mid)).write_bytes(body + b" ")
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


def test_lock_files_never_shadow_objects(store):
    """A name may end in `.lock`: CAS locks must not collide with it or hide it."""
    store.cas_ref("a/versions/v1", b"one", None)
    store.cas_ref("a/versions/v1.lock", b"other", None)
    assert store.get_ref("a/versions/v1") == b"one" and store.get_ref("a/versions/v1.lock") == b"other"
    assert store.list_refs("a/") == ["a/versions/v1", "a/versions/v1.lock"]
    store.cas_ref("a/versions/v1", b"two", b"one")
    assert store.get_ref("a/versions/v1.lock") == b"other"


def test_list_matches_string_prefixes(store):
    b = store.backend
    for k in ("l/a/1", "l/a/2", "l/ab", "l/b/1", "other/1"):
        b.put(k, k.encode())
    assert sorted(i.key for i in b.list("l/a/")) == ["l/a/1", "l/a/2"]
    assert sorted(i.key for i in b.list("l/a")) == ["l/a/1", "l/a/2", "l/ab"]
    assert sorted(i.key for i in b.list("l/")) == ["l/a/1", "l/a/2", "l/ab", "l/b/1"]
    assert {i.key: i.size for i in b.list("l/ab")} == {"l/ab": 4}
    assert list(b.list("nothing/")) == [] and list(b.list("l/zz")) == []
    store.cas_ref("art/versions/v1", b"x", None)
    store.cas_ref("artifact/versions/v1", b"y", None)
    assert store.list_refs("art/") == ["art/versions/v1"]  # not "artifact/…"


def test_concurrent_cas_increments_lose_nothing(store):
    key, threads, per_thread = "counter/channels/c", 6, 40
    store.cas_ref(key, b"0", None)
    final = count_up_concurrently(lambda: store.get_ref(key), lambda new, cur: store.cas_ref(key, new, cur),
                                  threads=threads, per_thread=per_thread)
    assert final == threads * per_thread


# --- atomicity under failure ---------------------------------------------------------------------

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


def test_leftover_temp_files_are_swept_by_fsck_repair(store, store_dir):
    cid = _put(store, b"kept")
    (store_dir / "tmp" / f"{uuid.uuid4().hex}.tmp").write_bytes(b"half a chunk")
    assert fsck(store).temp_swept == 0
    assert fsck(store, repair=True).temp_swept == 1
    assert os.listdir(store_dir / "tmp") == []
    assert store.get_chunk(cid) == b"kept"
