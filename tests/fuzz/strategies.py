"""Generated inputs shared by the suite: JSON values and texts that break naive parsers."""

from __future__ import annotations

import json
import string

from hypothesis import strategies as st

ZERO_ID = "blake3:" + "0" * 64
json_leaf = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
             | st.text(max_size=20) | st.sampled_from([ZERO_ID, "v1", "m", "prod", "promote", "rollback", ""]))
json_values = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def _deep(n: int, kind: str) -> bytes:
    return b"[" * n + b"]" * n if kind == "list" else b'{"a":' * n + b"1" + b"}" * n


hostile_numbers = st.sampled_from(["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1" + "0" * 30,
                                   "9" * 40, "1" * 5000, "-0", "1.5", "1e-400", "18446744073709551616"])
hostile_texts = st.one_of(
    st.tuples(st.integers(30, 3000), st.sampled_from(["list", "dict"])).map(lambda t: _deep(*t)),
    hostile_numbers.map(str.encode),
    st.just(b'"\\ud800"'), st.just(b'{"a": "\\udc00x"}'), st.just(b"\xff\xfe{}"), st.just(b"\xef\xbb\xbf{}"),
    st.binary(max_size=200),
)


def as_body(value) -> bytes:
    return json.dumps(value).encode()


def with_field(template: dict, data) -> bytes:
    """`template` with one field (or none) replaced by a generated or hostile value, as JSON text."""
    obj = dict(template)
    key = data.draw(st.sampled_from(sorted(obj) + ["<none>", "<extra>"]))
    how = data.draw(st.sampled_from(["value", "hostile", "drop"]))
    if key == "<none>":
        return as_body(obj)
    if key == "<extra>":
        key = data.draw(st.text(max_size=8))
    if how == "drop":
        obj.pop(key, None)
        return as_body(obj)
    if how == "value":
        obj[key] = data.draw(json_values)
        return as_body(obj)
    obj[key] = "\x00HOSTILE\x00"
    text = as_body(obj).decode()
    return text.replace('"\\u0000HOSTILE\\u0000"', data.draw(hostile_numbers | st.sampled_from(
        ['"\\ud800"', "[" * 40 + "]" * 40, '{"a":' * 40 + "1" + "}" * 40]))).encode()


names = st.sampled_from(["m", "v1", "v2", "prod", "solo", "-x", ".x", "a" * 129, "a" * 300, "%2e%2e",
                         "%00", "a%2Fb", "%FF", "%C3%A9", "..", "x[", "~"]) | \
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)
header_text = st.text(string.ascii_letters + string.digits + " -_.:/=+!;", max_size=40)
