"""The systemd notify protocol: tell the service manager a server is ready, alive, stopping.

A `Type=notify` unit counts its service as started only when the service sends
`READY=1`; with `WatchdogSec=` it restarts a service that stops sending `WATCHDOG=1`,
and `STOPPING=1` says a stop has begun. Each message is one datagram of `KEY=VALUE`
lines sent to the AF_UNIX socket that `$NOTIFY_SOCKET` names: a path, or an abstract
name written with a leading `@` (sd_notify(3)). `$WATCHDOG_USEC` gives the watchdog
interval, for this process only when `$WATCHDOG_PID` is unset or names it
(`fabric.config.systemd_notify_env` reads both). Outside systemd the variable is unset
and every call here does nothing.

`run_until_signalled` (`fabric.wire.server`) sends READY=1 once the socket is bound,
WATCHDOG=1 from the event loop at half the interval (so a blocked loop goes silent and
systemd restarts the service), and STOPPING=1 on shutdown.

The protocol is written out here rather than taken from PyPI: `sdnotify`, the usual
package, has had no release or maintenance since 2017, and the protocol is one `sendto`.
"""

from __future__ import annotations

import asyncio
import socket

from fabric.config import systemd_notify_env
from fabric.logs import get_logger

log = get_logger("systemd")


class Notifier:
    """Sends notify messages to one socket; a Notifier without a socket does nothing."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None):
        self.address = address  # None, "/run/systemd/notify" or "@abstract-name"
        self.watchdog_interval = watchdog_interval  # seconds between systemd's deadlines, or None
        self._warned = False

    @classmethod
    def from_env(cls) -> "Notifier":
        return cls(*systemd_notify_env())

    def notify(self, *states: str) -> bool:
        """Send `states` ("READY=1", "STATUS=…") as one datagram; False if not sent (never raises)."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)  # a full queue drops the message rather than stall the loop
                s.sendto("\n".join(states).encode(), target)
            return True
        except OSError as e:
            if not self._warned:  # once: a broken socket must not flood the log at watchdog rate
                log.warning("systemd notify failed", socket=self.address, error=repr(e))
                self._warned = True
            return False

    async def watchdog(self) -> None:
        """Send WATCHDOG=1 at half the interval, from the event loop, until cancelled."""
        if not self.address or not self.watchdog_interval:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval / 2)
