"""The `deltapack` encoding (tag 7): `delta`'s differences with byte planes packed 1, 2 or 4 bits a value."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.core import codec
from fabric.core.codec import Encoding, decode, decode_body, decode_verified, encode, encode_as
from fabric.core.digest import digest
from fabric.errors import BadFrame, InvalidInput, ReferenceMismatch

RNG = np.random.default_rng(7)
HEAD = 6 + 5 + 71  # payload header, ref_size and id length, the id: the packed group section starts here


def fine_tune(dtype: str, count: int, scale: float = 1e-3, rng=RNG) -> tuple[bytes, bytes]:
    """Weights before and after a fine-tune step: every value moves by about `scale` of the weights'."""
    before = rng.normal(0, 0.02, count).astype(np.float32)
    after = before + rng.normal(0, 0.02 * scale, count).astype(np.float32)
    if dtype == "BF16":
        return tuple((x.view(np.uint32) >> 16).astype("<u2").tobytes() for x in (before, after))
    if dtype == "F64":
        return tuple(x.astype("<f8").tobytes() for x in (before, after))
    return before.tobytes(), after.tobytes()


def packed(data: bytes, reference: bytes, dtype: str, bits: tuple[int, ...]) -> codec.Encoded:
    """A `deltapack` payload with each plane packed as `bits` says (the encoder picks bits itself)."""
    chunk = codec._chunk(data, dtype, reference, None, 3)
    return codec._encode_plan(codec._Plan(Encoding.DELTAPACK, 0, (True,) * len(bits), bits=bits), chunk)


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 8, 9, 1001])
def test_pack_and_unpack_invert_each_other(b, n):
    values = RNG.integers(0, 1 << b, n, dtype=np.uint8)
    blob = codec._pack(values, b)
    assert len(blob) == (n * b + 7) // 8
    assert codec._unpack(blob, b, n).tolist() == values.tolist()
    if n:  # the first value sits in the lowest bits of the first byte
        assert int(blob[0]) & ((1 << b) - 1) == values[0]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("bits", [(8,), (1,), (2,), (4,), "mixed"])
@pytest.mark.parametrize("change", ["step", "shorter", "longer", "unrelated", "empty", "odd tail"])
def test_every_packing_round_trips_against_any_reference(dtype, bits, change):
    width = codec._WIDTHS[dtype]
    before, after = fine_tune("F32" if dtype == "F16" else dtype, 3000)
    if dtype == "F16":
        before, after = (np.frombuffer(x, "<f4").astype("<f2").tobytes() for x in (before, after))
    reference = {"step": before, "shorter": before[: len(before) // 3 + 1], "longer": before + b"\xaa" * 13,
                 "unrelated": RNG.bytes(len(before)), "empty": b"", "odd tail": before}[change]
    data = after + b"\x01\x02\x03" if change == "odd tail" else after
    per_plane = (1, 2, 4, 8, 1, 2, 4, 8)[:width] if bits == "mixed" else bits * width
    enc = packed(data, reference, dtype, per_plane)
    assert enc.encoding is Encoding.DELTAPACK and enc.payload[HEAD] == width
    assert decode(enc, raw_size=len(data), reference=reference) == data
    assert decode_body(7, enc.body, raw_size=len(data), reference=reference) == data
    assert decode_verified(enc, chunk_id=digest(data), raw_size=len(data), reference=reference) == data


def test_deltapack_is_exact_for_every_special_bit_pattern():
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0], "<f4")
    bits = special.view("<u4").copy()
    bits[4] = 0x7FC0_1234  # a NaN with a payload
    reference, data = np.roll(bits, 3).tobytes(), bits.tobytes()
    for per_plane in ((1, 1, 1, 1), (2, 4, 1, 8)):
        assert decode(packed(data, reference, "F32", per_plane), raw_size=len(data), reference=reference) == data


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_selector_picks_deltapack_for_a_fine_tune_step_and_it_beats_delta(dtype):
    before, after = fine_tune(dtype, 200_000)
    enc = encode(after, dtype=dtype, reference=before)
    delta = encode_as(Encoding.DELTA, after, dtype=dtype, reference=before)
    assert enc.encoding is Encoding.DELTAPACK
    assert len(enc.payload) < 0.97 * len(delta.payload)
    assert decode(enc, raw_size=len(after), reference=before) == after
    pinned = encode_as(Encoding.DELTAPACK, after, dtype=dtype, reference=before)
    assert len(pinned.payload) == len(enc.payload)


def test_deltapack_is_only_offered_where_the_receiver_lists_it():
    before, after = fine_tune("BF16", 100_000)
    older = ["raw", "zstd", "bytegroup", "xor", "patch", "delta", "multipatch"]
    assert encode(after, dtype="BF16", reference=before, encodings=older).encoding is Encoding.DELTA
    assert encode(after, dtype="BF16", encodings=None).encoding is Encoding.BYTEGROUP  # no reference


def test_deltapack_is_not_chosen_where_no_plane_packs():
    before = RNG.bytes(200_000)  # unrelated noise: every plane of X is random
    enc = encode(RNG.bytes(200_000), dtype="BF16", reference=before)
    assert enc.encoding is not Encoding.DELTAPACK


def test_deltapack_needs_a_multi_byte_width_and_the_named_reference():
    before, after = fine_tune("F32", 100)
    with pytest.raises(InvalidInput):
        encode_as(Encoding.DELTAPACK, after, dtype="U8", reference=before)
    with pytest.raises(InvalidInput):
        encode_as(Encoding.DELTAPACK, after, dtype="F32")
    enc = packed(after, before, "F32", (1, 2, 4, 8))
    with pytest.raises(ReferenceMismatch):
        decode(enc, raw_size=len(after))
    with pytest.raises(ReferenceMismatch):
        decode(enc, raw_size=len(after), reference=after)


# --- hostile packed group sections ------------------------------------------------------------

def section(width: int, planes: list[tuple[int, list[tuple[int, bytes]]]], tail: bytes = b"") -> bytes:
    """A hand-built packed group section: planes are (bits, [(flag, body), ...])."""
    head = [struct.pack("<B", width)]
    bodies = []
    for bits, streams in planes:
        head.append(struct.pack("<B", bits))
        for flag, body in streams:
            head.append(struct.pack("<BI", flag, len(body)))
            bodies.append(body)
    return b"".join(head + bodies) + tail


def decode_section(body: bytes, raw_size: int, reference: bytes) -> bytes:
    ref_id = digest(reference).encode()
    payload = struct.pack("<BBIIB", 1, 7, raw_size, len(reference), len(ref_id)) + ref_id + body
    return decode((7, payload), raw_size=raw_size, reference=reference)


REF = bytes(8)  # four zero bf16 elements: X is the chunk's elements zigzagged, so 0 stays 0


def test_a_hand_built_section_decodes():
    # plane 0: values 0, 1, 5, 0 packed 2 bits (5 escaped: 3 + 2); plane 1: all zero, packed 1 bit
    body = section(2, [(2, [(0, bytes([0 | 1 << 2 | 3 << 4])), (0, b"\x02")]), (1, [(0, b"\x00"), (0, b"")])])
    # X = 0, 1, 5, 0 unzigzag to 0, -1, -3, 0 against zeros
    assert decode_section(body, 8, REF) == np.array([0, -1, -3, 0], "<i2").tobytes()


@pytest.mark.parametrize("case", ["width 1", "width 3", "bits 0", "bits 3", "bits 16", "S short", "S long",
                                  "padding set", "E short", "E long", "E overflow", "E bad frame", "unknown flag",
                                  "trailing byte"])
def test_malformed_packed_sections_are_bad_frames(case):
    good_s, good_e = bytes([3 << 4]), b"\x02"  # 0, 0, 3 (escaped: +2), 0
    zero = (1, [(0, b"\x00"), (0, b"")])
    body = {
        "width 1": section(1, [(2, [(0, good_s), (0, good_e)])]),
        "width 3": section(3, [(8, [(0, b"\0\0")])] * 3, b"\0\0"),
        "bits 0": section(2, [(0, [(0, good_s), (0, good_e)]), zero]),
        "bits 3": section(2, [(3, [(0, good_s), (0, good_e)]), zero]),
        "bits 16": section(2, [(16, [(0, good_s), (0, good_e)]), zero]),
        "S short": section(2, [(2, [(0, b""), (0, good_e)]), zero]),
        "S long": section(2, [(2, [(0, good_s + b"\0"), (0, good_e)]), zero]),
        "padding set": section(2, [(2, [(0, good_s), (0, good_e)]), (1, [(0, b"\x10"), (0, b"")])]),
        "E short": section(2, [(2, [(0, good_s), (0, b"")]), zero]),
        "E long": section(2, [(2, [(0, good_s), (0, b"\x02\x02")]), zero]),
        "E overflow": section(2, [(2, [(0, good_s), (0, b"\xfd")]), zero]),  # 3 + 253 > 255
        "E bad frame": section(2, [(2, [(0, good_s), (1, b"\x28\xb5\x2f\xfd junk")]), zero]),
        "unknown flag": section(2, [(2, [(2, good_s), (0, good_e)]), zero]),
        "trailing byte": section(2, [(2, [(0, good_s), (0, good_e)]), zero], b"\0"),
    }[case]
    assert decode_section(section(2, [(2, [(0, good_s), (0, good_e)]), zero]), 8, REF)  # the good one decodes
    with pytest.raises(BadFrame):
        decode_section(body, 8, REF)


def test_every_truncation_is_a_bad_frame():
    before, after = fine_tune("BF16", 300)
    enc = packed(after, before, "BF16", (2, 1))
    for cut in range(len(enc.payload)):
        with pytest.raises(BadFrame):
            decode((7, enc.payload[:cut]), raw_size=len(after), reference=before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 700), scale=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]),
       dtype=st.sampled_from(["BF16", "F32", "F64"]), tail=st.binary(max_size=7))
def test_property_deltapack_is_lossless(seed, count, scale, dtype, tail):
    before, after = fine_tune(dtype, count, scale, np.random.default_rng(seed))
    data = after + tail[: codec._WIDTHS[dtype] - 1]
    for enc in (encode(data, dtype=dtype, reference=before), encode_as(Encoding.DELTAPACK, data, dtype=dtype,
                                                                          reference=before)):
        assert decode(enc, raw_size=len(data), reference=before) == data


def test_the_documented_example_is_what_this_encoder_writes():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "encodings.md").read_text()
    example = {role: bytes.fromhex(body) for role, body in re.findall(r"```hex deltapack (\S+)\n(.*?)```", doc, re.S)}
    assert set(example) == {"reference", "data", "payload"}
    enc = packed(example["data"], example["reference"], "BF16", (2, 1))
    assert enc.payload == example["payload"]
    assert decode(enc, raw_size=len(example["data"]), reference=example["reference"]) == example["data"]
