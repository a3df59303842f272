"""The bounded LRU map (fabric.core.lru): by count, and by weight."""

from __future__ import annotations

from fabric.core.lru import LRU


def test_the_least_recently_used_goes_first():
    lru: LRU[int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the oldest
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)
    assert len(lru) == 2


def test_weighed_items_stay_within_the_budget_and_a_too_heavy_one_is_not_kept():
    lru: LRU[bytes] = LRU(10, weigh=len)
    lru.put("a", b"x" * 4)
    lru.put("b", b"x" * 4)
    assert lru.weight == 8
    lru.put("c", b"x" * 4)  # 12 > 10: "a" goes
    assert lru.get("a") is None and lru.weight == 8
    lru.put("b", b"x")  # replacing an item takes its old weight off
    assert lru.weight == 5
    lru.put("huge", b"x" * 11)
    assert lru.get("huge") is None and lru.weight == 5 and len(lru) == 2
