"""The `fabric` command's exit codes: one table from fabric/errors.py's classes to codes.

| code | meaning |
|-----:|---------|
| 0 | success |
| 1 | any other error (a full store, a quota, a failed health check, …) |
| 2 | usage: a bad flag or argument, bad input or config (`InvalidInput` and its kinds) |
| 3 | not found: no such artifact, version, channel or chunk (`NotFound`) |
| 4 | auth: the token is missing, unknown or lacks the scope (`Unauthorized`, `Forbidden`) |
| 5 | network or transfer: the origin or agent is unreachable, a transfer failed (`TransferError`) |
| 6 | integrity: a corrupt chunk, a reference mismatch, `fsck` found problems (`IntegrityError`), a signature refused by the trust policy (`SignatureError`) |
| 7 | conflict: the version exists, DEST is not empty, a race lost (`Conflict`) |
| 130 | interrupted (Ctrl-C) |

An error's code is that of the nearest class in its hierarchy the table names. The
README's "Using the CLI" section repeats this table for users.
"""

from __future__ import annotations

from fabric import errors

OK = 0
OTHER = 1
USAGE = 2
NOT_FOUND = 3
AUTH = 4
NETWORK = 5
INTEGRITY = 6
CONFLICT = 7
INTERRUPTED = 130

_BY_CLASS: dict[type, int] = {
    errors.InvalidInput: USAGE,
    errors.NotFound: NOT_FOUND,
    errors.Unauthorized: AUTH,
    errors.Forbidden: AUTH,
    errors.TransferError: NETWORK,
    errors.IntegrityError: INTEGRITY,
    errors.SignatureError: INTEGRITY,
    errors.Conflict: CONFLICT,
}


def exit_code(e: errors.FabricError) -> int:
    """The exit code for `e`: its nearest class in the table, else OTHER."""
    for cls in type(e).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return OTHER
