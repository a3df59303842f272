"""Canonical JSON and the DSSE envelope that carries a signed statement (docs/formats.md "Signed statements").

A statement is a JSON object in canonical form: `json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=False)` as UTF-8, over objects with ASCII keys,
strings, booleans, lists and integers in [0, 2**53) — no floats, no null. A reader
parses, re-encodes and compares bytes: any other spelling of the same object is
refused (`StatementNotCanonical`), so one statement has exactly one byte string and
one set of signatures over it.

The envelope is DSSE v1 (the in-toto / Sigstore signing envelope):

    {"payload": b64(statement bytes), "payloadType": PAYLOAD_TYPE,
     "signatures": [{"keyid": <64 hex>, "sig": b64(64 bytes)}, ...]}

each signature an Ed25519 signature over PAE(payloadType, payload) =
`b"DSSEv1 " + len(type) + b" " + type + b" " + len(payload) + b" " + payload`
(lengths in ASCII decimal). The envelope itself is stored and sent as canonical JSON,
at most MAX_STATEMENT_BYTES, with at most MAX_SIGNATURES signatures of distinct keyids.

Pure: bytes in, objects out.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from fabric.core.boundedjson import decode
from fabric.core.limits import MAX_STATEMENT_BYTES
from fabric.errors import StatementMalformed, StatementMismatch, StatementNotCanonical
from fabric.trust.keys import Key, b64decode_strict, is_keyid
from fabric.trust.statements import Statement, parse_statement

PAYLOAD_TYPE = "application/vnd.fabric.statement+json"
MAX_SIGNATURES = 16
MAX_INT = 2 ** 53  # canonical integers are below it (exact in every JSON implementation)
_ENVELOPE_FIELDS = {"payload", "payloadType", "signatures"}


def canonical(obj: object) -> bytes:
    """The canonical JSON bytes of `obj` (a statement, or a dict of allowed values).

    Raises:
        StatementMalformed: a float, null, negative or too large integer, a non-ASCII or
            non-string key, an unpaired surrogate, or any other type.
    """
    if hasattr(obj, "to_json"):
        obj = obj.to_json()
    _check_value(obj, "$")
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise StatementMalformed("a statement string is not valid Unicode (an unpaired surrogate)") from None


def _check_value(v: object, where: str) -> None:
    if isinstance(v, bool) or isinstance(v, str):
        return
    if isinstance(v, int):
        if not 0 <= v < MAX_INT:
            raise StatementMalformed(f"{where}: integers in signed statements are in [0, 2**53), got {v}")
        return
    if isinstance(v, list):
        for i, x in enumerate(v):
            _check_value(x, f"{where}[{i}]")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str) or not k.isascii():
                raise StatementMalformed(f"{where}: object keys in signed statements are ASCII strings, got {k!r}")
            _check_value(x, f"{where}.{k}")
        return
    kind = "null" if v is None else type(v).__name__
    raise StatementMalformed(f"{where}: {kind} is not allowed in a signed statement (no floats, no null)")


def decode_canonical(data: bytes, what: str) -> object:
    """Parse canonical JSON `data`; refuse anything that is not its own canonical encoding."""
    obj = decode(data, what=what, error=StatementMalformed)
    if canonical(obj) != bytes(data):
        raise StatementNotCanonical(f"{what} is not canonical JSON (sorted keys, no spaces, UTF-8, "
                                    "no escapes beyond JSON's required ones)")
    return obj


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes each signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


class Signature(NamedTuple):
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope: `payload` (canonical statement bytes) and its `signatures`."""

    payload: bytes
    signatures: tuple[Signature, ...]
    payload_type: str = PAYLOAD_TYPE

    @cached_property
    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)

    @cached_property
    def statement(self) -> Statement:
        """The payload as a typed statement (`StatementMalformed` when it is none)."""
        return parse_statement(decode_canonical(self.payload, "the statement"))

    @property
    def keyids(self) -> list[str]:
        return [s.keyid for s in self.signatures]

    @property
    def digest(self) -> str:
        """`sha256:<hex>` of the payload: equal for one statement whatever signatures it carries."""
        return "sha256:" + hashlib.sha256(self.payload).hexdigest()

    def to_json(self) -> dict:
        return {"payload": base64.b64encode(self.payload).decode("ascii"), "payloadType": self.payload_type,
                "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                               for s in self.signatures]}

    def to_bytes(self) -> bytes:
        return canonical(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> "Envelope":
        """An envelope from its parsed JSON object (a channel ref's `statement` field).

        Raises:
            StatementMalformed: wrong fields or types, bad base64, a keyid that is not 64
                lowercase hex, a signature not 64 bytes, repeated keyids, too many signatures.
            StatementNotCanonical: the payload is not canonical JSON.
        """
        if not isinstance(obj, dict) or set(obj) != _ENVELOPE_FIELDS:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise StatementMalformed(f"an envelope is an object with exactly {sorted(_ENVELOPE_FIELDS)}, got {got}")
        if obj["payloadType"] != PAYLOAD_TYPE:
            raise StatementMalformed(f"envelope payloadType must be {PAYLOAD_TYPE!r}, got {str(obj['payloadType'])[:80]!r}")
        payload = b64decode_strict(obj["payload"])
        if payload is None:
            raise StatementMalformed("envelope payload is not standard base64 (with padding)")
        decode_canonical(payload, "the statement")
        sigs = obj["signatures"]
        if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
            raise StatementMalformed(f"envelope signatures must be a list of at most {MAX_SIGNATURES}")
        out = []
        for i, s in enumerate(sigs):
            if not isinstance(s, dict) or set(s) != {"keyid", "sig"}:
                raise StatementMalformed(f"envelope signatures[{i}] must be an object with exactly keyid, sig")
            if not is_keyid(s["keyid"]):
                raise StatementMalformed(f"envelope signatures[{i}].keyid must be 64 lowercase hex")
            sig = b64decode_strict(s["sig"])
            if sig is None or len(sig) != 64:
                raise StatementMalformed(f"envelope signatures[{i}].sig must be the standard base64 of 64 bytes")
            out.append(Signature(s["keyid"], sig))
        if len({s.keyid for s in out}) != len(out):
            raise StatementMalformed("envelope signatures repeat a keyid")
        return cls(payload, tuple(out))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Envelope":
        """An envelope from its canonical JSON bytes (at most MAX_STATEMENT_BYTES)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StatementMalformed(f"an envelope is bytes, not {type(data).__name__}")
        if len(data) > MAX_STATEMENT_BYTES:
            raise StatementMalformed(f"envelope is {len(data)} bytes, more than the {MAX_STATEMENT_BYTES} allowed")
        return cls.from_json(decode_canonical(bytes(data), "the envelope"))

    def merge(self, other: "Envelope") -> "Envelope":
        """The union of both envelopes' signatures (by keyid) over their one payload.

        Raises:
            StatementMismatch: the payloads differ (they are different statements).
            StatementMalformed: the union has more than MAX_SIGNATURES signatures.
        """
        if other.payload != self.payload or other.payload_type != self.payload_type:
            raise StatementMismatch("cannot merge envelopes of different statements")
        by_id = {s.keyid: s for s in other.signatures}
        by_id.update({s.keyid: s for s in self.signatures})
        if len(by_id) > MAX_SIGNATURES:
            raise StatementMalformed(f"merged envelope would carry {len(by_id)} signatures, more than {MAX_SIGNATURES}")
        return Envelope(self.payload, tuple(sorted(by_id.values())), self.payload_type)


def sign(statement: Statement | dict, keys: list[Key]) -> Envelope:
    """An envelope of `statement` (a statement object or its JSON dict) signed by each of `keys`.

    Raises:
        StatementMalformed: the statement does not follow its format, or no (or too many) keys.
    """
    obj = statement.to_json() if hasattr(statement, "to_json") else statement
    parse_statement(obj)  # sign only what a verifier will parse
    payload = canonical(obj)
    if not keys or len({k.keyid for k in keys}) > MAX_SIGNATURES:
        raise StatementMalformed(f"sign needs 1 to {MAX_SIGNATURES} distinct keys")
    p = pae(PAYLOAD_TYPE, payload)
    sigs = {k.keyid: Signature(k.keyid, k.sign(p)) for k in keys}
    if len(payload) > MAX_STATEMENT_BYTES // 2:
        raise StatementMalformed(f"statement is {len(payload)} bytes; the envelope limit is {MAX_STATEMENT_BYTES}")
    return Envelope(payload, tuple(sorted(sigs.values())))


def digest(envelope: bytes | Envelope) -> str:
    """`sha256:<hex>` of an envelope's payload, for replay detection (the same statement,
    cosigned later, keeps its digest; any other statement has another)."""
    if not isinstance(envelope, Envelope):
        envelope = Envelope.from_bytes(envelope)
    return envelope.digest


def load(envelope: bytes | Envelope | dict) -> Envelope:
    """An Envelope from bytes, a parsed JSON object or an Envelope (the forms callers hold)."""
    if isinstance(envelope, Envelope):
        return envelope
    if isinstance(envelope, dict):
        return Envelope.from_json(envelope)
    return Envelope.from_bytes(envelope)


__all__ = ["PAYLOAD_TYPE", "MAX_SIGNATURES", "Envelope", "Signature", "canonical", "decode_canonical", "pae",
           "sign", "digest", "load"]
