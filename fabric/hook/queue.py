"""The hook's durable queue: accepted events and the checkpoints they belong to (SQLite).

An event is committed here, in WAL mode with `synchronous=FULL` (the commit is on
disk when `add` returns), before the receiver answers 2xx, so a receiver killed at
any moment after acknowledging loses nothing. Redelivered copies of an event share
a `dedup` key (`ObjectEvent.dedup`) and are stored once.

    events       id, dedup (unique), bucket, key, etag, size, source, received,
                 state: pending → done | gone | superseded | late, attempts, next_try, error
    checkpoints  (bucket, prefix) → rule, artifact, version,
                 state: waiting → published | failed (→ waiting again on new objects), first_seen, last_activity,
                 completed_at (newest object), detected, published, manifest_id,
                 promoted, attempts, next_try, error

Every method is one short transaction; one connection is shared under a lock, so
the HTTP handlers (via threads) and the worker thread can both use it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from fabric.hook.envelopes import ObjectEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup TEXT NOT NULL UNIQUE,
    bucket TEXT NOT NULL, key TEXT NOT NULL, etag TEXT, size INTEGER, source TEXT,
    received REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, error TEXT);
CREATE INDEX IF NOT EXISTS events_due ON events(state, next_try);
CREATE TABLE IF NOT EXISTS checkpoints(
    bucket TEXT NOT NULL, prefix TEXT NOT NULL, rule INTEGER NOT NULL,
    artifact TEXT NOT NULL, version TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    first_seen REAL NOT NULL, last_activity REAL NOT NULL, completed_at REAL,
    detected REAL, published REAL, manifest_id TEXT, promoted INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, error TEXT,
    PRIMARY KEY(bucket, prefix));
CREATE INDEX IF NOT EXISTS checkpoints_due ON checkpoints(state, next_try);
"""


class Queue:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- events ------------------------------------------------------------------------------

    def add(self, events: list[ObjectEvent], now: float | None = None) -> tuple[int, int]:
        """Store new events durably; returns (queued, duplicates)."""
        now = time.time() if now is None else now

        def run(db):
            queued = 0
            for ev in events:
                cur = db.execute(
                    "INSERT OR IGNORE INTO events(dedup, bucket, key, etag, size, source, received) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (ev.dedup, ev.bucket, ev.key, ev.etag, ev.size, ev.source, now))
                queued += cur.rowcount
            return queued
        queued = self._tx(run) if events else 0
        return queued, len(events) - queued

    def due_events(self, now: float, limit: int = 200) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM events WHERE state='pending' AND next_try<=? ORDER BY id LIMIT ?",
                          (now, limit))

    def finish_event(self, event_id: int, state: str, error: str | None = None) -> None:
        self._tx(lambda db: db.execute("UPDATE events SET state=?, error=? WHERE id=?", (state, error, event_id)))

    def retry_event(self, event_id: int, next_try: float, error: str) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE events SET attempts=attempts+1, next_try=?, error=? WHERE id=?", (next_try, error, event_id)))

    def event_attempts(self, event_id: int) -> int:
        rows = self._read("SELECT attempts FROM events WHERE id=?", (event_id,))
        return rows[0]["attempts"] if rows else 0

    def prune(self, before: float) -> int:
        """Forget finished events received before `before` (their dedup window is over)."""
        return self._tx(lambda db: db.execute(
            "DELETE FROM events WHERE state!='pending' AND received<?", (before,)).rowcount)

    # --- checkpoints ---------------------------------------------------------------------------

    def touch(self, *, bucket: str, prefix: str, rule: int, artifact: str, version: str, now: float,
              event_id: int | None = None) -> tuple[str, float | None]:
        """Note activity on a checkpoint (creating it as waiting) and finish the event that
        caused it, in one transaction. Returns the checkpoint's state and `completed_at`."""

        def run(db):
            row = db.execute("SELECT state, completed_at FROM checkpoints WHERE bucket=? AND prefix=?",
                             (bucket, prefix)).fetchone()
            completed_at = row["completed_at"] if row else None
            if row is None:
                db.execute("INSERT INTO checkpoints(bucket, prefix, rule, artifact, version, first_seen, "
                           "last_activity, next_try) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (bucket, prefix, rule, artifact, version, now, now, now))
                state = "waiting"
            else:
                state = row["state"]
                if state == "failed":  # new objects may fix what failed (a rewritten shard): try again
                    state = "waiting"
                    db.execute("UPDATE checkpoints SET state='waiting', attempts=0, detected=NULL "
                               "WHERE bucket=? AND prefix=?", (bucket, prefix))
                if state == "waiting":
                    db.execute("UPDATE checkpoints SET last_activity=?, next_try=? WHERE bucket=? AND prefix=?",
                               (now, now, bucket, prefix))
            if event_id is not None:
                db.execute("UPDATE events SET state=? WHERE id=?",
                           ("done" if state == "waiting" else "late", event_id))
            return state, completed_at
        return self._tx(run)

    def wake_bucket(self, bucket: str, now: float) -> None:
        """Re-evaluate every waiting checkpoint of `bucket` now (a tracker file changed)."""
        self._tx(lambda db: db.execute(
            "UPDATE checkpoints SET next_try=? WHERE bucket=? AND state='waiting'", (now, bucket)))

    def known(self, bucket: str, prefix: str) -> bool:
        return bool(self._read("SELECT 1 FROM checkpoints WHERE bucket=? AND prefix=?", (bucket, prefix)))

    def due_checkpoints(self, now: float) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM checkpoints WHERE state='waiting' AND next_try<=? "
                          "ORDER BY last_activity, prefix", (now,))

    def checkpoint(self, bucket: str, prefix: str) -> sqlite3.Row | None:
        rows = self._read("SELECT * FROM checkpoints WHERE bucket=? AND prefix=?", (bucket, prefix))
        return rows[0] if rows else None

    def update_checkpoint(self, bucket: str, prefix: str, **fields) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._tx(lambda db: db.execute(f"UPDATE checkpoints SET {cols} WHERE bucket=? AND prefix=?",
                                       (*fields.values(), bucket, prefix)))

    def newer_promoted(self, rule: int, artifact: str, completed_at: float, prefix: str) -> bool:
        """Whether a later checkpoint of the same rule and artifact is already on the channel."""
        return bool(self._read(
            "SELECT 1 FROM checkpoints WHERE rule=? AND artifact=? AND promoted=1 AND prefix!=? "
            "AND (completed_at>? OR (completed_at=? AND prefix>?))",
            (rule, artifact, prefix, completed_at, completed_at, prefix)))

    def next_due(self) -> float | None:
        """When the earliest pending event or waiting checkpoint is due (None: nothing to do)."""
        rows = self._read("SELECT MIN(next_try) FROM events WHERE state='pending' UNION ALL "
                          "SELECT MIN(next_try) FROM checkpoints WHERE state='waiting'")
        due = [r[0] for r in rows if r[0] is not None]
        return min(due) if due else None

    def checkpoints(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM checkpoints ORDER BY first_seen, prefix")]

    # --- numbers for /metrics ------------------------------------------------------------------

    def stats(self, now: float) -> dict:
        with self._lock:
            pending = self._db.execute(
                "SELECT COUNT(*), MIN(received) FROM events WHERE state='pending'").fetchone()
            by_state = dict(self._db.execute("SELECT state, COUNT(*) FROM checkpoints GROUP BY state").fetchall())
            waiting = self._db.execute(
                "SELECT MIN(first_seen) FROM checkpoints WHERE state='waiting'").fetchone()[0]
        return {"depth": pending[0], "lag": now - pending[1] if pending[1] else 0.0,
                "checkpoints": by_state, "oldest_waiting": now - waiting if waiting else 0.0}

    def writable(self) -> bool:
        try:
            self._tx(lambda db: db.execute("SELECT 1"))
            return True
        except sqlite3.Error:
            return False
