"""Generated inputs for every file parser: manifests, version refs and channel records, the
TOML configs (site, hook, tokens, topology, client), hook envelopes and SNS messages, and
chunk payloads of every encoding (the receiver's decoder, `fabric.wire.frames.decode`).

Each parser, given mutated valid inputs and hostile ones, either returns a value that
keeps its invariants or raises Fabric's own named error; nothing else escapes (no
RecursionError, ValueError, OverflowError, KeyError, TypeError).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.site.config import SiteConfig
from fabric.config import _read_file
from fabric.core.limits import MAX_PATH_BYTES
from fabric.core import codec
from fabric.core.digest import digest
from fabric.core.manifest import Manifest
from fabric.core.topology import Topology
from fabric.errors import FabricError, ReferenceMismatch
from fabric.hook import envelopes
from fabric.hook.config import HookConfig
from fabric.hook.sns import verify
from fabric.store.registry import _channel_from
from fabric.wire import frames
from fabric.wire.auth import TokenTable

from fuzz.strategies import as_body, hostile_numbers, hostile_texts, json_values, with_field
from fuzz.test_endpoints import TEMPLATES

pytestmark = pytest.mark.timeout(3600)
PARSERS = 8  # the tests below share the parsers' part of --fuzz-cases


def run(fuzz_cases: int, test) -> None:
    n = max(50, int(fuzz_cases * 0.2 / PARSERS))
    settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))(test)()


MANIFEST = {"format": "fabric.manifest/1", "artifact": "m", "version": "v1", "parent": None,
            "created": "2026-01-01T00:00:00Z", "chunking": {}, "metadata": {"k": "v"},
            "files": [{"path": "a/b.bin", "size": 3, "mode": 420, "chunks": [["blake3:" + "1" * 64, 3]]},
                      {"path": "c.bin", "size": 5, "mode": 420, "chunks": [["blake3:" + "2" * 64, 5]]}],
            "tensors": []}
paths = st.sampled_from(["a" * 256, "a/" * 70 + "x", "/".join(["b" * 200] * 21), "é" * 128, "x\ud800",
                         "ok/name", "a//b", "./a"])


def test_manifests(fuzz_cases):
    @given(st.data())
    def one(data):
        how = data.draw(st.sampled_from(["field", "file", "path", "twice", "text"]))
        m = json.loads(json.dumps(MANIFEST))
        if how == "field":
            raw = with_field(m, data)
        elif how == "file":
            file_text = with_field(m["files"][0], data)  # may be JSON only the bounded decoder refuses
            m["files"][0] = "\x00FILE\x00"
            raw = as_body(m).replace(b'"\\u0000FILE\\u0000"', file_text)
        elif how == "path":
            m["files"][0]["path"] = data.draw(paths)
            raw = json.dumps(m).encode("utf-8", "surrogatepass")
        elif how == "twice":  # one chunk id, two sizes
            m["files"][1]["chunks"][0][0] = m["files"][0]["chunks"][0][0]
            raw = as_body(m)
        else:
            raw = data.draw(hostile_texts)
        try:
            got = Manifest.from_bytes(raw)
        except FabricError:
            return
        assert how != "twice"
        assert Manifest.from_bytes(got.canonical()).canonical() == got.canonical()
        for f in got.files:
            assert len(f.path.encode()) <= MAX_PATH_BYTES and all(len(p.encode()) <= 255 for p in f.path.split("/"))
        sizes = {}
        for cid, n in (c for f in got.files for c in f.chunks):
            assert sizes.setdefault(cid, n) == n
    run(fuzz_cases, one)


def test_channel_records(fuzz_cases):
    @given(json_values.map(as_body) | hostile_texts | st.fixed_dictionaries(
        {"history": st.lists(json_values, max_size=3), "version": json_values}).map(as_body))
    def one(raw):
        try:
            _channel_from("m", "prod", raw)
        except FabricError:
            pass
    run(fuzz_cases, one)


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20)
    | st.sampled_from(["30s", "nan", "inf", "1e400", "50M", "http://127.0.0.1:1", "127.0.0.1:7000", "x" * 20]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8)

LOADERS = {
    "site": (SiteConfig.from_dict, {"site": "solo", "data": "/tmp/x", "listen": "127.0.0.1:7070",
                                    "origin": "http://127.0.0.1:1", "token": "t" * 20, "follow": ["m:prod"],
                                    "report_interval": 1, "sync": {"resync_interval": 2, "max_rate": "50M"},
                                    "retention": {"keep": 2}, "workers": {"canary_timeout": 5}}),
    "hook": (HookConfig.from_dict, {"listen": "127.0.0.1:7100", "token": "h" * 20, "store": "/tmp/s",
                                    "retry_max": "1s", "rule": [{"bucket": "b", "prefix": "runs/{r}/",
                                                                 "artifact": "{r}", "version": "v"}]}),
    "tokens": (TokenTable.from_dict, {"token": [{"name": "a", "secret": "s" * 20, "scopes": ["pull"]}]}),
    "topology": (Topology.from_dict, {"site": [{"name": "hub", "upstream": "origin", "bandwidth": "1gbit",
                                                "latency": "5ms"}]}),
}


def _mutate(obj, data, depth=0):
    if isinstance(obj, dict) and obj and depth < 3 and (depth == 0 or data.draw(st.booleans())):  # TOML: a table
        key = data.draw(st.sampled_from(sorted(obj)))
        return {**obj, key: _mutate(obj[key], data, depth + 1)}
    if isinstance(obj, list) and obj and depth < 3 and data.draw(st.booleans()):
        return [_mutate(obj[0], data, depth + 1)] + obj[1:]
    return data.draw(toml_values)


@pytest.mark.parametrize("which", sorted(LOADERS))
def test_toml_configs(fuzz_cases, which, tmp_path):
    load, valid = LOADERS[which]

    @given(st.data())
    def one(data):
        raw = _mutate(valid, data)
        raw = {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw
        try:
            cfg = load(raw) if which in ("tokens", "topology") else load(raw, "fuzz.toml", tmp_path)
        except FabricError:
            return
        for key in ("report_interval", "retry_max", "rescan_interval"):
            value = getattr(cfg, key, None)
            assert value is None or math.isfinite(value), (key, value)
        sync = getattr(cfg, "sync", None)
        if sync is not None:
            assert math.isfinite(sync.resync_interval)
        if which == "hook":
            assert len(cfg.token) >= 16
    run(fuzz_cases, one)


def test_client_config_files(fuzz_cases, tmp_path):
    @given(st.text(max_size=80) | st.sampled_from(['store = "/s"\n', 'token = 1\n', 'origin = [1]\n', "x = 1\n",
                                                    "[t]\na = 1\n", 'token = "\\ud800"\n']))
    def one(text):
        p = tmp_path / "config.toml"
        p.write_bytes(text.encode("utf-8", "replace"))
        try:
            out = _read_file(p)
        except FabricError:
            return
        assert all(isinstance(v, str) for v in out.values())
    run(fuzz_cases, one)


def test_hook_envelopes_and_sns(fuzz_cases, tmp_path):
    @given(st.data())
    def one(data):
        key = data.draw(st.sampled_from(["/events", "/events#sns", "/events#seaweed", "hostile"]))
        body = data.draw(hostile_texts) if key == "hostile" else with_field(TEMPLATES[key], data)
        if key == "/events" and data.draw(st.booleans()):  # the size field, specifically
            size = data.draw(hostile_numbers | st.sampled_from(['"' + "4" * 40 + '"', '"12"', "-1", '"-1"',
                                                                 '"abc"', "true", "[1]"]))
            body = body.replace(b'"size": 10', b'"size": ' + size.encode())
        try:
            env = envelopes.parse(body)
        except FabricError:
            return
        for ev in env.events:
            assert ev.size is None or 0 <= ev.size < 1 << 63
        if env.sns is not None:
            try:
                verify(env.sns, tmp_path, ())
            except FabricError:
                pass
    run(fuzz_cases, one)


def _payloads() -> list[tuple[int, bytes, bytes, dict[str, bytes]]]:
    """(tag, stream payload, chunk, the references by id): one valid payload of every encoding."""
    import numpy as np
    rng = np.random.default_rng(7)
    before = rng.normal(0, 0.02, 200).astype("<f4")
    after = (before.view("<u4") + rng.integers(0, 9, 200).astype("<u4")).tobytes() + b"\x05"
    text_ref = b"".join(b'{"id":%d,"text":"row %d"}\n' % (i, i * 7) for i in range(40))
    text = text_ref[:300] + b'{"id":999,"text":"inserted"}\n' + text_ref[300:]
    tail = b"".join(b'{"id":%d,"text":"later row %d"}\n' % (i, i * 3) for i in range(100, 140))
    out = []
    for enc in codec.Encoding:
        data, ref, more, dtype = after, before.tobytes(), [], "F32"
        if enc == codec.Encoding.PATCH:
            data, ref, dtype = text, text_ref, None
        elif enc == codec.Encoding.MULTIPATCH:
            data, ref, more, dtype = text_ref[:500] + tail[600:], text_ref, [tail], None
        if enc not in codec.REFERENCING:
            ref = None
        e = codec.encode_as(enc, data, dtype=dtype, reference=ref, more=[(m, None) for m in more])
        held = {digest(r): r for r in ([ref] if ref is not None else []) + more}
        out.append((e.tag, bytes(e.body), data, held))
    return out


PAYLOADS = _payloads()


def test_chunk_payloads(fuzz_cases):
    """Garbled payloads of every tag decode to the chunk, or raise a FabricError; never more bytes."""
    def lookup(held: dict[str, bytes]):
        def references(ref_id: str) -> bytes:
            if ref_id not in held:
                raise ReferenceMismatch(f"no reference {ref_id}")
            return held[ref_id]
        return references

    for tag, body, chunk, held in PAYLOADS:  # each intact payload decodes
        assert frames.decode(digest(chunk), tag, len(chunk), body, references=lookup(held)) == chunk

    @given(st.data())
    def one(data):
        tag, body, chunk, held = data.draw(st.sampled_from(PAYLOADS))
        how = data.draw(st.sampled_from(["flip", "cut", "extend", "tag", "size", "hostile"]))
        raw_size = len(chunk)
        body = bytearray(body)
        if how == "flip" and body:
            for _ in range(data.draw(st.integers(1, 4))):
                body[data.draw(st.integers(0, len(body) - 1))] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            body = body[:data.draw(st.integers(0, len(body)))]
        elif how == "extend":
            body += data.draw(st.binary(min_size=1, max_size=8))
        elif how == "tag":
            tag = data.draw(st.integers(0, 255))
        elif how == "size":
            raw_size = data.draw(st.sampled_from([0, 1, raw_size - 1, raw_size + 1, 1 << 31, (1 << 32) - 1]))
        else:
            body = bytearray(data.draw(st.binary(max_size=200)))
        try:
            out = frames.decode(digest(chunk), tag, raw_size, bytes(body), references=lookup(held),
                                expected_size=raw_size)
        except FabricError:
            return
        assert out == chunk and len(out) == raw_size
    run(fuzz_cases, one)
