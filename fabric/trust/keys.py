"""Ed25519 keys: key files, public keys and keyids (docs/trust.md "Key files").

A private key file `NAME.key` is PEM PKCS#8 ("BEGIN PRIVATE KEY"), unencrypted, mode
0600; like ssh, a key file that group or others may read is refused. A public key file
`NAME.pub` is PEM SubjectPublicKeyInfo ("BEGIN PUBLIC KEY"). Statements and trust files
carry a public key as the standard base64 of its 32 raw bytes, and name it by its
keyid: the lowercase hex SHA-256 of those 32 bytes (docs/formats.md "Keyids").

Pure functions over files and bytes; nothing here talks to the network. The `cryptography`
package is imported at the first key used, not with this module: a process that only moves
unsigned versions (a publish, a pull, an agent without a trust policy) never pays its
~40 ms import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from fabric.errors import DestinationExists, KeyFileInvalid

_KEYID_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_KEY_FILE = 16 << 10  # a PEM Ed25519 key is ~120 bytes; anything much bigger is not one

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@cache
def _crypto() -> SimpleNamespace:
    """The parts of `cryptography` this module uses, imported on first use."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    return SimpleNamespace(InvalidSignature=InvalidSignature, serialization=serialization,
                           Ed25519PrivateKey=Ed25519PrivateKey, Ed25519PublicKey=Ed25519PublicKey)


def keyid(raw32: bytes) -> str:
    """The keyid of a public key: lowercase hex SHA-256 of its 32 raw bytes."""
    if len(raw32) != 32:
        raise KeyFileInvalid(f"an Ed25519 public key is 32 bytes, not {len(raw32)}")
    return hashlib.sha256(raw32).hexdigest()


def is_keyid(value: object) -> bool:
    return isinstance(value, str) and bool(_KEYID_RE.fullmatch(value))


class PublicKey:
    """An Ed25519 public key: `raw` (32 bytes), `b64` (standard base64 of raw), `keyid`."""

    __slots__ = ("raw", "b64", "keyid", "_key")

    def __init__(self, raw: bytes):
        self.keyid = keyid(raw)
        self.raw = bytes(raw)
        self.b64 = base64.b64encode(self.raw).decode("ascii")
        self._key = None  # cryptography's key, made at its first use

    def _public(self):
        if self._key is None:
            self._key = _crypto().Ed25519PublicKey.from_public_bytes(self.raw)
        return self._key

    def verify(self, sig: bytes, data: bytes) -> bool:
        """True when `sig` is this key's Ed25519 signature over `data`."""
        if len(sig) != 64:
            return False
        key = self._public()
        try:
            key.verify(sig, data)
        except _crypto().InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        ser = _crypto().serialization
        return self._public().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey(keyid={self.keyid[:16]}…)"

    @classmethod
    def from_b64(cls, text: str) -> "PublicKey":
        """From the standard base64 of the 32 raw bytes (strict: canonical padding, no spaces)."""
        raw = b64decode_strict(text)
        if raw is None or len(raw) != 32:
            raise KeyFileInvalid("a public key must be the standard base64 of 32 bytes")
        return cls(raw)


class Key:
    """A private Ed25519 signing key: `keyid`, `public`, `sign(data) -> 64 bytes`."""

    __slots__ = ("_key", "public", "keyid")

    def __init__(self, key: Ed25519PrivateKey):
        ser = _crypto().serialization
        self._key = key
        self.public = PublicKey(key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))
        self.keyid = self.public.keyid

    @classmethod
    def from_seed(cls, seed: bytes) -> "Key":
        """The key whose 32-byte private seed is `seed` (RFC 8032); the test vectors use one."""
        return cls(_crypto().Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def pem(self) -> bytes:
        ser = _crypto().serialization
        return self._key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())

    def __repr__(self) -> str:
        return f"Key(keyid={self.keyid[:16]}…)"


def b64decode_strict(text: object) -> bytes | None:
    """Standard base64 with padding, in its one canonical spelling; None when it is not."""
    if not isinstance(text, str) or not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def generate_key(name: str, out_dir: Path) -> tuple[Path, Path]:
    """Write a new key pair `out_dir/NAME.key` (mode 0600) and `out_dir/NAME.pub`.

    Returns:
        (key_path, pub_path).
    Raises:
        DestinationExists: either file exists already (a key is never overwritten).
        KeyFileInvalid: NAME is not 1-128 of [A-Za-z0-9._-] starting with a letter or digit.
    """
    if not isinstance(name, str) or not _KEY_NAME_RE.fullmatch(name):
        raise KeyFileInvalid(f"invalid key name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise DestinationExists(f"{p} exists; a key is never overwritten (choose another NAME or --out)")
    key = Key(_crypto().Ed25519PrivateKey.generate())
    _write_new(key_path, key.pem(), 0o600)
    _write_new(pub_path, key.public.pem(), 0o644)
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise DestinationExists(f"{path} exists; a key is never overwritten") from None
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileInvalid(f"cannot read key file {path}: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileInvalid(f"{path} is not an Ed25519 key file (larger than {MAX_KEY_FILE} bytes)")
    return data


def load_private_key(path: Path | str) -> Key:
    """Read a private key file (`fabric key generate`'s NAME.key).

    Raises:
        KeyFileInvalid: unreadable, readable by group or others (mode & 0o077), not a PEM
            PKCS#8 unencrypted Ed25519 private key.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyFileInvalid(f"cannot read key file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileInvalid(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileInvalid(f"key file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"a private key must be private: chmod 600 {path}")
    data = _read_key_file(path)
    c = _crypto()
    try:
        key = c.serialization.load_pem_private_key(data, password=None)
    except Exception as e:  # cryptography raises ValueError, TypeError or UnsupportedAlgorithm
        raise KeyFileInvalid(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, c.Ed25519PrivateKey):
        raise KeyFileInvalid(f"{path} is not an Ed25519 key (Fabric signs with Ed25519 only)")
    return Key(key)


def load_public_key(source: Path | str | bytes) -> PublicKey:
    """A public key from a `.pub` file (a Path, or a str naming one), PEM text, or base64 of 32 raw bytes.

    Raises:
        KeyFileInvalid: none of those, or not Ed25519.
    """
    if isinstance(source, str):
        if source.lstrip().startswith("-----BEGIN"):
            return _public_from_pem(source.encode("ascii", "replace"), "the PEM text")
        raw = b64decode_strict(source)
        if raw is not None and len(raw) == 32:
            return PublicKey(raw)
        source = Path(source)
    if isinstance(source, bytes):
        return _public_from_pem(source, "the PEM bytes")
    return _public_from_pem(_read_key_file(source), str(source))


def _public_from_pem(data: bytes, what: str) -> PublicKey:
    if b"PRIVATE KEY" in data:
        raise KeyFileInvalid(f"{what} holds a private key; give the public one (NAME.pub)")
    c = _crypto()
    try:
        key = c.serialization.load_pem_public_key(data)
    except Exception as e:  # ValueError, UnsupportedAlgorithm
        raise KeyFileInvalid(f"{what} is not a PEM public key: {e}") from None
    if not isinstance(key, c.Ed25519PublicKey):
        raise KeyFileInvalid(f"{what} is not an Ed25519 public key")
    return PublicKey(key.public_bytes(c.serialization.Encoding.Raw, c.serialization.PublicFormat.Raw))
