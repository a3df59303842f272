"""Reference planning: which chunk the receiver holds is likely close to each new chunk.

Owns `ChunkHint` (a chunk's tensor dtype and a reference), `Plan` and
`plan_references`, specified in docs/encodings.md ("Choosing references"). A receiver
that asks for the chunks of version `v2` says which versions of the artifact it
already holds (`have`, newest first). For every chunk of `v2` the sender finds a hint:
for a tensor segment, the same tensor (same file and name; failing that, the same
name in another file) and the same segment index in the newest held version that has
the tensor with the same dtype. For any other chunk (the safetensors header, FastCDC
chunks of other files) it is the chunk of the same file in the newest held version
that covers the same region, found by lining the unchanged chunks of the two versions
up (so an edit or an append refers to the bytes around it); the hint also names the
old chunks on both sides of the edit that the chunk's bytes may come from, for
`multipatch`.

`PlanCache` keeps plans by manifest ids (manifests are immutable); whoever serves
chunks owns one. Pure: manifests in, hints out; no store, no registry, no I/O.
"""

from __future__ import annotations

import bisect
from itertools import zip_longest
from dataclasses import dataclass
from typing import Sequence

from fabric.core.lru import LRU
from fabric.core.manifest import FileEntry, Manifest, TensorEntry

_MORE = 7  # further references per chunk (`multipatch` names at most 8 in all)


@dataclass(frozen=True, slots=True)
class ChunkHint:
    """What the sender knows about one chunk: its tensor's dtype and a reference the receiver holds."""

    dtype: str | None = None
    reference: str | None = None
    more: tuple[str, ...] = ()  # further references (only with `reference`), for `multipatch`


STANDALONE = ChunkHint()
Plan = dict[str, ChunkHint]


def plan_references(target: Manifest, have: Sequence[Manifest]) -> Plan:
    """A hint for every chunk of `target`, with references into the chunks of `have`.

    `have` are versions the receiver holds (any order; the newest by `created` is
    preferred). A reference equal to the chunk itself is dropped: the receiver has it.
    """
    newest = sorted(have, key=lambda m: m.created, reverse=True)
    tensor_index = [_TensorIndex(m) for m in newest]
    plan: Plan = {}
    for t in sorted(target.tensors, key=lambda t: (t.file, t.name)):
        for segment, cid in enumerate(t.chunks):
            ref = _tensor_reference(t, segment, tensor_index)
            hint = ChunkHint(t.dtype, ref if ref != cid else None)
            if cid not in plan or (hint.reference and not plan[cid].reference):
                plan[cid] = hint
    files = [{f.path: f for f in m.files} for m in newest]
    for f in target.files:
        old = next((index[f.path] for index in files if f.path in index), None)
        refs = _region_references(f, old) if old else [(None, ())] * len(f.chunks)
        for (cid, _), (ref, more) in zip(f.chunks, refs):
            if cid not in plan:
                more = tuple(m for m in more if m not in (cid, ref))
                plan[cid] = ChunkHint(None, ref, more) if ref not in (cid, None) else ChunkHint()
    return plan


class _TensorIndex:
    def __init__(self, m: Manifest):
        self.by_key = {(t.file, t.name): t for t in m.tensors}
        by_name: dict[str, list[TensorEntry]] = {}
        for t in m.tensors:
            by_name.setdefault(t.name, []).append(t)
        self.by_name = {name: ts[0] for name, ts in by_name.items() if len(ts) == 1}

    def find(self, t: TensorEntry) -> TensorEntry | None:
        """The same tensor: same file and name, else the only tensor of that name (it moved file)."""
        return self.by_key.get((t.file, t.name)) or self.by_name.get(t.name)


def _tensor_reference(t: TensorEntry, segment: int, index: list[_TensorIndex]) -> str | None:
    for held in index:
        old = held.find(t)
        if old is not None and old.dtype == t.dtype and segment < len(old.chunks):
            return old.chunks[segment]
    return None


def _region_references(new: FileEntry, old: FileEntry) -> list[tuple[str | None, tuple[str, ...]]]:
    """Per chunk of `new`: the chunk of `old` covering the same region (None if
    unchanged), and further old chunks it may copy from.

    Chunks both files share are anchors. A run of new chunks between two anchors
    replaced the old chunks between the same anchors: each new chunk refers to the old
    chunk at the same relative position; it also names (at most 7) further old chunks
    of the span: those its bytes would cover if the run were lined up with the span's
    start, and with its end (taken in turns, from the start of the one and the end of
    the other). After a deletion or an insertion one alignment holds
    before the change and the other after it, so a chunk joining the head of one old
    chunk to the tail of another names both. A pure insertion (nothing between the old
    anchors), an append included, refers to the anchor before it: similar bytes.
    """
    old_ids = [cid for cid, _ in old.chunks]
    position = {}
    for i, cid in enumerate(old_ids):
        position.setdefault(cid, i)
    old_starts = [0]
    for _, n in old.chunks:
        old_starts.append(old_starts[-1] + n)
    refs: list[tuple[str | None, tuple[str, ...]]] = [(None, ())] * len(new.chunks)
    i = 0
    while i < len(new.chunks):
        if new.chunks[i][0] in position:
            i += 1
            continue
        k = i
        while k < len(new.chunks) and new.chunks[k][0] not in position:
            k += 1
        left = position[new.chunks[i - 1][0]] if i > 0 else -1
        right = position[new.chunks[k][0]] if k < len(new.chunks) else len(old_ids)
        if left >= right:  # anchors out of order (content moved): line up by offset instead
            left, right = -1, len(old_ids)
        if right - left > 1:  # old chunks left..right (exclusive) were replaced by new i..k
            lo, hi = old_starts[left + 1], old_starts[right]
            run = sum(n for _, n in new.chunks[i:k])
            at = 0
            for j in range(i, k):
                offset = lo + (at * (hi - lo) // run if run else 0)
                ref = old_ids[min(bisect.bisect_right(old_starts, offset) - 1, right - 1)]
                size = new.chunks[j][1]
                # the old chunks under this one when the run is lined up with the span's
                # start, then with its end: the bytes before and after an edit
                heads = list(_covering(old_starts, lo + at, lo + at + size, lo, hi))
                tails = list(_covering(old_starts, hi - run + at, hi - run + at + size, lo, hi))[::-1]
                near = [m for pair in zip_longest(heads, tails) for m in pair if m is not None]
                more = tuple(dict.fromkeys(old_ids[m] for m in near if old_ids[m] != ref))
                refs[j] = (ref, more[:_MORE])
                at += size
        else:
            anchor = left if left >= 0 else right
            if 0 <= anchor < len(old_ids):
                for j in range(i, k):
                    refs[j] = (old_ids[anchor], ())
        i = k
    return refs


def _covering(starts: list[int], a: int, b: int, lo: int, hi: int) -> range:
    """Indices of the old chunks (`starts`: their offsets, then the end) overlapping [a, b) ∩ [lo, hi)."""
    a, b = max(a, lo), min(b, hi)
    if a >= b:
        return range(0)
    return range(bisect.bisect_right(starts, a) - 1, bisect.bisect_left(starts, b))


class PlanCache:
    """Plans by (target manifest id, held manifest ids): the same request is planned once."""

    def __init__(self, size: int = 32):
        self._plans: LRU[Plan] = LRU(size)

    def get(self, target_id: str, have_ids: Sequence[str]) -> Plan | None:
        return self._plans.get((target_id, tuple(have_ids)))

    def put(self, target_id: str, have_ids: Sequence[str], plan: Plan) -> None:
        self._plans.put((target_id, tuple(have_ids)), plan)


__all__ = ["ChunkHint", "STANDALONE", "Plan", "plan_references", "PlanCache"]
