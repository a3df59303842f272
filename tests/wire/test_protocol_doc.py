"""docs/protocol.md: its examples decode, and what it lists is what the origin serves.

The page is written from the code; these tests keep it that way. They decode the
chunk-stream example with `fabric.wire.frames.FrameReader` and check every frame against
what the page says of it, check that the example is byte for byte what the code
writes and what a real origin answers, that the page specifies exactly the routes
`fabric.origin.app.create_app` registers, that its error table matches
`fabric/errors.py`, that its limits are the code's, and that its event examples have
the fields a real origin sends.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fabric.core import digest

from fabric import errors

from fabric.wire import frames as wire
from fabric.wire import protocol
from fabric.wire.auth import TokenTable
from fabric.origin.app import create_app
from fabric.publish import LocalTarget, publish
from fabric.store.store import open_store

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TEXT = DOC.read_text(encoding="utf-8")
_FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)
SECRET = "protocol-doc-secret-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}

# What the page says the example holds: chunk `hello` (raw), then a missing frame for
# the id of `absent`.
HELD, ABSENT = b"hello", b"absent"


def fence(lang: str, label: str | None = None) -> list[str]:
    return [body for kind, info, body in _FENCE.findall(TEXT)
            if kind == lang and (label is None or info.strip() == label)]


def example_bytes() -> bytes:
    (body,) = fence("hex", "fetch-response")
    return bytes.fromhex(body)


async def read_frames(data: bytes) -> tuple[list[wire.Frame], wire.FrameReader]:
    reader = wire.FrameReader(wire.bytes_reader(data))
    return [f async for f in reader], reader


def tokens() -> TokenTable:
    return TokenTable.from_dict({"token": [{"name": "ops", "secret": SECRET, "scopes": ["admin"]}]})


# --- the chunk stream -----------------------------------------------------------------------

def test_chunk_stream_example_decodes_as_the_page_says():
    data = example_bytes()
    assert f"({len(data)} bytes)" in TEXT
    frames, reader = asyncio.run(read_frames(data))
    assert reader.done  # the end frame was read, and its count matched
    held, absent = digest.digest(HELD), digest.digest(ABSENT)
    assert frames == [wire.Frame(wire.FRAME_CHUNK, held, 0, len(HELD), HELD),
                      wire.Frame(wire.FRAME_MISSING, absent)]
    assert wire.decode_frame(frames[0], len(HELD)) == HELD  # verified against its id
    # the annotated table names the same ids, sizes and count
    for stated in (f"id `{held}`", f"id `{absent}`", "encoding 0, raw", f"raw size {len(HELD)}",
                   f"payload length {len(HELD)}", "payload `hello`", "2 frames before it"):
        assert stated in TEXT, stated
    assert data[:4] == protocol.MAGIC and data[-5:] == wire.end_frame(2)


def test_chunk_stream_example_is_what_the_code_writes():
    held, absent = digest.digest(HELD), digest.digest(ABSENT)
    expected = wire.encode_stream([wire.chunk_frame(held, 0, len(HELD), HELD), wire.missing_frame(absent)])
    assert example_bytes() == expected


def test_a_truncated_example_is_a_bad_frame():
    data = example_bytes()
    for cut in (3, 20, len(data) - 1):
        with pytest.raises(wire.BadFrame):
            asyncio.run(read_frames(data[:cut]))


def test_an_origin_answers_the_example(tmp_path):
    store = open_store(tmp_path / "store", compress=False)
    held, absent = digest.digest(HELD), digest.digest(ABSENT)
    store.put_chunk(held, HELD)
    assert f'{{"ids": ["{held}", "{absent}"]}}' in TEXT  # the request the page shows

    async def go() -> tuple[int, str, bytes]:
        async with TestClient(TestServer(create_app(store, tokens()))) as client:
            resp = await client.post(f"{protocol.API}/chunks/fetch", json={"ids": [held, absent]}, headers=AUTH)
            return resp.status, resp.headers["Content-Type"], await resp.read()

    status, ctype, body = asyncio.run(go())
    assert (status, ctype) == (200, protocol.CHUNK_STREAM)
    assert body == example_bytes()


def test_limits_are_the_codes():
    for value in (protocol.MAX_CHUNK, protocol.MAX_PAYLOAD, protocol.MAX_IDS, protocol.MAX_JSON):
        assert str(value) in TEXT, value
    max_frames = inspect.signature(wire.FrameReader).parameters["max_frames"].default
    assert f"{max_frames} frames" in TEXT
    assert "`FBC1`" in TEXT and protocol.MAGIC == b"FBC1"
    assert protocol.CHUNK_STREAM in TEXT


# --- routes, errors, JSON ---------------------------------------------------------------------

def documented_routes() -> set[tuple[str, str]]:
    return set(re.findall(r"^### `(GET|PUT|POST|DELETE|PATCH) (/\S*)`$", TEXT, re.M))


def test_every_origin_route_is_documented_and_nothing_else(tmp_path):
    app = create_app(open_store(tmp_path / "store"), tokens())
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    served = {(m, p) for m, p in routes if m != "HEAD"}
    documented = documented_routes()
    assert served - documented == set(), "routes the origin serves but docs/protocol.md does not specify"
    assert documented - served == set(), "routes docs/protocol.md specifies but the origin does not serve"
    # the page says every GET also answers HEAD
    assert {p for m, p in served if m == "GET"} <= {p for m, p in routes if m == "HEAD"}


def test_error_table_matches_errors_py():
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", TEXT, re.M))
    code_status = {code: cls.http_status for code, cls in errors._BY_CODE.items()}
    assert {c: int(s) for c, s in rows.items()} == code_status
    for extra in ("`method_not_allowed` (405)", "`internal` (500", "`not_found` (404)"):
        assert extra in TEXT


def test_json_examples_parse():
    bodies = fence("json")
    assert len(bodies) >= 10
    for body in bodies:
        assert isinstance(json.loads(body), dict), body


# --- events ----------------------------------------------------------------------------------

def sse_examples() -> dict[str, dict]:
    """Event type -> the data of the page's example of it."""
    out = {}
    for body in fence("text"):
        for event, data in re.findall(r"^event: (\w+)\n(?:id: \d+\n)?data: (.*)$", body, re.M):
            out[event] = json.loads(data)
    return out


def test_event_examples_have_the_fields_an_origin_sends(tmp_path):
    store = open_store(tmp_path / "store")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"a": 1}\n')
    publish(tmp_path / "src", artifact="llama-7b", target=LocalTarget(store), version="v1")
    v2 = json.loads(store.get_manifest_bytes(store.get_ref("llama-7b/versions/v1").decode()))
    v2["version"] = "v2"

    async def go() -> str:
        async with TestClient(TestServer(create_app(store, tokens()))) as client:
            r = await client.put(f"{protocol.API}/artifacts/llama-7b/versions/v2", data=json.dumps(v2), headers=AUTH)
            assert r.status == 201
            r = await client.post(f"{protocol.API}/artifacts/llama-7b/channels/prod",
                                  json={"action": "promote", "version": "v2"}, headers=AUTH)
            assert r.status == 200
            resp = await client.get(f"{protocol.API}/events", params={"after": 0}, headers=AUTH)
            assert resp.headers["Content-Type"] == "text/event-stream"
            text = ""
            while text.count("\n\n") < 3:
                text += (await asyncio.wait_for(resp.content.readany(), 5)).decode()
            resp.close()
            return text

    text = asyncio.run(go())
    sent = {e: json.loads(d) for e, d in re.findall(r"^event: (\w+)\n(?:id: \d+\n)?data: (.*)$", text, re.M)}
    documented = sse_examples()
    assert set(sent) == {"hello", "version", "channel"} <= set(documented)
    for event, data in sent.items():
        optional = {"traceparent"}  # only when the origin traced the commit (the `tracing` extra)
        assert set(data) - optional == set(documented[event]) - optional, event
    assert re.search(r"^event: version\nid: 1\n", text, re.M)  # `id:` is the seq; hello has none
    assert sent["hello"]["complete"] is True and sent["hello"]["seq"] == 2
