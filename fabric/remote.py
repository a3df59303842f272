"""Working against an origin: the remote forms of publish and pull.

`pull_remote` resolves a reference at the origin, syncs the version's missing
chunks into a local store (`fabric.transfer`), then materialises it from there
(`fabric.pull`), so the local store doubles as a cache that later pulls reuse.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from .client import OriginClient
from .manifest import Manifest
from .pull import PullResult, check_dest, materialize
from .store import Store
from .transfer import sync


async def pull_remote(client: OriginClient, store: Store, artifact: str, dest: str | os.PathLike, *,
                      version: str | None = None, channel: str | None = None, overwrite: bool = False,
                      sources: list[OriginClient] | None = None, progress=None, **sync_options
                      ) -> tuple[PullResult, Manifest]:
    """Fetch `artifact` (at `version`, or `channel`'s version, or the latest) into `dest`."""
    t0 = time.monotonic()
    check_dest(Path(dest), overwrite)
    version = await client.resolve(artifact, version, channel)
    manifest = await client.manifest(artifact, version)
    stats = await sync(manifest, store, sources or [client], progress=progress, **sync_options)
    await asyncio.to_thread(materialize, store, manifest, dest, overwrite=overwrite)
    result = PullResult(
        artifact=artifact, version=version, manifest_id=manifest.id, dest=str(dest),
        files=len(manifest.files), bytes=manifest.size, chunks_fetched=stats.chunks_fetched,
        chunks_reused=stats.chunks_reused, bytes_received=stats.bytes_received,
        seconds=time.monotonic() - t0,
    )
    return result, manifest
