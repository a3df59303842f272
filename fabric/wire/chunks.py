"""Serving chunks: the has and fetch routes of the origin and the relays, and encoding what they send.

`chunk_routes` serves "which of these do you have" and batched chunk downloads from
a `Store` (or a relay's getter); reads run in threads so the event loop only moves
bytes. A fetch body without delta fields gets the stored forms (sendfile from a local
store, zero-copy). With them (docs/encodings.md, "Negotiation") the server plans
references (`plan_request`, cached in the app's `PlanCache`) and encodes each chunk
(`serving_getter`, `encode_data`) in the mode the peer's `EncodePolicy` predicts
fastest; the app owns those policies (`PeerPolicies`, under `POLICIES`) and the
frames `full` made, served again to the next peer that asks (`FrameCache`, `FRAMES`).

A relay (`prepare` and `ready` given) serves each chunk as it becomes held
(`_relay_frames`): while a chunk is still being fetched upstream it sends a wait frame
every `WAIT_INTERVAL` to a client that asked for them (`WAIT_HEADER`), so the client
knows the relay is alive. It never encodes (an encode holds about four times the chunk,
32 MiB for an 8 MiB one, more than issue 17's memory bound leaves a relay): to a child
whose delta fields plan a chunk against references, it sends the delta frame its own
upstream sent it against the same references, if it kept it (`Forwarded`), else the
stored form, which the kernel sends straight from its file (sendfile, one HTTP chunk
a frame), so a relay serving many children holds little payload in its own memory
(docs/protocol.md, "Relays"). A version the relay is still fetching, not yet in its
registry, is planned from the manifest it is fetching (`pending`): the children that
ask for a new version at its promote get the deltas its upstream sent.

Who sees a chunk (docs/protocol.md, "Authentication and scopes"): a chunk is served,
or reported held, only to a token that may pull an artifact whose versions reference
it (`has` also counts `publish` on such an artifact), as the role's `ChunkIndex`
tells; to anyone else it is missing. An admin token sees every chunk. An upload's
references (`upload_references`) may name only chunks the uploader may pull.

Length: over the ~450-line guide. The three ways of sending a fetch's frames (sendfile,
a relay's, encoded) share the request's planning and visibility rules, which
must not drift apart between modules.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import zstandard
from aiohttp import web

from fabric.config import encode_mode, frame_cache_bytes
from fabric.core import codec, digest
from fabric.core.codec import Encoding
from fabric.core.manifest import Manifest
from fabric.core.policy import EncodePolicy, Mode, PeerPolicies
from fabric.core.refplan import STANDALONE, ChunkHint, Plan, PlanCache, plan_references
from fabric.errors import (ChunkNotFound, CorruptChunk, FabricError, InvalidInput, NotFound, PayloadTooLarge,
                           ReferenceMismatch)
from fabric.store.chunk_index import ChunkIndex
from fabric.store.registry import Registry
from fabric.store.store import Store, StoredFile
from fabric.wire import frames, linkrate
from fabric.wire.framecache import ORIGIN_BYTES, Forwarded, Frame, FrameCache, Key as FrameKey, key as frame_key
from fabric.wire.negotiate import parse_fields
from fabric.wire.protocol import (CHUNK_STREAM, CHUNKS_FETCH, CHUNKS_HAS, ENCODINGS, ENCODINGS_HEADER, MAGIC,
                                  MAX_IDS, WAIT_HEADER, WAIT_INTERVAL)
from fabric.wire.server import METRICS, STORE, Metrics, principal, read_json

PLANS = web.AppKey("plans", PlanCache)
INDEX = web.AppKey("chunk_index", ChunkIndex)
POLICIES = web.AppKey("policies", PeerPolicies)
FRAMES = web.AppKey("frames", FrameCache)
LEVEL = 3  # the zstd level of the codec's entropy stages when serving
_READ_AHEAD = 3  # stored chunks read ahead of the one being sent

FrameFields = tuple[int, int, "bytes | memoryview"]  # stream tag, raw size, payload (codec body)
ChunkGetter = Callable[[str], Awaitable[bytes | None]]  # stored bytes (tag + payload) or None


# --- the routes ---------------------------------------------------------------------------------

def read_ids(body: dict) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise InvalidInput("'ids' must be a list of chunk ids")
    if len(ids) > MAX_IDS:
        raise PayloadTooLarge(f"{len(ids)} ids in one request; at most {MAX_IDS}")
    return [digest.check_id(i) for i in ids]


def store_getter(store: Store) -> ChunkGetter:
    async def get(chunk_id: str) -> bytes | None:
        try:
            return await asyncio.to_thread(store.get_chunk_stored, chunk_id)
        except ChunkNotFound:
            return None
    return get


Prepare = Callable[[web.Request, list[str]], Awaitable[None]]
Ready = Callable[[str], Awaitable[None]]  # returns once a chunk is held here, or no longer coming
# (artifact, version) -> the manifest of a version this server is fetching and has not committed, or None
Pending = Callable[[str, str], "Manifest | None"]


async def visible(request: web.Request, ids: Iterable[str], scopes: tuple[str, ...] = ("pull",)) -> set[str]:
    """The ids the request's token may see: referenced by a version of an artifact it may
    do one of `scopes` on (the app's `INDEX` says which), or every id for an admin."""
    p = principal(request)
    if p.admin:
        return set(ids)
    referenced = await request.app[INDEX].artifacts(ids)
    return {cid for cid, arts in referenced.items() if any(p.may(s, a) for a in arts for s in scopes)}


async def upload_references(request: web.Request, frame: frames.Frame) -> frames.References:
    """The reference lookup for decoding one uploaded frame: the chunk its payload names,
    if the uploader may pull it, from the app's store; anything else is "not available"
    (absent and forbidden alike, so the answer says nothing about other artifacts' chunks)."""
    try:
        ref_id = codec.body_reference(frame.encoding, frame.payload) if frame.kind == frames.FRAME_CHUNK else None
    except FabricError:  # an unknown encoding, a malformed payload: the decoder says so
        ref_id = None
    allowed = await visible(request, [ref_id]) if ref_id and digest.is_valid(ref_id) else set()
    store: Store = request.app[STORE]

    def read(ref_id: str) -> bytes:
        unavailable = ReferenceMismatch(f"reference {ref_id} is not available to this token: "
                                        "upload the chunk without references")
        if ref_id not in allowed:
            raise unavailable
        try:
            return store.get_chunk(ref_id)
        except (NotFound, CorruptChunk):
            raise unavailable from None
    return read


def chunk_routes(app: web.Application, *, index: ChunkIndex, get: ChunkGetter | None = None,
                 prepare: Prepare | None = None, ready: Ready | None = None, pending: Pending | None = None,
                 forwarded: Forwarded | None = None, frame_budget: int = ORIGIN_BYTES) -> None:
    """Add POST /v1/chunks/has and /v1/chunks/fetch, serving from `get` (default: the store).

    `index` tells which artifacts reference a chunk (who may see it; kept as `INDEX`).
    `prepare`, if given, sees each fetch's visible ids before any is served: a relay uses
    it to start fetching the ones it lacks from upstream (pull-through); with `ready` (which
    returns once a chunk is held, or will not be) a local relay store serves by
    `_relay_frames`, with wait frames and bounded memory, and encodes nothing: a planned
    chunk goes as the frame kept for it in `forwarded` (the relay's upstream's), else stored.
    `pending` names the manifests of versions a relay is fetching, so fetches for them are
    planned before they are committed here (`plan_request`). The app keeps the plan cache
    (`PLANS`), one encode policy per peer (`POLICIES`) and up to `frame_budget` bytes of
    encoded frames (`FRAMES`; `FABRIC_FRAME_CACHE_MB` overrides it).
    """
    get = get or store_getter(app[STORE])
    app[INDEX] = index
    app[PLANS] = PlanCache()
    app[POLICIES] = PeerPolicies(workers=min(_READ_AHEAD, os.cpu_count() or 1), fixed=encode_mode())
    app[FRAMES] = FrameCache(frame_cache_bytes(frame_budget))

    async def has(request: web.Request) -> web.Response:
        principal(request).require_any(("pull", "publish"))
        ids = read_ids(await read_json(request))
        store: Store = request.app[STORE]
        missing = await asyncio.to_thread(store.missing, ids)
        held = [cid for cid in ids if cid not in set(missing)]
        shown = await visible(request, held, ("pull", "publish")) if held else set()
        missing = [cid for cid in ids if cid not in shown]  # held but not shown: as missing, in order
        return web.json_response({"missing": missing}, headers={ENCODINGS_HEADER: ",".join(ENCODINGS)})

    async def fetch(request: web.Request) -> web.StreamResponse:
        principal(request).require("pull")
        body = await read_json(request)
        ids = read_ids(body)
        shown = await visible(request, ids)
        hidden = {cid for cid in ids if cid not in shown}  # answered with missing frames
        if prepare:
            await prepare(request, [cid for cid in ids if cid in shown])
        # delta fields (docs/encodings.md, Negotiation): encode per chunk; else stored forms
        p, store = principal(request), request.app[STORE]
        plan = await plan_for_request(store, body, may=lambda a: p.may("pull", a), cache=request.app[PLANS],
                                      pending=pending)
        forwarding = None
        if plan and ready is not None:  # a relay encodes nothing: its upstream's frames, or stored forms
            forwarding, plan = plan, None
        policy = request.app[POLICIES].get((p.name, request.remote)) if plan else None
        policy = linkrate.metered(policy, request.transport)  # the link measured by what the peer acknowledged
        cache = request.app[FRAMES]
        if (plan and prepare is None and store.local and not _all_kept(cache, plan, ids, hidden)
                and policy.choose() == Mode.STORED):
            plan = None  # the link outruns the codec: this batch goes out stored, zero-copy
        metrics: Metrics = request.app[METRICS]
        read = _hiding(serving_getter(get, store, plan, policy, cache=cache, metrics=metrics) if plan else get,
                       hidden)
        resp = web.StreamResponse(headers={"Content-Type": CHUNK_STREAM})
        length = await _stream_length(store, ids, hidden) if prepare is None and plan is None else None
        if length is not None:
            resp.content_length = length  # no chunked encoding: frames go out as they are
        relayed = length is None and ready is not None and plan is None and store.local
        if relayed:
            resp.enable_chunked_encoding()  # `_relay_frame` writes each frame as one HTTP chunk
        await resp.prepare(request)
        await resp.write(MAGIC)
        if length is not None and store.local:
            metrics.fetches.labels("sendfile").inc()
            await _sendfile_frames(request, resp, store, ids, metrics, policy, hidden)  # stored forms, zero-copy
        elif relayed:
            metrics.fetches.labels("relayed").inc()
            await _relay_frames(request, resp, store, ids, ready, hidden, metrics,
                                waits=request.headers.get(WAIT_HEADER) == "1",
                                kept=_kept_frames(forwarded, forwarding))
        else:
            metrics.fetches.labels("encoded" if plan else "stored").inc()
            await _send_frames(resp, ids, read, plan, policy, metrics,
                               waits=prepare is not None and request.headers.get(WAIT_HEADER) == "1")
        await resp.write(frames.end_frame(len(ids)))
        await resp.write_eof()
        return resp

    app.router.add_post(CHUNKS_HAS, has)
    app.router.add_post(CHUNKS_FETCH, fetch)


def _all_kept(cache: FrameCache, plan: RequestPlan, ids: list[str], hidden: set[str]) -> bool:
    """Whether the cache holds a frame for every id shown (then encoding costs nothing)."""
    return cache.holds_all(plan.key(cid) for cid in ids if cid not in hidden)


def _hiding(read, hidden: set[str]):
    """`read`, answering None (a missing frame) for the ids in `hidden`."""
    if not hidden:
        return read

    async def shown(chunk_id: str):
        return None if chunk_id in hidden else await read(chunk_id)
    return shown


async def _send_frames(resp: web.StreamResponse, ids: list[str], read, plan, policy, metrics: Metrics, *,
                       waits: bool = False) -> None:
    """One frame per id from `read` (stored bytes, or (tag, raw size, payload) under a delta plan);
    with `waits` (a relay), a wait frame whenever a read has kept it silent for `WAIT_INTERVAL`."""
    reads = [asyncio.ensure_future(read(cid)) for cid in ids[:_READ_AHEAD]]
    try:
        for i, cid in enumerate(ids):
            while waits and not (await asyncio.wait({reads[i]}, timeout=WAIT_INTERVAL))[0]:
                await resp.write(frames.wait_frame(cid))
            stored = await reads[i]
            if i + _READ_AHEAD < len(ids):
                reads.append(asyncio.ensure_future(read(ids[i + _READ_AHEAD])))
            if stored is None:
                metrics.chunks_missing.inc()
                await resp.write(frames.missing_frame(cid))
                continue
            if plan:
                tag, raw_size, payload = stored
            else:
                tag, payload = stored[0], memoryview(stored)[1:]
                raw_size = _raw_size(tag, payload)
            t0 = time.perf_counter()
            await resp.write(frames.chunk_header(cid, tag, raw_size, len(payload)))
            await resp.write(payload)
            if plan:
                policy.wrote(len(payload), time.perf_counter() - t0)
            metrics.chunks_out.inc()
            metrics.bytes_out.inc(len(payload))
    finally:
        for r in reads:
            r.cancel()


async def _sendfile_frames(request: web.Request, resp: web.StreamResponse, store: Store, ids: list[str],
                           metrics: Metrics, policy: EncodePolicy | None = None,
                           hidden: set[str] = frozenset()) -> None:
    """Frames whose payloads the kernel copies straight from the chunk files (sendfile).

    Only for a local store serving stored forms, where the response length is known.
    The time each send takes goes to `policy`, which thus notices a link getting slower.
    """
    loop = asyncio.get_running_loop()
    ahead: asyncio.Future | None = None  # the next chunk, opened (and its pages asked for) while this one goes
    try:
        for i, cid in enumerate(ids):
            opened = None if cid in hidden else await (ahead or asyncio.to_thread(_open_chunk, store, cid))
            ahead = None
            if i + 1 < len(ids) and ids[i + 1] not in hidden:
                ahead = asyncio.ensure_future(asyncio.to_thread(_open_chunk, store, ids[i + 1]))
            await _sendfile_frame(request, resp, loop, cid, opened, metrics, policy)
    finally:
        if ahead is not None:
            ahead.add_done_callback(_close_opened)


async def _sendfile_frame(request: web.Request, resp: web.StreamResponse, loop, cid: str,
                          opened: "tuple[StoredFile, int] | None", metrics: Metrics,
                          policy: EncodePolicy | None, *, chunked: bool = False) -> None:
    """One chunk's frame by sendfile (or its missing frame); closes the chunk's file.

    In a `chunked` answer (a relay's, `_relay_frames`) the frame goes out as one HTTP chunk
    written under aiohttp's writer, straight to the transport: its size line with the frame's
    header, the payload by sendfile, the CRLF that ends it. A file that gives fewer bytes than
    the frame announced ends the connection (no end frame: the client fetches again)."""
    if opened is None:
        metrics.chunks_missing.inc()
        await resp.write(frames.missing_frame(cid))
        return
    stored, raw_size = opened
    try:
        header = frames.chunk_header(cid, stored.tag, raw_size, stored.size)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        if chunked:
            transport.write(b"%x\r\n%s" % (len(header) + stored.size, header))
        else:
            await resp.write(header)
        t0 = time.perf_counter()
        sent = await loop.sendfile(transport, stored.file, stored.offset, stored.size)
        if sent != stored.size:
            transport.abort()
            raise ConnectionResetError(f"chunk {cid} ended early in its file ({sent} of {stored.size} bytes)")
        if chunked:
            transport.write(b"\r\n")
        if policy:
            policy.wrote(stored.size, time.perf_counter() - t0)
            policy.encoded(Mode.STORED, raw_size, stored.size, 0.0)
    finally:
        stored.file.close()
    metrics.chunks_out.inc()
    metrics.bytes_out.inc(stored.size)


def _close_opened(fut: asyncio.Future) -> None:
    """Close the file of a chunk opened ahead that was never sent (the response ended first)."""
    if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
        fut.result()[0].file.close()


async def _relay_frames(request: web.Request, resp: web.StreamResponse, store: Store, ids: list[str], ready: Ready,
                        hidden: set[str], metrics: Metrics, *, waits: bool,
                        kept: Callable[[str], Frame | None] | None = None) -> None:
    """A relay's frames: each chunk once `ready` says it is held, its stored payload sent
    from its file by the kernel (or the frame `kept` gives for it, from memory); a
    missing frame if it is hidden or never came.

    To a client that reads wait frames (`waits`), chunks go in the order they arrive here
    (any order is allowed then: docs/protocol.md, "Relays"), with a wait frame naming the
    first chunk still awaited whenever nothing was sent for `WAIT_INTERVAL`; to others,
    in request order."""
    pending: dict[asyncio.Future, int] = {}  # ready(id) -> the id's position in the request
    try:
        for i, cid in enumerate(ids):
            fut = asyncio.ensure_future(_nothing() if cid in hidden else ready(cid))
            pending[fut] = i
        while pending:
            if waits:
                done, _ = await asyncio.wait(pending, timeout=WAIT_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    await resp.write(frames.wait_frame(ids[min(pending.values())]))
                    continue
                fut = min(done, key=pending.get)
            else:
                fut = min(pending, key=pending.get)
                await fut
            await _relay_frame(request, resp, store, ids[pending.pop(fut)], hidden, metrics, kept)
    finally:
        for fut in pending:
            fut.cancel()


async def _nothing() -> None:
    return None


def _kept_frames(forwarded: Forwarded | None, plan: "RequestPlan | None") -> Callable[[str], Frame | None] | None:
    """What `_relay_frame` asks for a chunk's forwarded frame under `plan` (None: nothing kept)."""
    if forwarded is None or plan is None:
        return None
    return lambda cid: forwarded.get(cid, plan.hint(cid), plan.encodings)


async def _relay_frame(request: web.Request, resp: web.StreamResponse, store: Store, cid: str, hidden: set[str],
                       metrics: Metrics, kept: Callable[[str], Frame | None] | None = None) -> None:
    """One chunk frame (or a missing frame) of `_relay_frames`, as one HTTP chunk by sendfile,
    or the upstream's frame for it, if `kept` gives one."""
    frame = kept(cid) if kept is not None and cid not in hidden else None
    if frame is not None:  # a piece at a time: each child's socket buffers at most one, not the frame
        tag, raw_size, payload = frame
        await resp.write(frames.chunk_header(cid, tag, raw_size, len(payload)))
        view = memoryview(payload)
        for start in range(0, len(view), frames.PIECE):
            await resp.write(view[start:start + frames.PIECE])
        metrics.frames_forwarded.inc()
        metrics.chunks_out.inc()
        metrics.bytes_out.inc(len(payload))
        return
    opened = None if cid in hidden else await asyncio.to_thread(_open_chunk, store, cid)
    await _sendfile_frame(request, resp, asyncio.get_running_loop(), cid, opened, metrics, None, chunked=True)


def _open_chunk(store: Store, chunk_id: str) -> tuple[StoredFile, int] | None:
    """The file and range of a stored chunk's payload, and its raw size; None if absent. In a thread."""
    stored = store.open_stored(chunk_id)
    if stored is None:
        return None
    if hasattr(os, "posix_fadvise"):  # start reading it in now (a publish's packs skip the page cache)
        os.posix_fadvise(stored.file.fileno(), stored.offset, stored.size, os.POSIX_FADV_WILLNEED)
    if stored.tag == Encoding.ZSTD:
        return stored, _raw_size(stored.tag, memoryview(os.pread(stored.file.fileno(), 32, stored.offset)))
    return stored, stored.size


async def _stream_length(store: Store, ids: list[str], hidden: set[str]) -> int | None:
    """The exact size of the chunk stream for `ids`, if the store can tell without reading.

    Knowing it lets the response carry a Content-Length instead of chunked encoding,
    which would copy every payload once more on its way out.
    """
    sizes = await asyncio.to_thread(store.stored_sizes, ids)
    if sizes is None:
        return None
    sizes = [None if cid in hidden else n for cid, n in zip(ids, sizes)]
    total = sum(frames.missing_frame_size() if n is None else frames.chunk_frame_size(n - 1) for n in sizes)
    return len(MAGIC) + total + frames.end_frame_size()


def _raw_size(tag: int, payload: memoryview) -> int:
    if tag == Encoding.ZSTD:
        size = zstandard.frame_content_size(payload)
        return size if size >= 0 else 0
    return len(payload)


# --- planning a request --------------------------------------------------------------------

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

    def key(self, chunk_id: str, level: int = LEVEL) -> FrameKey:
        """The frame cache's key for `chunk_id`'s `full`-mode frame under this plan."""
        return frame_key(chunk_id, self.hint(chunk_id), level, self.names)


def plan_request(store: Store, body: dict, *, may: Callable[[str], bool] | None = None,
                 cache: PlanCache | None = None, pending: Pending | None = None) -> RequestPlan | None:
    """The plan for a fetch body (blocking); None to serve stored forms as before.

    None when the body has no delta fields, `may(artifact)` says the caller may not
    pull the artifact, or this store lacks the target version and `pending` has no
    manifest for it either. Versions of `have` it lacks are skipped: a reference is
    always a chunk of a version committed here, so all of it is held. Plans are kept in
    `cache`, if given, by manifest ids.
    """
    fields = parse_fields(body)
    if fields is None or (may is not None and not may(fields.artifact)):
        return None
    if not {Encoding.RAW, Encoding.ZSTD} <= fields.encodings:
        return None
    registry = Registry(store)
    target = None
    try:
        target_id = registry.manifest_id(fields.artifact, fields.version)
    except NotFound:
        target = pending(fields.artifact, fields.version) if pending else None
        if target is None:
            return None
        target_id = target.id
    have_ids = []
    for v in fields.have:
        try:
            have_ids.append(registry.manifest_id(fields.artifact, v))
        except NotFound:
            continue
    if not fields.encodings & set(codec.REFERENCING):
        have_ids = []
    hints = cache.get(target_id, have_ids) if cache else None
    if hints is None:
        target = target or _load(store, target_id)
        hints = plan_references(target, [_load(store, mid) for mid in have_ids])
        if cache:
            cache.put(target_id, have_ids, hints)
    return RequestPlan(hints, fields.encodings, fields.standalone)


def _load(store: Store, manifest_id: str) -> Manifest:
    return Manifest.from_bytes(store.get_manifest_bytes(manifest_id))


async def plan_for_request(store: Store, body: dict, *, may: Callable[[str], bool] | None = None,
                           cache: PlanCache | None = None, pending: Pending | None = None) -> RequestPlan | None:
    """`plan_request` off the event loop (cheap when the body has no delta fields)."""
    if "encodings" not in body:
        return None
    return await asyncio.to_thread(plan_request, store, body, may=may, cache=cache, pending=pending)


# --- encoding what is sent ------------------------------------------------------------------

def serving_getter(get: ChunkGetter, store: Store, plan: RequestPlan, policy: EncodePolicy, *,
                   level: int = LEVEL, cache: FrameCache | None = None, metrics: Metrics | None = None
                   ) -> Callable[[str], Awaitable[FrameFields | None]]:
    """Wrap a server's stored-chunk getter so it yields encoded frame fields (None: missing).

    A frame `cache` holds, or another request is encoding for it, is sent as it is
    (and counted in `metrics`); any other chunk is encoded in a worker thread, in the
    mode `policy` picks, and kept in `cache` if that mode was `full` and the sender held
    the references the hint names. The server reports its socket writes to `policy.wrote`.
    """
    async def serve(chunk_id: str) -> FrameFields | None:
        k = plan.key(chunk_id, level)
        kept = (cache.get(k) or await cache.wait(k)) if cache is not None else None
        if kept is not None:
            if metrics is not None:
                metrics.frames_reused.inc()
            return kept
        # claimed before the first await, so a request arriving meanwhile waits for this one
        claimed = cache is not None and cache.claim(k)
        frame, keep, mode = None, False, None
        try:
            stored = await get(chunk_id)
            if stored is None:
                return None
            mode = policy.choose()
            frame, seconds, keep = await asyncio.to_thread(_serve_one, store, chunk_id, stored, plan, mode, level)
            stored_size = len(stored) - 1
            del stored  # not held while the frame waits for its turn on the socket
        finally:
            if claimed:
                cache.release(k, frame if keep and mode == Mode.FULL else None)
        policy.encoded(mode, frame[1], len(frame[2]), seconds, stored=stored_size)
        return frame
    return serve


def _serve_one(store: Store, chunk_id: str, stored: bytes, plan: RequestPlan, mode: Mode,
               level: int) -> tuple[FrameFields, float, bool]:
    """The frame for one chunk in `mode`, the codec's CPU seconds, and whether it may be kept:
    the codec made it with every reference the hint names (a relay still fetching one sends
    the chunk standalone, a frame no later child should get)."""
    if mode == Mode.STORED or not stored:
        return stored_frame(stored), 0.0, False
    t0 = time.thread_time()  # the codec's CPU time: other work on the machine does not count
    try:
        data = Store.decode_stored(chunk_id, stored)
    except CorruptChunk:
        return stored_frame(stored), 0.0, False  # forward as is: the receiver's check will catch it
    frame, held = _encode(store, data, plan.hint(chunk_id), mode == Mode.FULL, level, plan.names)
    return frame, time.thread_time() - t0, held


def encode_kept(store: Store, chunk_id: str, plan: RequestPlan, level: int = LEVEL
                ) -> tuple[FrameFields | None, float]:
    """The `full`-mode frame a fetch under `plan` would send and keep for `chunk_id` (blocking),
    or None where it would keep none (a reference the hint names is not held here); and the
    codec's CPU seconds. Raises ChunkNotFound if the chunk is not in the store."""
    frame, seconds, held = _serve_one(store, chunk_id, store.get_chunk_stored(chunk_id), plan, Mode.FULL, level)
    return (frame if held else None), seconds


def encode_chunk(store: Store, chunk_id: str, hint: ChunkHint | None, *, allow_entropy: bool = True,
                 level: int = 3, encodings: Iterable[str] | None = None) -> FrameFields:
    """The frame fields for `chunk_id` read from `store`, encoded by `hint`.

    A reference the sender does not hold is ignored (the chunk goes standalone).
    Raises ChunkNotFound if the chunk itself is not in the store.
    """
    data = Store.decode_stored(chunk_id, store.get_chunk_stored(chunk_id))
    return encode_data(store, data, hint, allow_entropy=allow_entropy, level=level, encodings=encodings)


def encode_data(store: Store | None, data: bytes | memoryview, hint: ChunkHint | None, *,
                allow_entropy: bool = True, level: int = 3, encodings: Iterable[str] | None = None) -> FrameFields:
    """`encode_chunk` for bytes already read; the reference, if any, comes from `store`.

    The sender does not verify the reference it reads (nor the chunk, as for stored
    forms): the receiver checks the decoded bytes against the chunk id.
    """
    return _encode(store, data, hint or STANDALONE, allow_entropy, level, encodings)[0]


def _encode(store: Store | None, data: bytes | memoryview, hint: ChunkHint, allow_entropy: bool, level: int,
            encodings: Iterable[str] | None) -> tuple[FrameFields, bool]:
    """`encode_data`, and whether the sender held every reference the hint names."""
    reference = None
    if hint.reference and store is not None:
        try:
            reference = Store.decode_stored(hint.reference, store.get_chunk_stored(hint.reference))
        except (NotFound, CorruptChunk):
            reference = None
    more = []  # further references (`multipatch`): those the sender holds
    for ref_id in hint.more if reference is not None else ():
        try:
            more.append((Store.decode_stored(ref_id, store.get_chunk_stored(ref_id)), ref_id))
        except (NotFound, CorruptChunk):
            pass
    enc = codec.encode(data, dtype=hint.dtype, reference=reference,
                       reference_id=hint.reference if reference is not None else None,
                       level=level, allow_entropy=allow_entropy, encodings=encodings, more=more)
    held = not hint.reference or (reference is not None and len(more) == len(hint.more))
    return (enc.tag, enc.raw_size, enc.body), held


def stored_frame(stored: bytes) -> FrameFields:
    """The frame fields that forward a stored chunk (tag byte + payload) as it is."""
    tag, payload = stored[0], memoryview(stored)[1:]
    return tag, _raw_size(tag, payload), payload
