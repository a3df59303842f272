"""Working against an origin: the remote forms of publish and pull.

`pull_remote` resolves a reference at the origin and syncs the version's missing
chunks (`fabric.transfer`), writing each verified chunk once, straight into the
files being assembled in DEST as it arrives (`fabric.pull.Assembly`), which the
local store shares as packs; the chunks the store already held are copied from it.
The store doubles as a cache that later pulls reuse.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

from fabric.wire import delta
from fabric.wire.client import OriginClient
from fabric.errors import FabricError
from fabric.core.manifest import Manifest
from fabric.pull import Assembly, PullResult
from fabric.store.registry import Registry
from fabric.store.store import Store
from fabric.transfer import SyncStats, fetch_chunks, sync


async def pull_remote(client: OriginClient, store: Store, artifact: str, dest: str | os.PathLike, *,
                      version: str | None = None, channel: str | None = None, overwrite: bool = False,
                      sources: list[OriginClient] | None = None, progress=None, copy: bool = False,
                      on_manifest: Callable[[Manifest], None] | None = None,
                      **sync_options) -> tuple[PullResult, Manifest]:
    """Fetch `artifact` (at `version`, or `channel`'s version, or the latest) into `dest`.

    Each fetched chunk is written once, into DEST, whose files the store shares as
    packs (`fabric.store.packs`); with `copy`, or where the store cannot share them,
    the store keeps a copy of its own. `on_manifest` sees the manifest once it is known
    (to size a progress bar); `progress` then gets byte counts.
    """
    t0 = time.monotonic()
    version = await client.resolve(artifact, version, channel)
    base = await asyncio.to_thread(delta.manifest_base, store, artifact, version)
    manifest = await client.manifest(artifact, version, base)
    if on_manifest:
        on_manifest(manifest)
    assembly = await asyncio.to_thread(Assembly, manifest, dest, overwrite=overwrite,
                                       pack_into=None if copy else store)
    keeping = dict(keep=assembly.keep) if assembly.packed else dict(on_chunk=assembly.write, defer_store=True)
    sources = sources or [client]
    try:
        try:
            stats = await sync(manifest, store, sources, progress=progress, **keeping, **sync_options)
        finally:
            await asyncio.to_thread(store.flush)  # one syncfs, not one fsync per chunk
        refetch: list[str] = []  # stored chunks found spoiled (a pack edited in place): fetched again
        await asyncio.to_thread(assembly.fill_from_store, store, refetch=refetch)
        if refetch:
            await _refetch(refetch, manifest, store, sources, stats, progress=progress, **keeping, **sync_options)
            await asyncio.to_thread(assembly.fill_from_store, store)
        await asyncio.to_thread(store.flush)  # references moved by the fill
        await asyncio.to_thread(assembly.commit)
        try:  # the store holds the whole version now: later pulls may ask for deltas against it
            await asyncio.to_thread(Registry(store).commit, manifest)
        except FabricError:
            pass
    except BaseException:
        await asyncio.to_thread(assembly.abort)
        raise
    result = PullResult(
        artifact=artifact, version=version, manifest_id=manifest.id, dest=str(dest),
        files=len(manifest.files), bytes=manifest.size, chunks_fetched=stats.chunks_fetched,
        chunks_reused=stats.chunks_reused, bytes_received=stats.bytes_received, bytes_raw=stats.bytes_raw,
        packed=assembly.packed, seconds=time.monotonic() - t0,
    )
    return result, manifest


async def _refetch(ids: list[str], manifest: Manifest, store: Store, sources: list[OriginClient],
                   stats: SyncStats, **options) -> None:
    """Fetch `ids` again (chunks the store held but could not give back intact)."""
    sizes = manifest.unique_chunks()
    try:
        again = await fetch_chunks({c: sizes[c] for c in ids}, store, sources, **options)
    finally:
        await asyncio.to_thread(store.flush)
    stats.chunks_fetched += again.chunks_fetched
    stats.chunks_reused -= again.chunks_fetched
    stats.bytes_received += again.bytes_received
    stats.bytes_raw += again.bytes_raw
