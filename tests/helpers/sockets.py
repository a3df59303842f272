"""Who holds a TCP connection to a loopback server: read from /proc (Linux only).

`connections_to(port)` lists the ESTABLISHED connections whose server end is `port`;
`holders(port, pids)` says which of `pids` hold the client end of one.
"""

from __future__ import annotations

import os
from pathlib import Path


def _entries() -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of every ESTABLISHED TCP socket (IPv4 and IPv6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01":  # ESTABLISHED
                out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), int(f[9])))
    return out


def connections_to(port: int) -> int:
    """ESTABLISHED connections the server on `port` holds."""
    return sum(1 for local, _, _ in _entries() if local == port)


def holders(port: int, pids: dict[str, int]) -> dict[str, int]:
    """How many connections to `port` each named process in `pids` holds the client end of."""
    entries = _entries()
    client_ports = {remote for local, remote, _ in entries if local == port}
    inodes = {inode for local, remote, inode in entries if remote == port and local in client_ports}
    out = {}
    for name, pid in pids.items():
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                    n += 1
        except OSError:
            pass
        out[name] = n
    return out
