"""A site's data folder: what lives where, and the atomic pointer flip.

    <data>/store/                         the site's chunk store (fabric.store.store layout)
    <data>/versions/<artifact>/<version>/ materialised, verified versions (the store's packs)
    <data>/current/<artifact>             symlink to the active version's folder
    <data>/state.json                     activation history, pins, bad versions
    <data>/trust/                         signed statements accepted and kept (agents.site.trust)

A version folder appears only by rename from a staging folder, so it is complete
or absent. Its files are hard links of the store's packs (`fabric.store.packs`): the
site holds each byte once, and workers must treat them as read-only (a file written in
place is caught by its hash before the store serves it, and fetched again).
`sweep_staging` removes the staging folders a crash left; the packs linked from their
files stay in the store with the references into them, so the next pull resumes from
the chunks they hold, and collection drops them once nothing points into them. `activate` flips `current/<artifact>` with a rename of a new symlink over
the old one: a reader resolving the link sees the old version or the new one, never
a mix. `state.json` is rewritten with temp file, fsync, rename (`StateFile` does it
in a thread, one write at a time, each of a snapshot taken on the event loop).

Everything in `Layout` is blocking file I/O: coroutines call it in a thread.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path



@dataclass
class SiteState:
    history: dict[str, list[str]] = field(default_factory=dict)  # artifact -> versions, oldest first
    pins: set[str] = field(default_factory=set)  # "artifact@version"
    bad: dict[str, list[str]] = field(default_factory=dict)  # artifact -> versions marked bad here

    def to_json(self) -> dict:
        return {"history": self.history, "pins": sorted(self.pins), "bad": self.bad}


class Layout:
    def __init__(self, data: Path):
        self.data = Path(data)
        self.store_dir = self.data / "store"
        self.versions = self.data / "versions"
        self.current = self.data / "current"
        self.state_file = self.data / "state.json"
        self.trust = self.data / "trust"
        for d in (self.versions, self.current):
            d.mkdir(parents=True, exist_ok=True)

    def version_dir(self, artifact: str, version: str) -> Path:
        return self.versions / artifact / version

    def signature_path(self, artifact: str, version: str) -> Path:
        """The version's signed statement (DSSE envelope) as this site received it."""
        return self.trust / "versions" / artifact / version

    def active(self, artifact: str) -> str | None:
        link = self.current / artifact
        try:
            return Path(os.readlink(link)).name
        except (FileNotFoundError, OSError):
            return None

    def activate(self, artifact: str, version: str) -> None:
        """Point current/<artifact> at the version's folder, atomically."""
        target = os.path.relpath(self.version_dir(artifact, version), self.current)
        tmp = self.current / f".{artifact}.{uuid.uuid4().hex[:8]}"
        os.symlink(target, tmp)
        os.replace(tmp, self.current / artifact)
        _fsync_dir(self.current)

    def materialised(self, artifact: str) -> list[str]:
        folder = self.versions / artifact
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def remove_version(self, artifact: str, version: str) -> None:
        shutil.rmtree(self.version_dir(artifact, version), ignore_errors=True)
        self.signature_path(artifact, version).unlink(missing_ok=True)

    def sweep_staging(self) -> None:
        """Remove staging folders and temp links left by a crash."""
        for folder in self.versions.glob("*/.*"):
            shutil.rmtree(folder, ignore_errors=True)
        for link in self.current.glob(".*"):
            link.unlink(missing_ok=True)

    # --- state ---------------------------------------------------------------------

    def load_state(self) -> SiteState:
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return SiteState()
        return SiteState(history=raw.get("history", {}), pins=set(raw.get("pins", [])), bad=raw.get("bad", {}))

    def save_state(self, state: SiteState) -> None:
        tmp = self.state_file.with_name(f".state.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def disk_usage(self) -> float:
        """The fraction of the data disk in use, as `df` reports it: used / (used + available
        to us). Blocks reserved for root, or held back by the host, count as neither."""
        st = os.statvfs(self.data)
        used = st.f_blocks - st.f_bfree
        return used / (used + st.f_bavail) if used + st.f_bavail else 0.0


class StateFile:
    """The site's state, changed on the event loop and saved from a thread.

    `save` writes a snapshot taken when its turn comes, and saves run one at a time, so
    the file ends with the newest state whatever the threads' timing.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.state = layout.load_state()
        self._turn = asyncio.Lock()

    async def save(self) -> None:
        async with self._turn:
            await asyncio.to_thread(self.layout.save_state, copy.deepcopy(self.state))

    def snapshot(self) -> SiteState:
        return copy.deepcopy(self.state)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
