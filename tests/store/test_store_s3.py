"""One store suite, run against every backend: a local folder and an S3 bucket (real SeaweedFS).

Each S3 case gets a fresh prefix in one bucket of a `weed mini` started for this module.
Also the S3-only behaviour: opening (marker, non-store prefixes, conditional-write
probe), multipart for large objects, pagination, throttling retries, and the ETag cache
behind compare-and-swap.
"""

from __future__ import annotations

import threading
import uuid

import botocore.exceptions
import pytest

from fabric.core import digest
from fabric.errors import (ChunkNotFound, Conflict, CorruptChunk, InvalidInput, NotFound, TransferError,
                           VersionExists)
from fabric.core.manifest import FileEntry, Manifest
from fabric.store.registry import Registry, now_rfc3339
from fabric.store.store import Store, chunk_key, open_store
from fabric.store.s3 import S3Backend, S3Options

from conftest import count_up_concurrently, random_bytes
from helpers.s3 import ThrottlingProxy, Weed

BUCKET = "fabric-suite"


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    with Weed(tmp_path_factory.mktemp("weed")) as w:
        w.client().create_bucket(Bucket=BUCKET)
        yield w


@pytest.fixture(params=["local", "s3"])
def kind(request):
    return request.param


@pytest.fixture
def store(kind, tmp_path, request) -> Store:
    if kind == "local":
        return open_store(tmp_path / "store")
    w = request.getfixturevalue("weed")
    return open_store(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3=w.options)


@pytest.fixture
def backend(store):
    return store.backend


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


def test_put_if_semantics(backend):
    backend.put_if("refs/a", b"one", None)
    with pytest.raises(Conflict):
        backend.put_if("refs/a", b"other", None)       # must not exist, but does
    with pytest.raises(Conflict):
        backend.put_if("refs/a", b"two", b"stale")     # expected value is wrong
    with pytest.raises(Conflict):
        backend.put_if("refs/b", b"two", b"one")       # expected to exist, but does not
    assert backend.get("refs/a") == b"one" and not backend.has("refs/b")
    backend.put_if("refs/a", b"two", b"one")
    assert backend.get("refs/a") == b"two"
    backend.delete("refs/a")
    backend.put_if("refs/a", b"three", None)           # deleted: creatable again
    assert backend.get("refs/a") == b"three"


def test_list_by_prefix(backend):
    keys = ["l/a/1", "l/a/2", "l/ab", "l/b/1", "other/1"]
    for k in keys:
        backend.put(k, k.encode())
    assert sorted(i.key for i in backend.list("l/a/")) == ["l/a/1", "l/a/2"]
    assert sorted(i.key for i in backend.list("l/a")) == ["l/a/1", "l/a/2", "l/ab"]
    infos = {i.key: i for i in backend.list("l/")}
    assert sorted(infos) == ["l/a/1", "l/a/2", "l/ab", "l/b/1"]
    assert infos["l/ab"].size == 4 and infos["l/ab"].mtime > 0
    assert list(backend.list("nothing/")) == []


def test_concurrent_compare_and_swap_loses_nothing(backend):
    key, threads, per_thread = "refs/counter", 4, 15
    backend.put_if(key, b"0", None)
    final = count_up_concurrently(lambda: backend.get(key), lambda new, cur: backend.put_if(key, new, cur),
                                  threads=threads, per_thread=per_thread)
    assert final == threads * per_thread


# --- chunks and manifests ----------------------------------------------------------------------

def test_chunk_put_get_verify(store, rng):
    data = random_bytes(rng, 200_000)
    cid = digest.digest(data)
    assert store.missing([cid]) == [cid] and not store.has_chunk(cid)
    store.put_chunk(cid, data)
    assert store.has_chunk(cid) and store.get_chunk(cid) == data
    compressible = b"fabric " * 50_000
    cid2 = digest.digest(compressible)
    store.put_chunk(cid2, compressible)
    assert len(store.get_chunk_stored(cid2)) < len(compressible) // 10
    assert store.get_chunk(cid2) == compressible
    assert sorted(c for c, _ in store.iter_chunks()) == sorted([cid, cid2])
    other = digest.digest(b"other")
    assert store.missing([other, cid, other, cid2]) == [other]
    with pytest.raises(CorruptChunk):
        store.put_chunk(cid, b"not the bytes")
    with pytest.raises(ChunkNotFound):
        store.get_chunk(other)


def test_damaged_chunk_is_caught_on_read(store, rng):
    data = random_bytes(rng, 5000)
    cid = digest.digest(data)
    store.put_chunk(cid, data)
    stored = bytearray(store.backend.get(chunk_key(cid)))
    stored[100] ^= 1
    store.backend.put(chunk_key(cid), bytes(stored))
    with pytest.raises(CorruptChunk):
        store.get_chunk(cid)


def test_missing_asks_about_many_chunks(store):
    ids = []
    for i in range(40):
        blob = f"chunk {i}".encode()
        ids.append(digest.digest(blob))
        if i % 3 == 0:
            store.put_chunk(ids[-1], blob)
    assert store.missing(ids + ids) == [c for i, c in enumerate(ids) if i % 3]


def test_manifest_put_get(store):
    body = b'{"format":"fabric.manifest/1"}'
    mid = digest.digest(body)
    with pytest.raises(CorruptChunk):
        store.put_manifest(digest.digest(b"x"), body)
    with pytest.raises(NotFound):
        store.get_manifest_bytes(mid)
    store.put_manifest(mid, body)
    assert store.has_manifest(mid) and store.get_manifest_bytes(mid) == body


# --- the registry on top -------------------------------------------------------------------------

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


def test_concurrent_promotes_through_two_stores_lose_no_update(store, kind, tmp_path, request):
    """Two handles on one store (two origins on one bucket) move one channel concurrently."""
    if kind == "local":
        other = open_store(tmp_path / "store")
    else:
        backend: S3Backend = store.backend
        other = Store(S3Backend(backend.bucket, backend.prefix, options=backend.options))
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


# --- S3 only ---------------------------------------------------------------------------------------

def test_open_marks_a_new_prefix_and_refuses_others(weed):
    opts = weed.options
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    with pytest.raises(NotFound, match="no Fabric store"):
        open_store(prefix, s3=opts, create=False)
    open_store(prefix, s3=opts)
    open_store(prefix, s3=opts, create=False)
    client = weed.client()
    busy = uuid.uuid4().hex[:12]
    client.put_object(Bucket=BUCKET, Key=f"{busy}/thesis.txt", Body=b"precious")
    with pytest.raises(InvalidInput, match="not a Fabric store"):
        open_store(f"s3://{BUCKET}/{busy}", s3=opts)
    client.put_object(Bucket=BUCKET, Key=f"{busy}2/fabric-store.json", Body=b'{"format": "fabric.store/99"}')
    with pytest.raises(InvalidInput, match="fabric.store/99"):
        open_store(f"s3://{BUCKET}/{busy}2", s3=opts)
    new_bucket = f"fresh-{uuid.uuid4().hex[:8]}"
    open_store(f"s3://{new_bucket}", s3=opts)  # creates the bucket
    assert client.head_object(Bucket=new_bucket, Key="fabric-store.json")


def test_wrong_credentials_and_unreachable_endpoint_are_clear_errors(weed):
    from fabric.errors import Forbidden
    bad = S3Options(endpoint=weed.endpoint, access_key="nobody", secret_key="wrong", max_attempts=1)
    with pytest.raises(Forbidden, match="refused the credentials"):
        open_store(f"s3://{BUCKET}/x", s3=bad)
    dead = S3Options(endpoint="http://127.0.0.1:9", access_key="a", secret_key="b", max_attempts=1,
                     connect_timeout=1)
    with pytest.raises(TransferError, match="unreachable"):
        open_store(f"s3://{BUCKET}/x", s3=dead)


def test_endpoint_that_ignores_conditional_writes_is_refused(weed):
    store = open_store(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3=weed.options)
    backend: S3Backend = store.backend
    real_put = backend.client.put_object

    def ignoring(**kw):  # what an endpoint without conditional writes does
        kw.pop("IfNoneMatch", None)
        kw.pop("IfMatch", None)
        return real_put(**kw)
    backend.client.put_object = ignoring
    with pytest.raises(InvalidInput, match="ignores conditional writes"):
        backend.check_conditional_writes("fabric-store.json")


def test_large_objects_go_multipart_and_listing_paginates(weed, rng):
    opts = S3Options(**{**weed.options.__dict__, "multipart_threshold": 5 << 20, "multipart_chunksize": 5 << 20})
    store = open_store(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3=opts, compress=False)
    big = random_bytes(rng, 12 << 20)
    cid = digest.digest(big)
    store.put_chunk(cid, big, verified=True)
    head = store.backend.client.head_object(Bucket=BUCKET, Key=store.backend.prefix + chunk_key(cid))
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert store.get_chunk(cid) == big
    for i in range(1005):  # one page holds 1000 keys
        store.backend.put(f"p/{i:05d}", b"")
    assert len(list(store.backend.list("p/"))) == 1005


def test_throttling_is_retried(weed):
    prefix = uuid.uuid4().hex[:12]
    open_store(f"s3://{BUCKET}/{prefix}", s3=weed.options)
    with ThrottlingProxy(weed.endpoint, throttle=2) as proxy:
        opts = S3Options(endpoint=proxy.url, access_key=weed.options.access_key,
                         secret_key=weed.options.secret_key)
        store = open_store(f"s3://{BUCKET}/{prefix}", s3=opts)
        store.backend.put("refs/x", b"1")
        assert store.backend.get("refs/x") == b"1"
        assert proxy.throttled == 2 and proxy.forwarded >= 3
        proxy.throttle = 100  # more than botocore retries: a clear error, not a hang
        fast = S3Options(**{**opts.__dict__, "max_attempts": 2})
        with pytest.raises(TransferError, match="SlowDown"):
            S3Backend(BUCKET, prefix, options=fast).get("refs/x")


def test_compare_and_swap_uses_the_etag_of_the_last_read(weed):
    store = open_store(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3=weed.options)
    a: S3Backend = store.backend
    b = S3Backend(a.bucket, a.prefix, options=a.options)
    a.put_if("refs/c", b"1", None)
    assert b.get("refs/c") == b"1"
    a.put_if("refs/c", b"2", b"1")
    with pytest.raises(Conflict):  # b's remembered ETag is stale: If-Match fails at the server
        b.put_if("refs/c", b"3", b"1")
    assert a.get("refs/c") == b"2"
    b.put_if("refs/c", b"3", b"2")  # after a conflict, b reads afresh
    assert a.get("refs/c") == b"3"
    with pytest.raises(botocore.exceptions.ClientError):  # and the server really checks
        a.client.put_object(Bucket=a.bucket, Key=a.prefix + "refs/c", Body=b"x", IfMatch='"not-the-etag"')


def test_gc_and_fsck_work_on_every_store(store):
    from fabric.fsck import fsck
    from fabric.gc import gc
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
