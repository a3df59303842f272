"""The commit fence: how garbage collection and commits agree on which chunks are live.

gc decides what to delete from listings; a commit makes chunks live by writing a
version ref. Unfenced, a commit that lands between gc's mark and its sweep names
chunks the sweep then deletes. The fence (docs/formats.md, "Garbage collection and
commits") is a handshake over two kinds of objects, each written by one
single-object put or compare-and-swap, so it holds on a local folder and on S3 alike:

    gc/sweep              the sweep lease: held by at most one gc, renewed while it runs
    gc/intents/<32 hex>   a commit intent: the manifest id a commit in progress will name

A committer writes its manifest, then its intent, then waits while a live sweep lease
exists, and only then checks that every chunk is present and writes the version ref;
it deletes the intent last. gc takes the lease, then lists intents and refs, marks,
and deletes only while its lease is valid. Whichever of the two writes second sees
the other's write: gc sees the intent (and keeps its chunks), or the committer sees
the lease (and checks its chunks only after that sweep is over).

The lease object is never deleted: it is `held` (a gc's id and a beat that every
renewal changes) or free (`released`, or `broken` by a committer that saw it
unchanged for `LEASE` seconds of its own clock: a gc that died). Liveness rests on
that timeout; safety on gc deleting nothing more than `LEASE`/2 after its last
successful renewal began, so a break can only come after gc stopped deleting.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fabric.errors import Conflict, GcLeaseLost, GcRunning, NotFound
from fabric.store.store import Store

SWEEP_KEY = "gc/sweep"
INTENTS = "gc/intents/"
LEASE = 60.0  # seconds without a renewal after which a sweep lease counts as dead
INTENT_TTL = 24 * 3600.0  # an intent older than this (by the store's clock) no longer protects
COMMIT_WAIT = 600.0  # how long a commit waits for a live sweep to end before it gives up
_POLL = 0.05


# --- the lease record ---------------------------------------------------------------------

def _record(**fields) -> bytes:
    return json.dumps(fields, sort_keys=True).encode()


def _state(raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except ValueError:
        return {"state": "broken"}
    return obj if isinstance(obj, dict) else {"state": "broken"}


def _is_held(raw: bytes | None) -> bool:
    return raw is not None and _state(raw).get("state") == "held"


def _read(store: Store) -> bytes | None:
    try:
        return store.backend.get(SWEEP_KEY)
    except NotFound:
        return None


class SweepLease:
    """gc's hold on `gc/sweep` while it marks and deletes (a context manager).

    `started` is the store's own time of the acquiring write (the object's mtime), the
    "now" against which gc measures ages: no clock of this machine is compared with S3's.
    """

    def __init__(self, store: Store, *, lease: float | None = None):
        self.store, self.lease = store, LEASE if lease is None else lease
        self.id = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.started = 0.0
        self._bytes: bytes | None = None
        self._last_ok = 0.0  # monotonic time at which the last successful write began
        self._lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new(self, beat: int) -> bytes:
        return _record(state="held", id=self.id, owner=self.owner, beat=beat)

    def acquire(self) -> None:
        """Take the lease; GcRunning if another gc holds it and renews it."""
        seen, since = None, time.monotonic()
        while True:
            current = _read(self.store)
            if not _is_held(current):
                if self._swap(current, self._new(0)):
                    break
                continue
            if seen is not None and current != seen:
                raise GcRunning(f"another gc is sweeping {self.store} ({_state(current).get('owner')})")
            if seen is None:
                seen, since = current, time.monotonic()
            elif time.monotonic() - since >= self.lease:  # not renewed for a whole lease: it died
                if self._swap(current, self._new(0)):
                    break
                seen = None
            time.sleep(min(_POLL * 4, self.lease / 8))
        self.started = next(iter(self.store.backend.list(SWEEP_KEY))).mtime
        self._thread = threading.Thread(target=self._renew_loop, name="fabric-gc-lease", daemon=True)
        self._thread.start()

    def _swap(self, expected: bytes | None, new: bytes) -> bool:
        began = time.monotonic()
        try:
            self.store.backend.put_if(SWEEP_KEY, new, expected)
        except Conflict:
            return False
        with self._lock:
            self._bytes, self._last_ok = new, began
        return True

    def _renew_loop(self) -> None:
        beat = 0
        while not self._stop.wait(self.lease / 4):
            beat += 1
            with self._lock:
                if self._lost:
                    return
                current = self._bytes
            if not self._swap(current, self._new(beat)):
                with self._lock:
                    self._lost = True  # broken by a committer, or taken over: delete nothing more
                return

    def valid(self) -> bool:
        with self._lock:
            return not self._lost and time.monotonic() - self._last_ok < self.lease / 2

    def check(self) -> None:
        """Raise GcLeaseLost unless gc may still delete: call before every delete."""
        if not self.valid():
            raise GcLeaseLost(f"gc lost its sweep lease on {self.store}; it stopped deleting (run it again)")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            current, lost = self._bytes, self._lost
        if not lost:
            self._swap(current, _record(state="released", id=self.id))  # a conflict: someone took it over

    def __enter__(self) -> "SweepLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def wait_for_sweeps(store: Store, *, timeout: float | None = None) -> None:
    """Return once no live gc holds the sweep lease (a committer's step after writing its intent).

    A lease unchanged for `LEASE` seconds is broken (its gc died). GcRunning after `timeout`.
    """
    timeout = COMMIT_WAIT if timeout is None else timeout
    start = time.monotonic()
    seen, since = None, start
    while True:
        current = _read(store)
        if not _is_held(current):
            return
        now = time.monotonic()
        if current != seen:
            seen, since = current, now
        elif now - since >= LEASE:
            try:
                store.backend.put_if(SWEEP_KEY, _record(state="broken", id=_state(current).get("id")), current)
                return
            except Conflict:
                seen = None
                continue
        if now - start >= timeout:
            raise GcRunning(f"a gc has been sweeping {store} for {now - start:.0f}s; commit again later")
        time.sleep(_POLL)


# --- intents ------------------------------------------------------------------------------

@dataclass
class Intent:
    key: str
    manifest_id: str
    written: float  # monotonic time before the intent was written

    def check_age(self) -> None:
        """Conflict if this intent may have expired: the commit took too long to be safe."""
        if time.monotonic() - self.written >= INTENT_TTL / 2:
            raise Conflict(f"a commit of {self.manifest_id} took longer than {INTENT_TTL / 2:.0f}s; commit again")


def write_intent(store: Store, manifest_id: str) -> Intent:
    intent = Intent(INTENTS + uuid.uuid4().hex, manifest_id, time.monotonic())
    store.backend.put(intent.key, _record(manifest=manifest_id))
    return intent


def delete_intent(store: Store, intent: Intent) -> None:
    store.backend.delete(intent.key)


def intent_roots(store: Store, now: float, *, expire: bool) -> tuple[set[str], int]:
    """The manifest ids of the live intents, and how many expired ones there were
    (deleted with `expire`). `now` is the store's time (`SweepLease.started`)."""
    roots, expired = set(), 0
    for info in list(store.backend.list(INTENTS)):
        if info.mtime < now - INTENT_TTL:
            expired += 1
            if expire:
                store.backend.delete(info.key)
            continue
        try:
            mid = _state(store.backend.get(info.key)).get("manifest")
        except NotFound:
            continue  # its commit finished meanwhile: its ref is listed after this
        if isinstance(mid, str):
            roots.add(mid)
    return roots, expired
