"""fabric.core.chunking: safetensors header parsing, structure-aware plans, FastCDC cuts."""

from __future__ import annotations


import numpy as np
import pytest

from fabric.core import chunking
from fabric.core.chunking import (CDC_MAX, CDC_MIN, CdcChunker, InvalidSafetensors, Piece,
                             header_length, parse_safetensors_header, plan_safetensors)

from helpers.files import random_bytes, safetensors_bytes, write_safetensors


def _parse(data: bytes):
    n = header_length(data[:8], len(data))
    return parse_safetensors_header(data[8:8 + n], len(data))


def _spec(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# --- headers ---------------------------------------------------------------------------

def test_parses_a_file_written_by_the_safetensors_library(tmp_path, rng):
    tensors = {"b": rng.standard_normal((3, 5)).astype(np.float32),
               "a": np.arange(7, dtype=np.int64), "empty": np.zeros((0, 4), np.float16)}
    path = write_safetensors(tmp_path / "m.safetensors", tensors, metadata={"step": "10"})
    h = _parse(path.read_bytes())
    assert {t.name for t in h.tensors} == {"a", "b", "empty"}
    assert h.metadata == {"step": "10"}
    by_name = {t.name: t for t in h.tensors}
    data = path.read_bytes()
    for name, arr in tensors.items():
        t = by_name[name]
        assert t.shape == arr.shape and t.length == arr.nbytes
        assert data[t.offset:t.offset + t.length] == arr.tobytes()
    assert [t.offset for t in h.tensors] == sorted(t.offset for t in h.tensors)


@pytest.mark.parametrize("data, needle", [
    (b"\x01\x00\x00", "too short"),
    ((50).to_bytes(8, "little") + b"{}", "longer than the file"),
    ((chunking.MAX_HEADER + 1).to_bytes(8, "little") + b"{}", "exceeds"),
])
def test_header_length_errors(data, needle):
    with pytest.raises(InvalidSafetensors, match=needle):
        header_length(data[:8], len(data))


a4 = np.zeros(2, np.float32)


@pytest.mark.parametrize("header, needle", [
    ({"a": _spec(offsets=(16, 24))}, "out of range"),                       # end beyond the data
    ({"a": _spec(offsets=(8, 4))}, "out of range"),                          # begin after end
    ({"a": _spec(offsets=(0, 8)), "b": _spec(offsets=(4, 12))}, "overlap"),  # overlapping tensors
    ({"a": _spec(dtype="F33")}, "unknown dtype"),
    ({"a": _spec(dtype=["F32"])}, "unknown dtype"),                          # unhashable dtype
    ({"a": _spec(dtype=None)}, "unknown dtype"),
    ({"a": _spec(shape=(3,))}, r"8 bytes for shape \[3\]"),                  # shape/offsets size mismatch
    ({"a": _spec(shape=(-2,))}, "non-negative"),
    ({"a": _spec(shape=(True, 2))}, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "data_offsets"),
    ({"a": _spec(offsets=(0, 8, 9))}, "data_offsets"),
    ({"a": "F32"}, "not an object"),
    ({"a": _spec(), "__metadata__": {"k": 1}}, "__metadata__"),
])
def test_invalid_headers_are_rejected_with_the_reason(header, needle):
    data = safetensors_bytes([("a", a4), ("b", a4)], header=header)
    with pytest.raises(InvalidSafetensors, match=needle):
        _parse(data)


@pytest.mark.parametrize("raw, needle", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
     b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', "twice"),
])
def test_header_json_errors(raw, needle):
    data = safetensors_bytes([("a", a4), ("b", a4)], raw_header=raw)
    with pytest.raises(InvalidSafetensors, match=needle):
        _parse(data)


# --- plans ------------------------------------------------------------------------------

def _check_tiles(pieces: list[Piece], size: int) -> None:
    pos = 0
    for p in pieces:
        assert p.offset == pos and p.length > 0
        pos += p.length
    assert pos == size


def test_plan_cuts_header_then_segments_from_each_tensor_start(rng):
    t1 = rng.standard_normal(25).astype(np.float32)   # 100 bytes
    t2 = rng.standard_normal(3).astype(np.float32)    # 12 bytes
    data = safetensors_bytes([("t1", t1), ("t2", t2)], trailing=b"tail!")
    h = _parse(data)
    pieces = plan_safetensors(h, len(data), segment=32)
    _check_tiles(pieces, len(data))
    assert pieces[0] == Piece(0, h.header_len)
    t1_pieces = [p for p in pieces if p.tensor == "t1"]
    assert [p.length for p in t1_pieces] == [32, 32, 32, 4]
    assert [p.segment for p in t1_pieces] == [0, 1, 2, 3]
    assert t1_pieces[0].offset == h.header_len
    assert [p.length for p in pieces if p.tensor == "t2"] == [12]
    assert pieces[-1].tensor is None and pieces[-1].length == 5  # trailing bytes: own piece


def test_plan_covers_gaps_between_tensors():
    a = np.ones(4, np.uint8)
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [10, 14]}}
    data = safetensors_bytes([("a", a), ("b", a)], header=header, trailing=b"x" * 6)
    h = _parse(data)
    pieces = plan_safetensors(h, len(data), segment=1024)
    _check_tiles(pieces, len(data))
    assert [(p.tensor, p.length) for p in pieces[1:]] == [("a", 4), (None, 6), ("b", 4)]


def test_zero_size_tensors_get_no_piece():
    z = np.zeros((0, 3), np.float32)
    data = safetensors_bytes([("z", z), ("a", a4)])
    pieces = plan_safetensors(_parse(data), len(data))
    _check_tiles(pieces, len(data))
    assert [p.tensor for p in pieces] == [None, "a"]


def test_a_tensor_keeps_its_segments_when_moved(rng):
    big = rng.standard_normal(100).astype(np.float32)
    small = rng.standard_normal(7).astype(np.float32)
    d1 = safetensors_bytes([("big", big), ("small", small)])
    d2 = safetensors_bytes([("small", small), ("big", big)], metadata={"grown": "header" * 10})

    def segs(data):
        return [data[p.offset:p.offset + p.length]
                for p in plan_safetensors(_parse(data), len(data), segment=64) if p.tensor == "big"]
    assert segs(d1) == segs(d2) and len(segs(d1)) == 7


# --- content-defined chunking ------------------------------------------------------------

def _windowed(data: bytes, window: int) -> list[int]:
    """Feed `data` to a CdcChunker the way the publisher does: windows plus carry."""
    c, cuts, carry, pos = CdcChunker(), [], b"", 0
    while pos < len(data) or carry:
        block = data[pos:pos + window]
        pos += len(block)
        buf = carry + block
        got = c.cuts(buf, final=pos >= len(data))
        cuts += got
        carry = buf[sum(got):]
        if pos >= len(data):
            assert carry == b""
            break
    return cuts


@pytest.fixture(scope="module")
def cdc_data():
    return random_bytes(np.random.default_rng(7), 3 << 20)


def test_cdc_cuts_respect_bounds_and_cover_the_buffer(cdc_data):
    cuts = CdcChunker().cuts(cdc_data, final=True)
    assert sum(cuts) == len(cdc_data)
    assert all(CDC_MIN <= n <= CDC_MAX for n in cuts[:-1])
    assert 0 < cuts[-1] <= CDC_MAX
    assert CdcChunker().cuts(cdc_data, final=True) == cuts  # deterministic


@pytest.mark.parametrize("window", [300_000, 1 << 20, 5_000_001])
def test_cdc_cuts_do_not_depend_on_the_read_window(cdc_data, window):
    assert _windowed(cdc_data, window) == CdcChunker().cuts(cdc_data, final=True)


def test_cdc_not_final_holds_back_the_last_chunk(cdc_data):
    whole = CdcChunker().cuts(cdc_data, final=True)
    partial = CdcChunker().cuts(cdc_data, final=False)
    assert partial == whole[:-1]


def test_cdc_edit_in_the_middle_changes_only_nearby_chunks(cdc_data):
    edited = bytearray(cdc_data)
    mid = len(edited) // 2
    edited[mid:mid + 10] = b"0123456789"

    def chunks(data):
        out, pos = [], 0
        for n in CdcChunker().cuts(data, final=True):
            out.append(bytes(data[pos:pos + n]))
            pos += n
        return out
    before, after = set(chunks(cdc_data)), chunks(bytes(edited))
    new = [c for c in after if c not in before]
    assert 1 <= len(new) <= 2
    assert sum(map(len, new)) <= 2 * CDC_MAX


def test_empty_buffer_has_no_cuts():
    assert CdcChunker().cuts(b"", final=True) == []
