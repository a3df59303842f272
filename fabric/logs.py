"""Structured logs: one JSON object per line on stderr.

    log = get_logger("origin"); log.info("version committed", artifact="m", version="v2")

    {"ts": "2026-12-01T22:03:04.123Z", "level": "info", "component": "origin",
     "msg": "version committed", "artifact": "m", "version": "v2"}

This module owns the line's shape: `ts` is ISO-8601 UTC with milliseconds, `level` one
of `LEVELS`, `component` the process's role. A daemon's entry point calls `setup(level)`
(its config's `log_level`), and its runner calls `bind(component, **fields)` once it
knows its role (`"origin"`, `"agent"` with `site=…`, `"hook"`, `"worker"`): from then on
every line of that process says that component, and the name a module logs under
(`get_logger("pull")`, `"server"`, `"rollout"`) goes into `logger` when it differs.
Before `bind` (the CLI's one-shot commands, in-process tests) `component` is the
logger's name.

Secrets never go into a log line: callers pass token *names*, not tokens.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")


def iso_utc(t: float) -> str:
    """Seconds since the epoch → `2026-12-01T22:03:04.123Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class _JsonFormatter(logging.Formatter):
    def __init__(self, component: str | None = None, fields: dict | None = None):
        super().__init__()
        self.component, self.fields = component, dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix("fabric.")
        line = {"ts": iso_utc(record.created), "level": record.levelname.lower(),
                "component": self.component or name}
        if self.component and name != self.component:
            line["logger"] = name
        line["msg"] = record.getMessage()
        line.update(self.fields)
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, default=str)


class Logger:
    def __init__(self, name: str):
        self._log = logging.getLogger(f"fabric.{name}")

    def _emit(self, level: int, msg: str, fields: dict) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, msg, extra={"fields": fields})

    def enabled(self, level: str) -> bool:
        """Whether a line at `level` would be written (to skip costly debug fields)."""
        return self._log.isEnabledFor(getattr(logging, level.upper()))

    def debug(self, msg: str, **fields) -> None:
        self._emit(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields) -> None:
        self._emit(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields) -> None:
        self._emit(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields) -> None:
        self._emit(logging.ERROR, msg, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def _check_level(level: str) -> str:
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ValueError(f"{level!r} is not a log level ({', '.join(LEVELS)})")
    return level.lower()


def setup(level: str = "info") -> None:
    """Send fabric.* logs to stderr as JSON lines. Called once by each daemon's entry point."""
    root = logging.getLogger("fabric")
    root.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root.addHandler(handler)
    root.setLevel(_check_level(level).upper())
    root.propagate = False


def bind(component: str, **fields) -> None:
    """Name the process's role (and fields every line carries, e.g. `site`) on the lines
    `setup` writes. Called by each daemon's runner; without `setup`, nothing changes."""
    for handler in logging.getLogger("fabric").handlers:
        if isinstance(handler.formatter, _JsonFormatter):
            handler.setFormatter(_JsonFormatter(component, fields))
