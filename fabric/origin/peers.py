"""Origins over one store: each tells the others of its moves through the store's move log.

An origin's event stream announces what is done through its own API. With several
origins on one bucket, `MoveWatch` makes each stream announce the others' moves too,
within about `poll` seconds (docs/protocol.md "Several origins over one store"):

* `record(event)`: after a version commit or a channel move, the origin appends the
  event to the move log (`fabric.store.movelog`); a failed append is logged and
  counted, never the request's error (the move is made; the others' periodic re-syncs
  still find it);
* a background task lists the log after its cursor every `poll` seconds (one request)
  and appends each entry another origin wrote to this origin's `EventLog`: a `version`
  entry as it is, a `channel` entry after re-reading the channel's ref (the ref is the
  truth: the event names the channel's version now, whatever order moves were logged
  in; several entries for one channel in one poll make one event). The cursor starts
  at the log's head when the origin starts: earlier moves are what its followers'
  first re-sync reads.
* a reader that fell more than `KEEP` entries behind has missed moves: it starts a new
  epoch of its event log, so every follower re-syncs (`EventLog.new_epoch`).

`SharingOptions.move_log` says whether the log is used: by default on a store that is
not a local folder (an S3 bucket: the store several origins share).

Metrics: `fabric_origin_move_log_entries_total{direction}` (`written`, `read`: entries
of other origins re-emitted), `fabric_origin_move_log_errors_total{op}` (`append`, `poll`),
`fabric_origin_move_log_lag_seconds` (a histogram: an entry's writer time to its re-emission here).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from fabric.errors import FabricError
from fabric.logs import get_logger
from fabric.store.movelog import Entry, MoveLog
from fabric.store.registry import Registry
from fabric.store.store import Store
from fabric.wire.events import EventLog

log = get_logger("origin")
POLL = 0.5  # seconds between listings of the move log


@dataclass(frozen=True)
class SharingOptions:
    """What origins over one store share. `move_log` None: on unless the store is a local folder."""

    move_log: bool | None = None
    poll: float = POLL
    report_save: float = 2.0  # seconds: a changed site report is in the store within about this
    report_refresh: float = 15.0  # seconds between reads of the reports other origins stored

    def uses_log(self, store: Store) -> bool:
        return self.move_log if self.move_log is not None else not store.capabilities.files


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.entries = Counter("fabric_origin_move_log_entries", "Move log entries written here, or read "
                               "from other origins and re-emitted", ["direction"], registry=registry)
        self.errors = Counter("fabric_origin_move_log_errors", "Move log appends or polls that failed",
                              ["op"], registry=registry)
        self.lag = Histogram("fabric_origin_move_log_lag_seconds", "From an entry's writing (its writer's clock) "
                             "to its re-emission here", registry=registry,
                             buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))


class MoveWatch:
    """This origin's writer and reader of its store's move log."""

    def __init__(self, store: Store, events: EventLog, registry: CollectorRegistry, poll: float = POLL):
        self.id = uuid.uuid4().hex[:12]  # this process, as the writer of its entries
        self.log, self.events, self.registry = MoveLog(store, self.id), events, Registry(store)
        self.poll, self.cursor = poll, 0
        self.metrics = _Metrics(registry)

    async def record(self, event: dict) -> None:
        """Log a version or channel event this origin just emitted."""
        try:
            await asyncio.to_thread(self.log.append, event)
            self.metrics.entries.labels("written").inc()
        except FabricError as e:
            self.metrics.errors.labels("append").inc()
            log.warning("move log append failed", error=e.code, message=e.message[:300])

    async def run(self) -> None:
        """Re-emit the other origins' entries, every `poll` seconds, until cancelled."""
        while True:
            try:
                self.cursor = await asyncio.to_thread(self.log.head)
                break
            except FabricError as e:
                self.metrics.errors.labels("poll").inc()
                log.warning("move log unreadable", error=e.code, message=e.message[:300])
                await asyncio.sleep(max(self.poll, 1.0))
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.poll_once()
            except FabricError as e:
                self.metrics.errors.labels("poll").inc()
                log.warning("move log poll failed", error=e.code, message=e.message[:300])
            except Exception as e:  # noqa: BLE001 - a bug, or an entry we cannot take: the watch outlives it
                self.metrics.errors.labels("poll").inc()
                log.error("move log poll failed", error="internal", message=f"{type(e).__name__}: {e}"[:300])

    async def poll_once(self) -> int:
        """Read the entries after the cursor and re-emit the other origins'; how many events it emitted."""
        entries, gap = await asyncio.to_thread(self.log.read_after, self.cursor)
        if not entries:
            return 0
        if gap:
            log.warning("move log entries missed: followers re-sync", after=self.cursor, next=entries[0].seq)
            self.events.new_epoch()
        foreign = [e for e in entries if e.event is not None and e.origin != self.id]
        events = await asyncio.to_thread(self._events_of, foreign)
        wall = time.time()
        for entry, event in events:
            self.events.append(event)
            self.metrics.entries.labels("read").inc()
            self.metrics.lag.observe(max(0.0, wall - entry.at))
        self.cursor = entries[-1].seq
        return len(events)

    def _events_of(self, entries: list[Entry]) -> list[tuple[Entry, dict]]:
        """The events to emit for `entries` (in a thread: channel refs are read here)."""
        last = {}  # (artifact, channel) -> index of its last entry
        for i, e in enumerate(entries):
            if e.event["type"] == "channel":
                last[(e.event.get("artifact"), e.event.get("channel"))] = i
        out = []
        for i, e in enumerate(entries):
            event = dict(e.event)
            if event["type"] == "channel":
                key = (event.get("artifact"), event.get("channel"))
                if last[key] != i:
                    continue
                try:
                    event["version"] = self.registry.channel(str(key[0]), str(key[1])).version
                except FabricError:
                    continue  # a name that is not one, or a channel gone: nothing to follow
            out.append((e, event))
        return out


def move_watch(store: Store, events: EventLog, registry: CollectorRegistry,
               options: SharingOptions) -> MoveWatch | None:
    """The origin's move log watch, or None where the store's origins do not share one."""
    return MoveWatch(store, events, registry, options.poll) if options.uses_log(store) else None


def watching(key: web.AppKey):
    """A cleanup context running the app's `MoveWatch` at `key` (if any) for the app's life."""
    async def ctx(app: web.Application):
        watch = app.get(key)
        task = asyncio.create_task(watch.run()) if watch is not None else None
        yield
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return ctx
