"""fabric.store.s3: what only an S3 store does, on a real SeaweedFS (the session's `suite_weed`).

Opening (the marker, prefixes that are not stores, the conditional-write probe), clear
errors for bad credentials and dead endpoints, multipart for large objects, pagination,
throttling retries, and the ETag cache behind compare-and-swap. Everything a store does
on every backend is in test_store.py, which runs against S3 too.
"""

from __future__ import annotations

import uuid

import botocore.exceptions
import pytest

from fabric.core import digest
from fabric.errors import Conflict, Forbidden, InvalidInput, NotFound, TransferError
from fabric.store import chunk_key, open_store
from fabric.store.s3 import S3Backend, S3Options

from helpers.files import random_bytes
from helpers.s3 import SUITE_BUCKET as BUCKET
from helpers.s3 import ThrottlingProxy


@pytest.fixture
def weed(suite_weed):
    return suite_weed


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


def test_an_s3_store_declares_parallel_checks_and_no_files(weed):
    store = open_store(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", s3=weed.options)
    assert sorted(store.capabilities.declared()) == ["list_after", "parallel_has"]
    assert not store.local and store.stored_sizes([digest.digest(b"x")]) is None
