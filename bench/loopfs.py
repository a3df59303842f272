"""A file system with reflinks, for the benchmarks and tests that need one: an XFS made
with `reflink=1` in an image file, loop-mounted (root and `mkfs.xfs`, Debian's
`xfsprogs`, needed).

    with xfs_with_reflinks(Path("/tmp/x"), size_mb=2048) as mnt:
        ...  # mnt is an empty folder on that file system

`unavailable()` says why one cannot be made here (None if it can), so a caller can skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator


def unavailable() -> str | None:
    """Why a loop-mounted XFS cannot be made here, or None."""
    if os.geteuid() != 0:
        return "mounting a loop device needs root"
    missing = [t for t in ("mkfs.xfs", "mount", "umount") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install -y xfsprogs)"
    return None


@contextlib.contextmanager
def xfs_with_reflinks(folder: Path, size_mb: int = 1024) -> Iterator[Path]:
    """Make, mount and yield `folder/mnt` (an XFS with reflinks in `folder/xfs.img`); unmount
    and remove the image afterwards, also on failure. RuntimeError if it cannot be made."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    folder.mkdir(parents=True, exist_ok=True)
    image, mnt = folder / "xfs.img", folder / "mnt"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)  # sparse: costs the disk only what is written
    mnt.mkdir(exist_ok=True)
    try:
        _run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)])
        _run(["mount", "-o", "loop", str(image), str(mnt)])
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            if os.path.ismount(mnt):  # still busy (a process holds a file): detach it lazily
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        image.unlink(missing_ok=True)


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
