"""Rate control (fabric.core.policy): per chunk, the encoding mode predicted fastest."""

from __future__ import annotations

import pytest

from fabric.config import encode_mode
from fabric.core.policy import EncodePolicy, Mode, PeerPolicies, parse_mode
from fabric.errors import InvalidInput


def feed(policy: EncodePolicy, chunks: int, *, link_s_per_byte: float, codec_s_per_byte: float = 1e-9,
         ratio: float = 0.4, light_ratio: float = 0.6) -> list[Mode]:
    """Simulate a response: each chunk is 8 MiB, encoded in the mode chosen, then written."""
    modes = []
    raw = 8 << 20
    for _ in range(chunks):
        mode = policy.choose()
        modes.append(mode)
        wire = raw if mode == Mode.STORED else int(raw * (ratio if mode == Mode.FULL else light_ratio))
        seconds = 0.0 if mode == Mode.STORED else raw * codec_s_per_byte * (1 if mode == Mode.FULL else 0.5)
        policy.encoded(mode, raw, wire, seconds, stored=raw)
        policy.wrote(wire, wire * link_s_per_byte)
    return modes


def test_policy_starts_compact_and_keeps_compressing_on_a_slow_link():
    policy = EncodePolicy()
    assert policy.choose() == Mode.FULL  # nothing measured yet: fewest bytes
    modes = feed(EncodePolicy(), 64, link_s_per_byte=1e-8)  # 100 MB/s link, 1 GB/s codec
    assert modes.count(Mode.FULL) >= 56


def test_policy_stops_encoding_when_the_link_outruns_the_codec():
    modes = feed(EncodePolicy(), 64, link_s_per_byte=1e-11, codec_s_per_byte=2e-9)  # writes never wait
    assert modes[-16:].count(Mode.STORED) >= 14
    assert Mode.FULL in modes[16:]  # it keeps probing


def test_policy_picks_light_when_it_is_the_fastest():
    modes = feed(EncodePolicy(), 96, link_s_per_byte=1.6e-9, codec_s_per_byte=2e-9)
    # FULL: max(2, 0.64) = 2 ns/B; LIGHT: max(1, 0.96) = 1 ns/B; STORED: 1.6 ns/B
    assert modes[-32:].count(Mode.LIGHT) >= 28


def test_policy_sends_incompressible_data_stored_even_on_a_slow_link():
    # the codec gains nothing (ratio 1): every mode waits on the link alike, and the tie
    # goes to the one that spends no codec time
    modes = feed(EncodePolicy(), 64, link_s_per_byte=1e-8, ratio=1.0, light_ratio=1.0)
    assert modes[-16:].count(Mode.STORED) >= 14


def test_policy_per_peer():
    policies = PeerPolicies()
    assert policies.get(("site-a", "10.0.0.1")) is policies.get(("site-a", "10.0.0.1"))
    assert policies.get(("site-b", "10.0.0.2")) is not policies.get(("site-a", "10.0.0.1"))
    assert PeerPolicies().get(("site-a", "10.0.0.1")) is not policies.get(("site-a", "10.0.0.1"))  # per app


def test_fabric_encode_pins_the_mode(monkeypatch):
    monkeypatch.setenv("FABRIC_ENCODE", "stored")
    assert encode_mode() is Mode.STORED
    assert PeerPolicies(fixed=encode_mode()).get(("pinned", 1)).choose() is Mode.STORED
    monkeypatch.setenv("FABRIC_ENCODE", "auto")
    assert encode_mode() is None
    monkeypatch.setenv("FABRIC_ENCODE", "fastest")
    with pytest.raises(InvalidInput):
        encode_mode()
    assert parse_mode(" Light ") is Mode.LIGHT and parse_mode("") is None
