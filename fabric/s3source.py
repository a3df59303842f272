"""Objects in a bucket as publish sources: publish a checkpoint without a local copy.

`list_sources("s3://bucket/runs/r1/step-1200/")` lists the objects under the prefix
and returns one `S3Source` per object, named by its key relative to the prefix.
`fabric.publish.publish` reads each one once, sequentially, through `S3Reader`:
ranged GETs of `part_size` bytes, a few in flight ahead of the reader (as boto3's
`download_file` does), each carrying `If-Match: <ETag from the listing>`, so an
object overwritten mid-read fails with `SourceChanged` instead of mixing versions.
After the last byte, `check_unchanged` HEADs the object once more (a deleted or
replaced object is `SourceChanged` too). Memory stays bounded at `ahead × part_size`.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fabric.errors import Conflict, NotFound, SourceChanged, SourceError
from fabric.store.s3 import S3Options, make_client, parse_url, translate

PART = 8 << 20
AHEAD = 4


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


@dataclass
class S3Source:
    """One object to publish: knows its name in the version, its size and its ETag."""

    client: object = field(repr=False)
    bucket: str
    key: str
    rel: str
    size: int
    etag: str  # without quotes
    mode: int = 0o644

    def open(self) -> "S3Reader":
        return S3Reader(self)

    def check_unchanged(self) -> None:
        """HEAD the object: gone or a new ETag means it changed while we read it."""
        try:
            with translate(f"s3://{self.bucket}/{self.key}"):
                head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except NotFound:
            raise SourceChanged(f"{self.rel} was deleted while it was being published") from None
        if _etag(head.get("ETag")) != self.etag or int(head["ContentLength"]) != self.size:
            raise SourceChanged(f"{self.rel} changed while it was being published; publish again")


class S3Reader:
    """A sequential, read-only file over one object: `read(n)` and `readinto(buf)`."""

    def __init__(self, src: S3Source, *, part_size: int = PART, ahead: int = AHEAD):
        self.src = src
        self.part_size = part_size
        self._next = 0  # offset of the next part to request
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="fabric-s3-read")
        self._ahead = ahead
        self._part, self._pos = b"", 0
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead and self._next < self.src.size:
            end = min(self._next + self.part_size, self.src.size) - 1
            self._pending.append(self._pool.submit(self._get, self._next, end))
            self._next = end + 1

    def _get(self, start: int, end: int) -> bytes:
        src = self.src
        try:
            with translate(f"s3://{src.bucket}/{src.key}"):
                resp = src.client.get_object(Bucket=src.bucket, Key=src.key, Range=f"bytes={start}-{end}",
                                             IfMatch=f'"{src.etag}"')
                data = resp["Body"].read()
        except NotFound:
            raise SourceChanged(f"{src.rel} was deleted while it was being published") from None
        except Conflict:  # the If-Match failed: a new object under the same key
            raise SourceChanged(f"{src.rel} changed while it was being published; publish again") from None
        if len(data) != end - start + 1:
            raise SourceChanged(f"{src.rel} is shorter than its listing said ({src.size} bytes)")
        return data

    def _next_part(self) -> bool:
        if not self._pending:
            return False
        self._part = self._pending.popleft().result()
        self._pos = 0
        self._fill()
        return True

    def _left(self) -> int:
        return len(self._part) - self._pos

    def readinto(self, out) -> int:
        view = memoryview(out).cast("B")
        if not self._left() and not self._next_part():
            return 0
        n = min(len(view), self._left())
        view[:n] = memoryview(self._part)[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.src.size
        pieces, got = [], 0
        while got < n and (self._left() or self._next_part()):
            take = min(n - got, self._left())
            if self._pos == 0 and take == len(self._part):
                pieces.append(self._part)  # a whole part: no copy
            else:
                pieces.append(self._part[self._pos:self._pos + take])
            self._pos += take
            got += take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "S3Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_sources(url: str, *, s3: S3Options | None = None, client=None) -> list[S3Source]:
    """Every object under `s3://bucket/prefix/`, as sources named relative to the prefix.

    Keys that end in `/` (folder markers) are skipped. Raises SourceError when the
    prefix holds no object or the bucket cannot be read.
    """
    bucket, prefix = parse_url(url)
    client = client or make_client(s3)
    out = []
    try:
        with translate(f"listing {url}"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    out.append(S3Source(client, bucket, key, key[len(prefix):], int(obj["Size"]),
                                        _etag(obj.get("ETag"))))
    except NotFound:
        raise SourceError(f"source {url}: no such bucket") from None
    if not out and prefix:
        out = _single_object(client, bucket, prefix.rstrip("/"))
    if not out:
        raise SourceError(f"source {url} holds no objects")
    return sorted(out, key=lambda s: s.rel)


def _single_object(client, bucket: str, key: str) -> list[S3Source]:
    """`s3://bucket/path/file.bin` names one object: publish it under its base name."""
    try:
        with translate(f"s3://{bucket}/{key}"):
            head = client.head_object(Bucket=bucket, Key=key)
    except NotFound:
        return []
    return [S3Source(client, bucket, key, key.rsplit("/", 1)[-1], int(head["ContentLength"]),
                     _etag(head.get("ETag")))]

