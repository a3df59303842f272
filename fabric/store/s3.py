"""A backend on an S3-compatible bucket: the store of an origin that outgrows one machine.

Objects live under `s3://<bucket>/<prefix>` with the same keys as a local store
(`chunks/ab/ab12…`, `manifests/…`, `refs/…`). What S3 gives and how we use it:

* **Atomic puts.** A PUT (or a completed multipart upload) makes the whole object
  visible at once or not at all, so a crash never leaves a torn chunk. Objects larger
  than `multipart_threshold` go up in parts (boto3's transfer manager).
* **Compare-and-swap** for refs uses conditional writes: `If-None-Match: *` to create,
  `If-Match: <ETag>` to replace. A 412 (or AWS's 409 ConditionalRequestConflict) is a
  `Conflict`; the registry re-reads and tries again. The ETag that goes with the value
  the caller expects comes from the last `get` of that key when its bytes match, else
  from a fresh GET, so a read-modify-write costs one GET and one PUT. SeaweedFS (atomic
  since the race fix after 4.16) and AWS honour these headers; `check_conditional_writes`
  proves it on every open, because a store that silently ignores them would let two
  origins lose each other's channel moves. No lock objects or leases are needed.
* **Retries.** botocore's `standard` mode retries throttling (SlowDown, 503), 5xx and
  dropped connections with jittered exponential backoff; what is left after
  `max_attempts` becomes a `TransferError`.

Blocking I/O: async callers run these calls in threads. The boto3 client is
thread-safe and keeps a pool of `max_connections` connections.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from fabric.errors import Conflict, Forbidden, InvalidInput, NotFound, TransferError
from fabric.store.backend import Capabilities, ObjectInfo

_ETAG_CACHE = 4096  # refs whose last-read ETag we remember
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_CONFLICT = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible endpoint. `None` fields fall back to boto3's own
    configuration chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/…)."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None
    max_attempts: int = 8  # per request, throttling and 5xx included
    max_connections: int = 32
    multipart_threshold: int = 16 << 20
    multipart_chunksize: int = 8 << 20
    connect_timeout: float = 5.0
    read_timeout: float = 60.0


def make_client(opts: S3Options | None = None):
    """A boto3 S3 client with standard-mode retries and path-style addressing."""
    opts = opts or S3Options()
    config = Config(
        retries={"mode": "standard", "max_attempts": opts.max_attempts},
        max_pool_connections=opts.max_connections,
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        # S3-compatible stores rarely have wildcard DNS for virtual-host buckets
        s3={"addressing_style": "path"} if opts.endpoint else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=opts.endpoint, aws_access_key_id=opts.access_key,
        aws_secret_access_key=opts.secret_key, region_name=opts.region or "us-east-1", config=config)


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/"); the prefix is "" or ends with "/"."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidInput(f"{url!r} is not an s3://BUCKET[/PREFIX] URL")
    prefix = parts.path.strip("/")
    return parts.netloc, prefix + "/" if prefix else ""


def error_code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def http_status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


@contextmanager
def translate(what: str):
    """Turn botocore errors into Fabric's: missing → NotFound, 412/409 → Conflict,
    refused credentials → Forbidden, unreachable or still failing after retries → TransferError."""
    try:
        yield
    except botocore.exceptions.ClientError as e:
        code, status = error_code(e), str(http_status(e))
        if code in _NOT_FOUND or status == "404":
            if code == "NoSuchBucket":
                raise NotFound(f"{what}: no such bucket") from None
            raise NotFound(f"{what}: no such object") from None
        if code in _CONFLICT or status in ("412", "409"):
            raise Conflict(f"{what}: changed concurrently ({code or status}); try again") from None
        if code == "InvalidBucketName":
            raise InvalidInput(f"{what}: not a valid bucket name") from None
        if code in _DENIED or status == "403":
            raise Forbidden(f"{what}: the S3 endpoint refused the credentials ({code})") from None
        raise TransferError(f"{what}: S3 error {code or status}: {e}") from None
    except (botocore.exceptions.BotoCoreError, ConnectionError) as e:
        raise TransferError(f"{what}: S3 endpoint unreachable ({e})") from None


class S3Backend:
    """The Backend protocol on `s3://bucket/prefix`: remote objects, asked about in parallel."""

    capabilities = Capabilities(parallel_has=True, list_after=True)

    def __init__(self, bucket: str, prefix: str = "", *, client=None, options: S3Options | None = None):
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix = bucket, prefix
        self.options = options or S3Options()
        self.client = client or make_client(self.options)
        self._etags: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._transfer = TransferConfig(multipart_threshold=self.options.multipart_threshold,
                                        multipart_chunksize=self.options.multipart_chunksize,
                                        max_concurrency=4)

    def describe(self) -> str:
        where = f" at {self.options.endpoint}" if self.options.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _what(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    # --- the protocol ----------------------------------------------------------------

    def has(self, key: str) -> bool:
        try:
            with translate(self._what(key)):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFound:
            return False

    def has_many(self, keys: list[str]) -> list[bool]:
        """`has` for many keys at once (HEADs in parallel): S3 round trips dominate."""
        if len(keys) < 4:
            return [self.has(k) for k in keys]
        with ThreadPoolExecutor(max_workers=min(16, self.options.max_connections)) as pool:
            return list(pool.map(self.has, keys))

    def get(self, key: str) -> bytes:
        with translate(self._what(key)):
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = resp["Body"].read()
        if key.startswith("refs/"):
            self._remember(key, data, resp["ETag"])
        return data

    def put(self, key: str, data: bytes | memoryview) -> None:
        with translate(self._what(key)):
            if len(data) > self.options.multipart_threshold:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                           Config=self._transfer)
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data))

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        what = self._what(key)
        if expected is None:
            cond = {"IfNoneMatch": "*"}
        else:
            etag = self._etag_for(key, expected)
            cond = {"IfMatch": etag}
        try:
            with translate(what):
                resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
        except (Conflict, NotFound):
            self._forget(key)
            raise Conflict(f"{key!r} changed concurrently; try again") from None
        self._remember(key, data, resp["ETag"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix))
        with translate(f"listing {self._what(prefix)}"):
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix):]
                    if key and not key.endswith("/"):
                        yield ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())

    def list_after(self, prefix: str, after: str) -> Iterator[ObjectInfo]:
        """`list(prefix)` from the first key after `after` (S3 lists in key order): a log's tail in one request."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix), StartAfter=self._key(after))
        with translate(f"listing {self._what(prefix)} after {after!r}"):
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix):]
                    if key and not key.endswith("/"):
                        yield ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        self._forget(key)
        with translate(self._what(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    # --- compare-and-swap support ---------------------------------------------------------

    def _etag_for(self, key: str, expected: bytes) -> str:
        """The ETag of `key` if it holds `expected` now (as far as we can tell), else Conflict."""
        with self._lock:
            cached = self._etags.get(key)
        if cached is not None and cached[0] == expected:
            return cached[1]  # if it moved since, If-Match fails and the caller re-reads
        try:
            with translate(self._what(key)):
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                current = resp["Body"].read()
        except NotFound:
            raise Conflict(f"{key!r} no longer exists; try again") from None
        if current != expected:
            self._remember(key, current, resp["ETag"])
            raise Conflict(f"{key!r} changed concurrently; try again")
        return resp["ETag"]

    def _remember(self, key: str, data: bytes, etag: str) -> None:
        with self._lock:
            self._etags[key] = (bytes(data), etag)
            self._etags.move_to_end(key)
            while len(self._etags) > _ETAG_CACHE:
                self._etags.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._etags.pop(key, None)

    # --- opening -----------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (an origin's first start)."""
        try:
            with translate(f"s3://{self.bucket}"):
                self.client.head_bucket(Bucket=self.bucket)
            return
        except NotFound:
            pass
        try:
            with translate(f"creating bucket s3://{self.bucket}"):
                self.client.create_bucket(Bucket=self.bucket)
        except Conflict:
            pass  # BucketAlreadyOwnedByYou: someone created it meanwhile

    def is_empty(self) -> bool:
        with translate(f"listing {self._what('')}"):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        return not resp.get("Contents")

    def check_conditional_writes(self, key: str) -> None:
        """Prove that the endpoint refuses a create-if-absent of an existing `key`.

        An endpoint that ignores `If-None-Match` would let concurrent channel moves
        overwrite each other; refuse to run on it rather than lose updates quietly.
        """
        probe = self.get(key)
        try:
            with translate(self._what(key)):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=probe, IfNoneMatch="*")
        except Conflict:
            return
        raise InvalidInput(
            f"{self.describe()}: the S3 endpoint ignores conditional writes (If-None-Match); "
            "Fabric needs them for channel compare-and-swap")
