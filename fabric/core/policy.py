"""Rate control: how hard to encode each chunk so encoding never makes a transfer slower.

Owns `Mode` (full codec, light codec, stored forms), `EncodePolicy` (the per-link
cost model, docs/encodings.md "Rate control"), `PeerPolicies` (one policy per peer,
owned by the app that serves them) and `parse_mode`, the meaning of a
`FABRIC_ENCODE` value (`fabric.config.encode_mode` reads the variable). Pure: timings
in, a mode out; no I/O, no environment.
"""

from __future__ import annotations

import threading
from enum import IntEnum

from fabric.core.lru import LRU
from fabric.errors import InvalidInput


class Mode(IntEnum):
    FULL = 0  # the codec with entropy coding (allow_entropy=True): fewest bytes
    LIGHT = 1  # the codec, zstd only where it halves the data (allow_entropy=False)
    STORED = 2  # forward the stored form: no codec work at all


MARGIN = 0.05  # a codec mode's predicted cost must be this much below stored's to be chosen


class EncodePolicy:
    """Choose per chunk how hard to encode, so encoding never makes a transfer slower.

    The sender reports each chunk it encodes (`encoded`: mode, raw and wire bytes,
    codec seconds: CPU time of the encoding thread) and what the link delivered
    (`delivered`: bytes the peer acknowledged and the seconds the connection was busy
    sending them, from the kernel's TCP counters; `fabric.wire.linkrate`). Where the
    kernel cannot tell, the time each write waits (`wrote`) stands in; it is ignored
    once `delivered` has reported, since socket buffers and sendfile make writes
    return long before the bytes have crossed the link. The policy keeps moving
    averages, weighted by bytes, of, per mode, codec seconds per raw byte and wire
    bytes per raw byte, and of the link's seconds per wire byte. Encoding runs ahead
    of the writes in `workers` threads, so a mode's predicted cost per raw byte is

        max(codec s/B ÷ workers, link s/B × the mode's wire ratio)

    and `choose` picks the cheapest, a codec mode's cost counted `MARGIN` (5%) higher
    (ties: the smaller ratio, then the less codec time). `STORED` costs no codec time
    and its ratio is learnt from every encoded chunk (`stored=`), so it is always
    known: when the link outruns the codec it
    wins, and a sync runs as fast as it did before encodings; when the codec outruns
    the link the compact modes win. Before anything is measured the policy picks
    `FULL`. Every `probe` chunks it tries a codec mode it is not using, but only one
    that could be cheaper than the current choice: one whose link term alone
    (link s/B × its last ratio; if never measured, 0 for `FULL` and `FULL`'s ratio
    for `LIGHT`, which never compresses more) is below the current prediction. So
    on a link-bound transfer (a slow link) it never spends bytes on a probe, and on
    a codec-bound one it keeps the estimates of the faster modes current.
    `fixed` pins one mode (`FABRIC_ENCODE=full|light|stored`; default `auto`).
    """

    def __init__(self, *, workers: float = 1.0, probe: int = 16, alpha: float = 0.25, fixed: Mode | None = None):
        self.workers, self.probe, self.alpha, self.fixed = workers, probe, alpha, fixed
        self._codec: dict[Mode, float | None] = {Mode.FULL: None, Mode.LIGHT: None, Mode.STORED: 0.0}
        self._ratio: dict[Mode, float | None] = dict.fromkeys(Mode)
        self._link: float | None = None
        self._acked = False  # `delivered` has reported: write waits no longer count
        self._sums: dict[object, tuple[float, float]] = {}  # decayed (amount, bytes) per estimate
        self._count = 0
        self._lock = threading.Lock()
        self.chosen: dict[Mode, int] = dict.fromkeys(Mode, 0)

    def choose(self) -> Mode:
        with self._lock:
            self._count += 1
            best = self._best() if self.fixed is None else self.fixed
            if self.fixed is None and self._count % self.probe == 0:
                best = self._probe(best)
            self.chosen[best] += 1
            return best

    def _probe(self, best: Mode) -> Mode:
        """A codec mode other than `best` that could beat it, in turn; `best` if there is none."""
        current = self.predicted(best)
        if current is None:
            return best
        link, full = self._link or 0.0, self._ratio[Mode.FULL] or 0.0
        # a mode's ratio if measured; else LIGHT's is at least FULL's (the same codec, fewer zstd stages)
        ratio = {Mode.FULL: self._ratio[Mode.FULL] or 0.0, Mode.LIGHT: self._ratio[Mode.LIGHT] or full}
        others = [m for m in (Mode.FULL, Mode.LIGHT) if m != best and link * ratio[m] < current]
        return others[(self._count // self.probe) % len(others)] if others else best

    @property
    def allow_entropy(self) -> bool:
        """For callers with two modes only (codec with or without entropy coding)."""
        return self.choose() != Mode.LIGHT

    @property
    def link_seconds_per_byte(self) -> float | None:
        """The link's measured seconds per wire byte (None until measured)."""
        return self._link

    def predicted(self, mode: Mode) -> float | None:
        """Predicted seconds per raw byte in `mode`, or None until it has been measured."""
        codec_s, ratio = self._codec[mode], self._ratio[mode]
        if codec_s is None or ratio is None:
            return None
        return max(codec_s / self.workers, (self._link or 0.0) * ratio)

    def _best(self) -> Mode:
        if self._link is None or self._ratio[Mode.FULL] is None:
            return Mode.FULL
        # a codec mode must beat stored by MARGIN (its costs beyond the model: copies instead of
        # sendfile, the receiver's decoding); ties go to the smaller ratio, then the least codec time
        known = [(p * (1.0 if m == Mode.STORED else 1.0 + MARGIN), self._ratio[m], self._codec[m], m)
                 for m in Mode if (p := self.predicted(m)) is not None]
        return min(known)[3]

    def encoded(self, mode: Mode, raw: int, wire: int, seconds: float, *, stored: int | None = None) -> None:
        """One chunk: `raw` bytes became `wire` bytes in `seconds` of codec time (stored size if known)."""
        if raw <= 0:
            return
        with self._lock:
            if mode != Mode.STORED:
                self._codec[mode] = self._avg(('codec', mode), seconds, raw)
            self._ratio[mode] = self._avg(('ratio', mode), wire, raw)
            if stored is not None and mode != Mode.STORED:
                self._ratio[Mode.STORED] = self._avg(('ratio', Mode.STORED), stored, raw)

    def delivered(self, nbytes: int, seconds: float) -> None:
        """The peer acknowledged `nbytes` while the connection spent `seconds` sending (TCP busy time)."""
        if nbytes > 0:
            with self._lock:
                if not self._acked:  # forget what write waits said
                    self._acked = True
                    self._sums.pop('link', None)
                self._link = self._avg('link', max(seconds, 0.0), nbytes)

    def wrote(self, nbytes: int, seconds: float) -> None:
        """One write of `nbytes` to the socket took `seconds` (waiting for the peer included).

        The fallback link measure, for connections whose kernel does not report what it
        delivered; ignored once `delivered` has."""
        if nbytes > 0 and not self._acked:
            with self._lock:
                self._link = self._avg('link', max(seconds, 0.0), nbytes)

    def _avg(self, key, amount: float, nbytes: int) -> float:
        """The moving average of `amount` per byte under `key`, weighted by bytes: each sample
        adds its amount and its bytes to sums that decay by (1 - alpha) per sample, so a small
        chunk (a header, a norm's weights, with the codec's fixed costs) barely moves it."""
        num, den = self._sums.get(key, (0.0, 0.0))
        num, den = num * (1 - self.alpha) + amount, den * (1 - self.alpha) + nbytes
        self._sums[key] = (num, den)
        return num / den


def parse_mode(value: str) -> Mode | None:
    """The mode a `FABRIC_ENCODE` value pins (full, light, stored), or None for `auto` (or empty)."""
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Mode[value.upper()]
    except KeyError:
        raise InvalidInput(f"FABRIC_ENCODE={value!r}: use auto, full, light or stored") from None


class PeerPolicies:
    """The `EncodePolicy` kept for each peer (e.g. its token name and address), made on first use.

    `options` (workers, probe, alpha, fixed) go to every policy made; at most `size`
    peers are remembered.
    """

    def __init__(self, size: int = 256, **options):
        self._policies: LRU[EncodePolicy] = LRU(size)
        self._options = options

    def get(self, key: object) -> EncodePolicy:
        policy = self._policies.get(key)
        if policy is None:
            policy = EncodePolicy(**self._options)
            self._policies.put(key, policy)
        return policy


__all__ = ["Mode", "EncodePolicy", "PeerPolicies", "parse_mode"]
