"""Working against an origin: the remote forms of publish and pull.

`pull_remote` resolves a reference at the origin and syncs the version's missing
chunks into a local store (`fabric.transfer`), writing each verified chunk straight
into the files being assembled in DEST as it arrives (`fabric.pull.Assembly`); the
chunks the store already held are copied from it. The store doubles as a cache
that later pulls reuse.
"""

from __future__ import annotations

import asyncio
import os
import time

from . import delta
from .client import OriginClient
from .errors import FabricError
from .manifest import Manifest
from .pull import Assembly, PullResult
from .registry import Registry
from .store import Store
from .transfer import sync


async def pull_remote(client: OriginClient, store: Store, artifact: str, dest: str | os.PathLike, *,
                      version: str | None = None, channel: str | None = None, overwrite: bool = False,
                      sources: list[OriginClient] | None = None, progress=None, **sync_options
                      ) -> tuple[PullResult, Manifest]:
    """Fetch `artifact` (at `version`, or `channel`'s version, or the latest) into `dest`."""
    t0 = time.monotonic()
    version = await client.resolve(artifact, version, channel)
    base = await asyncio.to_thread(delta.manifest_base, store, artifact, version)
    manifest = await client.manifest(artifact, version, base)
    assembly = await asyncio.to_thread(Assembly, manifest, dest, overwrite=overwrite)
    try:
        try:
            stats = await sync(manifest, store, sources or [client], progress=progress, on_chunk=assembly.write,
                               defer_store=True, **sync_options)
        finally:
            await asyncio.to_thread(store.flush)  # one syncfs for the cache, not one fsync per chunk
        await asyncio.to_thread(assembly.fill_from_store, store)  # the chunks the store already held
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
        seconds=time.monotonic() - t0,
    )
    return result, manifest
