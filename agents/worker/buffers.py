"""The live weights' building blocks: a readers-writer lock (requests read, a load
writes) and `Buffer`, one copy of the module with the version it holds."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from fabric.logs import get_logger
from fabric.core.manifest import Manifest



log = get_logger("worker")


class RWLock:
    """Many readers (requests) or one writer (an in-place swap); a waiting writer goes first.

    Reentrant for readers on one thread, so a request path that nests `serving()`
    does not deadlock behind a waiting writer.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(eq=False)
class Buffer:
    """One set of weights: a module, the version it holds, and what is known of it."""

    module: torch.nn.Module
    version: str | None
    manifest: Manifest | None = None
    dirty: set[str] = field(default_factory=set)  # tensors written by a load that did not finish
    users: int = 0  # requests running on it (double-buffered)
    folder: Path | None = None  # where its version's files are (the restore source for in-place)
