"""Fewest bytes on the wire: tensor-aware references, per-chunk encodings, rate control.

The codec (`fabric.core.codec`) encodes one chunk given its dtype and a reference. This
module decides, for a whole version, what those are, and carries the results over
the chunk stream:

* **Planning** (`plan_references`). A receiver that asks for the chunks of version
  `v2` says which versions of the artifact it already holds (`have`, newest first).
  For every chunk of `v2` the sender finds a `ChunkHint`: the chunk's dtype (its
  tensor's, or None) and a *reference*, a chunk the receiver holds that is likely
  close to it. For a tensor segment that is the same tensor (same file and name;
  failing that, the same name in another file) and the same segment index in the
  newest held version that has the tensor with the same dtype. For any other chunk
  (the safetensors header, FastCDC chunks of other files) it is the chunk of the same
  file in the newest held version that covers the same region, found by lining the
  unchanged chunks of the two versions up (so an edit or an append refers to the
  bytes around it).
* **Stream tags** (`encode_chunk`, `decode_chunk`). A chunk frame carries the codec's
  tag (0 raw, 1 zstd, 2 bytegroup, 3 xor, 4 patch), the raw size, and as payload the
  codec payload *without* its 6-byte header, which the frame's own fields replace.
  Tags 0 and 1 so mean exactly what they meant before: the store's raw and zstd
  forms, which a sender may forward as they are.
* **Negotiation** (`request_fields`, `fetch_body`, `plan_for_request`). The fetch
  request body gains optional fields; a sender that cannot use them (an old one, or
  one that lacks the manifests) ignores them and serves stored forms.
* **Rate control** (`EncodePolicy`). Encoding costs CPU; on a link faster than the
  codec it would make a sync slower. The sender times its encoding and its socket
  writes and picks, per chunk, the mode predicted fastest.
* **Manifests** (`serve_manifest`, `read_manifest_body`). A receiver that holds an
  older version asks for the new manifest as a zstd patch against the old one: the
  unchanged chunk ids, most of a manifest, then cost almost nothing.
* **Publishing** (`encode_upload`). A publisher has no older bytes: it encodes
  standalone (byte planes for float tensors, by the dtype from the safetensors header).

Everything here is blocking, CPU-bound work that async callers run in threads,
except `plan_for_request` and `serving_getter`, which do that themselves.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Awaitable, Callable, Iterable, Sequence

import zstandard

from fabric.core import codec

from fabric.core import digest
from fabric.core.codec import Encoding
from fabric.errors import BadFrame, CorruptChunk, FabricError, InvalidInput, NotFound, ReferenceMismatch
from fabric.core.manifest import FileEntry, Manifest, TensorEntry, check_name
from fabric.store.registry import Registry
from fabric.store.store import Store

ENCODINGS = tuple(e.name.lower() for e in Encoding)  # what this receiver decodes, by name
CODEC_TAGS = frozenset({Encoding.BYTEGROUP, Encoding.XOR, Encoding.PATCH})  # stream tags only the codec decodes
ENCODINGS_HEADER = "X-Fabric-Encodings"  # on a `has` answer: what the server decodes in uploads
MAX_HAVE = 8  # versions a request may name in `have` (more are ignored)
FRAME_OVERHEAD = 1 + 32 + 1 + 4 + 4  # a chunk frame's bytes before its payload


# --- planning ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChunkHint:
    """What the sender knows about one chunk: its tensor's dtype and a reference the receiver holds."""

    dtype: str | None = None
    reference: str | None = None


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
        refs = _region_references(f, old) if old else [None] * len(f.chunks)
        for (cid, _), ref in zip(f.chunks, refs):
            if cid not in plan:
                plan[cid] = ChunkHint(None, ref if ref != cid else None)
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


def _region_references(new: FileEntry, old: FileEntry) -> list[str | None]:
    """Per chunk of `new`: the chunk of `old` covering the same region, or None if unchanged.

    Chunks both files share are anchors. A run of new chunks between two anchors
    replaced the old chunks between the same anchors: each new chunk refers to the old
    chunk at the same relative position. A pure insertion (nothing between the old
    anchors), an append included, refers to the anchor before it: similar bytes.
    """
    old_ids = [cid for cid, _ in old.chunks]
    position = {}
    for i, cid in enumerate(old_ids):
        position.setdefault(cid, i)
    old_starts = [0]
    for _, n in old.chunks:
        old_starts.append(old_starts[-1] + n)
    refs: list[str | None] = [None] * len(new.chunks)
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
                refs[j] = old_ids[min(bisect.bisect_right(old_starts, offset) - 1, right - 1)]
                at += new.chunks[j][1]
        else:
            anchor = left if left >= 0 else right
            if 0 <= anchor < len(old_ids):
                for j in range(i, k):
                    refs[j] = old_ids[anchor]
        i = k
    return refs


# --- encoding and decoding one chunk ---------------------------------------------------

Frame = tuple[int, int, "bytes | memoryview"]  # stream tag, raw size, payload (codec body)


def encode_chunk(store: Store, chunk_id: str, hint: ChunkHint | None, *, allow_entropy: bool = True,
                 level: int = 3, encodings: Iterable[str] | None = None) -> Frame:
    """The frame fields for `chunk_id` read from `store`, encoded by `hint`.

    A reference the sender does not hold is ignored (the chunk goes standalone).
    Raises ChunkNotFound if the chunk itself is not in the store.
    """
    data = Store.decode_stored(chunk_id, store.get_chunk_stored(chunk_id))
    return encode_data(store, data, hint, allow_entropy=allow_entropy, level=level, encodings=encodings)


def encode_data(store: Store | None, data: bytes | memoryview, hint: ChunkHint | None, *,
                allow_entropy: bool = True, level: int = 3, encodings: Iterable[str] | None = None) -> Frame:
    """`encode_chunk` for bytes already read; the reference, if any, comes from `store`.

    The sender does not verify the reference it reads (nor the chunk, as for stored
    forms): the receiver checks the decoded bytes against the chunk id.
    """
    hint = hint or STANDALONE
    reference = None
    if hint.reference and store is not None:
        try:
            reference = Store.decode_stored(hint.reference, store.get_chunk_stored(hint.reference))
        except (NotFound, CorruptChunk):
            reference = None
    enc = codec.encode(data, dtype=hint.dtype, reference=reference,
                       reference_id=hint.reference if reference is not None else None,
                       level=level, allow_entropy=allow_entropy, encodings=encodings)
    return enc.tag, enc.raw_size, enc.body


def stored_frame(stored: bytes) -> Frame:
    """The frame fields that forward a stored chunk (tag byte + payload) as it is."""
    tag, payload = stored[0], memoryview(stored)[1:]
    if tag == Encoding.ZSTD:
        size = zstandard.frame_content_size(payload)
        return tag, (size if size >= 0 else 0), payload
    return tag, len(payload), payload


def decode_chunk(store: Store | None, chunk_id: str, tag: int, raw_size: int, payload: bytes | memoryview, *,
                 expected_size: int | None = None) -> bytes:
    """A received frame's bytes, decoded and checked against `chunk_id`.

    A reference (`xor`, `patch`) is read from the receiver's `store` and checked
    against its id; one the store lacks or holds corrupt is a ReferenceMismatch, which
    the receiver answers by asking for the chunk again without references
    (`fetch_body(standalone=...)`). Raises BadFrame, UnknownEncoding, ReferenceMismatch,
    CorruptChunk; never returns bytes that do not hash to `chunk_id`.
    """
    if expected_size is not None and raw_size != expected_size:
        raise BadFrame(f"chunk {chunk_id}: frame says {raw_size} bytes, the manifest {expected_size}")
    encoding = Encoding.parse(tag)
    reference = ref_id = None
    if encoding in codec.REFERENCING:
        ref_id = codec.body_reference(encoding, payload)
        if not digest.is_valid(ref_id):
            raise BadFrame(f"chunk {chunk_id}: the payload names no valid reference ({ref_id[:80]!r})")
        reference = read_reference(store, ref_id)
    data = codec.decode_body(encoding, payload, raw_size=raw_size, reference=reference, reference_id=ref_id)
    digest.verify(chunk_id, data)
    return data


def read_reference(store: Store | None, ref_id: str) -> bytes:
    """A reference chunk from the receiver's store, verified; ReferenceMismatch if unusable."""
    if store is None:
        raise ReferenceMismatch(f"no store to read reference {ref_id} from")
    try:
        return store.get_chunk(ref_id)
    except NotFound:
        raise ReferenceMismatch(f"reference {ref_id} is not in {store}") from None
    except CorruptChunk:
        raise ReferenceMismatch(f"reference {ref_id} is corrupt in {store}") from None


# --- negotiation ------------------------------------------------------------------------

def request_fields(store: Store, manifest: Manifest, *, max_have: int = MAX_HAVE) -> dict:
    """The fields a receiver adds to its fetch requests for `manifest`'s chunks (blocking).

    `have` lists the versions of the artifact its registry holds, newest first: a
    committed version's chunks are all in the store (commit checks), so the sender
    may refer to any of them.
    """
    try:
        versions = Registry(store).versions(manifest.artifact)
    except FabricError:
        versions = []
    have = [v for v in reversed(versions) if v != manifest.version][:max_have]
    return {"artifact": manifest.artifact, "version": manifest.version, "have": have,
            "encodings": list(ENCODINGS)}


def fetch_body(ids: list[str], fields: dict | None = None, standalone: Iterable[str] = ()) -> dict:
    """A fetch request body: the ids, the receiver's fields, and the ids to send without references."""
    body: dict = {"ids": ids}
    if fields:
        body.update(fields)
        skip = set(standalone)
        if skip:
            listed = [c for c in ids if c in skip]
            if listed:
                body["standalone"] = listed
    return body


@dataclass(frozen=True)
class _Fields:
    artifact: str
    version: str
    have: tuple[str, ...]
    encodings: frozenset[Encoding]
    standalone: frozenset[str]


def parse_fields(body: dict) -> _Fields | None:
    """The delta fields of a fetch body; None if it has none (an old receiver).

    Malformed fields are an InvalidInput: only a client that knows them sends them.
    """
    if "encodings" not in body:
        return None
    encodings = body.get("encodings")
    if not isinstance(encodings, list) or not all(isinstance(e, str) for e in encodings):
        raise InvalidInput("'encodings' must be a list of encoding names")
    known = {e for e in encodings if e in ENCODINGS}
    have = body.get("have", [])
    if not isinstance(have, list):
        raise InvalidInput("'have' must be a list of versions")
    standalone = body.get("standalone", [])
    if not isinstance(standalone, list) or not all(isinstance(c, str) for c in standalone):
        raise InvalidInput("'standalone' must be a list of chunk ids")
    return _Fields(
        artifact=check_name("artifact", body.get("artifact")),
        version=check_name("version", body.get("version")),
        have=tuple(check_name("version", v) for v in have[:MAX_HAVE]),
        encodings=frozenset(Encoding.parse(e) for e in known),
        standalone=frozenset(standalone),
    )


class _LRU:
    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_PLANS = _LRU(32)  # (target manifest id, have manifest ids) -> Plan; manifests are immutable


@dataclass(frozen=True)
class RequestPlan:
    """How a sender encodes the chunks of one fetch request."""

    hints: Plan
    encodings: frozenset[Encoding]
    standalone: frozenset[str] = frozenset()

    def hint(self, chunk_id: str) -> ChunkHint:
        hint = self.hints.get(chunk_id, STANDALONE)
        if hint.reference and chunk_id in self.standalone:
            return ChunkHint(hint.dtype)
        return hint

    @property
    def names(self) -> list[str]:
        return [e.name.lower() for e in sorted(self.encodings)]


def plan_request(store: Store, body: dict, *, may: Callable[[str], bool] | None = None) -> RequestPlan | None:
    """The plan for a fetch body (blocking); None to serve stored forms as before.

    None when the body has no delta fields, `may(artifact)` says the caller may not
    pull the artifact, or this store lacks the target version. Versions of `have` it
    lacks are skipped. Plans are cached by manifest ids.
    """
    fields = parse_fields(body)
    if fields is None or (may is not None and not may(fields.artifact)):
        return None
    if not {Encoding.RAW, Encoding.ZSTD} <= fields.encodings:
        return None
    registry = Registry(store)
    try:
        target_id = registry.manifest_id(fields.artifact, fields.version)
    except NotFound:
        return None
    have_ids = []
    for v in fields.have:
        try:
            have_ids.append(registry.manifest_id(fields.artifact, v))
        except NotFound:
            continue
    if not fields.encodings & set(codec.REFERENCING):
        have_ids = []
    key = (target_id, tuple(have_ids))
    hints = _PLANS.get(key)
    if hints is None:
        target = _load(store, target_id)
        hints = plan_references(target, [_load(store, mid) for mid in have_ids])
        _PLANS.put(key, hints)
    return RequestPlan(hints, fields.encodings, fields.standalone)


def _load(store: Store, manifest_id: str) -> Manifest:
    return Manifest.from_bytes(store.get_manifest_bytes(manifest_id))


async def plan_for_request(store: Store, body: dict, *, may: Callable[[str], bool] | None = None
                           ) -> RequestPlan | None:
    """`plan_request` off the event loop (cheap when the body has no delta fields)."""
    if "encodings" not in body:
        return None
    return await asyncio.to_thread(plan_request, store, body, may=may)


# --- rate control -----------------------------------------------------------------------

class Mode(IntEnum):
    FULL = 0  # the codec with entropy coding (allow_entropy=True): fewest bytes
    LIGHT = 1  # the codec, zstd only where it halves the data (allow_entropy=False)
    STORED = 2  # forward the stored form: no codec work at all


class EncodePolicy:
    """Choose per chunk how hard to encode, so encoding never makes a transfer slower.

    The sender reports each chunk it encodes (`encoded`: mode, raw and wire bytes,
    codec seconds) and each write to the socket (`wrote`: bytes, seconds the write
    waited). The policy keeps moving averages of, per mode, codec seconds per raw byte
    and wire bytes per raw byte, and of the link's seconds per wire byte. Encoding runs
    ahead of the writes in `workers` threads, so a mode's predicted cost per raw byte is

        max(codec s/B ÷ workers, link s/B × the mode's wire ratio)

    and `choose` picks the cheapest (ties: the smaller ratio, then the less codec time). A write that does not
    wait measures a link faster than the chunks arrive, which makes `STORED` (no codec
    time) the cheapest: on such a link a sync runs as fast as it did before encodings.
    A slow link makes writes wait, which makes the compact modes cheapest again. Before
    anything is measured the policy picks `FULL`; every `probe` chunks it tries the
    next mode that it is not using, so its estimate of that mode stays current.
    `fixed` pins one mode (`FABRIC_ENCODE=full|light|stored`; default `auto`).
    """

    def __init__(self, *, workers: float = 1.0, probe: int = 16, alpha: float = 0.25, fixed: Mode | None = None):
        self.workers, self.probe, self.alpha, self.fixed = workers, probe, alpha, fixed
        self._codec: dict[Mode, float | None] = {Mode.FULL: None, Mode.LIGHT: None, Mode.STORED: 0.0}
        self._ratio: dict[Mode, float | None] = dict.fromkeys(Mode)
        self._link: float | None = None
        self._count = 0
        self._lock = threading.Lock()
        self.chosen: dict[Mode, int] = dict.fromkeys(Mode, 0)

    def choose(self) -> Mode:
        with self._lock:
            self._count += 1
            best = self._best() if self.fixed is None else self.fixed
            if self.fixed is None and self._count % self.probe == 0:
                others = [m for m in Mode if m != best]
                best = others[(self._count // self.probe) % len(others)]
            self.chosen[best] += 1
            return best

    @property
    def allow_entropy(self) -> bool:
        """For callers with two modes only (codec with or without entropy coding)."""
        return self.choose() != Mode.LIGHT

    def predicted(self, mode: Mode) -> float | None:
        """Predicted seconds per raw byte in `mode`, or None until it has been measured."""
        codec_s, ratio = self._codec[mode], self._ratio[mode]
        if codec_s is None or ratio is None:
            return None
        return max(codec_s / self.workers, (self._link or 0.0) * ratio)

    def _best(self) -> Mode:
        if self._link is None or self._ratio[Mode.FULL] is None:
            return Mode.FULL
        # ties (a codec that gains nothing: incompressible data) go to the least codec time
        known = [(p, self._ratio[m], self._codec[m], m) for m in Mode if (p := self.predicted(m)) is not None]
        return min(known)[3]

    def encoded(self, mode: Mode, raw: int, wire: int, seconds: float, *, stored: int | None = None) -> None:
        """One chunk: `raw` bytes became `wire` bytes in `seconds` of codec time (stored size if known)."""
        if raw <= 0:
            return
        with self._lock:
            if mode != Mode.STORED:
                self._codec[mode] = self._avg(self._codec[mode], seconds / raw)
            self._ratio[mode] = self._avg(self._ratio[mode], wire / raw)
            if stored is not None and mode != Mode.STORED:
                self._ratio[Mode.STORED] = self._avg(self._ratio[Mode.STORED], stored / raw)

    def wrote(self, nbytes: int, seconds: float) -> None:
        """One write of `nbytes` to the socket took `seconds` (waiting for the peer included)."""
        if nbytes > 0:
            with self._lock:
                self._link = self._avg(self._link, max(seconds, 0.0) / nbytes)

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)


_POLICIES = _LRU(256)


def configured_mode() -> Mode | None:
    """The mode `FABRIC_ENCODE` pins (full, light, stored), or None for `auto` (the default)."""
    value = os.environ.get("FABRIC_ENCODE", "auto").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Mode[value.upper()]
    except KeyError:
        raise InvalidInput(f"FABRIC_ENCODE={value!r}: use auto, full, light or stored") from None


def policy_for(key: object, **options) -> EncodePolicy:
    """The policy kept for one peer (e.g. its token name and address), made on first use."""
    policy = _POLICIES.get(key)
    if policy is None:
        options.setdefault("fixed", configured_mode())
        policy = EncodePolicy(**options)
        _POLICIES.put(key, policy)
    return policy


# --- serving: the hook a chunk server calls -----------------------------------------------

Getter = Callable[[str], Awaitable["bytes | None"]]  # stored bytes (tag + payload) or None


def serving_getter(get: Getter, store: Store, plan: RequestPlan, policy: EncodePolicy, *,
                   level: int = 3) -> Callable[[str], Awaitable[Frame | None]]:
    """Wrap a server's stored-chunk getter so it yields encoded frame fields (None: missing).

    Each chunk is encoded in a worker thread, in the mode `policy` picks; the server
    reports its socket writes to `policy.wrote`.
    """
    async def serve(chunk_id: str) -> Frame | None:
        stored = await get(chunk_id)
        if stored is None:
            return None
        mode = policy.choose()
        frame, seconds = await asyncio.to_thread(_serve_one, store, chunk_id, stored, plan, mode, level)
        policy.encoded(mode, frame[1], len(frame[2]), seconds, stored=len(stored) - 1)
        return frame
    return serve


def _serve_one(store: Store, chunk_id: str, stored: bytes, plan: RequestPlan, mode: Mode,
               level: int) -> tuple[Frame, float]:
    if mode == Mode.STORED or not stored:
        return stored_frame(stored), 0.0
    t0 = time.perf_counter()
    try:
        data = Store.decode_stored(chunk_id, stored)
    except CorruptChunk:
        return stored_frame(stored), 0.0  # forward as is: the receiver's check will catch it
    frame = encode_data(store, data, plan.hint(chunk_id), allow_entropy=mode == Mode.FULL, level=level,
                        encodings=plan.names)
    return frame, time.perf_counter() - t0


# --- publishing ---------------------------------------------------------------------------

def encode_upload(data: bytes | memoryview, dtype: str | None, *, allow_entropy: bool = True,
                  level: int = 3, encodings: Iterable[str] | None = None) -> Frame:
    """Frame fields for uploading one chunk standalone (byte planes for float tensors).

    `encodings` are those the origin advertised (its `has` answer); by default
    raw and zstd only, which every origin decodes.
    """
    allowed = [e for e in (encodings or ("raw", "zstd")) if e not in ("xor", "patch")]
    return encode_data(None, data, ChunkHint(dtype), allow_entropy=allow_entropy, level=level, encodings=allowed)


def parse_encodings(header: str | None) -> list[str]:
    """The encodings a server's `X-Fabric-Encodings` header lists; raw and zstd without one."""
    names = [n.strip() for n in (header or "").split(",") if n.strip() in ENCODINGS]
    return names if {"raw", "zstd"} <= set(names) else ["raw", "zstd"]


class UploadEncoder:
    """Encodes a publisher's new chunks for upload, under an `EncodePolicy`.

    `frames` encodes one upload's chunks (`STORED` mode sends them raw, tag 0);
    the caller reports the upload's payload bytes and seconds to `uploaded`. Safe to
    call from the publisher's worker threads.
    """

    def __init__(self, policy: EncodePolicy | None = None, *, level: int = 3):
        self.policy = policy or EncodePolicy(workers=2, fixed=configured_mode())
        self.level = level

    def frames(self, chunks: Iterable[tuple[str, bytes | memoryview, str | None]],
               encodings: Iterable[str] | None) -> list[tuple[str, int, int, bytes | memoryview]]:
        encodings = list(encodings or ("raw", "zstd"))
        out = []
        for chunk_id, data, dtype in chunks:
            mode = self.policy.choose()
            if mode == Mode.STORED:
                out.append((chunk_id, int(Encoding.RAW), len(data), data))
                self.policy.encoded(mode, len(data), len(data), 0.0)
                continue
            t0 = time.perf_counter()
            tag, raw_size, payload = encode_upload(data, dtype, allow_entropy=mode == Mode.FULL, level=self.level,
                                                   encodings=encodings)
            self.policy.encoded(mode, raw_size, len(payload), time.perf_counter() - t0, stored=len(data))
            out.append((chunk_id, tag, raw_size, payload))
        return out

    def uploaded(self, nbytes: int, seconds: float) -> None:
        self.policy.wrote(nbytes, seconds)


# --- manifests: the new version's manifest against one the receiver holds ---------------------

def encode_manifest(canonical: bytes, base: bytes | None, *, level: int = 19) -> bytes:
    """The manifest's canonical bytes as one zstd frame, with `base` (a manifest the
    receiver holds) as its prefix: the unchanged chunk ids cost almost nothing."""
    prefix = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if base else None
    return zstandard.ZstdCompressor(level=level, dict_data=prefix, write_dict_id=False).compress(canonical)


def decode_manifest(frame: bytes, base: bytes | None, *, manifest_id: str | None = None,
                    max_size: int = 64 << 20) -> bytes:
    """The manifest bytes from `encode_manifest`'s frame, checked against `manifest_id` if given."""
    try:
        size = zstandard.frame_content_size(frame)
        if not 0 <= size <= max_size:
            raise BadFrame(f"manifest frame declares {size} bytes (at most {max_size})")
        prefix = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if base else None
        out = zstandard.ZstdDecompressor(dict_data=prefix).decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise BadFrame(f"bad manifest frame: {e}") from None
    if manifest_id is not None:
        digest.verify(manifest_id, out)
    return out


MANIFEST_PATCH = "application/x-fabric-manifest-patch"  # Content-Type of a patched manifest
BASE_HEADER = "X-Fabric-Manifest-Base"  # the id of the manifest a patch is against


@dataclass(frozen=True)
class ManifestBase:
    """A manifest the receiver holds, offered as the base of the next one's patch."""

    version: str
    manifest_id: str
    canonical: bytes


def manifest_base(store: Store, artifact: str, exclude: str | None = None) -> ManifestBase | None:
    """The newest version of `artifact` this store's registry holds, other than `exclude` (blocking)."""
    registry = Registry(store)
    try:
        versions = [v for v in registry.versions(artifact) if v != exclude]
        if not versions:
            return None
        mid = registry.manifest_id(artifact, versions[-1])
        return ManifestBase(versions[-1], mid, store.get_manifest_bytes(mid))
    except FabricError:
        return None


def serve_manifest(store: Store, artifact: str, version: str, base: str | None) -> tuple[bytes, str, dict]:
    """Body, content type and headers answering GET …/versions/{version}?base={base} (blocking).

    With a `base` version this store holds, the body is the manifest as a zstd patch
    against it (`MANIFEST_PATCH`, base id in `BASE_HEADER`); otherwise the canonical
    JSON, as before. Raises the registry's NotFound errors for the target.
    """
    registry = Registry(store)
    mid = registry.manifest_id(artifact, version)
    canonical = store.get_manifest_bytes(mid)
    headers = {"X-Fabric-Manifest-Id": mid}
    if base and base != version:
        try:
            base_id = registry.manifest_id(artifact, check_name("version", base))
            base_bytes = store.get_manifest_bytes(base_id)
        except (NotFound, InvalidInput):
            base_bytes = None
        if base_bytes is not None:
            headers[BASE_HEADER] = base_id
            return encode_manifest(canonical, base_bytes), MANIFEST_PATCH, headers
    return canonical, "application/json", headers


def read_manifest_body(body: bytes, content_type: str | None, headers, base: ManifestBase | None) -> bytes:
    """The manifest's canonical bytes from a GET …/versions/{v}[?base=] answer.

    A patch must name the base the receiver offered and decode to the id the
    server sent; anything else is a BadFrame (the caller asks again without `base`).
    """
    if (content_type or "").split(";")[0].strip() != MANIFEST_PATCH:
        return body
    if base is None or headers.get(BASE_HEADER) != base.manifest_id:
        raise BadFrame(f"manifest patch against {headers.get(BASE_HEADER)!r}, which was not offered")
    manifest_id = headers.get("X-Fabric-Manifest-Id")
    if not digest.is_valid(manifest_id):
        raise BadFrame("manifest patch without a valid X-Fabric-Manifest-Id")
    try:
        return decode_manifest(body, base.canonical, manifest_id=manifest_id)
    except CorruptChunk:
        raise BadFrame(f"manifest patch does not decode to {manifest_id}") from None


__all__ = [
    "ENCODINGS", "MAX_HAVE", "FRAME_OVERHEAD", "ChunkHint", "Plan", "STANDALONE", "plan_references",
    "encode_chunk", "encode_data", "stored_frame", "decode_chunk", "read_reference", "request_fields",
    "fetch_body", "parse_fields", "RequestPlan", "plan_request", "plan_for_request", "Mode", "EncodePolicy",
    "policy_for", "serving_getter", "encode_upload", "encode_manifest", "decode_manifest", "MANIFEST_PATCH",
    "BASE_HEADER", "ManifestBase", "manifest_base", "serve_manifest", "read_manifest_body", "UploadEncoder",
    "configured_mode", "ENCODINGS_HEADER", "parse_encodings", "CODEC_TAGS",
]
