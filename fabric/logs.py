"""Structured logs: one JSON object per line on stderr.

    log = get_logger("origin"); log.info("version committed", artifact="m", version="v2")

Secrets never go into a log line: callers pass token *names*, not tokens.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
                "component": record.name.removeprefix("fabric."), "msg": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, default=str)


class Logger:
    def __init__(self, name: str):
        self._log = logging.getLogger(f"fabric.{name}")

    def _emit(self, level: int, msg: str, fields: dict) -> None:
        self._log.log(level, msg, extra={"fields": fields})

    def info(self, msg: str, **fields) -> None:
        self._emit(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields) -> None:
        self._emit(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields) -> None:
        self._emit(logging.ERROR, msg, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def setup(level: str = "info") -> None:
    """Send fabric.* logs to stderr as JSON lines. Called once by each daemon's entry point."""
    root = logging.getLogger("fabric")
    root.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
