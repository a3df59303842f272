"""What every inference-server adapter shares: its configuration, its load record, its protocol.

The site agent drives inference servers it does not own (vLLM, SGLang, Triton/KServe)
through their own run-time APIs (docs/serving.md). Each server is one `[[servers]]`
block of site.toml, read here into a `ServerConfig`:

    [[servers]]
    name = "vllm-a"                   # unique at this site; the id in status (`fabric status`)
    kind = "vllm"                     # vllm | sglang | kserve | triton
    url = "http://10.0.0.5:8000"
    model = "llama-8b"                # the served model name (OpenAI `model`, v2 model name)
    artifact = "llama-8b"             # the followed artifact it serves (default: the only one followed)
    token = "…"                       # or token_file = "…": the server's API key, if it has one
    [servers.health]                  # optional: the golden request through the inference API
    request = { prompt = "The capital of France is", max_tokens = 4, temperature = 0 }
    expect = " Paris"                 # optional: the recorded answer
    field = "choices.0.text"          # where the answer is in the response (default per kind)
    tolerance = 0.0                   # for numbers: |answer - expect| <= tolerance
    path = "/v1/completions"          # default per kind
    [servers.timeouts]
    connect = 5                       # seconds
    load = 600                        # the whole load call (reload_weights, update_weights_from_disk)
    health = 60                       # the golden request
    pause = 60                        # vLLM: the pause call (mode=wait drains in-flight requests)
    [servers.options]                 # kind-specific (docs/serving.md), e.g. extension = true (vLLM)

`ServerAdapter` is the protocol one adapter per kind implements (agents/serving/vllm.py,
sglang.py, kserve.py); `agents.site.servers` drives them as members of the rollout. A
`LoadRecord` says how one load went; it becomes the member's report in status.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fabric.config import Checker, resolve_path
from fabric.core.manifest import check_name
from fabric.errors import FabricError

KINDS = ("vllm", "sglang", "kserve", "triton")
_KEYS = {"name", "kind", "url", "model", "artifact", "token", "token_file", "health", "timeouts", "options"}
_HEALTH = {"request", "expect", "field", "tolerance", "path"}
_TIMEOUTS = {"connect", "load", "health", "pause"}


@dataclass(frozen=True)
class HealthCheck:
    request: dict  # the golden request body
    expect: Any = None  # the recorded answer (None: any successful answer passes)
    field: str | None = None  # dotted path of the answer in the response; None: the adapter's default
    tolerance: float = 0.0  # numbers match when |answer - expect| <= tolerance
    path: str | None = None  # the inference route; None: the adapter's default


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    load_s: float = 600.0
    health_s: float = 60.0
    pause_s: float = 60.0


@dataclass(frozen=True)
class ServerConfig:
    name: str
    kind: str
    url: str
    model: str
    artifact: str | None = None  # None: the site's only followed artifact
    token: str | None = None
    health: HealthCheck | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    extras: dict = field(default_factory=dict)  # [servers.options]: kind-specific


@dataclass
class LoadRecord:
    """How one load (or restore) went, as status shows it."""

    version: str | None
    ok: bool
    error: str | None = None  # "<code>: <message>"
    seconds_to_new_answers: float | None = None  # activation -> the golden request answered by it
    pause_ms: float | None = None  # the longest the server held requests (the adapter's measure)
    bytes_read: int | None = None  # what the server read from the version folder
    changed: bool = False  # the server's weights may have changed (a failed load must be undone)
    mode: str | None = None  # how it loaded: "reload_weights", "changed_tensors", "update_weights_from_disk", …
    at: float = field(default_factory=time.time)

    def fail(self, e: FabricError) -> "LoadRecord":
        self.ok, self.error = False, f"{e.code}: {e.message}"
        return self

    def to_json(self) -> dict:
        return asdict(self)


class ServerAdapter(Protocol):
    """One inference server, driven through its own API. Methods raise nothing but
    `FabricError`s (`ServingError`, `HealthCheckFailed`); `load` and `restore` catch them into
    the record they return."""

    name: str
    kind: str
    config: ServerConfig

    async def load(self, version: str, folder: Path, previous: tuple[str, Path] | None) -> LoadRecord:
        """Make the server serve `version` from `folder` (the site's versions/<artifact>/<version>),
        then run the health check. `previous` is what it served, for diffs and for undoing."""
        ...

    async def check(self, version: str) -> None:
        """The golden request; raises `HealthCheckFailed` (or a `ServingError`)."""
        ...

    async def restore(self, previous: tuple[str, Path]) -> LoadRecord:
        """Put the server back on `previous` after a failed load: loaded again if the failed load
        changed it, else only checked."""
        ...

    async def serving(self) -> str | None:
        """The version the server reports now (None: it cannot say, or it is unreachable)."""
        ...

    async def close(self) -> None: ...


# --- site.toml --------------------------------------------------------------------------

def parse_servers(raw: object, where: str, base: Path, artifacts: tuple[str, ...]) -> tuple[ServerConfig, ...]:
    """The `[[servers]]` array of site.toml; `artifacts` are the followed ones."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
        raise Checker({}, where).fail("servers", "must be an array of tables ([[servers]])")
    from agents.serving import build_adapter  # each kind checks its own [servers.options]

    out = [_server(Checker(b, f"{where}: servers[{i}]"), base, artifacts) for i, b in enumerate(raw)]
    for cfg in out:
        build_adapter(cfg)  # raises ConfigError naming the option; holds nothing open yet
    names = [s.name for s in out]
    for i, n in enumerate(names):
        if n in names[:i]:
            Checker({}, f"{where}: servers[{i}]").fail("name", f"{n!r} names two servers")
    return tuple(out)


def _server(c: Checker, base: Path, artifacts: tuple[str, ...]) -> ServerConfig:
    c.known(_KEYS)
    name = c.string("name")
    try:
        check_name("server", name)
    except FabricError:
        c.fail("name", f"{name!r}: use 1-128 letters, digits, '.', '_' or '-'")
    kind = c.choice("kind", KINDS, "")
    artifact = c.optional("artifact")
    if artifact is None:
        if len(artifacts) != 1:
            c.fail("artifact", "required when the site follows more than one artifact")
        artifact = artifacts[0]
    elif artifact not in artifacts:
        c.fail("artifact", f"{artifact!r} is not followed by this site (follow = ...)")
    return ServerConfig(name=name, kind=kind, url=c.url("url"), model=c.string("model"), artifact=artifact,
                        token=_token(c, base), health=_health(c), timeouts=_timeouts(c.table("timeouts")),
                        extras=dict(c.table("options").raw))


def _token(c: Checker, base: Path) -> str | None:
    if "token" in c.raw and "token_file" in c.raw:
        c.fail("token", "give at most one of token or token_file")
    if "token" in c.raw:
        return c.string("token")
    if "token_file" not in c.raw:
        return None
    path = resolve_path(base, c.string("token_file"))
    try:
        token = path.read_text().strip()
    except OSError as e:
        c.fail("token_file", f"cannot read {path}: {e.strerror}")
    if not token:
        c.fail("token_file", f"{path} is empty")
    return token


def _health(c: Checker) -> HealthCheck | None:
    if "health" not in c.raw:
        return None
    h = c.table("health")
    h.known(_HEALTH)
    request = h.raw.get("request")
    if not isinstance(request, dict) or not request:
        h.fail("request", "must be a non-empty table: the golden request body")
    expect = h.raw.get("expect")
    if isinstance(expect, float) and not math.isfinite(expect):
        h.fail("expect", "must be finite")
    path = h.optional("path")
    if path is not None and not path.startswith("/"):
        h.fail("path", f"must start with '/', got {path!r}")
    return HealthCheck(request=request, expect=expect, field=h.optional("field"),
                       tolerance=h.number("tolerance", 0.0), path=path)


def _timeouts(c: Checker) -> Timeouts:
    c.known(_TIMEOUTS)
    d = Timeouts()
    return Timeouts(connect_s=c.number("connect", d.connect_s, 0.01), load_s=c.number("load", d.load_s, 0.01),
                    health_s=c.number("health", d.health_s, 0.01), pause_s=c.number("pause", d.pause_s, 0.01))
