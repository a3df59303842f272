"""Rate control (fabric.core.policy): per chunk, the encoding mode predicted fastest."""

from __future__ import annotations

import random

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


def feed_acked(policy: EncodePolicy, chunks: int, *, link, codec, ratio: float = 0.3, light_ratio: float = 0.5,
               write_s_per_byte: float = 1e-12, raw: int = 8 << 20) -> list[Mode]:
    """As `feed`, but the link is measured as the sender's TCP counters see it (`delivered`):
    `link()` and `codec()` give each chunk's true seconds per byte (noise allowed), and every
    write returns at once (`write_s_per_byte`: socket buffers and sendfile hide the link)."""
    modes = []
    for _ in range(chunks):
        mode = policy.choose()
        modes.append(mode)
        wire = raw if mode == Mode.STORED else int(raw * (ratio if mode == Mode.FULL else light_ratio))
        seconds = 0.0 if mode == Mode.STORED else raw * codec() * (1 if mode == Mode.FULL else 0.6)
        policy.encoded(mode, raw, wire, seconds, stored=raw)
        policy.wrote(wire, wire * write_s_per_byte)
        policy.delivered(wire, wire * link())
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


# --- the link measured by what the peer acknowledged (issue 16: slow shaped links) -------------

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@pytest.mark.parametrize("mbit", [10, 100, 1000])
def test_codec_faster_than_the_link_means_full_and_no_byte_costing_probes(mbit):
    # codec 300 MB/s per thread, two workers; the link 10, 100 or 1000 Mbit/s; writes never wait
    policy = EncodePolicy(workers=2)
    modes = feed_acked(policy, 64, link=lambda: 1 / (mbit * MBIT), codec=lambda: 1 / 300e6)
    assert modes == [Mode.FULL] * 64  # link-bound: no probe of a mode that sends more bytes
    assert policy.predicted(Mode.FULL) < policy.predicted(Mode.STORED)


def test_link_faster_than_the_codec_means_stored():
    # loopback: 3 GB/s delivered, the codec 150 MB/s per thread: stored forms, sendfile
    policy = EncodePolicy(workers=2)
    modes = feed_acked(policy, 64, link=lambda: 1 / 3e9, codec=lambda: 1 / 150e6)
    assert modes[-32:].count(Mode.STORED) >= 30
    assert Mode.FULL in modes[16:]  # a compressible stream: it keeps probing whether the codec got faster


def test_noisy_measurements_do_not_flip_the_choice():
    rng = random.Random(7)  # each measurement off by up to 2x either way
    noisy = lambda mean: lambda: mean * rng.choice([0.5, 0.8, 1, 1, 1.25, 2])  # noqa: E731
    slow = feed_acked(EncodePolicy(workers=2), 200, link=noisy(1 / (100 * MBIT)), codec=noisy(1 / 300e6))
    assert slow.count(Mode.FULL) == 200
    # 1 Gbit/s against a codec on a loaded machine (25 MB/s of CPU per thread, 2 workers: full
    # encodes 50 MB/s of raw bytes, light 83 MB/s): stored (125 MB/s of raw bytes) is faster,
    # and noise must not make it swing back
    fast = feed_acked(EncodePolicy(workers=2), 200, link=noisy(1 / (1000 * MBIT)), codec=noisy(1 / 25e6))
    assert fast[50:].count(Mode.STORED) >= 130  # the rest: probes every 16 chunks, a brief swing to light
    assert fast[50:].count(Mode.FULL) <= 150 // 16 + 1


def test_write_waits_are_ignored_once_the_kernel_reports_delivery():
    policy = EncodePolicy(workers=2)
    feed_acked(policy, 8, link=lambda: 1 / (100 * MBIT), codec=lambda: 1 / 300e6)
    link = policy.link_seconds_per_byte
    for _ in range(50):
        policy.wrote(8 << 20, 1e-6)  # the write returned at once: buffers, not the link
    assert policy.link_seconds_per_byte == link
    assert policy.choose() == Mode.FULL


def test_estimates_are_weighted_by_bytes():
    # a first tiny chunk (a safetensors header: the codec's fixed costs) at 20 us per byte
    policy = EncodePolicy(workers=2)
    policy.choose()
    policy.encoded(Mode.FULL, 4096, 4000, 4096 * 2e-5, stored=4096)
    feed_acked(policy, 2, link=lambda: 1 / (100 * MBIT), codec=lambda: 1 / 300e6)
    assert policy.predicted(Mode.FULL) < policy.predicted(Mode.STORED)
    assert [policy.choose() for _ in range(8)] == [Mode.FULL] * 8
