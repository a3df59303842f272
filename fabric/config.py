"""Configuration: the client's settings, the notation for durations and rates, and the
checker every daemon's TOML uses.

This is the one place that reads environment variables. It is also the one definition
of how a duration ("30s", "20ms") or a rate is written, in files and in flags alike: a
link's bandwidth in bits per second (`parse_bit_rate`, "200mbit") and a transfer cap in
bytes per second (`parse_byte_rate`, "50M"). It imports nothing of Fabric but
`fabric.errors` and pure `fabric.core` modules, so `fabric.core.topology` may use it.

`ClientConfig` holds what CLI commands need when a flag is not given: the store
folder, the origin URL, the token and the site agent's URL (for `pin`/`unpin`).
Precedence: command-line flag, then the environment (`FABRIC_STORE`, `FABRIC_ORIGIN`,
`FABRIC_TOKEN`, `FABRIC_AGENT`), then the config file (`FABRIC_CONFIG`, default
`~/.config/fabric/config.toml`; a `FABRIC_CONFIG` naming a missing file is an error),
then the default (only the agent has one), and `sources` says which gave each. The
file's keys are:

    store = "/var/lib/fabric/store"
    origin = "http://origin:7000"
    token = "…"
    agent = "http://127.0.0.1:7070"
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fabric.core.policy import Mode, parse_mode
from fabric.errors import ConfigError, InvalidInput

_KEYS = {"store", "origin", "token", "agent"}
_CLIENT_DEFAULTS = {"agent": "http://127.0.0.1:7070"}
MIN_SECRET = 16  # the shortest secret any configuration may hold: a hook token, a site token, a token file's


@dataclass(frozen=True)
class ClientConfig:
    store: str | None = None
    origin: str | None = None
    token: str | None = None
    agent: str | None = None
    sources: tuple[tuple[str, str], ...] = ()  # (key, "flag" | "env FABRIC_…" | "file PATH" | "default")


def config_path() -> Path:
    return Path(os.environ.get("FABRIC_CONFIG") or Path.home() / ".config" / "fabric" / "config.toml")


def encode_mode() -> Mode | None:
    """The encoding mode `FABRIC_ENCODE` pins (full, light, stored), or None for `auto` (the default)."""
    return parse_mode(os.environ.get("FABRIC_ENCODE", "auto"))


def frame_cache_bytes(default: int) -> int:
    """The bytes of encoded frames a server keeps (`fabric.wire.framecache`): `FABRIC_FRAME_CACHE_MB`
    (0 keeps none), else `default` (the role's)."""
    raw = os.environ.get("FABRIC_FRAME_CACHE_MB", "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigError(f"FABRIC_FRAME_CACHE_MB={raw!r}: give whole MiB (0 keeps no encoded frames)")
    return int(raw) << 20


def server_limits_env() -> dict[str, float]:
    """`FABRIC_SERVER_LIMITS`, e.g. "header_timeout=5,max_connections=256": overrides of what
    every server gives a connection (`fabric.wire.connections.ServerLimits` checks the names)."""
    raw = os.environ.get("FABRIC_SERVER_LIMITS", "").strip()
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"FABRIC_SERVER_LIMITS: {item!r} is not NAME=NUMBER") from None
        if not sep or not math.isfinite(out[key.strip()]) or out[key.strip()] <= 0:
            raise ConfigError(f"FABRIC_SERVER_LIMITS: {item!r} is not NAME=NUMBER (a positive number)")
    return out


def traces_file() -> str | None:
    """Where `fabric.tracing` appends this process's spans (`FABRIC_TRACES_FILE`), or None."""
    return os.environ.get("FABRIC_TRACES_FILE") or None


def systemd_notify_env() -> tuple[str | None, float | None]:
    """systemd's `NOTIFY_SOCKET`, and the watchdog interval in seconds (`WATCHDOG_USEC`).

    The interval is None when unset or meant for another process (`WATCHDOG_PID`, as in
    sd_watchdog_enabled(3)); both are None outside a `Type=notify` unit.
    """
    address = os.environ.get("NOTIFY_SOCKET") or None
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
    interval = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
    return address, interval


def load_client_config(*, store: str | None = None, origin: str | None = None,
                       token: str | None = None, agent: str | None = None) -> ClientConfig:
    """Merge flags, environment, config file and defaults (in that order of precedence).

    An origin or agent URL without an http:// or https:// scheme is a ConfigError
    naming where it came from.
    """
    path = config_path()
    if os.environ.get("FABRIC_CONFIG") and not path.exists():
        raise ConfigError(f"FABRIC_CONFIG names {path}, which does not exist")
    file = _read_file(path)
    flags = {"store": store, "origin": origin, "token": token, "agent": agent}
    values, sources = {}, []
    for key, flag in flags.items():
        var = f"FABRIC_{key.upper()}"
        for value, source in ((flag, "flag"), (os.environ.get(var), f"env {var}"),
                              (file.get(key), f"file {path}"), (_CLIENT_DEFAULTS.get(key), "default")):
            if value:
                values[key] = value
                sources.append((key, source))
                break
        if key in ("origin", "agent") and values.get(key) and not values[key].startswith(("http://", "https://")):
            where = f"--{key}" if sources[-1][1] == "flag" else sources[-1][1]
            raise ConfigError(f"{where}: {key} URL {values[key]!r} has no scheme; "
                              f"write it as http://{values[key]} or https://{values[key]}")
    return ClientConfig(**values, sources=tuple(sources))


def read_toml(path: str | Path, what: str) -> dict:
    """Parse a TOML file; a missing, unreadable or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path}: {e}") from None


def _read_file(path: Path) -> dict:
    if not path.exists():
        return {}
    data = read_toml(path, "config file")
    for key, value in data.items():
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key!r} must be a string")
    return data


# --- durations and rates: the one notation every config file and flag uses ------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?$")
_SECONDS = {"us": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_BIT_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps|b)\s*$", re.IGNORECASE)
_SI = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_duration(text: object, *, bare_seconds: bool = True) -> float:
    """"30s", "2m", "500ms", "250us", "1h", "1d" → seconds (units are lower case).

    With `bare_seconds` (the default) a number, or a string without a unit, counts
    seconds; without it the unit is required ("20ms", never "20"). Raises ValueError.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool) and bare_seconds:
        if not _finite(text):
            raise ValueError(f"{repr(text)[:40]} is not a finite number of seconds")
        return float(text)
    m = _DURATION.match(str(text).strip())
    if not m or (m.group(2) is None and not bare_seconds):
        raise ValueError(f"{text!r} is not a duration like '30s', '2m' or '500ms'")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _finite(value: object) -> bool:
    """A number (not a bool) that a float holds: not NaN, not ±Infinity, no 400-digit integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


def parse_bit_rate(text: object) -> float:
    """A link's bandwidth → bits per second: '1gbit' = 1e9, '64kbit', '9600bit'.

    The unit is required and says what is counted: 'bit' counts bits, 'b' and 'bps'
    count bytes ('100mb' = '100mbps' = 800 Mbit/s). k, m, g are powers of 1000, in
    either case. Raises ValueError, for a malformed rate or one that is not positive.
    """
    m = _BIT_RATE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not like '200mbit' or '1gbit'")
    value = float(m.group(1)) * _SI[m.group(2).upper()]
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return value if m.group(3).lower() == "bit" else value * 8


def parse_byte_rate(text: object) -> float:
    """A transfer cap → bytes per second: '50M' = 50e6, '1.5G', '64k', '1000'.

    A number with an optional K, M or G (powers of 1000, either case); no unit word.
    Raises ValueError.
    """
    s = str(text).strip().upper()
    try:
        value = float(s[:-1]) * _SI[s[-1]] if s[-1:] in ("K", "M", "G") else float(s)
    except ValueError:
        raise ValueError(f"{text!r} is not a byte rate like '50M'") from None
    if not math.isfinite(value):  # float() reads "nan" and "inf"
        raise ValueError(f"{text!r} is not a byte rate like '50M'")
    return value


def resolve_path(base: Path, value: str) -> Path:
    """`value` as an absolute path; relative paths are relative to the config file's folder."""
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


# --- checking a daemon's TOML (agents.site.config, fabric.hook.config) ------------------------

def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) → (host, port); an empty host is every address."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class Checker:
    """Typed reads from one TOML table; every failure names the file, table and key."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def fail(self, key: str, why: str):
        raise ConfigError(f"{self.where}: {key}: {why}")

    def known(self, keys: set[str]) -> None:
        for key in self.raw:
            if key not in keys:
                self.fail(key, f"unknown key (known: {', '.join(sorted(keys))})")

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(key, "missing or not a non-empty string")
        return value

    def optional(self, key: str) -> str | None:
        return self.string(key) if key in self.raw else None

    def listen(self, key: str, *, required: bool = True) -> str | None:
        """A `HOST:PORT` to listen on (None when optional and absent)."""
        value = self.string(key) if required else self.optional(key)
        if value is not None:
            try:
                parse_listen(value)
            except InvalidInput:
                self.fail(key, f"must be HOST:PORT, got {value!r}")
        return value

    def secret(self, key: str, value: str | None = None) -> str:
        """A configured secret (a token): a string of at least `MIN_SECRET` characters.

        `value` is one read from elsewhere (a token file) and checked under `key`'s name."""
        value = self.string(key) if value is None else value
        if len(value) < MIN_SECRET:
            self.fail(key, f"must be at least {MIN_SECRET} characters (a secret that short is guessable)")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, "must be a list of strings")
        return value

    def url(self, key: str) -> str:
        value = self.string(key)
        if not value.startswith(("http://", "https://")):
            self.fail(key, f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def urls(self, key: str) -> list[str]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                  for u in value):
            self.fail(key, "must be a list of http(s) URLs")
        return [u.rstrip("/") for u in value]

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self.raw.get(key, default)
        if not _finite(value) or value < minimum:
            self.fail(key, f"must be a finite number >= {minimum}")
        return float(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw.get(key, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
        return value

    def duration(self, key: str, default: float, minimum: float = 0.0) -> float:
        try:
            value = parse_duration(self.raw.get(key, default))
        except ValueError as e:
            self.fail(key, str(e))
        if value < minimum:
            self.fail(key, f"must be at least {minimum}s")
        return value

    def table(self, key: str) -> "Checker":
        value = self.raw.get(key, {})
        if not isinstance(value, dict):
            self.fail(key, "must be a table")
        return Checker(value, f"{self.where}: {key}")
