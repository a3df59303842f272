"""Link rate: how fast a connection really delivers, from the kernel's TCP counters.

A write to a socket returns once the bytes are in the kernel's send buffer (several
MB), and `sendfile` once the last of them is: on a slow link both return long before
the bytes have crossed it, so timing writes measures the link as much faster than it
is (docs/encodings.md, "Rate control"). Linux keeps, per TCP connection
(`getsockopt(TCP_INFO)`), `tcpi_bytes_acked` (bytes the peer acknowledged) and
`tcpi_busy_time` (microseconds the connection had unacknowledged or unsent data:
sending, or held back by the peer's receive window or a full send buffer) less
`tcpi_rwnd_limited` (the part held back by the peer's receive window). Their growth
between two readings is what the link delivered and how long it took, whether the
sender kept the link full or not (a codec slower than the link leaves it idle between
chunks, and idle time is not busy time); a receiver slower than the link does not
count as a slow link.

`metered(policy, transport)` wraps an `EncodePolicy` for one response: its `wrote`
(called after each write) reads the counters and reports their growth to the
policy's `delivered` once at least `MIN_BUSY` seconds of busy time (the counter
counts in kernel ticks, 1-4 ms) or `MAX_BYTES` have accumulated. Readings are kept
per connection (`_LAST`), so a keep-alive connection's next response continues where
the last one stopped and the tail of a response still draining counts too. Where the
counters are missing (not Linux, an old kernel, no socket), `wrote` times the write as
before.
"""

from __future__ import annotations

import socket
import struct
import weakref
from typing import Any

from fabric.core.policy import EncodePolicy

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_SIZE = 184  # struct tcp_info through tcpi_rwnd_limited (Linux >= 4.10)
_ACKED = 120  # __u64 tcpi_bytes_acked
_BUSY = 168  # __u64 tcpi_busy_time, microseconds
_RWND = 176  # __u64 tcpi_rwnd_limited, microseconds (part of the busy time)
MIN_BUSY = 0.04  # seconds of busy time per report (>= 10 ticks at HZ=250)
MAX_BYTES = 32 << 20  # report at least this often, however little time it took (a fast link)

_LAST: "weakref.WeakKeyDictionary[Any, tuple[int, float]]" = weakref.WeakKeyDictionary()


def read_counters(sock) -> tuple[int, float] | None:
    """(bytes acknowledged, seconds busy on the link) of a TCP socket, or None where the kernel does not say.

    Busy time held back by the peer's receive window is left out: a receiver slower than
    the link (on loopback, one verifying every chunk) is not a slow link, and fewer bytes
    that it must decode would not help it."""
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _SIZE)
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    if len(info) < _SIZE:
        return None
    (acked,) = struct.unpack_from("=Q", info, _ACKED)
    (busy,) = struct.unpack_from("=Q", info, _BUSY)
    (rwnd,) = struct.unpack_from("=Q", info, _RWND)
    return acked, max(busy - rwnd, 0) / 1e6


class MeteredPolicy:
    """An `EncodePolicy` for one response, whose link measure is the connection's TCP counters."""

    def __init__(self, policy: EncodePolicy, transport):
        self.policy, self._transport = policy, transport
        self._sock = transport.get_extra_info("socket") if transport is not None else None
        now = read_counters(self._sock)
        self._active = now is not None
        if self._active and transport not in _LAST:
            _LAST[transport] = now

    def __getattr__(self, name: str):
        return getattr(self.policy, name)

    def wrote(self, nbytes: int, seconds: float) -> None:
        """After a write of `nbytes` that took `seconds`: report what the link delivered since the last report."""
        if not self._active:
            self.policy.wrote(nbytes, seconds)
            return
        now = read_counters(self._sock)
        last = _LAST.get(self._transport)
        if now is None or last is None:
            return
        acked, busy = now[0] - last[0], now[1] - last[1]
        if acked > 0 and (busy >= MIN_BUSY or acked >= MAX_BYTES):
            self.policy.delivered(acked, busy)
            _LAST[self._transport] = now
        elif acked < 0:  # not the connection we read before
            _LAST[self._transport] = now


def metered(policy: EncodePolicy | None, transport) -> EncodePolicy | MeteredPolicy | None:
    """`policy` with its link measured from `transport`'s TCP counters (None stays None)."""
    return None if policy is None else MeteredPolicy(policy, transport)


__all__ = ["MeteredPolicy", "metered", "read_counters", "MIN_BUSY", "MAX_BYTES"]
