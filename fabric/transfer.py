"""The sync engine: bring a store up to a manifest, fetching only what it lacks.

    stats = await sync(manifest, store, [relay, origin], FetchOptions(connections=4))

The missing chunks are grouped into batches (many small chunks per request, a few
MiB each) and a pool of workers fetches batches in parallel over several
connections, in manifest order. Each worker asks the first healthy source in the
caller's order (relay first, origin last). Batches whose chunks have a preferred
source (a sibling hub that owns them, `prefer`) have workers of their own (the
connections are split between the groups): waiting on a sibling never holds up the
batches this site fetches itself (two hubs whose every worker waited on the other would
deadlock until a stall timeout), and the chunks in flight stay near the front of the
manifest, where this site's children are asking. Every chunk is decoded and checked against its id in a thread,
then given to the caller's sink (`store_sink` puts it in the store); so a transfer
that is killed resumes from what it stored. `FetchOptions` holds the knobs.

Faults, and what happens:
* a connection error, HTTP error, malformed stream, or an answer that while we wait
  for it delivers under `min_rate` B/s over `stall_timeout` s (`fabric.pacing`; a stop
  or a drip fails within that window, whatever the frame's size): the source is benched
  with exponential backoff and the batch's unfinished chunks go back for any source.
  A relay that is itself still fetching a chunk says so with wait frames
  (docs/protocol.md, "The chunk stream"): they restart the stall window, so a slow but
  live relay is never abandoned for the origin; only `give_up_after` seconds of waits
  without a chunk count as a stall;
* a frame for a chunk this request did not ask for, or asked for and already got: the
  source is cut off at once (no more of its bytes are read) and it counts as a bad chunk;
* a source that says it lacks a chunk, or sends bytes that do not match the id: that
  source is excluded for that chunk, and the chunk is fetched elsewhere; a source
  that lies `max_bad` times is dropped for the rest of the transfer;
* every source down: workers wait for the first to come off the bench, and give up
  with `TransferError` only after `give_up_after` seconds without progress.

Memory: payloads read but not yet stored, and for a delta the chunk it decodes to and its
reference (`fabric.wire.frames.memory`), are bounded by a `fabric.pacing.ByteBudget`
that every fetch sharing an `Inflight` shares (a relay's deploy and its pull-throughs:
`MEMORY_BUDGET`, 12 MiB); a fetch without one (`fabric pull`, `fabric sync`) has its own
of `FetchOptions.memory` bytes (32 MiB: a 12 MiB budget held one 8 MiB payload at a time,
so every other connection's reading waited for that chunk to be verified and written,
8-11 s of waiting summed over the connections of a 1 GB pull), and each payload is read
into one buffer of its size (`FrameReader(reserve=...)`).

Length: over the ~450-line guide. The engine is one state machine (batches, sources,
benching, exclusions, waits, budget) whose rules the list above states; split across
modules, each rule would lose the state it reads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from fabric import tracing
from fabric.pacing import ByteBudget, ProgressFloor, RateLimit
from fabric.wire import frames as wire
from fabric.wire.client import OriginClient, error_from, read_body
from fabric.wire.negotiate import fetch_body, request_fields
from fabric.wire.protocol import CHUNKS_FETCH, MAX_IDS, MAX_JSON, WAIT_HEADER
from fabric.errors import FabricError, IntegrityError, InvalidInput, ReferenceMismatch, StoreFull, TransferError
from fabric.logs import get_logger
from fabric.core.manifest import Manifest
from fabric.store.store import Store

log = get_logger("transfer")
BATCH_BYTES = 16 << 20
PRIVATE_BUDGET = 32 << 20  # a fetch of its own: about one 8 MiB payload per connection (4) stored while more are read
_RECEIVE_AHEAD = 2  # chunks of one response being verified and stored while the next is read
Progress = Callable[[int], None]
ChunkSink = Callable[[str, bytes], None]  # (chunk id, verified bytes): make the chunk the store's
Forward = Callable[[str, int, int, "bytes | bytearray"], None]  # (id, stream tag, raw size, payload) of a codec frame


@dataclass(frozen=True)
class FetchOptions:
    """How a fetch behaves, whatever it fetches."""

    connections: int = 4  # batches in flight at once
    batch_bytes: int = BATCH_BYTES  # about this many bytes of chunks per request
    max_rate: float | None = None  # bytes per second, all connections together
    stall_timeout: float = 30.0  # seconds of waiting over which a source must deliver …
    min_rate: float = 8 << 10  # … at least this many bytes per second, or be benched
    give_up_after: float = 120.0  # TransferError after this long without any progress
    max_bad: int = 3  # chunks failing verification before a source is dropped
    memory: int = PRIVATE_BUDGET  # payload bytes held at once by a fetch without an `Inflight` (whose budget it shares)


def store_sink(store: Store, *, defer: bool = False, then: ChunkSink | None = None) -> ChunkSink:
    """The usual sink: put each fetched chunk in `store`, then hand it to `then` (if any).
    With `defer`, chunks are durable and visible in the store only at its `flush()`, which
    the caller runs (right for a private cache; a relay's store serves at once)."""
    def sink(chunk_id: str, data: bytes) -> None:
        store.put_chunk(chunk_id, data, verified=True, defer=defer)
        if then is not None:
            then(chunk_id, data)
    return sink


@dataclass
class SourceState:
    client: OriginClient
    failures: int = 0  # consecutive transport failures
    benched_until: float = 0.0
    bad_chunks: int = 0
    dropped: bool = False
    bytes: int = 0

    @property
    def url(self) -> str:
        return self.client.url

    def available(self, now: float) -> bool:
        return not self.dropped and now >= self.benched_until


@dataclass
class SyncStats:
    chunks_total: int = 0
    chunks_reused: int = 0
    chunks_fetched: int = 0
    bytes_received: int = 0  # payload bytes on the wire
    bytes_raw: int = 0  # decoded bytes of the fetched chunks
    seconds: float = 0.0
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    bad_chunks_by_source: dict[str, int] = field(default_factory=dict)
    sources_dropped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["wire_ratio"] = round(self.bytes_received / self.bytes_raw, 6) if self.bytes_raw else None
        return d


@dataclass
class _Batch:
    ids: list[str]
    excluded: dict[str, set[str]] = field(default_factory=dict)  # chunk id -> source urls to avoid
    preferred: SourceState | None = None  # asked before the usual order (the chunks' owner)


class Inflight:
    """Chunks being fetched right now, so concurrent wants of one chunk share one fetch.

    A fetcher `claim`s the chunks it will fetch; anyone else who wants one of them
    `wait`s on its future instead of fetching it again. The claimer resolves each
    future with True once the chunk is stored, or False if it gave up. All calls
    happen on one event loop.
    """

    def __init__(self):
        self._futures: dict[str, asyncio.Future] = {}
        self.progressed = time.monotonic()  # the last claim or stored chunk: waiters' patience runs from it
        self.budget = ByteBudget()  # the memory of every fetch that shares this

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._futures

    def claim(self, ids: list[str]) -> tuple[list[str], list[tuple[str, asyncio.Future]]]:
        """Split `ids` into those this caller now owns and (id, future) of those others own."""
        owned, foreign = [], []
        loop = asyncio.get_running_loop()
        self.progressed = time.monotonic()
        for cid in ids:
            if cid in self._futures:
                foreign.append((cid, self._futures[cid]))
            else:
                self._futures[cid] = loop.create_future()
                owned.append(cid)
        return owned, foreign

    def waiter(self, chunk_id: str) -> asyncio.Future | None:
        return self._futures.get(chunk_id)

    def resolve(self, chunk_id: str, ok: bool) -> None:
        if ok:
            self.progressed = time.monotonic()
        fut = self._futures.pop(chunk_id, None)
        if fut is not None and not fut.done():
            fut.set_result(ok)

    def release(self, ids: list[str]) -> None:
        for cid in ids:
            self.resolve(cid, False)


async def sync(manifest: Manifest, store: Store, sources: list[OriginClient],
               options: FetchOptions = FetchOptions(), **hooks) -> SyncStats:
    """Fetch every chunk of `manifest` that `store` lacks from `sources` (in preference order).

    `hooks` are the keyword arguments of `fetch_chunks`; without `delta_fields`, the
    versions the store holds are named, so sources can send deltas against them.

    Raises:
        TransferError: some chunks could not be fetched from any source in time.
    """
    if "delta_fields" not in hooks:
        hooks["delta_fields"] = await asyncio.to_thread(request_fields, store, manifest)
    return await fetch_chunks(manifest.unique_chunks(), store, sources, options, **hooks)


async def fetch_chunks(sizes: dict[str, int | None], store: Store, sources: list[OriginClient],
                       options: FetchOptions = FetchOptions(), *, sink: ChunkSink | None = None,
                       progress: Progress | None = None, delta_fields: dict | None = None,
                       prefer: Callable[[str], OriginClient | None] | None = None,
                       inflight: Inflight | None = None, preclaimed: bool = False,
                       forward: Forward | None = None) -> SyncStats:
    """Fetch the chunks in `sizes` (id -> size, or None if unknown) that `store` lacks.

    Args:
        options: connections, batch size, rate and patience.
        sink: called (in a worker thread) with each fetched chunk's verified bytes; it
            must make the chunk the store's, as `store_sink` (the default) does, or
            `fabric.pull.Assembly.keep` with one write for the files and the store both.
        progress: called with the decoded size of each chunk fetched.
        delta_fields: (`fabric.wire.negotiate.request_fields`) go into every fetch request.
        prefer: names, per chunk, a source to ask before the usual order (sibling relays
            splitting one uplink by chunk owner).
        inflight: chunks another fetcher is already getting are awaited, not fetched
            again, and the chunks this call fetches are announced to later askers.
        preclaimed: the caller has already claimed every id in `sizes` in `inflight`.
        forward: called (in a worker thread) with each codec frame (id, tag, raw size,
            payload) once it decoded to its id: a relay keeps them for its children.

    Raises:
        TransferError: some chunks could not be fetched from any source in time.
    """
    if not sources:
        raise TransferError("no sources to fetch from")
    t0 = time.monotonic()
    sink = sink or store_sink(store)
    missing = await asyncio.to_thread(store.missing, list(sizes))
    stats = SyncStats(chunks_total=len(sizes), chunks_reused=len(sizes) - len(missing))
    if preclaimed:
        owned, foreign = missing, []
        for cid in set(sizes) - set(missing):
            inflight.resolve(cid, True)
    else:
        owned, foreign = inflight.claim(missing) if inflight else (missing, [])
    engine = _Engine(store, sizes, [SourceState(s) for s in sources], stats, options, sink, progress,
                     inflight, delta_fields, forward)
    try:
        for batch in engine.batches(owned, options.batch_bytes, prefer):
            engine.put(batch)
        await engine.run(max(1, options.connections))
    finally:
        if inflight:
            inflight.release(owned)
    failed = [cid for cid, fut in foreign if not await fut]
    if failed:  # the other fetcher gave up on these: try them ourselves, once
        again = await fetch_chunks({c: sizes[c] for c in failed}, store, sources, options, sink=sink,
                                   progress=progress, delta_fields=delta_fields, forward=forward)
        stats.chunks_fetched += again.chunks_fetched
        stats.bytes_received += again.bytes_received
        stats.bytes_raw += again.bytes_raw
    stats.seconds = time.monotonic() - t0
    return stats


def _floor_only(resp: aiohttp.ClientResponse) -> None:
    """Turn off the connection's per-read timeout (`fabric.wire.client.READ_TIMEOUT`) for the
    rest of this answer, whose body the progress floor watches, more strictly: aiohttp
    re-arms that timer on every socket read (cancel, `call_later`), 8% of the event loop's
    time in a 1 GB pull. The answer's headers came under it; the next request on the
    connection sets its own again."""
    conn = resp.connection
    protocol = conn.protocol if conn is not None else None
    if protocol is not None and isinstance(getattr(type(protocol), "read_timeout", None), property):
        protocol.read_timeout = None


def _batches(ids: list[str], sizes: dict[str, int | None], limit: int) -> list[list[str]]:
    out, current, total = [], [], 0
    for cid in ids:
        size = sizes[cid] or BATCH_BYTES // 8  # unknown size: assume a large-ish chunk
        if current and (total + size > limit or len(current) >= MAX_IDS):
            out.append(current)
            current, total = [], 0
        current.append(cid)
        total += size
    if current:
        out.append(current)
    return out


class _Engine:
    def __init__(self, store: Store, sizes: dict[str, int | None], sources: list[SourceState], stats: SyncStats,
                 options: FetchOptions, sink: ChunkSink, progress: Progress | None, inflight: Inflight | None,
                 delta_fields: dict | None, forward: Forward | None = None):
        self.store, self.sizes, self.sources, self.stats = store, sizes, sources, stats
        self.inflight, self.sink, self.delta_fields, self.forward = inflight, sink, delta_fields, forward
        self.standalone: set[str] = set()  # chunks whose reference we lack: asked for without one
        self.preferred: dict[str, SourceState] = {}
        self.refusal: FabricError | None = None  # a 401/403 from a source, reported if all else fails
        self.stall_timeout, self.give_up_after = options.stall_timeout, options.give_up_after
        self.min_rate = options.min_rate
        self.max_bad = options.max_bad
        self.limit = RateLimit(options.max_rate) if options.max_rate else None
        self.progress = progress
        self.queues: dict[str | None, asyncio.Queue[_Batch]] = {}  # by preferred source: workers each
        self.budget = inflight.budget if inflight else ByteBudget(options.memory)
        self.last_progress = time.monotonic()
        self.failure: FabricError | None = None

    def batches(self, ids: list[str], limit: int, prefer) -> list[_Batch]:
        """Batches of `ids`, each batch's chunks sharing one preferred source (or none)."""
        groups: dict[str | None, list[str]] = {}
        for cid in ids:
            client = prefer(cid) if prefer else None
            key = None
            if client is not None:
                key = client.url
                self.preferred.setdefault(key, SourceState(client))
            groups.setdefault(key, []).append(cid)
        return [_Batch(part, preferred=self.preferred.get(key)) for key, group in groups.items()
                for part in _batches(group, self.sizes, limit)]

    def _candidates(self, batch: _Batch) -> list[SourceState]:
        return ([batch.preferred] if batch.preferred else []) + self.sources

    def put(self, batch: _Batch) -> None:
        key = batch.preferred.url if batch.preferred else None
        self.queues.setdefault(key, asyncio.Queue()).put_nowait(batch)

    async def run(self, connections: int) -> None:
        """Work every queue off, `connections` workers shared among the queues (one each at least)."""
        each = max(1, connections // max(1, len(self.queues)))
        tasks = [asyncio.create_task(self._worker(q)) for q in self.queues.values() for _ in range(each)]
        try:
            for q in self.queues.values():
                await q.join()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.failure:
            raise self.failure

    async def _worker(self, queue: asyncio.Queue[_Batch]) -> None:
        while True:
            batch = await queue.get()
            try:
                if self.failure is None:
                    await self._attempt(batch)
            except FabricError as e:  # not a source's fault (e.g. our disk is full): stop
                self.failure = self.failure or e
            finally:
                queue.task_done()

    async def _attempt(self, batch: _Batch) -> None:
        while True:
            source = self._pick(batch)
            if source is None:
                if self._hopeless(batch) or time.monotonic() - self.last_progress > self.give_up_after:
                    self.failure = self.refusal or TransferError(
                        f"{len(batch.ids)} chunk(s) could not be fetched from any source, e.g. {batch.ids[0]}")
                    return
                await asyncio.sleep(self._wait_time())
                continue
            ids = [c for c in batch.ids if source.url not in batch.excluded.get(c, ())]
            leftover = await self._fetch(source, ids, batch)
            rest = [c for c in batch.ids if c not in ids] + leftover
            if not rest:
                return
            batch.ids = rest

    def _pick(self, batch: _Batch) -> SourceState | None:
        now = time.monotonic()
        for s in self._candidates(batch):
            if s.available(now) and any(s.url not in batch.excluded.get(c, ()) for c in batch.ids):
                return s
        return None

    def _hopeless(self, batch: _Batch) -> bool:
        """No source, benched or not, may still serve some chunk of the batch."""
        return not any(not s.dropped and any(s.url not in batch.excluded.get(c, ()) for c in batch.ids)
                       for s in self.sources)

    def _wait_time(self) -> float:
        now = time.monotonic()
        pending = [s.benched_until - now for s in self.sources if not s.dropped and s.benched_until > now]
        return min([0.5] + pending) if pending else 0.5

    async def _fetch(self, source: SourceState, ids: list[str], batch: _Batch) -> list[str]:
        """Fetch `ids` from `source`; return the ids still missing afterwards."""
        done: set[str] = set()
        retry: set[str] = set()  # reference mismatches: asked for again, standalone
        body = fetch_body(ids, self.delta_fields, self.standalone)
        try:
            headers = {**tracing.headers(), WAIT_HEADER: "1"}
            async with source.client.session.post(f"{source.url}{CHUNKS_FETCH}", json=body, headers=headers) as resp:
                if resp.status in (401, 403):  # retrying will not help: drop the source, say why
                    self._refused(source, error_from(resp.status, await read_body(resp, MAX_JSON, source.url)))
                    return list(ids)
                if resp.status >= 400:
                    raise TransferError(f"{source.url} answered HTTP {resp.status} to a chunk fetch")
                _floor_only(resp)
                await self._read_answer(source, resp.content, ids, batch, done, retry)
            source.failures = 0
            for cid in ids:  # a complete answer that skipped an id counts as "missing" for it
                if cid not in done and cid not in retry:
                    batch.excluded.setdefault(cid, set()).add(source.url)
        except StoreFull:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, TransferError, wire.BadFrame, OSError) as e:
            self._bench(source, e)
        log.debug("fetch batch", source=source.url, asked=len(ids), got=len(done), again=len(retry))
        return [c for c in ids if c not in done]

    async def _read_answer(self, source: SourceState, stream, ids: list[str], batch: _Batch, done: set[str],
                           retry: set[str]) -> None:
        """Read one chunk-stream answer under the progress floor; each frame is stored while the next is read.

        A wait frame (a relay still fetching that chunk upstream) restarts the floor's
        window; waits without a chunk or missing frame for `give_up_after` s are a stall."""
        asked, seen = set(ids), set()
        receiving: set[asyncio.Task] = set()
        floor = ProgressFloor(stream, window=self.stall_timeout, min_rate=self.min_rate, source=source.url)
        answered = time.monotonic()  # the last chunk or missing frame (or the answer's start)
        held = [0]  # budget taken for a payload not yet handed to `_receive`

        async def reserve(n: int) -> None:
            await self.budget.take(n)
            held[0] = n
        try:
            async with floor:
                async for frame in wire.FrameReader(floor.read, waits=True, reserve=reserve):
                    if frame.chunk_id not in asked or frame.chunk_id in seen:
                        self._unasked(source, frame, seen)
                    if frame.kind == wire.FRAME_WAIT:
                        if time.monotonic() - answered > self.give_up_after:
                            raise TransferError(f"{source.url} kept waiting on {frame.chunk_id} for over "
                                                f"{self.give_up_after:g}s")
                        floor.alive()
                        continue
                    answered = time.monotonic()
                    seen.add(frame.chunk_id)
                    held[0] = 0  # `_receive` gives it back
                    receiving.add(asyncio.create_task(self._receive(source, frame, batch, done, retry)))
                    del frame  # `_receive` holds the payload now: not this loop while the next waits on the budget
                    if len(receiving) >= _RECEIVE_AHEAD:
                        finished, receiving = await asyncio.wait(receiving, return_when=asyncio.FIRST_COMPLETED)
                        for t in finished:
                            t.result()
        finally:
            self.budget.give(held[0])  # a payload whose read failed
            for t in asyncio.as_completed(receiving):
                await t

    async def _receive(self, source: SourceState, frame: wire.Frame, batch: _Batch, done: set[str],
                       retry: set[str]) -> None:
        cid = frame.chunk_id
        if frame.kind == wire.FRAME_MISSING:
            batch.excluded.setdefault(cid, set()).add(source.url)
            return
        try:
            await self._store(source, frame, batch, done, retry)
        finally:
            self.budget.give(frame.held)  # what `reserve` took for it (`fabric.wire.frames.memory`)

    async def _store(self, source: SourceState, frame: wire.Frame, batch: _Batch, done: set[str],
                     retry: set[str]) -> None:
        cid = frame.chunk_id
        try:
            if self.limit:
                await self.limit.take(len(frame.payload))
            size = await asyncio.to_thread(self._store_frame, frame)
        except ReferenceMismatch as e:
            self.stats.bytes_received += len(frame.payload)
            if cid in self.standalone:  # asked for it standalone, got a reference again
                self._bad_chunk(source, cid, batch, e)
            else:
                self.standalone.add(cid)
                retry.add(cid)
            return
        except (IntegrityError, InvalidInput) as e:  # corrupt, bad frame, unknown encoding
            self._bad_chunk(source, cid, batch, e)
            return
        done.add(cid)
        if self.inflight:
            self.inflight.resolve(cid, True)
        self.stats.chunks_fetched += 1
        self.stats.bytes_received += len(frame.payload)
        self.stats.bytes_raw += size
        source.bytes += len(frame.payload)
        self.stats.bytes_by_source[source.url] = source.bytes
        self.last_progress = time.monotonic()
        if self.progress:
            self.progress(size)

    def _store_frame(self, frame: wire.Frame) -> int:
        data = wire.decode_frame(frame, self.sizes[frame.chunk_id], references=wire.store_references(self.store))
        self.sink(frame.chunk_id, data)
        if self.forward is not None and frame.encoding in wire.CODEC_TAGS:  # decoded to its id: a relay keeps it
            self.forward(frame.chunk_id, frame.encoding, frame.raw_size, frame.payload)
        return len(data)

    def _bad_chunk(self, source: SourceState, cid: str, batch: _Batch, e: Exception) -> None:
        batch.excluded.setdefault(cid, set()).add(source.url)
        log.warning("bad chunk from source", source=source.url, chunk=cid, error=str(e))
        self._count_bad(source)

    def _count_bad(self, source: SourceState) -> None:
        source.bad_chunks += 1
        self.stats.bad_chunks_by_source[source.url] = source.bad_chunks
        if source.bad_chunks >= self.max_bad and not source.dropped:
            source.dropped = True
            self.stats.sources_dropped.append(source.url)
            log.warning("source dropped: too many bad chunks", source=source.url)

    def _unasked(self, source: SourceState, frame: wire.Frame, seen: set[str]) -> None:
        """A frame this answer had no business sending: count it against the source, stop reading it."""
        again = frame.chunk_id in seen
        self._count_bad(source)
        raise wire.BadFrame(f"{source.url} sent chunk {frame.chunk_id} "
                            f"{'again' if again else 'which this request did not ask for'}")

    def _refused(self, source: SourceState, e: FabricError) -> None:
        source.dropped = True
        self.stats.sources_dropped.append(source.url)
        self.refusal = e
        log.warning("source refused our token", source=source.url, code=e.code, error=e.message)

    def _bench(self, source: SourceState, e: Exception) -> None:
        source.failures += 1
        backoff = min(10.0, 0.2 * 2 ** (source.failures - 1))
        source.benched_until = time.monotonic() + backoff
        log.warning("source failed", source=source.url, error=str(e) or type(e).__name__,
                    failures=source.failures, backoff_s=backoff)
