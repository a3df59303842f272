"""Following: which version each followed channel points at, as the origin says.

The `Follower` listens to the origin's event stream; on every (re)connect it re-reads
each followed channel from scratch, and it re-reads them every `resync_interval`
anyway, so a dropped event costs a delay, never a missed version. It sets a channel's
`target` and wakes that artifact's deploy loop (`agents.site.deploy`); it never
deploys itself.

Whatever ends a stream — the origin restarting, a broken connection, a stream that
breaks the protocol's limits (`fabric.wire.events.read_events`), a bug in handling an
event — the follower reconnects after a `Backoff` delay: exponential, with full jitter (each wait
drawn uniformly from zero to the doubling ceiling), so that the sites of an origin that
restarts spread their reconnects over the whole window instead of arriving in lockstep.
(`stamina` and `tenacity` retry one call on a schedule that starts with the call and
cannot be reset; a follower runs forever and starts its schedule over once a stream
has stayed up, so the few lines of `Backoff` are its own.)
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from fabric.core.manifest import check_name
from fabric.errors import FabricError
from fabric.logs import get_logger
from fabric.wire.client import OriginClient

log = get_logger("agent")
RECONNECT_FIRST = 0.5  # seconds: the longest first wait before reconnecting (jittered from 0)
RECONNECT_MAX = 10.0  # seconds: the longest wait between attempts


class Backoff:
    """Full-jitter waits: the n-th is drawn uniformly from [0, min(longest, first · 2^n)].

    Full rather than "equal" jitter ([half, all]): a thousand sites whose origin restarts
    spread over the whole window, so the origin sees about N/ceiling reconnects a second,
    not a wall of them at ceiling/2 (`random.uniform`, as `stamina` draws it; see the
    module docstring for why not the package itself)."""

    def __init__(self, first: float = RECONNECT_FIRST, longest: float = RECONNECT_MAX):
        self.first, self.longest, self.failures = first, longest, 0

    def next(self) -> float:
        ceiling = min(self.longest, self.first * 2 ** self.failures)
        self.failures += 1
        return random.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class ChannelStatus:
    """One followed channel at this site, as `fabric status` shows it."""

    artifact: str
    channel: str
    target: str | None = None  # the version the channel points at
    active: str | None = None
    syncing: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    updated: float = field(default_factory=time.time)
    trace: tuple[str, str] | None = None  # (version, its traceparent from the origin's event: fabric.tracing)
    trust: str | None = None  # "verified", "unsigned", "stale" or "refused" (agents.site.trust); None: not checked yet
    trust_error: dict | None = None  # {"code", "message"} of the last refusal, while `trust` is "refused"
    statement_expires: str | None = None  # when the accepted channel statement expires (RFC 3339)
    staged: dict | None = None  # the channel's staged version as held here (agents.site.staging), or None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "trace"}


class Follower:
    """Keeps each channel's `target` equal to what the origin says; `wake(artifact)` on every read."""

    def __init__(self, origin: OriginClient, channels: dict[str, ChannelStatus], resync_interval: float,
                 wake: Callable[[str], None], on_resync: Callable[[], Awaitable[None]] | None = None,
                 staged: Callable[[ChannelStatus, str | None], None] = lambda ch, version: None):
        self.origin, self.channels = origin, channels
        self.resync_interval, self.wake = resync_interval, wake
        self.on_resync = on_resync  # runs first at every resync (the site's trust: newer delegations)
        self.staged = staged  # each read of a channel's staged version (agents.site.staging.Stager.want)

    async def follow_events(self) -> None:
        """Listen to the origin's events forever; re-sync everything on each (re)connect."""
        backoff = Backoff()
        while True:
            opened = time.monotonic()
            try:
                async for event, data in self.origin.events():
                    log.debug("event received", event=event, data=data)
                    if event == "hello":
                        await self.resync()
                    elif event == "channel" and data.get("artifact") in self.channels:
                        ch = self.channels[data["artifact"]]
                        if data.get("channel") == ch.channel:
                            if data.get("traceparent") and data.get("version"):
                                ch.trace = (data["version"], str(data["traceparent"]))
                            self.want(ch, data.get("version"))
                            self.staged(ch, _name(data.get("staged")))
                error = "the origin ended the stream"
            except FabricError as e:
                error = e.message
            except Exception as e:  # noqa: BLE001 - whatever broke, the follower must come back
                error = repr(e)
            if time.monotonic() - opened >= backoff.longest:  # it stayed up: this is a new outage
                backoff.reset()
            wait = backoff.next()
            log.warning("event stream lost", origin=self.origin.url, error=error[:300], retry_in_s=round(wait, 2))
            await asyncio.sleep(wait)

    async def resync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            try:
                await self.resync()
            except Exception as e:  # noqa: BLE001 - one bad answer must not end the periodic resync
                log.warning("resync failed", origin=self.origin.url, error=repr(e)[:300])

    async def resync(self) -> None:
        """Read every followed channel at the origin and deploy what changed."""
        if self.on_resync is not None:
            await self.on_resync()
        for ch in self.channels.values():
            try:
                read = await self.origin.channel(ch.artifact, ch.channel)
                self.want(ch, read.version)
                self.staged(ch, read.staged_version)
            except Exception as e:  # noqa: BLE001 - one channel's bad answer must not skip the others
                error = e if isinstance(e, FabricError) else FabricError(repr(e)[:300])
                ch.error = f"{error.code}: {error.message}"
                log.warning("cannot read channel", artifact=ch.artifact, channel=ch.channel, error=error.message)
                self.wake(ch.artifact)  # with a trust policy, the deploy loop reads and judges it itself

    def want(self, ch: ChannelStatus, version: str | None) -> None:
        if version and version != ch.target:
            log.info("channel points at new version", artifact=ch.artifact, channel=ch.channel, version=version)
            ch.target = version
        self.wake(ch.artifact)


def _name(value: object) -> str | None:
    """An event's `staged`: a version name, else None (absent, or not a name: ignored)."""
    try:
        return check_name("version", value) if isinstance(value, str) else None
    except FabricError:
        return None
