"""A small thread-safe LRU map: the bounded caches that apps and clients own.

Used by the plan cache (`fabric.core.refplan.PlanCache`), the per-peer encode
policies (`fabric.core.policy.PeerPolicies`) and the encoded frames a sender keeps
(`fabric.wire.framecache`, bounded by bytes: `weigh`). Pure; never a module-level instance.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most `size` items (with `weigh`: items weighing at most `size` in all); the least
    recently used goes first. An item heavier than `size` alone is not kept."""

    def __init__(self, size: int, weigh: Callable[[V], int] | None = None):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()
        self._weigh = weigh or (lambda _: 1)
        self.weight = 0  # of the items held

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: Hashable, value: V) -> None:
        w = self._weigh(value)
        with self._lock:
            if key in self._items:
                self.weight -= self._weigh(self._items.pop(key))
            if w > self.size:
                return
            self._items[key] = value
            self.weight += w
            while self.weight > self.size:
                self.weight -= self._weigh(self._items.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._items)
