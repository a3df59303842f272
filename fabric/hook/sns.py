"""SNS-wrapped events: signature checks and subscription confirmation, without reaching out.

AWS signs every SNS message with the key of the certificate at `SigningCertURL`
(SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA) over the message's fields, each
written as `Name\\nvalue\\n` in a fixed order. The receiver never fetches that URL: the
operator downloads the certificate once into `[sns] cert_dir`, under the URL's file
name (e.g. `SimpleNotificationService-<hash>.pem`), and messages signed with any
other certificate, or whose URL is not an https `sns.<region>.amazonaws.com` one,
are refused. Verification needs the `cryptography` package.

A `SubscriptionConfirmation` is confirmed by GETting its `SubscribeURL` only when
that URL points at a loopback address (tests, a local SNS emulator); otherwise the
URL is logged for the operator to confirm by hand: the receiver never contacts
other hosts.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from fabric.errors import Forbidden

_CERT_HOST = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
_CERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.pem$")  # a plain file name in cert_dir
_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}


def string_to_sign(msg: dict) -> bytes:
    """The bytes AWS signs: `Name\\nvalue\\n` for each present field, in the documented order."""
    fields = _FIELDS.get(str(msg.get("Type")))
    if fields is None:
        raise Forbidden(f"SNS message of unknown type {msg.get('Type')!r}")
    return "".join(f"{k}\n{msg[k]}\n" for k in fields if k in msg and msg[k] is not None).encode()


def verify(msg: dict, cert_dir: Path | None, topics: tuple[str, ...] = ()) -> None:
    """Raise Forbidden unless `msg` carries a valid signature by a certificate in `cert_dir`."""
    if topics and msg.get("TopicArn") not in topics:
        raise Forbidden(f"SNS topic {msg.get('TopicArn')!r} is not in [sns] topics")
    url = _split(str(msg.get("SigningCertURL", "")))
    if url is None or url.scheme != "https" or not _CERT_HOST.match(url.hostname or "") \
            or not url.path.endswith(".pem"):
        raise Forbidden(f"SNS SigningCertURL {msg.get('SigningCertURL')!r} is not an AWS SNS certificate URL")
    name = url.path.rsplit("/", 1)[-1]
    if not _CERT_NAME.match(name):
        raise Forbidden(f"SNS SigningCertURL names a file {name[:80]!r} that is not a certificate's name")
    if cert_dir is None or not (cert_dir / name).is_file():
        raise Forbidden(f"SNS certificate {name} is not in [sns] cert_dir ({cert_dir}); "
                        f"download {msg.get('SigningCertURL')} there once to trust it")
    try:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
    except ImportError:  # pragma: no cover - depends on the install
        raise Forbidden("SNS signature checks need the 'cryptography' package (pip install cryptography), "
                        "or set [sns] verify = false") from None
    algo = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(str(msg.get("SignatureVersion")))
    if algo is None:
        raise Forbidden(f"SNS SignatureVersion {msg.get('SignatureVersion')!r} is not 1 or 2")
    try:
        signature = base64.b64decode(str(msg.get("Signature", "")), validate=True)
        cert = x509.load_pem_x509_certificate((cert_dir / name).read_bytes())
        cert.public_key().verify(signature, string_to_sign(msg), padding.PKCS1v15(), algo)
    except (InvalidSignature, binascii.Error, ValueError, TypeError) as e:
        raise Forbidden(f"SNS message signature does not verify ({type(e).__name__})") from None


def _split(url: str) -> SplitResult | None:
    """`url`'s parts, or None where it is no URL at all (`https://[::1`, a port of letters)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the port, raising ValueError for a bad one
        return parts
    except ValueError:
        return None


def is_loopback_url(url: str) -> bool:
    """Whether `url` is http(s) to localhost or a loopback address (the only hosts we GET)."""
    parts = _split(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False
