"""The one pull path: a version's files written into a folder, atomically.

    result = await pull(store, manifest, Sink.folder(dest), upstream=Upstream([origin]))

Every pull runs the same steps (`pull`): the manifest (`fetch_manifest`, sent as a
patch against the newest version the store holds), an `Assembly` of its files, the
chunks the store lacks fetched from the upstream's sources (`fabric.transfer`; none
for a purely local pull, `materialize`), the rest filled from the store, the commit
and the version recorded in the store's registry. The `Sink` says where the files
land and how they are committed: a DEST folder swapped into place (`fabric pull`), or
a site's `versions/<artifact>/<version>/` folder, which the site agent activates
afterwards.

An `Assembly` builds a version's files in a hidden sibling folder of DEST: every file
is created at its final size, then chunks are written at their offsets in whatever
order they come — straight from the network as each chunk is verified
(`fabric.transfer` hands it to `Assembly.write`), or from the store for the chunks it
already held (`fill_from_store`). `commit` fsyncs the files and renames the folder
into place, so a reader never sees a half-written version, and a failed pull
leaves DEST as it was. Each byte is written once and hashed once.

Given a store to pack into, each file is also hard-linked into that store as a pack
(`fabric.store.packs`) the moment it is created, and `keep` records each fetched
chunk there as a reference to its place in the file: the store holds the chunk
without a second copy, and a pull that is killed resumes from the references it
made durable. Where linking is impossible (store not local, another file system),
`packed` is False and the caller stores chunks itself. `fabric pull` and a site agent
both pack (`Sink.folder(pack=True)`, `Sink.site_version`): a site writes each byte of
a version once. A private cache's references are durable at its next flush; a site's
store serves each chunk at once, so there a chunk's bytes are `fdatasync`ed before its
reference is written. Chunks reused from the store move their references into the new
files (deferred: the old ones stay valid meanwhile), so older versions' packs can go;
a site hard-links a file unchanged since an older version instead (`share_files`:
its pack, verified). On a file system with reflinks a reused chunk is not even
written: its blocks are shared with the pack that held it (`_clone_in`), then read
back and verified. When done, each pack's mtime is set back to before its first reference, which is how
the store tells a file edited in place later (`fabric.store.packs.Guard`).
A site's sink (`Sink.seal`) also seals each chunk written (`fabric.core.seal`) and
writes the seal into the staging folder before the rename. A site reuses a folder that
is already there (a rollback, a restart after the build) once it verifies, and builds
it again if it does not (a file edited in place); the store's missing chunks are then
referenced in the folder's files (`packs.adopt`) rather than fetched.

Length: over the ~450-line guide. The assembly and the pull's steps share the sink's
rules (packing, durability, reuse, the seal), which must not drift apart between modules.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fabric.core import digest, seal
from fabric.core.manifest import Manifest
from fabric.errors import (ChunkNotFound, CorruptChunk, DestinationExists, FabricError, IntegrityError,
                           InvalidManifest, MissingChunks, StoreFull)
from fabric.fileio import cannot_share, clone_range, create_sized, pwrite_all, replace_file
from fabric.logs import get_logger
from fabric.store import packs
from fabric.store.packs import PackRef
from fabric.store.registry import Registry
from fabric.store.store import TAG_RAW, Store
from fabric.transfer import ChunkSink, FetchOptions, Forward, Inflight, Progress, SyncStats, fetch_chunks, store_sink
from fabric.wire.client import OriginClient
from fabric.wire.negotiate import manifest_base, request_fields

log = get_logger("pull")


@dataclass
class PullResult:
    artifact: str
    version: str
    manifest_id: str
    dest: str
    files: int
    bytes: int
    chunks_fetched: int = 0
    chunks_reused: int = 0
    bytes_received: int = 0  # payload bytes on the wire
    bytes_raw: int = 0  # decoded bytes of the chunks fetched
    packed: bool = False  # the store shares DEST's files (hard links) instead of keeping copies
    seconds: float = 0.0

    @property
    def wire_ratio(self) -> float | None:
        """Payload bytes on the wire per raw byte fetched."""
        return round(self.bytes_received / self.bytes_raw, 6) if self.bytes_raw else None

    def to_json(self) -> dict:
        return dict(self.__dict__, wire_ratio=self.wire_ratio)


def check_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        if not dest.is_dir() or any(dest.iterdir()):
            raise DestinationExists(f"{dest} exists and is not empty (use --force to replace it)")


class Assembly:
    """The files of `manifest`, being written under a staging folder next to `dest`."""

    def __init__(self, manifest: Manifest, dest: str | os.PathLike, *, overwrite: bool = False,
                 pack_into: Store | None = None, sealed: bool = False, share_files: bool = False,
                 direct: bool = True):
        self.manifest = manifest
        self.direct = direct  # large writes around the page cache (fabric.fileio.pwrite_all)
        self.sealer = seal.Sealer() if sealed else None  # each written (verified) chunk's xxh3-128
        self.dest = Path(dest).absolute()
        check_dest(self.dest, overwrite)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.dest.parent / f".{self.dest.name}.fabric-{uuid.uuid4().hex[:8]}"
        self.store = pack_into
        self.packed = pack_into is not None
        self._started_ns = 0  # the staging folder's mtime: before any reference, the packs' mtime once committed
        self._finished = False  # committing or aborted: takes nothing more from the store (`_take`)
        self._share = share_files and pack_into is not None  # link unchanged files of older versions
        self.shared: list[str] = []  # files linked from an older version instead of written
        self._packs: dict[Path, str] = {}  # file -> its pack in the store
        self._referenced: set[Path] = set()  # files whose pack a chunk reference points into
        self._places: dict[str, list[tuple[Path, int]]] = {}
        self._file_locks: dict[Path, threading.Lock] = {}
        self._written: set[str] = set()
        self._cloning = True  # reused chunks may share blocks with older files (False: this file system cannot)
        self._lock = threading.Lock()
        self._guard(self._create_files)

    def _create_files(self) -> None:
        self.staging.mkdir()
        self._started_ns = self.staging.stat().st_mtime_ns  # the file system's clock, as references get
        root = self.staging.resolve()
        owners: dict[str, int] = {}  # chunk id -> how many files hold it
        for entry in self.manifest.files:
            for cid in {c for c, _ in entry.chunks}:
                owners[cid] = owners.get(cid, 0) + 1
        for entry in self.manifest.files:
            path = self.staging / entry.path
            if not path.resolve().is_relative_to(root):
                raise InvalidManifest(f"file path {entry.path!r} escapes the destination")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file_locks[path] = threading.Lock()
            if self._share and self.packed and all(owners[c] == 1 for c, _ in entry.chunks) \
                    and self._link_unchanged(entry, path):
                self.shared.append(entry.path)
            else:
                create_sized(path, entry.size)
                if entry.chunks:
                    self._link(path)
            offset = 0
            for cid, size in entry.chunks:
                self._places.setdefault(cid, []).append((path, offset))
                offset += size

    def _link_unchanged(self, entry, path: Path) -> bool:
        """Hard-link, as `path`, a pack that is this very file in an older version (every chunk
        a reference into it at its offset, same size and mode), once its bytes verify: an
        unchanged file is not written again. Its chunks are then written (none is in another file)."""
        refs = [self.store.pack_ref(cid) for cid, _ in entry.chunks]
        if not refs or None in refs or len({r.pack for r in refs}) != 1:
            return False
        offset = 0
        for (cid, size), ref in zip(entry.chunks, refs):
            if (ref.offset, ref.size) != (offset, size):
                return False
            offset += size
        pack = self.store.backend.path(refs[0].pack)
        try:
            st = os.stat(pack)
            if st.st_size != entry.size or stat.S_IMODE(st.st_mode) != entry.mode:
                return False
            with open(pack, "rb") as f:
                for (cid, size), ref in zip(entry.chunks, refs):
                    data = os.pread(f.fileno(), size, ref.offset)
                    digest.verify(cid, data)
                    if self.sealer is not None:
                        self.sealer.add(cid, data)
            os.link(pack, path)
        except (OSError, FabricError):
            return False
        self._written.update(cid for cid, _ in entry.chunks)
        return True

    def _link(self, path: Path) -> None:
        if not self.packed:
            return
        key = self.store.link_pack(path)
        if key is not None:
            self.store.writing_pack(key)
            self._packs[path] = key
            return
        self.packed = False  # not here: the caller stores its own copies; drop the empty packs
        for key in self._packs.values():
            self.store.writing_pack(key, False)
            self.store.delete_pack(key)
        self._packs.clear()

    def write(self, chunk_id: str, data: bytes | memoryview, *, durable: bool = False) -> bool:
        """Write a verified chunk at every place the version uses it (with `durable`, on disk
        before this returns: `fdatasync`). Thread-safe.

        False if there was nothing to do: the chunk is not in this version, or is written.
        """
        with self._lock:
            if chunk_id in self._written or chunk_id not in self._places:
                return False
            self._written.add(chunk_id)
        if self.sealer is not None:
            self.sealer.add(chunk_id, data)
        self._guard(self._pwrite_all, chunk_id, data, durable)
        return True

    def keep(self, chunk_id: str, data: bytes | memoryview, *, defer: bool = True) -> None:
        """Write a fetched, verified chunk into the files and record it in the store as a
        reference into its pack. For `packed` only.

        With `defer` (a private cache) the reference is durable and visible at the store's
        next flush, whose `syncfs` covers the pack too. Without (a site's store, which serves
        the chunk at once) the chunk's bytes are made durable first, then its reference.
        """
        if chunk_id not in self._places:  # not ours: stored the usual way
            self.store.put_chunk(chunk_id, data, verified=True, defer=defer)
        elif self.write(chunk_id, data, durable=not defer):
            path, offset = self._places[chunk_id][0]
            self._referenced.add(path)
            self.store.put_packed(chunk_id, PackRef(self._packs[path], offset, len(data)), defer=defer)

    def keeper(self, *, defer: bool) -> Callable[[str, bytes], None]:
        """`keep` as a fetch's sink (`fabric.transfer.ChunkSink`). Without `defer` (a site's
        store, which others fetch into too: a relay's pull-through) the store also hands this
        assembly the chunks it needs that others put there meanwhile (`Store.take`)."""
        if not defer and self.packed:
            self.store.take(self._places, self._take)
        return lambda chunk_id, data: self.keep(chunk_id, data, defer=defer)

    def _take(self, chunk_id: str, data: bytes | memoryview) -> bool:
        """A chunk someone else put in the store: written and referenced here, unless written already."""
        if self._finished or not self.packed or not self.write(chunk_id, data, durable=True):
            return False
        path, offset = self._places[chunk_id][0]
        self._referenced.add(path)
        self.store.put_packed(chunk_id, PackRef(self._packs[path], offset, len(data)))
        return True

    def _pwrite_all(self, chunk_id: str, data, durable: bool = False) -> None:
        view = memoryview(data).cast("B")
        for i, (path, offset) in enumerate(self._places[chunk_id]):
            fd = os.open(path, os.O_WRONLY)
            # One writer per file at a time: the kernel serialises writes to a file anyway,
            # and its lock spins where ours sleeps (seen as 15% of a pull's CPU on 2 cores).
            try:
                with self._file_locks[path]:
                    pwrite_all(fd, view, offset, direct=self.direct)
                if durable and i == 0:  # the place its reference names
                    os.fdatasync(fd)
            finally:
                os.close(fd)

    def fill_from_store(self, store: Store, progress=None, *, refetch: list[str] | None = None) -> int:
        """Write every chunk not written yet from `store` (verified as read); returns how many.

        When packing into `store`, the store's references move to this version's files
        (durable at its next flush), so the packs of older versions can go with them.
        With `refetch`, a chunk the store cannot give back intact (a pack spoiled by an
        edit in place, say) is deleted from the store and its id appended to `refetch`
        instead of raising: the caller fetches it again and calls this once more.
        """
        todo = [cid for cid in self._places if cid not in self._written]
        missing = store.missing(todo)
        if missing:
            raise MissingChunks(f"the store lacks {len(missing)} chunk(s) of this version, e.g. {missing[0]}")
        done = 0
        for cid in todo:
            try:
                shared = self._clone_in(cid) if store is self.store else None  # its blocks shared, not written
                data = shared if shared is not None else store.get_chunk(cid)
            except (CorruptChunk, ChunkNotFound) as e:
                if refetch is None:
                    raise
                log.warning("stored chunk unreadable; fetching it again", chunk=cid, error=e.message)
                store.delete_chunk(cid)
                refetch.append(cid)
                continue
            if shared is None and self.packed and store is self.store:
                self.keep(cid, data)  # refer to this version's file now (at the next flush): older packs can go
            elif shared is None:
                self.write(cid, data)
            done += 1
            if progress:
                progress(len(data) * len(self._places[cid]))
        return done

    def _clone_in(self, chunk_id: str) -> bytes | None:
        """Put a chunk the store holds in a pack (an older version's file) at its places by
        sharing the pack's blocks (`fabric.fileio.clone_range`: reflinks, nothing written),
        then verify what landed and refer to it, as `keep` does; the chunk's bytes, or None
        (nothing done) where the blocks cannot be shared. Raises CorruptChunk if the shared
        bytes do not match the id (the pack was spoiled): the chunk then counts as not written."""
        if not self.packed or not self._cloning:
            return None
        found = self.store.open_stored(chunk_id)
        if found is None:
            return None
        with found.file:
            if found.tag != TAG_RAW:
                return None
            with self._lock:
                if chunk_id in self._written:
                    return None
                self._written.add(chunk_id)
            shared = False
            try:
                data = self._share_blocks(chunk_id, found)
                if data is not None:
                    digest.verify(chunk_id, data)
                    shared = True
            finally:
                if not shared:  # the caller writes it (or fetches it again)
                    with self._lock:
                        self._written.discard(chunk_id)
        if not shared:
            return None
        if self.sealer is not None:
            self.sealer.add(chunk_id, data)
        path, offset = self._places[chunk_id][0]
        self._referenced.add(path)
        self.store.put_packed(chunk_id, PackRef(self._packs[path], offset, len(data)), defer=True)  # as `keep`
        return data

    def _share_blocks(self, chunk_id: str, found) -> bytes | None:
        """Share the blocks `found` holds at every place of `chunk_id`; the bytes that landed,
        read back from the first place, or None where the file system cannot share them."""
        data = None
        for path, offset in self._places[chunk_id]:
            fd = os.open(path, os.O_RDWR)
            try:
                with self._file_locks[path]:
                    if not clone_range(found.file.fileno(), found.offset, fd, offset, found.size):
                        self._cloning = not cannot_share(fd)  # none will share on this file system
                        return None
                    if data is None:
                        data = os.pread(fd, found.size, offset)
            finally:
                os.close(fd)
        return data

    def commit(self) -> None:
        """Make the files durable and move the folder into place as DEST."""
        def finish():
            self._release()  # every chunk is written by now: what others put goes elsewhere
            for entry in self.manifest.files:
                path = self.staging / entry.path
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(path, entry.mode)
            self._close_packs()
            if self.sealer is not None:
                replace_file(self.staging / seal.SEAL_FILE, self.sealer.encode(self.manifest))
            _swap_into_place(self.staging, self.dest)
        self._guard(finish)

    def _release(self) -> None:
        self._finished = True
        if self.store is not None:
            self.store.release_takes(self._take)

    def _close_packs(self) -> None:
        """Done writing: each pack's mtime goes back to before its first reference, so a later
        write into the file (a program editing DEST in place) shows (`Store._pack_intact`)."""
        for path, key in self._packs.items():
            try:
                os.utime(path, ns=(self._started_ns, self._started_ns))
            except FileNotFoundError:
                pass
            self.store.writing_pack(key, False)

    def abort(self) -> None:
        """Remove the staging folder. Packs that chunks refer to stay: a retry resumes from them."""
        self._release()
        if self._packs:
            self._close_packs()
        shutil.rmtree(self.staging, ignore_errors=True)
        for path, key in self._packs.items():
            if path not in self._referenced:
                self.store.delete_pack(key)

    def _guard(self, fn, *args) -> None:
        """Run `fn`; on any failure remove the staging folder; a full disk is StoreFull."""
        try:
            fn(*args)
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left to write {self.manifest.artifact}@{self.manifest.version} "
                                f"into {self.dest}") from None
            raise
        except BaseException:
            self.abort()
            raise


@dataclass(frozen=True)
class Sink:
    """Where a pulled version's files land, and how they are committed.

    Make one with `Sink.folder` (`fabric pull`) or `Sink.site_version` (a site agent).
    """

    dest: Path
    overwrite: bool = False  # replace a DEST that exists and is not empty (`--force`)
    pack: bool = False  # the store shares the files (hard links) instead of keeping copies
    private: bool = True  # the store is a private cache: chunks durable at its next flush
    reuse: bool = False  # a folder already at `dest` is this version, built before: verify, keep
    must_record: bool = False  # failing to record the version in the registry fails the pull
    seal: bool = False  # write the site seal (fabric.core.seal) beside the files
    share_files: bool = False  # hard-link files unchanged since an older version (with `pack`)
    direct: bool = True  # large writes skip the page cache (fabric.fileio): nothing reads them soon

    @classmethod
    def folder(cls, dest: str | os.PathLike, *, overwrite: bool = False, pack: bool = False) -> "Sink":
        """A DEST folder, swapped into place; the store, a cache later pulls reuse."""
        return cls(Path(dest), overwrite=overwrite, pack=pack)

    @classmethod
    def site_version(cls, folder: str | os.PathLike) -> "Sink":
        """A site's `versions/<artifact>/<version>/` folder (complete or absent), which
        the agent activates afterwards. The site's store shares the folder's files as
        packs (one copy of each byte at the site) and serves other sites at once, and
        its registry is what they (and its workers) read, so recording the version must
        succeed. Its writes go through the page cache: children fetch each chunk from
        these files (sendfile) as soon as it lands, and workers load the version next."""
        return cls(Path(folder), pack=True, private=False, reuse=True, must_record=True, seal=True,
                   share_files=True, direct=False)


@dataclass(frozen=True)
class Upstream:
    """Where a pull fetches the chunks its store lacks: `sources` in preference order."""

    sources: list[OriginClient]
    options: FetchOptions = field(default_factory=FetchOptions)
    inflight: Inflight | None = None  # shared with other fetchers of the same store (a relay)
    prefer: Callable[[str], OriginClient | None] | None = None  # a chunk's owner, asked first
    forward: Forward | None = None  # gets each codec frame fetched (`fabric.transfer.fetch_chunks`)


async def fetch_manifest(store: Store, client: OriginClient, artifact: str, version: str) -> Manifest:
    """`artifact@version`'s manifest from `client`, sent as a patch against the newest
    version of the artifact the store holds (if any)."""
    base = await asyncio.to_thread(manifest_base, store, artifact, version)
    return await client.manifest(artifact, version, base)


async def pull(store: Store, manifest: Manifest, sink: Sink, *, upstream: Upstream | None = None,
               progress: Progress | None = None,
               on_fetched: Callable[[SyncStats], None] | None = None) -> PullResult:
    """Write `manifest`'s files into `sink`, fetching what `store` lacks from `upstream`.

    Args:
        upstream: where missing chunks come from; without one, the store must hold
            every chunk, and the version is not recorded again.
        progress: gets byte counts: of the chunks fetched (with an upstream), or of the
            files written (without).
        on_fetched: sees the fetch's statistics once every chunk is in the store.

    Raises:
        MissingChunks: (no upstream) the store lacks some chunk of the version.
        TransferError: some chunks could not be fetched from any source in time.
        DestinationExists: DEST exists and is not empty, and the sink may not overwrite it.
        StoreFull: no space left to write the files.
    """
    t0 = time.monotonic()
    if upstream is None:
        missing = await asyncio.to_thread(store.missing, manifest.chunk_ids())
        if missing:
            raise MissingChunks(f"the store lacks {len(missing)} chunk(s) of this version, e.g. {missing[0]}")
    packed = False
    reused = sink.reuse and await asyncio.to_thread(_reusable, manifest, sink)  # a rollback, a restart after the build
    if reused:
        adopted = sink.pack and await asyncio.to_thread(packs.adopt, store, manifest, sink.dest)
        if adopted:  # the store holds the version now, in the folder's files
            sizes = manifest.unique_chunks()
            stats = SyncStats(chunks_total=len(sizes), chunks_reused=len(sizes))
        else:
            stats = await _fetch(store, manifest, sink, upstream, store_sink(store, defer=sink.private), progress)
        if on_fetched:
            on_fetched(stats)
        packed = adopted
    else:  # build the folder as chunks arrive; the ones the store held are copied after
        assembly = await asyncio.to_thread(Assembly, manifest, sink.dest, overwrite=sink.overwrite or sink.reuse,
                                           pack_into=store if sink.pack else None, sealed=sink.seal,
                                           share_files=sink.share_files, direct=sink.direct)
        try:
            stats = await _assemble(store, manifest, sink, assembly, upstream, progress, on_fetched)
            await asyncio.to_thread(assembly.commit)
        except BaseException:
            await asyncio.to_thread(assembly.abort)
            raise
        packed = assembly.packed
    if upstream is not None:  # the store holds the whole version now: later pulls may ask for deltas against it
        try:
            await asyncio.to_thread(Registry(store).commit, manifest)
        except FabricError:
            if sink.must_record:
                raise
    return PullResult(
        artifact=manifest.artifact, version=manifest.version, manifest_id=manifest.id, dest=str(sink.dest),
        files=len(manifest.files), bytes=manifest.size, chunks_fetched=stats.chunks_fetched,
        chunks_reused=stats.chunks_reused, bytes_received=stats.bytes_received, bytes_raw=stats.bytes_raw,
        packed=packed, seconds=time.monotonic() - t0,
    )


async def _assemble(store: Store, manifest: Manifest, sink: Sink, assembly: Assembly, upstream: Upstream | None,
                    progress: Progress | None, on_fetched: Callable[[SyncStats], None] | None) -> SyncStats:
    """Fetch into `assembly` what the store lacks, then fill the rest of it from the store."""
    if upstream is None:
        await asyncio.to_thread(assembly.fill_from_store, store, progress)
        if assembly.packed:
            await asyncio.to_thread(store.flush)  # the references it moved
        sizes = manifest.unique_chunks()
        return SyncStats(chunks_total=len(sizes), chunks_reused=len(sizes))
    chunk_sink = assembly.keeper(defer=sink.private) if assembly.packed \
        else store_sink(store, defer=sink.private, then=assembly.write)
    stats = await _fetch(store, manifest, sink, upstream, chunk_sink, progress)
    if on_fetched:
        on_fetched(stats)
    refetch: list[str] = []  # stored chunks found spoiled (a pack edited in place): fetched again
    await asyncio.to_thread(assembly.fill_from_store, store, refetch=refetch)
    if refetch:
        sizes = manifest.unique_chunks()
        again = await _fetch(store, manifest, sink, upstream, chunk_sink, progress,
                             sizes={c: sizes[c] for c in refetch}, standalone=True)
        stats.chunks_fetched += again.chunks_fetched
        stats.chunks_reused -= again.chunks_fetched
        stats.bytes_received += again.bytes_received
        stats.bytes_raw += again.bytes_raw
        await asyncio.to_thread(assembly.fill_from_store, store)
    if sink.private or assembly.packed:
        await asyncio.to_thread(store.flush)  # references moved by the fill (deferred even at a site)
    return stats


async def _fetch(store: Store, manifest: Manifest, sink: Sink, upstream: Upstream | None, chunk_sink: ChunkSink,
                 progress: Progress | None, *, sizes: dict[str, int] | None = None,
                 standalone: bool = False) -> SyncStats:
    """Fetch the chunks of `manifest` (or just `sizes`) the store lacks, into `chunk_sink`.

    The requests name the versions the store holds, so sources may send deltas against
    them; `standalone` ones do not (a refetch: what a delta would refer to may be as
    spoiled as the chunks being fetched again).
    """
    sizes = manifest.unique_chunks() if sizes is None else sizes
    if upstream is None:
        return SyncStats(chunks_total=len(sizes), chunks_reused=len(sizes))
    fields = None if standalone else await asyncio.to_thread(request_fields, store, manifest)
    try:
        return await fetch_chunks(sizes, store, upstream.sources, upstream.options, sink=chunk_sink,
                                  progress=progress, delta_fields=fields, prefer=upstream.prefer,
                                  inflight=upstream.inflight, forward=upstream.forward)
    finally:
        if sink.private:
            await asyncio.to_thread(store.flush)  # one syncfs, not one fsync per chunk


def materialize(store: Store, manifest: Manifest, dest: str | os.PathLike, *,
                overwrite: bool = False, progress: Progress | None = None) -> None:
    """Write every file of `manifest` under `dest` from `store`, atomically (blocking:
    `pull` without an upstream, for code that runs no event loop)."""
    asyncio.run(pull(store, manifest, Sink.folder(dest, overwrite=overwrite), progress=progress))


async def pull_remote(client: OriginClient, store: Store, artifact: str, dest: str | os.PathLike, *,
                      version: str | None = None, channel: str | None = None, overwrite: bool = False,
                      copy: bool = False, options: FetchOptions = FetchOptions(), progress: Progress | None = None,
                      on_manifest: Callable[[Manifest], None] | None = None) -> tuple[PullResult, Manifest]:
    """`fabric pull --origin`: `artifact` (at `version`, or `channel`'s version, or the
    latest) from `client` into `dest`.

    Each fetched chunk is written once, into DEST, whose files the store shares as
    packs (`fabric.store.packs`); with `copy`, or where the store cannot share them,
    the store keeps a copy of its own. `on_manifest` sees the manifest once it is known
    (to size a progress bar); `progress` then gets byte counts.
    """
    t0 = time.monotonic()
    version = await client.resolve(artifact, version, channel)
    manifest = await fetch_manifest(store, client, artifact, version)
    if on_manifest:
        on_manifest(manifest)
    result = await pull(store, manifest, Sink.folder(dest, overwrite=overwrite, pack=not copy),
                        upstream=Upstream([client], options), progress=progress)
    result.dest, result.seconds = str(dest), time.monotonic() - t0
    return result, manifest


def _reusable(manifest: Manifest, sink: Sink) -> bool:
    """Whether the folder at `sink.dest` is this version, intact (then sealed again, for a
    site); a folder that is not (a file edited in place) is built again over it."""
    if not sink.dest.is_dir():
        return False
    sealer = seal.Sealer() if sink.seal else None
    try:
        verify_tree(manifest, sink.dest, sealer)
    except IntegrityError as e:
        log.warning("the version's folder is spoiled; building it again", dest=str(sink.dest), error=e.message)
        return False
    if sealer is not None:
        replace_file(sink.dest / seal.SEAL_FILE, sealer.encode(manifest))
    return True


def verify_tree(manifest: Manifest, folder: Path, sealer: seal.Sealer | None = None) -> None:
    """Re-read a materialised version and check every chunk against its id (and seal it)."""
    for entry in manifest.files:
        path = folder / entry.path
        if not path.is_file() or path.stat().st_size != entry.size:
            raise IntegrityError(f"{path}: missing or wrong size")
        with open(path, "rb") as f:
            for cid, size in entry.chunks:
                data = f.read(size)
                digest.verify(cid, data)
                if sealer is not None:
                    sealer.add(cid, data)


def _swap_into_place(staging: Path, dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.fabric-old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        os.rename(staging, dest)
