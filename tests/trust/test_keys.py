"""fabric/trust/keys.py: key files (modes, formats, no overwrite), public keys, keyids, signatures."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fabric.errors import DestinationExists, KeyFileInvalid
from fabric.trust import Key, generate_key, keyid, load_private_key, load_public_key
from helpers.trust import key_files

# RFC 8032 section 7.1, TEST 1 (the empty message)
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
                        "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_a_seed_key_signs_as_rfc_8032_says_and_its_keyid_is_the_sha256_of_the_raw_public_key():
    k = Key.from_seed(RFC_SEED)
    assert k.public.raw == RFC_PUBLIC
    assert k.sign(b"") == RFC_SIG
    assert k.keyid == keyid(RFC_PUBLIC) == hashlib.sha256(RFC_PUBLIC).hexdigest()
    assert k.public.verify(RFC_SIG, b"") and not k.public.verify(RFC_SIG, b"x")
    assert not k.public.verify(RFC_SIG[:63], b"")
    assert k.public.b64 == base64.b64encode(RFC_PUBLIC).decode()


def test_generate_writes_a_private_key_mode_0600_and_a_public_key_that_load_back(tmp_path):
    key, key_path, pub_path = key_files(tmp_path / "keys", "ci")
    assert (key_path.name, pub_path.name) == ("ci.key", "ci.pub")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    pub = load_public_key(pub_path)
    assert pub.keyid == key.keyid and pub == key.public
    assert pub.verify(key.sign(b"data"), b"data")


def test_generate_never_overwrites_a_key_and_checks_the_name(tmp_path):
    key_path, _ = generate_key("ci", tmp_path)
    before = key_path.read_bytes()
    with pytest.raises(DestinationExists):
        generate_key("ci", tmp_path)
    assert key_path.read_bytes() == before
    (tmp_path / "other.pub").write_text("x")
    with pytest.raises(DestinationExists):
        generate_key("other", tmp_path)
    assert not (tmp_path / "other.key").exists()
    for bad in ("../up", "a/b", "", ".hidden"):
        with pytest.raises(KeyFileInvalid):
            generate_key(bad, tmp_path)


def test_a_private_key_readable_by_others_is_refused_like_ssh_does(tmp_path):
    _, key_path, _ = key_files(tmp_path, "ci")
    os.chmod(key_path, 0o644)
    with pytest.raises(KeyFileInvalid, match=r"mode 0644.*chmod 600"):
        load_private_key(key_path)
    os.chmod(key_path, 0o640)
    with pytest.raises(KeyFileInvalid, match="group or others"):
        load_private_key(key_path)
    os.chmod(key_path, 0o600)
    assert load_private_key(key_path).keyid


def test_files_that_are_not_ed25519_private_keys_are_refused(tmp_path):
    _, _, pub_path = key_files(tmp_path, "ci")
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cases = {"pub.key": pub_path.read_bytes(), "ec.key": ec_key, "junk.key": b"hello", "big.key": b"x" * 20000}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        os.chmod(p, 0o600)
        with pytest.raises(KeyFileInvalid):
            load_private_key(p)
    with pytest.raises(KeyFileInvalid, match="cannot read"):
        load_private_key(tmp_path / "missing.key")


def test_a_public_key_loads_from_a_file_pem_text_pem_bytes_or_base64(tmp_path):
    key, key_path, pub_path = key_files(tmp_path, "ci")
    pem = pub_path.read_text()
    for source in (pub_path, str(pub_path), pem, pem.encode(), key.public.b64):
        assert load_public_key(source).keyid == key.keyid
    with pytest.raises(KeyFileInvalid, match="private key"):
        load_public_key(key_path)
    for bad in (base64.b64encode(b"x" * 31).decode(), "not base64 and no such file", "-----BEGIN PUBLIC KEY-----\nxx"):
        with pytest.raises(KeyFileInvalid):
            load_public_key(bad)


def test_moving_unsigned_versions_does_not_import_cryptography():
    # A publish, a pull and an agent without a trust policy import `cryptography` at the first key
    # they use (fabric.trust.keys._crypto), not at start-up: its import is ~40 ms and ~7 MiB.
    code = ("import sys; import fabric.publish, fabric.pull, fabric.store.registry, agents.site.agent, fabric.trust\n"
            "def loaded(): return sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')\n"
            "print(loaded())\n"
            "from fabric.trust import PublicKey\n"
            f"k = PublicKey(bytes.fromhex('{RFC_PUBLIC.hex()}'))\n"
            "ok = k.verify(bytes.fromhex(sys.argv[1]), b''), k.verify(bytes.fromhex(sys.argv[1]), b'x')\n"
            "print(len(loaded()) > 0, *ok)")
    out = subprocess.run([sys.executable, "-c", code, RFC_SIG.hex()], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["[]", "True True False"], out  # and the first key used brings it in
