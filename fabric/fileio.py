"""Writing files: big ones preallocated, in slices of 64 KiB; small ones replaced whole.

Linux's page cache sizes the folios it allocates for a write by the write's length, so
one 8 MiB `write` asks for large folios, and on a VM whose host reclaims freed guest
memory (free page reporting, as on the machines these benchmarks run on) large
folios tend to come from memory the host must fault in again: the copy into the page
cache then ran at 0.6-1.3 GB/s with seconds of system time, where 64 KiB writes ran at
5-10 GB/s (`python -m bench.pull_throughput`). The extra system calls cost about
30 ms per 2 GB.
"""

from __future__ import annotations

import ctypes
import errno
import os
import uuid

WRITE_SLICE = 64 << 10
_LIBC = ctypes.CDLL(None, use_errno=True)


def create_sized(path: str | os.PathLike, size: int) -> None:
    """A new empty file of `size` bytes, its blocks allocated up front where the file
    system can (writes then land in place, and a full disk shows before any is made).
    Elsewhere a sparse file: `fallocate` is not emulated, which would write every block."""
    with open(path, "wb") as f:
        if size and _LIBC.fallocate(f.fileno(), 0, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(err, os.strerror(err), os.fspath(path))
            f.truncate(size)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of the open file `fd`."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + WRITE_SLICE], offset + done)


def write_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> None:
    """Write the concatenation of `parts` at the current position of `fd`."""
    for part in parts:
        view = memoryview(part).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + WRITE_SLICE])


def replace_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` whole: a temp name beside it, fsync, rename (a reader sees old or new)."""
    path = os.fspath(path)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
