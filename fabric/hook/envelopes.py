"""Event envelopes from S3-compatible stores, parsed into one shape. Pure: no I/O.

Shapes understood (docs/hooks.md has an example of each; tests/fixtures/events/ has
recorded bodies):

* **AWS S3 / Ceph RGW** `{"Records": [{"eventName": "ObjectCreated:Put", "s3": {...}}]}`;
  keys are URL-encoded with `+` for space; Ceph may send `size` as a string.
* **SNS** `{"Type": "Notification", "Message": "<the Records JSON>"}`, plus the
  `SubscriptionConfirmation` / `UnsubscribeConfirmation` messages.
* **MinIO** `{"EventName": "s3:ObjectCreated:Put", "Key": "bucket/key", "Records": [...]}`
  (`eventName` keeps its `s3:` prefix).
* **SeaweedFS filer webhook** `{"key": "/buckets/<bucket>/<key>", "event_type": "create",
  "message": {"new_entry": {...}, "old_entry": {...}}}`; the S3 ETag is base64 in
  `new_entry.extended["Seaweed-X-Amz-ETag"]`.
* the AWS test event `{"Event": "s3:TestEvent"}`.

`parse(body)` returns an `Envelope`: the object-created events worth acting on, and
the ones ignored with a reason (deletes, folders, multipart parts, system paths, other
event kinds). Malformed JSON raises `fabric.errors.MalformedEvent`; an unknown shape is an envelope
of kind "unknown" with nothing in it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote_plus

from fabric.core.boundedjson import decode
from fabric.errors import InvalidInput, MalformedEvent

SEAWEED_BUCKETS = "/buckets/"
MAX_SIZE = (1 << 63) - 1  # an object's size must fit the queue's SQLite INTEGER (S3's largest is 5 TiB)


@dataclass(frozen=True)
class ObjectEvent:
    """One object-created event, whatever store sent it."""

    source: str  # "aws", "ceph", "minio", "seaweedfs", … (from eventSource)
    bucket: str
    key: str  # decoded
    size: int | None = None
    etag: str | None = None  # without quotes
    version_id: str | None = None
    sequencer: str | None = None
    name: str = ""  # the store's event name, e.g. "ObjectCreated:Put"

    def __post_init__(self):
        if self.size is not None and not (isinstance(self.size, int) and 0 <= self.size <= MAX_SIZE):
            raise ValueError(f"object size {self.size!r} is not an integer in [0, 2^63)")

    @property
    def dedup(self) -> str:
        """Redelivered copies of one event share this: (bucket, key, versionId or ETag/sequencer)."""
        tag = self.version_id or self.etag or self.sequencer or f"size={self.size}"
        return f"{self.bucket}\x00{self.key}\x00{tag}"


@dataclass(frozen=True)
class Envelope:
    kind: str  # records | minio | seaweedfs | sns-confirm | sns-unsubscribe | test | unknown
    events: tuple[ObjectEvent, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()  # (what, why)
    sns: dict | None = None  # the SNS wrapper, for signature checks and confirmation


def parse(body: bytes) -> Envelope:
    """Parse one request body. Raises MalformedEvent when it is not JSON (or not within
    the bounded decoder's limits: too deep, a huge integer, NaN, Infinity)."""
    obj = decode(body, what="event body", error=MalformedEvent)
    if not isinstance(obj, dict):
        return Envelope("unknown", ignored=(("body", "not a JSON object"),))
    if obj.get("Type") in ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation") \
            and "TopicArn" in obj:
        return _sns(obj)
    return _unwrapped(obj)


def _unwrapped(obj: dict) -> Envelope:
    if "Records" in obj:
        records = obj["Records"] if isinstance(obj["Records"], list) else []
        kind = "minio" if "EventName" in obj else "records"
        return _records(kind, records)
    if "Event" in obj and "TestEvent" in str(obj.get("Event")):
        return Envelope("test", ignored=(("test event", "a store's connectivity test"),))
    if "event_type" in obj and "key" in obj:
        return _seaweedfs(obj)
    return Envelope("unknown", ignored=(("body", "unknown envelope"),))


def _sns(obj: dict) -> Envelope:
    if obj["Type"] == "SubscriptionConfirmation":
        return Envelope("sns-confirm", sns=obj)
    if obj["Type"] == "UnsubscribeConfirmation":
        return Envelope("sns-unsubscribe", sns=obj, ignored=(("sns", "unsubscribe confirmation"),))
    message = obj.get("Message")
    try:
        inner = decode(message if isinstance(message, str) else "", what="SNS Message")
    except InvalidInput:
        return Envelope("unknown", sns=obj, ignored=(("sns", "Message is not JSON"),))
    env = _unwrapped(inner) if isinstance(inner, dict) else Envelope("unknown")
    return Envelope(env.kind, env.events, env.ignored, sns=obj)


# --- AWS / Ceph / MinIO records ------------------------------------------------------------

def _records(kind: str, records: list) -> Envelope:
    events, ignored = [], []
    for i, rec in enumerate(records):
        try:
            ev, why = _record(rec)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            ignored.append((f"record {i}", f"malformed record ({e!r})"))
            continue
        if why:
            ignored.append((f"{ev.bucket}/{ev.key}" if ev else f"record {i}", why))
        else:
            events.append(ev)
    return Envelope(kind, tuple(events), tuple(ignored))


def _record(rec: dict) -> tuple[ObjectEvent | None, str | None]:
    name = str(rec.get("eventName", ""))
    short = name.removeprefix("s3:")
    s3 = rec["s3"]
    obj = s3["object"]
    source = str(rec.get("eventSource", "aws:s3")).split(":", 1)[0] or "aws"
    size = obj.get("size")
    ev = ObjectEvent(
        source=source, bucket=str(s3["bucket"]["name"]), key=unquote_plus(str(obj["key"])),
        size=_size(size), etag=_strip(obj.get("eTag") or obj.get("etag")),
        version_id=obj.get("versionId") or None, sequencer=obj.get("sequencer") or None, name=name)
    if not short.startswith("ObjectCreated:"):
        return ev, "deleted" if short.startswith("ObjectRemoved:") else f"not an object-created event ({name})"
    if ev.key.endswith("/"):
        return ev, "folder marker"
    return ev, None


def _size(size: object) -> int | None:
    """A record's size: an integer, or a string of digits (Ceph); ValueError for anything else."""
    if size in (None, ""):
        return None
    if isinstance(size, bool) or not isinstance(size, (int, str)) or (isinstance(size, str) and not (
            size.isascii() and size.isdigit() and len(size) <= 19)):
        raise ValueError(f"size {str(size)[:40]!r} is not a whole number of bytes")
    return int(size)


def _strip(etag: object) -> str | None:
    return str(etag).strip('"') or None if etag else None


# --- SeaweedFS filer webhook -----------------------------------------------------------------

def _seaweedfs(obj: dict) -> Envelope:
    path, event_type = str(obj.get("key", "")), str(obj.get("event_type", ""))
    msg = obj.get("message") if isinstance(obj.get("message"), dict) else {}
    entry = msg.get("new_entry") if isinstance(msg.get("new_entry"), dict) else None
    if event_type == "rename" and entry and msg.get("new_parent_path"):
        path = f"{str(msg['new_parent_path']).rstrip('/')}/{entry.get('name', '')}"

    def ignore(why: str) -> Envelope:
        return Envelope("seaweedfs", ignored=((path, why),))

    if event_type not in ("create", "update", "rename"):
        return ignore("deleted" if event_type == "delete" else f"event type {event_type!r}")
    if not path.startswith(SEAWEED_BUCKETS):
        return ignore("not under /buckets/ (not an S3 object)")
    bucket, _, key = path[len(SEAWEED_BUCKETS):].partition("/")
    if bucket.startswith(".") or not bucket:
        return ignore("system path")
    if not key:
        return ignore("bucket entry")
    if key.startswith(".uploads/"):
        return ignore("multipart upload part")
    if entry is None or entry.get("is_directory"):
        return ignore("directory")
    attrs = entry.get("attributes") if isinstance(entry.get("attributes"), dict) else {}
    extended = entry.get("extended") if isinstance(entry.get("extended"), dict) else {}
    etag = _b64_text(extended.get("Seaweed-X-Amz-ETag")) or _b64_hex(attrs.get("md5"))
    size = attrs.get("file_size")
    ev = ObjectEvent(source="seaweedfs", bucket=bucket, key=key,
                     size=_size(size) if _whole(size) else None,
                     etag=_strip(etag), name=f"filer:{event_type}")
    return Envelope("seaweedfs", (ev,))


def _whole(size: object) -> bool:
    return (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_SIZE) or (
        isinstance(size, str) and size.isascii() and size.isdigit() and len(size) <= 18)


def _b64_text(value: object) -> str | None:
    try:
        return base64.b64decode(str(value), validate=True).decode() if value else None
    except (binascii.Error, UnicodeDecodeError):
        return None


def _b64_hex(value: object) -> str | None:
    try:
        return base64.b64decode(str(value), validate=True).hex() if value else None
    except binascii.Error:
        return None

