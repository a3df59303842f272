"""fabric.fileio: large writes go around the page cache (direct I/O) and still land byte for
byte, unaligned ends included; a file system that refuses direct I/O gets the same bytes
through the page cache; the caller's descriptor is left as it was."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from fabric import fileio

from helpers.files import page_cache_share, used_bytes


def _fresh(path: Path, size: int) -> int:
    fileio.create_sized(path, size)
    return os.open(path, os.O_WRONLY)


@pytest.fixture(autouse=True)
def _no_refusals(monkeypatch):
    monkeypatch.setattr(fileio, "_refused", set())


def test_unaligned_chunks_land_byte_for_byte_and_skip_the_page_cache(tmp_path, rng):
    size = 3 * fileio.DIRECT_MIN + 12_345
    header, a, b = 777, 2 * fileio.DIRECT_MIN + 5, fileio.DIRECT_MIN + 11_563  # odd offsets and lengths
    data = rng.bytes(size)
    path = tmp_path / "f.bin"
    fd = _fresh(path, size)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        fileio.pwrite_all(fd, bytearray(data[header:header + a]), header)  # a reader's buffer
        fileio.pwrite_all(fd, memoryview(data)[header + a:header + a + b], header + a)
        fileio.pwrite_all(fd, data[:header], 0)  # small: the page cache
        os.fsync(fd)
        refused = os.fstat(fd).st_dev in fileio._refused
    finally:
        os.close(fd)
    if refused:
        pytest.skip("this file system refuses direct I/O")
    resident = page_cache_share(path)
    assert path.read_bytes()[:header + a + b] == data[:header + a + b]
    assert path.read_bytes()[header + a + b:] == bytes(size - header - a - b)  # untouched: still zeros
    assert resident < 0.2, f"{resident:.0%} of the file went through the page cache"


def test_a_file_system_that_refuses_direct_io_gets_the_bytes_through_the_page_cache(tmp_path, rng, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(fileio.os, "open", refusing_open)
    data = rng.bytes(2 * fileio.DIRECT_MIN + 3)
    path = tmp_path / "f.bin"
    fd = _fresh(path, len(data) + 10)
    try:
        fileio.pwrite_all(fd, data, 10)
        dev = os.fstat(fd).st_dev
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(10) + data
    assert dev in fileio._refused  # asked once per file system, not once per write


def test_the_callers_descriptor_keeps_its_flags_and_position(tmp_path, rng):
    data = rng.bytes(fileio.DIRECT_MIN + 4096 * 3 + 1)
    path = tmp_path / "f.bin"
    fd = _fresh(path, len(data))
    try:
        os.lseek(fd, 5, os.SEEK_SET)
        before = fcntl.fcntl(fd, fcntl.F_GETFL)
        fileio.pwrite_all(fd, data, 0)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == before
        assert not before & os.O_DIRECT
        assert os.lseek(fd, 0, os.SEEK_CUR) == 5
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_tmpfs_writes_land_whatever_it_says_about_direct_io(rng):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    data = rng.bytes(fileio.DIRECT_MIN * 2 + 999)
    path = shm / f"fabric-test-fileio-{os.getpid()}"
    try:
        fd = _fresh(path, len(data) + 1)
        try:
            fileio.pwrite_all(fd, data, 1)
        finally:
            os.close(fd)
        assert path.read_bytes() == b"\0" + data
    finally:
        path.unlink(missing_ok=True)


# --- sharing blocks (reflinks) ----------------------------------------------------------------

def test_clone_range_shares_the_whole_blocks_and_copies_the_unaligned_ends(reflinks, rng):
    data = rng.bytes(6 << 20)
    src_path, dst_path = reflinks / "old", reflinks / "new"
    src_path.write_bytes(data)
    os.sync()
    fileio.create_sized(dst_path, len(data))
    os.sync()
    before = used_bytes(reflinks)
    src, dst = os.open(src_path, os.O_RDONLY), os.open(dst_path, os.O_RDWR)
    try:
        # a range that starts and ends inside blocks, at the same place in a block in both files
        assert fileio.clone_range(src, 1000, dst, 1000, (5 << 20) + 123)
        assert os.pread(dst, (5 << 20) + 123, 1000) == data[1000:1000 + (5 << 20) + 123]
        assert os.pread(dst, 1000, 0) == bytes(1000), "nothing outside the range"
        # offsets at different places in a block cannot share: nothing written
        assert not fileio.clone_range(src, 0, dst, 1, 1 << 20)
        assert os.pread(dst, 1, 0) == b"\0"
        assert not fileio.cannot_share(dst)
    finally:
        os.close(src)
        os.close(dst)
    os.sync()
    # the destination's preallocated blocks gave way to the shared ones: no new space for 5 MiB
    assert used_bytes(reflinks) - before < (1 << 20)


def test_clone_range_says_no_where_the_file_system_has_no_reflinks(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(fileio, "_unshared", set())
    data = rng.bytes(1 << 20)
    (tmp_path / "old").write_bytes(data)
    fileio.create_sized(tmp_path / "new", len(data))
    src, dst = os.open(tmp_path / "old", os.O_RDONLY), os.open(tmp_path / "new", os.O_RDWR)
    try:
        shared = fileio.clone_range(src, 0, dst, 0, len(data))
        if shared:  # this temp folder happens to be on a file system with reflinks
            assert os.pread(dst, len(data), 0) == data
            pytest.skip("the temp folder's file system shares blocks")
        assert os.pread(dst, len(data), 0) == bytes(len(data)), "nothing written"
        assert fileio.cannot_share(dst)
    finally:
        os.close(src)
        os.close(dst)
