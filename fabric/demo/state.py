"""The demo's state: its constants, the nodes it runs (origin, sites, workers) and `Demo`,
which every step reads and fills in."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console

from fabric.publish import PublishResult
from fabric.store.registry import Registry
from fabric.store.store import Store

if TYPE_CHECKING:
    from fabric.demo.processes import Processes
    from fabric.demo.stream import RequestStream

CHANNEL = "prod"
SERVED = "demo-mlp"  # part 2: the reference worker's model (fabric/worker_demo.py)
WORKER_PORT = 8101  # preferred port of the first worker; the next ones count up
# A site of the topology is a hub when another site names it as upstream; the others
# are edges, and each edge runs one worker.
DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "topology" / "demo.toml"

# Part 2's bounds: the request stream, and how long each wait may take.
RATE = 50.0  # requests per second per worker
WARM = 80  # answers per worker before v2 is published, and v2 answers per worker before the stream stops
MAX_REQUESTS = 1000  # per worker
MAX_STREAM_S = 60.0
START_TIMEOUT = 60.0  # a process serving /livez; every site and worker on v1
SWAP_TIMEOUT = 45.0  # every site and worker on v2


# --- the demo's state ----------------------------------------------------------------------

@dataclass
class Node:
    """A server process of part 2: the origin, a site agent or a worker."""

    name: str
    url: str
    kind: str  # "origin", "hub", "edge" or "worker"
    upstream: str | None = None  # sites: the site (or "origin") above
    site: str | None = None  # workers: their site
    proc: subprocess.Popen | None = None


@dataclass
class Demo:
    root: Path
    console: Console
    shown_root: str = ""  # how `root` is printed in commands (as given on the command line)
    topology_text: str = ""
    store: Store | None = None
    results: dict[str, PublishResult] = field(default_factory=dict)
    procs: "Processes | None" = None
    origin: Node | None = None
    sites: dict[str, Node] = field(default_factory=dict)
    workers: dict[str, Node] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # token name ("admin" or a site) -> secret
    published: dict[str, dict] = field(default_factory=dict)  # version -> `fabric publish --json`
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # version -> output on the fixed input
    stream: "RequestStream | None" = None
    problems: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # site -> the code it refused the forgery with

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def registry(self) -> Registry:
        return Registry(self.store)

    def edges(self) -> list[Node]:
        return [s for s in self.sites.values() if s.kind == "edge"]

def shown(d: Demo, path: Path | str) -> str:
    """`path` as the demo prints it: under --out as given on the command line."""
    text = str(path)
    root = str(d.root)
    return (d.shown_root or root) + text[len(root):] if text.startswith(root) else text
