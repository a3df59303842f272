"""A backend on a local directory: the embedded default.

Every write goes to a temp file under `tmp/`, is fsynced, then renamed into place,
so a crash at any moment leaves either the old object or the whole new one, never a
torn file under its final key. Leftover temp files are swept by `fsck --repair`.

A writer of many objects at once (a publish) may defer durability: `put_parts(...,
durable=False)` writes the temp file and stops there; `flush()` then makes every such
file durable with one `syncfs` and only then renames them into place. The guarantee
is the same (no object under its key before its bytes are on disk), at the cost of
one flush instead of one `fsync` per object. Bytes a writer put elsewhere in the store
for the next flush to cover (a publish's packs) count too (`defer_bytes`). Once 256 MiB
or 2 seconds' worth is pending, a flush starts in a background thread (one at a time),
so writers go on while the disk catches up; `flush()` waits for it, and re-raises what
made it fail.
Compare-and-swap takes an exclusive `flock` on a hidden lock file beside the key
(`.<name>.lock`: keys never start with '.', so a lock never shadows an object).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from fabric.errors import Conflict, NotFound, StoreFull
from fabric.fileio import write_all
from fabric.store import packs
from fabric.store.backend import Capabilities, ObjectInfo


class LocalBackend:
    """The Backend protocol on a folder: objects are files, so it can do everything."""

    capabilities = Capabilities(parts=True, deferred=True, size=True, files=True, link=True, temp_files=True)

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[Path, Path]] = []  # deferred writes: (temp file, final path)
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._pending_lock = threading.Lock()
        self._flushing = threading.Lock()  # held by the one flush in progress, from taking the list to the renames
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None

    def describe(self) -> str:
        return str(self.root)

    def sweep_temp(self) -> int:
        """Remove temp files left by a crashed writer. Only safe when no writer runs."""
        removed = 0
        for p in self._tmp.iterdir():
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    def _path(self, key: str) -> Path:
        return self.root / key

    def path(self, key: str) -> Path:
        return self._path(key)

    def size(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None

    def link_in(self, key: str, src: str | os.PathLike) -> bool:
        """Hard-link the file `src` under `key`; False where the file system cannot."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return packs.link(src, path)

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"no object {key!r} in store {self.root}") from None

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.put_parts(key, [data])

    def put_parts(self, key: str, parts: list[bytes | memoryview], *, durable: bool = True) -> None:
        """Write the concatenation of `parts` under `key` (no copy into one buffer).

        With `durable=False` the object appears only at the next `flush()`.
        """
        path = self._path(key)
        tmp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, parts)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not durable:
                self._defer(sum(len(p) for p in parts), (tmp, path))
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"store {self.root} is full while writing {key!r}") from None
            raise

    def defer_bytes(self, nbytes: int) -> None:
        """Count `nbytes` written into a file of this store (a pack) that the next flush covers."""
        self._defer(nbytes, None)

    def _defer(self, nbytes: int, rename: tuple[Path, Path] | None) -> None:
        with self._pending_lock:
            if not self._pending and not self._pending_bytes:
                self._pending_since = time.monotonic()
            if rename is not None:
                self._pending.append(rename)
            self._pending_bytes += nbytes
            full = (self._pending_bytes >= _FLUSH_BYTES
                    or time.monotonic() - self._pending_since >= _FLUSH_SECONDS)
            if full and self._background is None:  # bound what a crash can lose: a killed publish resumes from here
                self._background = threading.Thread(target=self._flush_in_background, name="fabric-flush",
                                                    daemon=True)
                self._background.start()

    def _flush_in_background(self) -> None:
        try:
            self._flush_pending()
        except BaseException as e:  # noqa: BLE001 - kept for flush() to raise
            self._background_error = e
        finally:
            with self._pending_lock:
                self._background = None

    def flush(self) -> None:
        """Make deferred objects durable (one syncfs), then move them into place."""
        self._flush_pending()  # waits for a background flush in progress: it holds `_flushing`
        error, self._background_error = self._background_error, None
        if error is not None:
            raise error

    def _flush_pending(self) -> None:
        with self._flushing:
            with self._pending_lock:
                pending, self._pending, self._pending_bytes = self._pending, [], 0
            if not pending:
                return
            _syncfs(self.root)
            error: OSError | None = None
            for tmp, path in pending:  # one that cannot be renamed does not keep the others out
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, path)
                except OSError as e:
                    error = error or e
                    tmp.unlink(missing_ok=True)
            _syncfs(self.root)  # the renames (metadata only: cheap)
            if error is not None:
                raise error

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(_lock_path(path), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = path.read_bytes() if path.is_file() else None
            if current != expected:
                raise Conflict(f"{key!r} changed concurrently; try again")
            self.put(key, data)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # A prefix is a string prefix, not a folder: "l/a" matches "l/a/1" and "l/ab".
        # Walk from the folder holding its last part, descending only where keys can match.
        head = prefix.rpartition("/")[0]
        for dirpath, dirnames, names in os.walk(self._path(head) if head else self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames
                           if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")]
            for name in names:
                if name.startswith("."):  # a CAS lock file, not an object
                    continue
                p = Path(dirpath, name)
                key = rel + name
                if key.startswith(prefix):
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _lock_path(path: Path) -> Path:
    """`.<name>.lock`: no key part starts with '.', so a lock never shadows an object
    (a version may well be named `v1.lock`)."""
    return path.with_name(f".{path.name}.lock")


_LIBC = ctypes.CDLL(None, use_errno=True)
_FLUSH_BYTES = 256 << 20  # deferred bytes that trigger a flush
_FLUSH_SECONDS = 2.0  # ... or the age of the oldest deferred write: what a crash can lose


def _syncfs(path: Path) -> None:
    """Flush the file system holding `path` (Linux syncfs; else a global sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if getattr(_LIBC, "syncfs", None) is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
