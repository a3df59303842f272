"""Deploying: bring a followed artifact's active version to its channel's target.

One deploy loop per artifact waits to be woken (`agents.site.follow`), and deploys the
target unless it is active already or was rejected here. A deploy

1. with a trust policy, starts from the channel's signed statement (`agents.site.trust`):
   verified before anything is fetched, it names the version to deploy, and the
   version's own statement and manifest id are verified before any chunk;
2. fetches the manifest from the origin and pulls the version through the one pull
   path (`fabric.pull.pull`): the missing chunks from the site's planned sources
   (upstream relay, peers, origin last), the files materialised under
   `versions/<artifact>/<version>/` and shared with the store as packs (each byte
   written once), the manifest recorded in the site's registry; a
   version this process staged and holds (`agents.site.staging`) skips this step: its
   manifest comes from the site's registry, its folder is there, verified when built;
3. only then, and only if the channel still wants that version (newest wins) and both
   statements still verify, flips
   `current/<artifact>`, records the activation in `state.json`, starts the rollout
   to the workers (`agents.site.rollout`) and prunes (`agents.site.retention`).

Deploys, rejections and staging pulls run one at a time (`lock`); a deploy or rejection
cancels a staging pull of anything else first (`Stager.yield_to`). A failed deploy leaves the active
version serving; the loop retries with backoff. A refused statement leaves it serving
too, and is checked again at the next event or resync (not retried on its own: the same
bytes would be refused again). File I/O runs in threads.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fabric import tracing
from fabric.core.manifest import Manifest
from fabric.errors import FabricError, SignatureError
from fabric.logs import get_logger
from fabric.pull import Sink, fetch_manifest, pull
from fabric.transfer import SyncStats

from agents.site.follow import ChannelStatus
from agents.site.trust import Claim

if TYPE_CHECKING:
    from agents.site.agent import SiteAgent

log = get_logger("agent")


class Deployer:
    """The deploy loops, deploys and rejections of one site."""

    def __init__(self, site: SiteAgent):
        self.site = site
        self.lock = asyncio.Lock()
        self._wake = {a: asyncio.Event() for a in site.channels}

    def wake(self, artifact: str) -> None:
        self._wake[artifact].set()

    async def loop(self, artifact: str) -> None:
        """Keep the artifact's active version equal to its channel's target (newest wins)."""
        ch, backoff, trust = self.site.channels[artifact], 1.0, self.site.trust
        while True:
            await self._wake[artifact].wait()
            self._wake[artifact].clear()
            try:
                claim = await trust.resolve(ch) if trust.enabled else None  # the signed move, verified
            except Exception as e:  # noqa: BLE001 - recording it failed (a full disk): the next wake tries again
                log.error("cannot record the channel statement", artifact=artifact, error=repr(e)[:300])
                continue
            if trust.enabled and claim is None:
                continue  # nothing new that verifies (refusals are shown and counted by `trust`)
            target = claim.version if claim else ch.target
            if target is None or target == ch.active or target in self.site.statefile.state.bad.get(artifact, []):
                continue
            t0 = time.monotonic()
            try:
                await self.deploy(ch, target, claim)
                if ch.active == target:
                    self.site.metrics.count_deploy("activated", time.monotonic() - t0)
                backoff = 1.0
            except SignatureError as e:  # nothing was activated; the next event or resync checks again
                trust.refuse(ch, e, claim.envelope if claim else None)
                self.site.metrics.count_deploy("refused", time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - a failed deploy must never stop the loop
                if not isinstance(e, FabricError):
                    log.error("unexpected deploy error", artifact=artifact, error=repr(e))
                    e = FabricError(repr(e))
                ch.error = f"{e.code}: {e.message}"
                self.site.metrics.count_deploy("failed", time.monotonic() - t0)
                log.error("deploy failed; the active version keeps serving", artifact=artifact,
                          version=target, active=ch.active, error=e.message, code=e.code, retry_in_s=backoff)
                asyncio.get_running_loop().call_later(backoff, self._wake[artifact].set)
                backoff = min(backoff * 2, 60.0)
            finally:
                ch.syncing = None

    async def deploy(self, ch: ChannelStatus, version: str, claim: Claim | None = None) -> None:
        """Deploy `version`, in an `agent.deploy` span under the version's trace (`fabric.tracing`)."""
        parent = ch.trace[1] if ch.trace and ch.trace[0] == version else None
        with tracing.span("agent.deploy", parent=parent, site=self.site.cfg.site, artifact=ch.artifact,
                          version=version):
            await self._deploy(ch, version, claim)

    async def _deploy(self, ch: ChannelStatus, version: str, claim: Claim | None) -> None:
        site, artifact = self.site, ch.artifact
        site.stager.yield_to(artifact, version)  # a staging pull of anything else gives up the lock
        async with self.lock:
            ch.syncing, ch.error = version, None
            staged = await site.stager.held(artifact, version)  # staged and held here: no fetch, only the flip
            manifest = staged or await fetch_manifest(site.store, site.control, artifact, version)  # via the relay
            if claim is not None:  # before any chunk: the manifest and the version are the ones signed
                await site.trust.check_version(ch, claim, manifest)
            if staged is None:
                await self._pull(ch, version, manifest)
            if ch.target != version:
                log.info("newer version wanted; not activating", artifact=artifact, version=version,
                         wanted=ch.target)
                return
            if claim is not None:  # right before the flip: both statements still verify
                site.trust.recheck(ch, claim)
                await site.trust.accept(ch, claim)
            elif staged is None:
                await site.trust.keep_unverified(artifact, version)  # for the sites below, untouched
            await self._activate(ch, version)

    async def _pull(self, ch: ChannelStatus, version: str, manifest: Manifest) -> None:
        """Fetch and materialise the version under versions/ (`fabric.pull.pull`). Holds `lock`."""
        site, artifact = self.site, ch.artifact
        ch.bytes_total, ch.bytes_done = sum(manifest.unique_chunks().values()), 0
        site.metrics.sync_expected.labels(artifact).set(ch.bytes_total)

        def progress(n: int) -> None:
            ch.bytes_done += n
            site.metrics.sync_done.labels(artifact).set(ch.bytes_done)

        def fetched(stats: SyncStats) -> None:
            ch.bytes_done = ch.bytes_total
            site.metrics.count_sources(stats)
            log.info("version fetched", artifact=artifact, version=version,
                     chunks_fetched=stats.chunks_fetched, chunks_reused=stats.chunks_reused,
                     bytes_received=stats.bytes_received, bytes_raw=stats.bytes_raw,
                     wire_ratio=stats.to_json()["wire_ratio"], by_source=stats.bytes_by_source,
                     bad_chunks=stats.bad_chunks_by_source, seconds=round(stats.seconds, 3))

        with site.relay.fetching(manifest):  # children asking for it meanwhile get deltas (`agents.site.relay`)
            await pull(site.store, manifest, Sink.site_version(site.layout.version_dir(artifact, version)),
                       upstream=site.upstream, progress=progress, on_fetched=fetched)

    async def _activate(self, ch: ChannelStatus, version: str) -> None:
        """Flip `current/<artifact>` to `version`, record it, roll it out, prune. Holds `lock`."""
        site, artifact = self.site, ch.artifact
        previous, t0 = ch.active, time.monotonic()
        await asyncio.to_thread(site.layout.activate, artifact, version)
        ch.active = version
        history = site.statefile.state.history.setdefault(artifact, [])
        if version in history:
            history.remove(version)
        history.append(version)
        await site.statefile.save()
        site.metrics.activation_seconds.observe(time.monotonic() - t0)
        site.set_active_metric()
        log.info("version activated", artifact=artifact, version=version, site=site.cfg.site)
        await site.rollout.on_activated(artifact, version, previous)
        await asyncio.to_thread(site.pruner.prune, site.statefile.snapshot())

    async def reject(self, artifact: str, version: str, previous: str | None, reason: str) -> None:
        """A version failed its canary here: mark it bad and put `previous` back in service."""
        site = self.site
        site.stager.yield_to(artifact, None)
        async with self.lock:
            # the flip back first: whoever sees the version marked bad (status, /v1/site) sees
            # `previous` active with it, never the bad one still named active
            if await asyncio.to_thread(site.layout.active, artifact) == version:
                if previous:
                    await asyncio.to_thread(site.layout.activate, artifact, previous)
                else:
                    await asyncio.to_thread((site.layout.current / artifact).unlink, missing_ok=True)
                site.channels[artifact].active = previous
                site.set_active_metric()
            bad = site.statefile.state.bad.setdefault(artifact, [])
            if version not in bad:
                bad.append(version)
                site.metrics.count_rejection(artifact)
            await site.statefile.save()
            log.error("version rejected at this site", artifact=artifact, version=version, active=previous,
                      reason=reason)
