"""Client configuration: the one place that reads environment variables.

`ClientConfig` holds what CLI commands need when a flag is not given: the store
folder, the origin URL and the token. Precedence: command-line flag, then the
environment (`FABRIC_STORE`, `FABRIC_ORIGIN`, `FABRIC_TOKEN`), then the config file
(`FABRIC_CONFIG`, default `~/.config/fabric/config.toml`), whose keys are:

    store = "/var/lib/fabric/store"
    origin = "http://origin:7000"
    token = "…"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

_KEYS = {"store", "origin", "token"}


@dataclass(frozen=True)
class ClientConfig:
    store: str | None = None
    origin: str | None = None
    token: str | None = None


def config_path() -> Path:
    return Path(os.environ.get("FABRIC_CONFIG") or Path.home() / ".config" / "fabric" / "config.toml")


def load_client_config(*, store: str | None = None, origin: str | None = None,
                       token: str | None = None) -> ClientConfig:
    """Merge flags, environment and config file (in that order of precedence)."""
    file = _read_file(config_path())
    return ClientConfig(
        store=store or os.environ.get("FABRIC_STORE") or file.get("store"),
        origin=origin or os.environ.get("FABRIC_ORIGIN") or file.get("origin"),
        token=token or os.environ.get("FABRIC_TOKEN") or file.get("token"),
    )


def _read_file(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    for key, value in data.items():
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key!r} must be a string")
    return data
