"""The `delta` encoding (tag 5): element differences against a reference, zigzagged, in byte planes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.core.codec import Encoding, decode, decode_verified, encode, encode_as
from fabric.core.digest import digest
from fabric.errors import BadFrame, InvalidInput, ReferenceMismatch

RNG = np.random.default_rng(5)
WIDTHS = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8}


def weights(dtype: str, count: int = 20_000) -> np.ndarray:
    w = RNG.normal(0, 0.02, count)
    if dtype == "BF16":
        return (w.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    return w.astype({"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<f8"}[dtype])


def stepped(before: np.ndarray, dtype: str) -> np.ndarray:
    """`before` after a small update: most elements move a few units in the last place, either way."""
    kind = np.dtype(f"<u{before.dtype.itemsize}")
    bits = before.view(kind).copy()
    moves = RNG.integers(-40, 41, len(bits))
    return (bits.astype(np.int64) + moves).astype(kind)


@pytest.mark.parametrize("dtype", sorted(WIDTHS))
@pytest.mark.parametrize("change", ["stepped", "shorter", "longer", "unrelated", "empty", "odd tail"])
def test_delta_round_trips_against_any_reference(dtype, change):
    before = weights(dtype)
    after = stepped(before, dtype).tobytes()
    reference = {
        "stepped": before.tobytes(),
        "shorter": before.tobytes()[: len(after) // 3 + 1],  # not a whole number of elements
        "longer": before.tobytes() + b"\xaa" * 13,
        "unrelated": RNG.bytes(len(after)),
        "empty": b"",
        "odd tail": before.tobytes(),
    }[change]
    data = after + b"\x01\x02\x03" if change == "odd tail" else after
    enc = encode_as(Encoding.DELTA, data, dtype=dtype, reference=reference)
    assert enc.reference_id == digest(reference) and enc.payload[1] == 5
    assert decode(enc, raw_size=len(data), reference=reference) == data
    assert decode_verified(enc, chunk_id=digest(data), raw_size=len(data), reference=reference) == data


def test_delta_is_exact_for_every_special_bit_pattern():
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0], "<f4")
    bits = special.view("<u4").copy()
    bits[4] = 0x7FC0_1234  # a NaN with a payload
    reference = np.roll(bits, 3).tobytes()
    data = bits.tobytes()
    enc = encode_as(Encoding.DELTA, data, dtype="F32", reference=reference)
    assert decode(enc, raw_size=len(data), reference=reference) == data


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_selector_picks_delta_for_a_fine_tune_step_and_it_beats_xor(dtype):
    before = weights(dtype, 100_000)
    after = stepped(before, dtype).tobytes()
    reference = before.tobytes()
    enc = encode(after, dtype=dtype, reference=reference)
    xor = encode_as(Encoding.XOR, after, dtype=dtype, reference=reference)
    assert enc.encoding is Encoding.DELTA
    assert len(enc.payload) < 0.9 * len(xor.payload)
    assert decode(enc, raw_size=len(after), reference=reference) == after


def test_delta_is_only_offered_where_the_receiver_lists_it():
    before = weights("F32", 50_000)
    after = stepped(before, "F32").tobytes()
    old_peer = ["raw", "zstd", "bytegroup", "xor", "patch"]
    enc = encode(after, dtype="F32", reference=before.tobytes(), encodings=old_peer)
    assert enc.encoding is Encoding.XOR


def test_delta_needs_a_multi_byte_width_and_the_named_reference():
    data = weights("F32", 100).tobytes()
    with pytest.raises(InvalidInput):
        encode_as(Encoding.DELTA, data, dtype="U8", reference=data)
    with pytest.raises(InvalidInput):
        encode_as(Encoding.DELTA, data, dtype="F32")
    reference = stepped(weights("F32", 100), "F32").tobytes()
    enc = encode_as(Encoding.DELTA, data, dtype="F32", reference=reference)
    with pytest.raises(ReferenceMismatch):
        decode(enc, raw_size=len(data))
    with pytest.raises(ReferenceMismatch):
        decode(enc, raw_size=len(data), reference=data)


@pytest.mark.parametrize("width", [0, 1, 3, 5, 16])
def test_a_delta_payload_with_another_width_is_a_bad_frame(width):
    data = weights("F32", 64).tobytes()
    reference = stepped(weights("F32", 64), "F32").tobytes()
    payload = bytearray(encode_as(Encoding.DELTA, data, dtype="F32", reference=reference).payload)
    group = 6 + 5 + 71  # header, ref_size and id length, the id
    assert payload[group] == 4
    payload[group] = width
    with pytest.raises(BadFrame):
        decode((5, bytes(payload)), raw_size=len(data), reference=reference)


# --- multipatch: zstd with several held chunks as its prefix (a deletion's two sides) ------------

def _rows(start: int, count: int) -> bytes:
    rng = np.random.default_rng(start)
    words = ["alpha", "beta", "gamma", "delta", "river", "model", "token", "paper"]
    return b"".join(b'{"id":%d,"text":"%s"}\n' % (i, " ".join(rng.choice(words, 12)).encode())
                    for i in range(start, start + count))


def test_multipatch_copies_from_both_sides_of_a_deletion():
    left, right = _rows(0, 600), _rows(5000, 600)
    joined = left[:len(left) // 2] + right[len(right) // 2:]
    single = encode(joined, reference=left)
    both = encode(joined, reference=left, more=[(right, None)])
    assert single.encoding is Encoding.PATCH and both.encoding is Encoding.MULTIPATCH
    assert len(both.payload) < len(single.payload) / 4
    assert both.reference_id == digest(left) and both.more_ids == (digest(right),)
    assert decode_verified(both, chunk_id=digest(joined), raw_size=len(joined), reference=left,
                           more=[right]) == joined
    from fabric.core.codec import body_references
    assert body_references(both.encoding, both.body) == [digest(left), digest(right)]
    # an old receiver does not list it: the single-reference patch
    assert encode(joined, reference=left, more=[(right, None)],
                  encodings=["raw", "zstd", "patch"]).encoding is Encoding.PATCH


def test_multipatch_refuses_missing_or_swapped_references():
    left, right = _rows(0, 100), _rows(900, 100)
    data = left[:2000] + right[2000:]
    enc = encode_as(Encoding.MULTIPATCH, data, reference=left, more=[(right, None)])
    assert decode(enc, raw_size=len(data), reference=left, more=[right]) == data
    for args in (dict(reference=left), dict(reference=right, more=[left]), dict(),
                 dict(reference=left, more=[right, right])):
        with pytest.raises(ReferenceMismatch):
            decode(enc, raw_size=len(data), **args)
    with pytest.raises(InvalidInput):
        encode_as(Encoding.MULTIPATCH, data, reference=left, more=[(right, None)] * 8)


@pytest.mark.parametrize("count", [0, 9, 255])
def test_a_multipatch_payload_naming_too_many_or_no_references_is_a_bad_frame(count):
    left = _rows(0, 50)
    payload = bytearray(encode_as(Encoding.MULTIPATCH, left[::-1], reference=left).payload)
    assert payload[6] == 1
    payload[6] = count
    with pytest.raises(BadFrame):
        decode((6, bytes(payload)), raw_size=len(left), reference=left)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), pieces=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3000),
                                                                 st.integers(0, 3000)), min_size=1, max_size=6),
       refs=st.integers(1, 8))
def test_property_multipatch_of_spliced_references_is_lossless(seed, pieces, refs):
    rng = np.random.default_rng(seed)
    held = [_rows(int(rng.integers(0, 10_000)), 40) for _ in range(refs)]
    data = b"".join(held[i % refs][a:a + n] for i, a, n in pieces) + rng.bytes(int(rng.integers(0, 50)))
    enc = encode(data, reference=held[0], more=[(h, None) for h in held[1:]])
    assert len(enc.payload) <= len(data) + 6
    if enc.encoding is Encoding.MULTIPATCH:
        assert enc.more_ids == tuple(digest(h) for h in held[1:])
    got = decode_verified(enc, chunk_id=digest(data), raw_size=len(data), reference=held[0], more=held[1:])
    assert got == data
