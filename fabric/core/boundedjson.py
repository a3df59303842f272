"""The one JSON decoder for untrusted input: bounded depth, bounded integers, finite numbers.

Every JSON document that arrives from the network (request bodies at the origin, the
agents and the hook; the bodies a client reads back; event envelopes and the SNS
messages inside them) or from a store (manifests) is decoded by `decode`. Python's
own `json.loads` accepts what later breaks a process: nesting a thousand deep (a
`RecursionError` in whoever walks or re-encodes it), integers of thousands of digits
(a `ValueError` from the int-digit limit, or an overflow in SQLite), `NaN` and
`Infinity` (a poll wait that never ends), lone surrogates (no UTF-8 form). `decode`
refuses each with the caller's named error, before the document is used:

* the text must be UTF-8 (bytes) and JSON;
* arrays and objects nest at most `MAX_JSON_DEPTH` deep;
* an integer has at most `MAX_JSON_DIGITS` digits, a float is finite
  (`1e400` is refused, not read as infinity), `NaN`/`Infinity` are refused;
* strings hold valid Unicode (no unpaired `\\ud800`-style escapes).

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

from fabric.core.limits import MAX_JSON_DEPTH, MAX_JSON_DIGITS
from fabric.errors import FabricError, InvalidInput

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LONG_INT = re.compile(r"[0-9]{%d,}" % (MAX_JSON_DIGITS + 1))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


def depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return text.count("[") + text.count("{")  # an upper bound, and small: no need to look closer
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP, brackets)), default=0)


def decode(data: bytes | bytearray | memoryview | str, *, what: str = "the JSON document",
           error: type[FabricError] = InvalidInput) -> object:
    """Decode untrusted JSON, within the limits above; anything else raises `error`.

    Args:
        data: the document: UTF-8 bytes, or text.
        what: how messages name it ("request body", "manifest", "event body").
        error: the `FabricError` class to raise (`InvalidInput`, `InvalidManifest`, …).
    """
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{what} is not valid JSON (not UTF-8)") from None
    if depth(text) > MAX_JSON_DEPTH:
        raise error(f"{what} is not valid JSON: nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    if _LONG_INT.search(text) and _LONG_INT.search(_STRING.sub('""', text)):
        raise error(f"{what} is not valid JSON: an integer has more than {MAX_JSON_DIGITS} digits")

    def constant(name: str):
        raise error(f"{what} is not valid JSON: {name} is not allowed")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise error(f"{what} is not valid JSON: the number {number[:40]} is out of range")
        return value

    try:
        obj = json.loads(text, parse_constant=constant, parse_float=finite)
    except FabricError:
        raise
    except RecursionError:  # not reached after the depth check; kept as the last line of defence
        raise error(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and any limit of Python's own
        raise error(f"{what} is not valid JSON ({e})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"{what} holds a string that is not valid Unicode (a lone surrogate)") from None
    return obj


__all__ = ["decode", "depth", "MAX_JSON_DEPTH", "MAX_JSON_DIGITS"]
