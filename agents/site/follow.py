"""Following: which version each followed channel points at, as the origin says.

The `Follower` listens to the origin's event stream; on every (re)connect it re-reads
each followed channel from scratch, and it re-reads them every `resync_interval`
anyway, so a dropped event costs a delay, never a missed version. It sets a channel's
`target` and wakes that artifact's deploy loop (`agents.site.deploy`); it never
deploys itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from fabric.errors import FabricError
from fabric.logs import get_logger
from fabric.wire.client import OriginClient

log = get_logger("agent")


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

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "trace"}


class Follower:
    """Keeps each channel's `target` equal to what the origin says; `wake(artifact)` on every read."""

    def __init__(self, origin: OriginClient, channels: dict[str, ChannelStatus], resync_interval: float,
                 wake: Callable[[str], None]):
        self.origin, self.channels = origin, channels
        self.resync_interval, self.wake = resync_interval, wake

    async def follow_events(self) -> None:
        """Listen to the origin's events forever; re-sync everything on each (re)connect."""
        backoff = 0.5
        while True:
            try:
                async for event, data in self.origin.events():
                    backoff = 0.5
                    log.debug("event received", event=event, data=data)
                    if event == "hello":
                        await self.resync()
                    elif event == "channel" and data.get("artifact") in self.channels:
                        ch = self.channels[data["artifact"]]
                        if data.get("channel") == ch.channel:
                            if data.get("traceparent") and data.get("version"):
                                ch.trace = (data["version"], str(data["traceparent"]))
                            self.want(ch, data.get("version"))
            except FabricError as e:
                log.warning("event stream lost", origin=self.origin.url, error=e.message, retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def resync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            await self.resync()

    async def resync(self) -> None:
        """Read every followed channel at the origin and deploy what changed."""
        for ch in self.channels.values():
            try:
                self.want(ch, (await self.origin.channel(ch.artifact, ch.channel)).version)
            except FabricError as e:
                ch.error = f"{e.code}: {e.message}"
                log.warning("cannot read channel", artifact=ch.artifact, channel=ch.channel, error=e.message)

    def want(self, ch: ChannelStatus, version: str | None) -> None:
        if version and version != ch.target:
            log.info("channel points at new version", artifact=ch.artifact, channel=ch.channel, version=version)
            ch.target = version
        self.wake(ch.artifact)
