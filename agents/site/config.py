"""Site agent configuration: one typed object, loaded from TOML and checked at start-up.

    site = "fra-edge-1"
    data = "/var/lib/fabric"                  # store/, versions/, current/ live here
    listen = "0.0.0.0:7070"
    origin = "http://origin.example:7000"
    # or origins = ["http://a.example:7000", "http://b.example:7000"]: origins over one store,
    # asked in this order; a dead one is skipped and tried again later (agents.site.origins)
    token = "…"                               # or token_file = "…"
    follow = ["llama-8b:prod", "embedder:latest"]
    topology = "topology/demo.toml"           # optional; without it the origin is the only source
    upstreams = ["http://hub.example:7070"]   # optional; overrides the topology
    tokens = "tokens.toml"                    # optional; who may fetch from this relay
    metrics_listen = "0.0.0.0:9470"           # optional; /metrics here without a token
    trust = "trust.toml"                      # optional; the trust policy (docs/trust.md): without
                                              # it the site accepts unsigned versions, and says so
    log_level = "info"                        # debug | info | warning | error
    [retention]
    keep = 3
    high_watermark = 0.90                     # fraction of the disk; above it, prune to `keep_min`
    low_watermark = 0.80
    [sync]
    connections = 4
    max_rate = "0"                            # bytes/s cap on fetching, e.g. "50M"; 0 = none
    stall_timeout = 30
    give_up_after = 120
    resync_interval = 60                      # seconds between full re-syncs (missed events)
    [workers]
    canary_timeout = 600                      # the canary must report within this (seconds)
    load_timeout = 600                        # any other worker: past this it is marked failed
    forget_after = 600                        # dead workers leave the status after this
    [[servers]]                               # optional, one per inference server the agent drives
    name = "vllm-a"                           # (vLLM, SGLang, Triton/KServe): agents/serving/base.py
    kind = "vllm"                             # and docs/serving.md have every key
    url = "http://10.0.0.5:8000"
    model = "llama-8b"

Every problem names the key: `site.toml: retention.keep: must be an integer >= 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fabric.config import Checker, parse_byte_rate, read_toml, resolve_path
from fabric.core.manifest import check_name
from fabric.logs import LEVELS

from fabric.errors import ConfigError, TrustPolicyInvalid
from fabric.trust import TrustPolicy

from agents.serving.base import ServerConfig, parse_servers
from agents.site.rollout import RolloutOptions

_TOP = {"site", "data", "listen", "origin", "origins", "token", "token_file", "follow", "topology",
        "upstreams", "tokens", "retention", "sync", "workers", "log_level", "report_interval", "metrics_listen",
        "trust", "servers"}
_RETENTION = {"keep", "high_watermark", "low_watermark"}
_SYNC = {"connections", "max_rate", "stall_timeout", "give_up_after", "resync_interval"}
_WORKERS = {"canary_timeout", "load_timeout", "forget_after"}


@dataclass(frozen=True)
class Retention:
    keep: int = 3
    high_watermark: float = 0.90
    low_watermark: float = 0.80


@dataclass(frozen=True)
class SyncOptions:
    connections: int = 4
    max_rate: float | None = None
    stall_timeout: float = 30.0
    give_up_after: float = 120.0
    resync_interval: float = 60.0


@dataclass(frozen=True)
class SiteConfig:
    site: str
    data: Path
    listen: str
    origin: str  # the first of `origins`
    token: str
    follow: tuple[tuple[str, str], ...]
    topology: Path | None = None
    upstreams: tuple[str, ...] = ()
    tokens: Path | None = None
    retention: Retention = field(default_factory=Retention)
    sync: SyncOptions = field(default_factory=SyncOptions)
    log_level: str = "info"
    report_interval: float = 5.0
    workers: RolloutOptions = field(default_factory=RolloutOptions)
    metrics_listen: str | None = None  # HOST:PORT for a token-free /metrics listener
    trust_file: Path | None = None  # `trust`: the trust policy's file
    trust: TrustPolicy | None = None  # the policy it holds, parsed at start-up (agents.site.trust)
    servers: tuple[ServerConfig, ...] = ()  # [[servers]]: inference servers driven as rollout members
    origins: tuple[str, ...] = ()  # every origin, in preference order (`origin` alone: that one)

    def __post_init__(self):
        if not self.origins:
            object.__setattr__(self, "origins", (self.origin,))

    @classmethod
    def load(cls, path: str | Path) -> "SiteConfig":
        path = Path(path)
        return cls.from_dict(read_toml(path, "agent config"), path.name, base=path.parent)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config", base: Path = Path(".")) -> "SiteConfig":
        c = Checker(raw, where)
        c.known(_TOP)
        site = c.string("site")
        try:
            check_name("site", site)
        except Exception:
            c.fail("site", "must be 1-128 letters, digits, '.', '_' or '-'")
        listen = c.listen("listen")
        trust_file = resolve_path(base, c.string("trust")) if "trust" in raw else None
        origins = _origins(c)
        return cls(
            site=site,
            data=resolve_path(base, c.string("data")),
            listen=listen,
            origin=origins[0],
            origins=origins,
            token=_token(c, base),
            follow=_follow(c),
            topology=resolve_path(base, c.string("topology")) if "topology" in raw else None,
            upstreams=tuple(c.urls("upstreams")),
            tokens=resolve_path(base, c.string("tokens")) if "tokens" in raw else None,
            retention=_retention(c.table("retention"), f"{where}: retention"),
            sync=_sync(c.table("sync"), f"{where}: sync"),
            log_level=c.choice("log_level", LEVELS, "info"),
            report_interval=c.number("report_interval", 5.0, minimum=0.1),
            workers=_workers(c.table("workers")),
            metrics_listen=c.listen("metrics_listen", required=False),
            trust_file=trust_file,
            trust=_trust(c, trust_file) if trust_file else None,
            servers=parse_servers(raw.get("servers"), where, base, tuple(a for a, _ in _follow(c))),
        )



def _trust(c: Checker, path: Path) -> TrustPolicy:
    """The trust policy in `path`; a file that is missing or does not parse stops the agent."""
    try:
        return TrustPolicy.load(path)  # its errors name the file and the key
    except ConfigError as e:
        raise TrustPolicyInvalid(f"{c.where}: trust: {e.message}") from None


def _origins(c: Checker) -> tuple[str, ...]:
    """`origin = URL`, or `origins = [URL, ...]` (origins over one store, in preference order)."""
    if ("origin" in c.raw) == ("origins" in c.raw):
        c.fail("origin", "give exactly one of origin or origins")
    if "origin" in c.raw:
        return (c.url("origin"),)
    urls = c.urls("origins")
    if not urls:
        c.fail("origins", "must list at least one origin URL")
    if len(set(urls)) != len(urls):
        c.fail("origins", "lists an origin twice")
    return tuple(urls)


def _token(c: Checker, base: Path) -> str:
    if ("token" in c.raw) == ("token_file" in c.raw):
        c.fail("token", "give exactly one of token or token_file")
    if "token" in c.raw:
        return c.secret("token")
    path = resolve_path(base, c.string("token_file"))
    try:
        token = path.read_text().strip()
    except OSError as e:
        c.fail("token_file", f"cannot read {path}: {e.strerror}")
    if not token:
        c.fail("token_file", f"{path} is empty")
    return c.secret("token_file", token)


def _follow(c: Checker) -> tuple[tuple[str, str], ...]:
    value = c.raw.get("follow")
    if not isinstance(value, list) or not value:
        c.fail("follow", 'must be a non-empty list like ["llama-8b:prod"]')
    out = []
    for entry in value:
        artifact, sep, channel = str(entry).partition(":")
        try:
            if not sep:
                raise ValueError
            check_name("artifact", artifact)
            check_name("channel", channel)
        except Exception:
            c.fail("follow", f"{entry!r} is not ARTIFACT:CHANNEL")
        out.append((artifact, channel))
    if len(set(out)) != len(out):
        c.fail("follow", "lists a channel twice")
    if len({a for a, _ in out}) != len(out):
        c.fail("follow", "follows two channels of one artifact (one active version per artifact)")
    return tuple(out)


def _retention(c: Checker, where: str) -> Retention:
    c.known(_RETENTION)
    keep = c.raw.get("keep", 3)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        c.fail("keep", "must be an integer >= 1")
    high = c.number("high_watermark", 0.90)
    low = c.number("low_watermark", 0.80)
    if not 0 < low <= high <= 1:
        c.fail("low_watermark", "need 0 < low_watermark <= high_watermark <= 1")
    return Retention(keep, high, low)


def _sync(c: Checker, where: str) -> SyncOptions:
    c.known(_SYNC)
    rate = c.raw.get("max_rate", "0")
    try:
        max_rate = _rate(rate)
    except ValueError:
        c.fail("max_rate", f"{rate!r} is not a byte rate like '50M'")
    connections = c.raw.get("connections", 4)
    if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 64:
        c.fail("connections", "must be an integer from 1 to 64")
    return SyncOptions(connections, max_rate, c.number("stall_timeout", 30.0, 0.1),
                       c.number("give_up_after", 120.0, 0.1), c.number("resync_interval", 60.0, 0.1))


def _workers(c: Checker) -> RolloutOptions:
    c.known(_WORKERS)
    d = RolloutOptions()
    return RolloutOptions(canary_timeout=c.number("canary_timeout", d.canary_timeout, 0.1),
                          load_timeout=c.number("load_timeout", d.load_timeout, 0.1),
                          forget_after=c.number("forget_after", d.forget_after, 0.1))


def _rate(value: object) -> float | None:
    return parse_byte_rate(value) or None  # "0": no cap
