"""Staging: versions a site fetches and holds before any channel points at them (preheat).

A channel may name a staged version (`staged` in its JSON and in its `channel` events,
docs/protocol.md "Staged versions"). The follower (`agents.site.follow`) hands it to
`Stager.want`; one staging loop per artifact then fetches it like any version:

1. its manifest, through the control chain (the upstream relay first);
2. with a trust policy, the version's own signed statement, verified for that manifest
   before any chunk (`SiteTrust.check_staged`: the same check a deploy makes; no channel
   statement names a staged version yet, and none is needed: staging activates nothing);
3. its chunks from the site's planned sources, materialised and verified under
   `versions/<artifact>/<version>/` (`fabric.pull.pull`, the deploy's sink: the files
   are the store's packs, and the chunks the staged version shares with the active one
   move their references into it; retention moves them back out if the staged version
   is dropped), the version's envelope kept for the sites below.

It never flips `current/`, never touches the workers and never changes the channel's
`target`. The site reports it per channel as `staged`: {"version", "state" ("fetching",
"held", "failed", "refused"), "bytes_done", "bytes_total", "error"}. Retention keeps the
staged version (`also_keep`). Metrics: `fabric_agent_stagings_total{outcome}` (held,
failed, refused) and `fabric_agent_staged_version{artifact,version}` (1 while held). When the channel then moves to a version this process
held, the deploy takes `held(...)`: the manifest from the site's own registry and no
pull at all, so activation is the trust checks and the flip.

Staging runs under the deployer's lock (one pull at a time, never beside a prune), and
yields to deploys: a deploy or rejection of anything but the version being staged
cancels the staging pull (`yield_to`), as does a new staged version (`want`); the chunks
already fetched stay in the store and the staging resumes after it. A failed staging is retried with backoff; a refused one
waits for the next event or resync, like a refused deploy.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fabric.core.manifest import Manifest
from fabric.errors import FabricError, SignatureError
from fabric.logs import get_logger
from fabric.pull import Sink, fetch_manifest, pull

from agents.site.follow import ChannelStatus

if TYPE_CHECKING:
    from agents.site.agent import SiteAgent

log = get_logger("agent")


class Stager:
    """The staging loops of one site, what each followed channel stages, and what is held."""

    def __init__(self, site: SiteAgent):
        self.site = site
        self.wanted: dict[str, str | None] = {a: None for a in site.channels}  # the channel's staged version
        self._held: dict[str, str] = {}  # artifact -> a version this process staged, verified, complete
        self._running: dict[str, tuple[str, asyncio.Task]] = {}
        self._wake = {a: asyncio.Event() for a in site.channels}
        self._shown: dict[str, str] = {}  # artifact -> the version fabric_agent_staged_version shows

    def want(self, ch: ChannelStatus, version: str | None) -> None:
        """The channel says `version` is staged (None: nothing is); from the follower."""
        a = ch.artifact
        if version == ch.active:
            version = None
        running = self._running.get(a)
        if running and running[0] not in (version, ch.target) and not running[1].done():
            running[1].cancel()  # the channel stages something else now (or nothing), and does not want it
        if version != self._shown.get(a):
            self._gauge(a, None)
        if version is None:
            self.wanted[a] = None
            ch.staged = None
            return
        if version != self.wanted.get(a):
            log.info("channel stages a version", artifact=a, channel=ch.channel, version=version)
            self.wanted[a] = version
        self._wake[a].set()

    def also_keep(self, artifact: str) -> set[str]:
        """What retention keeps beside its own rule: the staged version (called from a thread)."""
        v = self.wanted.get(artifact)
        return {v} if v else set()

    async def held(self, artifact: str, version: str) -> Manifest | None:
        """The manifest of `version` if this process staged it and its folder is here (then the
        deploy skips the pull), else None. Taken once: a deploy that fails retries the full way."""
        if self._held.get(artifact) != version:
            return None
        del self._held[artifact]
        self._gauge(artifact, None)  # about to be active
        site = self.site
        if not await asyncio.to_thread(site.layout.version_dir(artifact, version).is_dir):
            return None
        try:
            return await asyncio.to_thread(site.registry.manifest, artifact, version)
        except FabricError:
            return None

    def yield_to(self, artifact: str, version: str | None) -> None:
        """A deploy (or rejection) of `artifact@version` needs the lock: cancel every staging pull
        but one of that very version, which the deploy then finds held."""
        for a, (v, task) in list(self._running.items()):
            if (a, v) != (artifact, version) and not task.done():
                log.info("staging yields to a deploy", artifact=a, version=v, deploying=f"{artifact}@{version}")
                task.cancel()

    async def loop(self, artifact: str) -> None:
        """Hold the channel's staged version, for the agent's life."""
        ch, backoff = self.site.channels[artifact], 1.0
        while True:
            await self._wake[artifact].wait()
            self._wake[artifact].clear()
            version = self.wanted.get(artifact)
            if not self._needs(ch, version):
                continue
            task = asyncio.create_task(self._stage(ch, version))
            self._running[artifact] = (version, task)
            try:
                await asyncio.wait({task})
            finally:
                self._running.pop(artifact, None)
                if not task.done():
                    task.cancel()  # the loop itself is being cancelled (shutdown)
            if task.cancelled():  # a deploy took the lock, or the channel stages another: look again
                self._report(ch, version, "fetching", error=None)
                self._wake[artifact].set()
                continue
            e = task.exception()
            if e is None:
                backoff = 1.0
            elif isinstance(e, SignatureError):  # the same bytes would be refused again: wait for news
                self.site.metrics.stagings.labels("refused").inc()
                self._report(ch, version, "refused", error=f"{e.code}: {e.message}")
                log.error("staged version refused; not held", artifact=artifact, version=version, code=e.code,
                          error=e.message)
            else:
                err = e if isinstance(e, FabricError) else FabricError(repr(e))
                self.site.metrics.stagings.labels("failed").inc()
                self._report(ch, version, "failed", error=f"{err.code}: {err.message}")
                log.error("staging failed", artifact=artifact, version=version, error=err.message, retry_in_s=backoff)
                asyncio.get_running_loop().call_later(backoff, self._wake[artifact].set)
                backoff = min(backoff * 2, 60.0)

    def _gauge(self, artifact: str, version: str | None) -> None:
        """fabric_agent_staged_version: 1 for the version held for `artifact` (None: none)."""
        old = self._shown.pop(artifact, None)
        if old is not None:
            self.site.metrics.staged.remove(artifact, old)
        if version is not None:
            self.site.metrics.staged.labels(artifact, version).set(1)
            self._shown[artifact] = version

    def _needs(self, ch: ChannelStatus, version: str | None) -> bool:
        if version is None or version == ch.active or version in self.site.statefile.state.bad.get(ch.artifact, []):
            return False
        return not (self._held.get(ch.artifact) == version and (ch.staged or {}).get("state") == "held")

    def _report(self, ch: ChannelStatus, version: str, state: str, **fields) -> None:
        if self.wanted.get(ch.artifact) != version:
            return  # the channel moved on meanwhile: `want` set what it stages now
        old = ch.staged if ch.staged and ch.staged.get("version") == version else {}
        ch.staged = {"version": version, "state": state, "bytes_done": old.get("bytes_done", 0),
                     "bytes_total": old.get("bytes_total", 0), "error": old.get("error")} | fields

    async def _stage(self, ch: ChannelStatus, version: str) -> None:
        site, artifact = self.site, ch.artifact
        async with site.deployer.lock:
            if self.wanted.get(artifact) != version or version == ch.active:
                return
            t0 = time.monotonic()
            self._report(ch, version, "fetching", error=None)
            manifest = await fetch_manifest(site.store, site.control, artifact, version)
            envelope = await site.trust.check_staged(artifact, version, manifest) if site.trust.enabled else None
            total = sum(manifest.unique_chunks().values())
            self._report(ch, version, "fetching", bytes_total=total, bytes_done=0)

            def progress(n: int) -> None:
                if ch.staged and ch.staged.get("version") == version:
                    ch.staged["bytes_done"] += n

            with site.relay.fetching(manifest):
                result = await pull(site.store, manifest, Sink.site_version(site.layout.version_dir(artifact, version)),
                                    upstream=site.upstream, progress=progress)
            if envelope is not None:
                await site.trust.keep(artifact, version, envelope)
            else:
                await site.trust.keep_unverified(artifact, version)  # for the sites below, untouched
            self._held[artifact] = version
            self.site.metrics.stagings.labels("held").inc()
            self._gauge(artifact, version)
            self._report(ch, version, "held", bytes_done=total, error=None)
            log.info("version staged: held, not active", artifact=artifact, version=version, active=ch.active,
                     chunks_fetched=result.chunks_fetched, bytes_received=result.bytes_received,
                     seconds=round(time.monotonic() - t0, 3))
