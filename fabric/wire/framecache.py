"""Encoded frames kept for the next peer that asks: a sender encodes each delta once.

A chunk encoded against a reference is the same bytes for every receiver that holds
that reference and accepts the same encodings: an origin serving a new version to its
direct children used to encode it again for each of them. `FrameCache` keeps the frames
the `full` mode made (the fewest bytes the codec finds), by everything that decides
them, within a byte budget, least recently used first out (not one made while the
sender lacked a reference its hint names: that chunk went standalone, a bigger frame
than a later receiver should get).

A relay encodes nothing (`fabric.wire.chunks`): `Forwarded` keeps the delta frames its
own upstream sent it, for its children that hold the same references.

Requests that want a frame another request is encoding wait for it (`claim`, `wait`,
`release`: one encoding per key at a time), so the direct children that all ask for a
new version's deltas at its promote get them encoded once, not once each.

A hit is served whatever mode the peer's policy would pick (docs/encodings.md, "Rate
control"): it costs no codec time and is the fewest bytes, so the policy neither pays
for it nor learns from it. What the cache holds was made from bytes addressed by their
ids (the chunk and its references), so it never goes stale; the receiver checks the
decoded bytes against the chunk id as for any frame. Visibility is decided before the
cache is asked (`fabric.wire.chunks`), so a hit shows no one a chunk they may not see.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

from fabric.core import codec
from fabric.core.lru import LRU
from fabric.core.refplan import ChunkHint

ORIGIN_BYTES = 128 << 20  # an origin's budget: the deltas of a 1 GB version's changed tenth
# A relay's frames from its upstream, for the children that ask for them at once: with 16 MiB
# a hub relaying a delta version to 10 children peaked at 107 MiB, over issue 17's 100
# (bench.relay_memory --size-mb 128 --delta --encode full), with 4 MiB at 95.4-95.6 (1 GB: 98.1).
FORWARD_BYTES = 4 << 20

Frame = tuple[int, int, bytes]  # stream tag, raw size, payload
Key = tuple[str, ChunkHint, int, tuple[str, ...]]


def key(chunk_id: str, hint: ChunkHint, level: int, encodings: Iterable[str]) -> Key:
    """What decides a `full`-mode frame: the chunk, its hint (dtype, references), the zstd
    level and the encodings the receiver accepts."""
    return chunk_id, hint, level, tuple(encodings)


class FrameCache:
    """Encoded frames by `key`, at most `budget` payload bytes in all (0: keep none)."""

    def __init__(self, budget: int):
        self.budget = budget
        self._frames: LRU[Frame] = LRU(budget, weigh=lambda f: len(f[2]))
        self._encoding: dict[Key, asyncio.Future] = {}  # keys a request is encoding now (event loop only)

    def get(self, k: Key) -> Frame | None:
        return self._frames.get(k) if self.budget else None

    def holds_all(self, keys: Iterable[Key]) -> bool:
        """Whether every one of `keys` is held now (a fetch of only those costs no codec time)."""
        return bool(self.budget) and all(self._frames.get(k) is not None for k in keys)

    def put(self, k: Key, frame: tuple[int, int, bytes | memoryview]) -> None:
        if self.budget:
            tag, raw_size, payload = frame
            self._frames.put(k, (tag, raw_size, bytes(payload)))

    def claim(self, k: Key) -> bool:
        """Say this request encodes `k` now (False: another one does, or nothing is kept);
        a True must be followed by `release`."""
        if not self.budget or k in self._encoding:
            return False
        self._encoding[k] = asyncio.get_running_loop().create_future()
        return True

    def release(self, k: Key, frame: tuple[int, int, bytes | memoryview] | None) -> None:
        """End a `claim`: keep `frame` (None: nothing to keep) and hand it to the waiters."""
        if frame is not None:
            self.put(k, frame)
        fut = self._encoding.pop(k, None)
        if fut is not None and not fut.done():
            fut.set_result(self.get(k))

    async def wait(self, k: Key) -> Frame | None:
        """The frame another request is encoding for `k`, once it is done (None if none is,
        or it kept nothing)."""
        fut = self._encoding.get(k)
        return await asyncio.shield(fut) if fut is not None else None

    @property
    def bytes(self) -> int:
        return self._frames.weight

    def __len__(self) -> int:
        return len(self._frames)


class Forwarded:
    """Codec frames a relay received from its upstream, kept for its children.

    Each was decoded here to its chunk id before it is kept (`put`, from the fetch's worker
    thread), by the chunk and the references it names, within `budget` payload bytes, least
    recently used first out. A child whose request plan gives the chunk the same references
    holds them, so it decodes the frame as this relay did, and checks the result against the
    id as for any frame (`get`). The relay neither decodes nor encodes for that child.
    """

    def __init__(self, budget: int = FORWARD_BYTES):
        self._frames: LRU[Frame] = LRU(budget, weigh=lambda f: len(f[2]))

    def put(self, chunk_id: str, tag: int, raw_size: int, payload: bytes | bytearray | memoryview) -> None:
        references = tuple(codec.body_references(tag, payload))
        if references:
            self._frames.put((chunk_id, references), (tag, raw_size, bytes(payload)))

    def get(self, chunk_id: str, hint: ChunkHint, encodings: Iterable[int]) -> Frame | None:
        """The frame for `chunk_id` against `hint`'s references, if kept and of an accepted encoding."""
        if not hint.reference:
            return None
        frame = self._frames.get((chunk_id, (hint.reference, *hint.more)))
        return frame if frame is not None and frame[0] in encodings else None
