"""TLS is a configuration switch: `fabric origin --tls-cert --tls-key`, and clients verify it.

A self-signed certificate for 127.0.0.1 is made with `cryptography`; the client side
trusts it through SSL_CERT_FILE (what OpenSSL's default context reads), as an operator
with a private CA would.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import time

import pytest

from helpers.http import request
from helpers.origin import FABRIC, PUBLISH_SECRET, PULL_SECRET, clean_env, free_port, write_token_file

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fabric-test-origin")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_origin_over_tls_publish_and_pull(tmp_path):
    cert, key = self_signed(tmp_path)
    tokens = write_token_file(tmp_path / "tokens.toml")
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log = open(tmp_path / "origin.log", "wb")
    proc = subprocess.Popen(FABRIC + ["origin", "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{port}",
                                      "--tokens", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key)],
                            stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    env = clean_env(SSL_CERT_FILE=str(cert))
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["curl", "-sf", "--cacert", str(cert), f"{url}/livez"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "origin.log").read_text()
            time.sleep(0.1)
        # Plain HTTP to the TLS port gets no answer a client could mistake for Fabric's.
        with pytest.raises(Exception):
            request(f"http://127.0.0.1:{port}", "GET", "/livez", timeout=5)
        src = tmp_path / "src"
        src.mkdir()
        (src / "weights.bin").write_bytes(bytes(range(256)) * 4096)
        pub = subprocess.run(FABRIC + ["publish", str(src), "-a", "m", "--channel", "prod", "--origin", url,
                                       "--token", PUBLISH_SECRET, "--json"], capture_output=True, text=True, env=env)
        assert pub.returncode == 0, pub.stdout + pub.stderr
        pull = subprocess.run(FABRIC + ["pull", "m:prod", str(tmp_path / "dest"), "--store", str(tmp_path / "site"),
                                        "--origin", url, "--token", PULL_SECRET, "--json"],
                              capture_output=True, text=True, env=env)
        assert pull.returncode == 0, pull.stdout + pull.stderr
        assert json.loads(pull.stdout)["chunks_fetched"] > 0
        assert (tmp_path / "dest" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
        # A client that does not trust the certificate refuses to talk.
        untrusted = subprocess.run(FABRIC + ["ls", "--origin", url, "--token", PULL_SECRET],
                                   capture_output=True, text=True, env=clean_env())
        assert untrusted.returncode == 5 and "transfer_failed" in untrusted.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
