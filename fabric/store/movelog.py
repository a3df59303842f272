"""The move log: an append-only record, in the store, of the moves origins make through it.

Several origins may serve one store (an S3 bucket). Each announces the changes made
through its own API on its event stream; the move log is how the others learn of them
within a poll (docs/formats.md "log/<seq>"):

    log/<20 digits>      one entry per version commit or channel move, numbered 1, 2, 3, …

An entry is created once, by a compare-and-swap from absent (`If-None-Match: *` on S3),
at the number after the highest one the writer lists, so two writers never take the
same number and the numbers have no holes; a writer that loses the race lists again
and takes the next. Readers list the keys after the last one they read (S3's
`StartAfter`: one request however long the log). After writing entry N a writer deletes
entry N - `KEEP`, so the log holds about `KEEP` entries; a reader that finds the first
entry after its cursor missing (it fell more than `KEEP` behind) is told so (`gap`).

Entries are hints, not the truth: the channel ref is the truth, and a reader re-reads
it (two moves of one channel may be logged in the other order than they were made).
Blocking I/O: async callers run these in threads.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Iterator

from fabric.core.boundedjson import decode as decode_json
from fabric.errors import Conflict, FabricError, NotFound
from fabric.store.backend import ObjectInfo
from fabric.store.store import Store

PREFIX = "log/"
DIGITS = 20
KEEP = 1024  # entries kept behind the newest
ENTRY_MAX = 16 << 10  # the largest entry a reader reads
EVENT_TYPES = ("version", "channel")
_CAS_TRIES = 30


@dataclass(frozen=True)
class Entry:
    seq: int
    origin: str  # the writing origin process's id
    at: float  # Unix seconds, the writer's clock
    event: dict | None  # the event, without `seq` and `at`; None: an entry that does not parse


def entry_key(seq: int) -> str:
    return f"{PREFIX}{seq:0{DIGITS}d}"


def _seq_of(key: str) -> int | None:
    tail = key[len(PREFIX):]
    return int(tail) if key.startswith(PREFIX) and len(tail) == DIGITS and tail.isdigit() else None


class MoveLog:
    """The move log of `store`, written as origin `writer`."""

    def __init__(self, store: Store, writer: str):
        self.store, self.writer = store, writer
        self._known = 0  # the highest seq this process saw or wrote (where a writer's listing starts)

    def _listed(self, after: int) -> Iterator[tuple[int, ObjectInfo]]:
        """(seq, info) of the entries after `after`, in order."""
        backend = self.store.backend
        if backend.capabilities.list_after:
            infos = backend.list_after(PREFIX, entry_key(after)) if after else backend.list(PREFIX)
        else:
            infos = sorted(backend.list(PREFIX), key=lambda i: i.key)
        for info in infos:
            seq = _seq_of(info.key)
            if seq is not None and seq > after:
                yield seq, info

    def head(self) -> int:
        """The newest entry's number (0: an empty log)."""
        newest = self._known
        for seq, _ in self._listed(self._known):
            newest = max(newest, seq)
        self._known = newest
        return newest

    def read_after(self, after: int, limit: int = KEEP) -> tuple[list[Entry], bool]:
        """Up to `limit` entries after `after`, oldest first, and whether some between `after` and
        the first of them are gone (the reader fell more than `KEEP` behind)."""
        entries: list[Entry] = []
        for seq, info in self._listed(after):
            if len(entries) >= limit:
                break
            entries.append(self._read(seq, info))
        gap = bool(entries) and after > 0 and entries[0].seq > after + 1
        if entries:
            self._known = max(self._known, entries[-1].seq)
        return entries, gap

    def _read(self, seq: int, info: ObjectInfo) -> Entry:
        if info.size > ENTRY_MAX:
            return Entry(seq, "", 0.0, None)
        try:
            obj = decode_json(self.store.backend.get(info.key), what=f"move log entry {seq}")
            event = obj["event"]
            if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
                raise TypeError("not a version or channel event")
            return Entry(seq, str(obj["origin"]), float(obj["at"]), event)
        except NotFound:
            return Entry(seq, "", 0.0, None)  # pruned meanwhile
        except (FabricError, KeyError, TypeError, ValueError):
            return Entry(seq, "", 0.0, None)

    def append(self, event: dict) -> int:
        """Log `event` (a `version` or `channel` event, without `seq` and `at`) as the next entry; its number."""
        event = {k: v for k, v in event.items() if k not in ("seq", "at")}
        for attempt in range(_CAS_TRIES):
            seq = self.head() + 1
            body = json.dumps({"seq": seq, "origin": self.writer, "at": time.time(), "event": event},
                              sort_keys=True).encode()
            try:
                self.store.backend.put_if(entry_key(seq), body, None)
            except Conflict:
                self._known = max(self._known, seq)
                time.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** attempt)))
                continue
            self._known = max(self._known, seq)
            if seq > KEEP:
                self.store.backend.delete(entry_key(seq - KEEP))
            return seq
        raise Conflict(f"the move log kept growing under this writer; gave up after {_CAS_TRIES} tries")
