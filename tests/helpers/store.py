"""Stores in tests: publish into and pull from a local store through the library, look
at the chunk files a store holds, and race compare-and-swap writers against it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from fabric.errors import Conflict
from fabric.publish import LocalTarget, publish
from fabric.pull import materialize
from fabric.store.registry import Registry


# --- library round trips -----------------------------------------------------------------

def publish_local(store, src, artifact="model", version="v1", **kw):
    return publish(src, artifact=artifact, target=LocalTarget(store), version=version, **kw)


def pull_local(store, artifact, version, dest, **kw):
    m = Registry(store).manifest(artifact, version)
    materialize(store, m, dest, **kw)
    return m


# --- a local store's files ------------------------------------------------------------------

def chunk_files(store_root: Path) -> list[Path]:
    base = Path(store_root) / "chunks"
    return [Path(d, n) for d, _, names in os.walk(base) for n in names] if base.exists() else []


def chunk_count(store_root: Path) -> int:
    return len(chunk_files(store_root))


def stored_payload_size(store_root: Path, chunk_id: str) -> int:
    """Payload bytes of a stored chunk (its file less the one-byte encoding tag)."""
    h = chunk_id.split(":", 1)[1]
    return (Path(store_root) / "chunks" / h[:2] / h).stat().st_size - 1


# --- compare-and-swap races ---------------------------------------------------------------------

def count_up_concurrently(get, cas, *, threads: int, per_thread: int) -> int:
    """Increment a counter from `threads` threads, `per_thread` times each, by
    compare-and-swap (`cas(new, expected)` raises Conflict on a lost race); return
    the final value read with `get()`. A CAS that loses nothing gives threads × per_thread."""
    def bump():
        for _ in range(per_thread):
            while True:
                cur = get()
                try:
                    cas(str(int(cur) + 1).encode(), cur)
                    break
                except Conflict:
                    continue
    ts = [threading.Thread(target=bump) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return int(get())
