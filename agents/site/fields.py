"""The rollout wire's field checks: what a worker may send in a registration, a poll or a report.

`agents.site.rollout` reads every field a worker sends through these (docs/hotload.md
"Wire"). Each refuses a bad value with `InvalidInput` (a 422), never lets one through
that breaks later: a poll wait of NaN (a worker never dead, a poll never answered), a
`seq` of Infinity, a report field nested a thousand deep that the agent would keep and
re-send to the origin in its status.
"""

from __future__ import annotations

import math

from fabric.core.manifest import check_name
from fabric.errors import FabricError, InvalidInput

MAX_POLL_S = 50.0  # below the clients' 60 s read timeout
MIN_POLL_S = 0.2
MAX_REPORT_TEXT = 4096  # characters kept of one text field of a report (an error message)


def count(value: object, what: str) -> int:
    """A non-negative integer (`seq`, `after`), from JSON or a query string."""
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
        raise InvalidInput(f"{what!r} must be an integer") from None
    if n < 0:
        raise InvalidInput(f"{what!r} must be >= 0")
    return n


def poll_wait(value: object) -> float:
    """A long-poll wait in seconds, clamped to [MIN_POLL_S, MAX_POLL_S]."""
    try:
        s = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInput("poll wait must be a number of seconds") from None
    if math.isnan(s):  # max(nan, …) is nan
        raise InvalidInput("poll wait must be a number of seconds, not NaN")
    return min(max(s, MIN_POLL_S), MAX_POLL_S)


def scalar(value: object, what: str) -> object:
    """A report field: null, a boolean, a finite number or a string (cut at MAX_REPORT_TEXT)."""
    if isinstance(value, str):
        return value[:MAX_REPORT_TEXT]
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise InvalidInput(f"report field {what!r} must be null, a boolean, a number or a string")


def version_or_none(value: object) -> str | None:
    if value in (None, ""):
        return None
    try:
        return check_name("version", value)
    except FabricError:
        raise InvalidInput(f"invalid version name {value!r}") from None
