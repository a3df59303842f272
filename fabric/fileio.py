"""Writing files: big ones preallocated, large writes around the page cache (direct I/O),
the rest in slices of 64 KiB; small files replaced whole.

Linux's page cache sizes the folios it allocates for a write by the write's length, so
one 8 MiB `write` asks for large folios, and on a VM whose host reclaims freed guest
memory (free page reporting, as on the machines these benchmarks run on) large
folios tend to come from memory the host must fault in again: the copy into the page
cache then ran at 0.6-1.3 GB/s with seconds of system time, where 64 KiB writes ran at
5-10 GB/s (`python -m bench.pull_throughput`). The extra system calls cost about
30 ms per 2 GB.

Around the page cache is cheaper still: on the same VM a buffered 1 GB costs 0.2-1.9 s
of system time, and the final sync writes it out again, where direct I/O (`O_DIRECT`)
costs ~0.1 s (`dd`). `pwrite_all` writes the whole 4096-byte blocks of a write of at
least `DIRECT_MIN` bytes that way, through a second descriptor of the same file (the
caller's is left as it was) from a per-thread page-aligned staging buffer; the partial
blocks at either end, and everything on a file system that refuses direct I/O (tmpfs),
go through the page cache. Either way the bytes are in the file when it returns, and as
durable as after any write: an `fsync`/`fdatasync` of the file makes them so, since it
also flushes the device's cache. A later read of those blocks comes from the disk.

Cheaper than any write is none: on a file system with reflinks (XFS made with
`reflink=1`, btrfs), `clone_range` makes a range of one file share another's blocks
(`FICLONERANGE`), so a new version's file takes the chunks it shares with the version
before without writing them. Only whole blocks can be shared, and only where the two
offsets sit at the same place in a block; ext4 and tmpfs cannot share at all.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading
import uuid

WRITE_SLICE = 64 << 10
DIRECT_MIN = 1 << 20  # writes at least this large skip the page cache where they can
BLOCK = 4096  # direct I/O's unit: offsets, lengths and buffer addresses are multiples of it
_STAGE = 2 << 20  # bytes per direct write: each thread that writes keeps a buffer this large
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux's; elsewhere every write goes through the page cache
_refused: set[int] = set()  # st_dev of file systems that refused direct I/O
_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range): asm-generic's encoding (x86-64, arm64)
_unshared: set[int] = set()  # st_dev of file systems that cannot share blocks between files
_local = threading.local()
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


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int, *, direct: bool = True) -> None:
    """Write all of `data` at `offset` of the open file `fd` (with direct I/O where it can,
    see above; `direct=False`: through the page cache, for bytes read again soon)."""
    view = memoryview(data).cast("B")
    if direct and len(view) >= DIRECT_MIN and _O_DIRECT and _pwrite_direct(fd, view, offset):
        return
    _pwrite_buffered(fd, view, offset)


def _pwrite_buffered(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + WRITE_SLICE], offset + done)


def _pwrite_direct(fd: int, view: memoryview, offset: int) -> bool:
    """The whole blocks of `view` by direct I/O, then the ends through the page cache;
    False (nothing written) where the file system refuses direct I/O."""
    end = offset + len(view)
    first, last = -(-offset // BLOCK) * BLOCK, end // BLOCK * BLOCK
    dev = os.fstat(fd).st_dev
    if dev in _refused:
        return False
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | _O_DIRECT)
    except OSError as e:  # a file system without direct I/O, or no /proc mounted
        if e.errno in (errno.EINVAL, errno.ENOENT):
            _refused.add(dev)
        return False
    try:
        stage, stage_at = _staging()
        src = None if view.readonly else ctypes.addressof(ctypes.c_char.from_buffer(view))
        pos = first
        while pos < last:
            k = min(last - pos, len(stage))
            if src is None:
                stage[:k] = view[pos - offset:pos - offset + k]
            else:  # ctypes' memmove lets go of the GIL: the event loop reads on while this copies
                ctypes.memmove(stage_at, src + pos - offset, k)
            done = 0
            while done < k:
                done += os.pwrite(direct, stage[done:k], pos + done)
            pos += k
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        if pos == first:
            _refused.add(dev)  # took the flag, not the writes
        return False  # the caller writes it all again, through the page cache
    finally:
        os.close(direct)
    _pwrite_buffered(fd, view[:first - offset], offset)
    _pwrite_buffered(fd, view[last - offset:], last)
    return True


def clone_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> bool:
    """Make `length` bytes of `dst_fd` at `dst_offset` those of `src_fd` at `src_offset`,
    sharing whole blocks instead of writing them (the partial blocks at either end are
    copied in the kernel). False, with nothing written, where no block can be shared:
    the file system has no reflinks, the files are on two of them, the offsets are not
    congruent modulo the block size, or the range holds no whole block."""
    st = os.fstat(dst_fd)
    size = st.st_blksize or BLOCK
    head = -src_offset % size
    body = (length - head) // size * size
    if st.st_dev in _unshared or (src_offset - dst_offset) % size or body <= 0:
        return False
    arg = struct.pack("qQQQ", src_fd, src_offset + head, body, dst_offset + head)
    try:
        fcntl.ioctl(dst_fd, _FICLONERANGE, arg)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
            _unshared.add(st.st_dev)
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV, errno.EINVAL):
            return False
        raise
    _copy_in_kernel(src_fd, src_offset, dst_fd, dst_offset, head)
    tail = head + body
    _copy_in_kernel(src_fd, src_offset + tail, dst_fd, dst_offset + tail, length - tail)
    return True


def cannot_share(fd: int) -> bool:
    """Whether `clone_range` found that the file system holding `fd` has no reflinks."""
    return os.fstat(fd).st_dev in _unshared


def _copy_in_kernel(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        if n <= 0:
            raise OSError(errno.EIO, f"copy_file_range stopped {length} bytes short")
        src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n


def _staging() -> tuple[memoryview, int]:
    """This thread's page-aligned buffer for direct writes (anonymous memory, kept), and its address."""
    stage = getattr(_local, "stage", None)
    if stage is None:
        buf = mmap.mmap(-1, _STAGE)
        stage = _local.stage = (memoryview(buf), ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    return stage


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
