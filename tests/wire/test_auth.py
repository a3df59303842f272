"""Tokens: the token file, and what a real `fabric origin` process lets each token do.

One origin process serves the whole module (tokens from helpers.origin.DEFAULT_TOKENS):
publisher (publish+pull), site-fra (pull), ops (admin), llama-site (pull+publish on
llama-* only) and hashed (pull; its file entry holds only secret_sha256).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from fabric.wire import frames as wire
from fabric.wire import protocol
from fabric.wire.auth import Principal, TokenTable
from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.core.digest import digest
from fabric.errors import ConfigError, Forbidden, Unauthorized
from fabric.publish import publish

from helpers.files import write_tree
from helpers.http import Session, raw_exchange, request
from helpers.origin import (ADMIN_SECRET, ALL_SECRETS, DEFAULT_TOKENS, HASHED_SECRET, LLAMA_SECRET,
                            PUBLISH_SECRET, PULL_SECRET, fabric, start_origin, write_token_file)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    o = start_origin(root)
    src = write_tree(root / "src", {"weights.bin": b"w" * 5000, "config.json": b"{}"})
    with SyncOrigin(o.url, PUBLISH_SECRET) as so:
        for artifact in ("llama-7b", "other"):
            publish(src, artifact=artifact, target=RemoteTarget(so), version="v1", channel="prod")
    yield o
    o.stop()


def _status(o, method, path, body=None, token=None, **kw):
    return request(o.url, method, path, body, token=token, **kw)


# --- the token file -------------------------------------------------------------------------------

def _table(**entry) -> TokenTable:
    base = {"name": "t", "secret": "s" * 16, "scopes": ["pull"]}
    base.update(entry)
    return TokenTable.from_dict({"token": [{k: v for k, v in base.items() if v is not None}]})


@pytest.mark.parametrize("entry, names", [
    ({"scope": ["pull"]}, "'scope'"),  # a typo of a key is named
    ({"scopes": ["pull", "root"]}, "scopes"),
    ({"scopes": []}, "scopes"),
    ({"scopes": "pull"}, "scopes"),
    ({"name": ""}, "name"),
    ({"name": 7}, "name"),
    ({"artifacts": "llama-*"}, "artifacts"),
    ({"artifacts": [""]}, "artifacts"),
    ({"secret": "short"}, "secret"),
    ({"secret": 1234567890123456789}, "secret"),
    ({"secret": None}, "secret or secret_sha256"),
    ({"secret_sha256": "ab" * 32}, "secret or secret_sha256"),  # both given
    ({"secret": None, "secret_sha256": "zz" * 32}, "secret_sha256"),
    ({"secret": None, "secret_sha256": "ab" * 31}, "secret_sha256"),
])
def test_bad_token_entries_name_the_bad_key(entry, names):
    with pytest.raises(ConfigError) as e:
        _table(**entry)
    assert names in e.value.message and "token[0]" in e.value.message


def test_bad_token_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'tokens'"):
        TokenTable.from_dict({"tokens": []})
    with pytest.raises(ConfigError, match="no \\[\\[token\\]\\]"):
        TokenTable.from_dict({})
    with pytest.raises(ConfigError, match="share a name"):
        TokenTable.from_dict({"token": [{"name": "a", "secret": "x" * 16, "scopes": ["pull"]},
                                        {"name": "a", "secret": "y" * 16, "scopes": ["pull"]}]})
    with pytest.raises(ConfigError, match="cannot read"):
        TokenTable.from_file(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[token]]\nname = 'x'\nsecret = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        TokenTable.from_file(bad)


def test_malformed_token_file_stops_the_origin_with_a_config_error(tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "a"\nsecret = "0123456789abcdefgh"\nscopes = ["pull"]\nartifact = ["x"]\n')
    p = fabric("origin", "--store", tmp_path / "s", "--listen", "127.0.0.1:0", "--tokens", tokens, timeout=30)
    assert p.returncode == 2  # a config error: the usage exit code
    assert "error[invalid_config]" in p.stderr and "'artifact'" in p.stderr


def test_authenticate_and_scopes():
    table = TokenTable.from_dict({"token": DEFAULT_TOKENS})
    assert table.authenticate(f"Bearer {PUBLISH_SECRET}").name == "publisher"
    assert table.authenticate(f"Bearer  {HASHED_SECRET} ").name == "hashed"
    for bad in (None, "", PUBLISH_SECRET, f"Basic {PUBLISH_SECRET}", "Bearer ", f"Bearer {PUBLISH_SECRET}x"):
        with pytest.raises(Unauthorized):
            table.authenticate(bad)
    llama = table.authenticate(f"Bearer {LLAMA_SECRET}")
    assert llama.may("pull", "llama-7b") and llama.may("publish", "llama-70b")
    assert not llama.may("pull", "other") and not llama.may("pull", "xllama-7b")
    assert not llama.may("admin")
    ops = table.authenticate(f"Bearer {ADMIN_SECRET}")
    assert ops.may("publish", "anything") and ops.may("pull")  # admin implies every scope
    with pytest.raises(Forbidden, match="'publish'"):
        Principal("p", frozenset({"pull"}), ("*",)).require("publish", "m")


def test_a_token_file_of_a_thousand_sites_finds_each_one():
    """An origin's or a relay's file names every site below it: each is found by its own secret."""
    entries = [{"name": f"site-{i}", "secret": f"secret-of-site-{i:04d}-xxxxxxxx", "scopes": ["pull"],
                "site": f"site-{i}"} for i in range(1000)]
    table = TokenTable.from_dict({"token": entries})
    for i in (0, 1, 499, 998, 999):
        p = table.authenticate(f"Bearer secret-of-site-{i:04d}-xxxxxxxx")
        assert p.name == f"site-{i}" and p.speaks_for(f"site-{i}") and not p.speaks_for(f"site-{i + 1}")
    with pytest.raises(Unauthorized):
        table.authenticate("Bearer secret-of-site-1000-xxxxxxxx")


def test_token_file_round_trip_with_hashed_secret(tmp_path):
    path = write_token_file(tmp_path / "t.toml")
    table = TokenTable.from_file(path)
    assert table.authenticate(f"Bearer {HASHED_SECRET}").name == "hashed"
    assert HASHED_SECRET not in path.read_text()  # the file holds only its hash


# --- over HTTP -------------------------------------------------------------------------------------

def test_probes_need_no_token_but_metrics_do(origin):
    for path in ("/livez", "/readyz"):
        assert _status(origin, "GET", path).status == 200, path
    assert _status(origin, "GET", "/readyz").json() == {"ready": True}
    assert _status(origin, "GET", "/metrics").status == 401
    assert request(origin.url, "GET", "/metrics", token=PULL_SECRET).status == 200


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": f"Basic {PUBLISH_SECRET}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer not-a-real-token-0123456789"},
    {"Authorization": f"Bearer {PUBLISH_SECRET[:-1]}"},
    {"Authorization": f"bearer {PUBLISH_SECRET}"},
])
def test_missing_or_wrong_token_is_401_json(origin, headers):
    for method, path in (("GET", "/v1/artifacts"), ("POST", "/v1/chunks/has"), ("GET", "/v1/events"),
                         ("PUT", "/v1/artifacts/other/versions/v2"), ("GET", "/v1/nowhere")):
        r = _status(origin, method, path, b"{}" if method != "GET" else None, headers=headers)
        assert r.status == 401, (method, path, r)
        assert r.error()["code"] == "unauthorized"


def test_header_that_is_not_utf8_is_401_not_500(origin):
    out = raw_exchange("127.0.0.1", origin.port, b"GET /v1/artifacts HTTP/1.1\r\nHost: x\r\n"
                       b"Authorization: Bearer \xff\xfe\xfdsecret-ish\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 401"), out[:200]
    assert b'"unauthorized"' in out


def test_hashed_secret_entry_authenticates(origin):
    r = _status(origin, "GET", "/v1/artifacts", token=HASHED_SECRET)
    assert r.status == 200 and r.json()["artifacts"] == ["llama-7b", "other"]


def test_pull_token_cannot_publish_upload_or_move_channels(origin):
    data = b"a chunk a pull token tries to upload"
    cid = digest(data)
    stream = wire.encode_stream([wire.chunk_frame(cid, 0, len(data), data)])
    r = _status(origin, "POST", "/v1/chunks/upload", stream, token=PULL_SECRET)
    assert r.status == 403 and r.error()["code"] == "forbidden"
    assert _status(origin, "POST", "/v1/chunks/has", {"ids": [cid]}, token=PUBLISH_SECRET).json() == {"missing": [cid]}

    manifest = _status(origin, "GET", "/v1/artifacts/other/versions/v1", token=PULL_SECRET)
    assert manifest.status == 200
    body = json.loads(manifest.body)
    body["version"] = "v9"
    r = _status(origin, "PUT", "/v1/artifacts/other/versions/v9", body, token=PULL_SECRET)
    assert r.status == 403 and r.error()["code"] == "forbidden"
    for action in ({"action": "promote", "version": "v1"}, {"action": "rollback"}):
        r = _status(origin, "POST", "/v1/artifacts/other/channels/prod", action, token=PULL_SECRET)
        assert r.status == 403 and r.error()["code"] == "forbidden" and "publish" in r.error()["message"]
    versions = _status(origin, "GET", "/v1/artifacts/other/versions", token=PULL_SECRET).json()["versions"]
    assert [v["version"] for v in versions] == ["v1"]  # nothing was committed
    ch = _status(origin, "GET", "/v1/artifacts/other/channels/prod", token=PULL_SECRET).json()
    assert len(ch["history"]) == 1  # nothing moved


def test_pull_token_can_pull(origin):
    s = Session(origin.url, PULL_SECRET)
    try:
        assert s.request("GET", "/v1/artifacts").json()["artifacts"] == ["llama-7b", "other"]
        m = s.request("GET", "/v1/artifacts/other/versions/v1").json()
        ids = [c for f in m["files"] for c, _ in f["chunks"]]
        assert s.request("POST", "/v1/chunks/has", {"ids": ids}).json() == {"missing": []}
        r = s.request("POST", "/v1/chunks/fetch", {"ids": ids})
        assert r.status == 200 and r.body.startswith(protocol.MAGIC)
    finally:
        s.close()


def test_artifact_pattern_limits_a_token(origin):
    ok = _status(origin, "GET", "/v1/artifacts/llama-7b/versions", token=LLAMA_SECRET)
    assert ok.status == 200 and ok.json()["versions"][0]["version"] == "v1"
    for method, path, body in (
        ("GET", "/v1/artifacts/other/versions", None),
        ("GET", "/v1/artifacts/other/versions/v1", None),
        ("GET", "/v1/artifacts/other/channels", None),
        ("GET", "/v1/artifacts/other/channels/prod", None),
        ("POST", "/v1/artifacts/other/channels/prod", {"action": "rollback"}),
        ("PUT", "/v1/artifacts/other/versions/v2", {"format": "x"}),
    ):
        r = _status(origin, method, path, body, token=LLAMA_SECRET)
        assert r.status == 403, (method, path, r)
        err = r.error()
        assert err["code"] == "forbidden" and "'other'" in err["message"]
    # listing shows only what the token may pull
    assert _status(origin, "GET", "/v1/artifacts", token=LLAMA_SECRET).json() == {"artifacts": ["llama-7b"]}
    # and an artifact that does not exist yet but matches the pattern is "not found", not forbidden
    r = _status(origin, "GET", "/v1/artifacts/llama-13b/versions/v1", token=LLAMA_SECRET)
    assert r.status == 404 and r.error()["code"] == "artifact_not_found"


def test_admin_token_may_do_everything(origin):
    r = _status(origin, "POST", "/v1/artifacts/other/channels/canary",
                {"action": "promote", "version": "v1"}, token=ADMIN_SECRET)
    assert r.status == 200 and r.json()["version"] == "v1"


def test_cli_with_a_wrong_token_fails_cleanly(origin):
    p = fabric("ls", "--origin", origin.url, "--token", "wrong-token-0123456789", timeout=60)
    assert p.returncode == 4 and "error[unauthorized]" in p.stderr
    p = fabric("ls", "--origin", origin.url, "--token", PULL_SECRET, "--json", timeout=60)
    assert p.returncode == 0 and {i["artifact"] for i in json.loads(p.stdout)["items"]} == {"llama-7b", "other"}


def test_non_ascii_secret_works_over_the_wire(tmp_path):
    secret = "sécret-ünïcode-0123456789"
    o = start_origin(tmp_path, tokens=[{"name": "u", "secret": secret, "scopes": ["pull"]}])
    try:
        out = raw_exchange("127.0.0.1", o.port, b"GET /v1/artifacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           + secret.encode() + b"\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
    finally:
        o.stop()


def test_secrets_never_reach_the_origin_log(origin):
    """Run last in this module: by now every token has been used, right and wrong."""
    text = origin.log_text()
    records = origin.log_records()
    assert any(r.get("by") == "publisher" for r in records)  # the log does name principals ...
    assert any(r.get("msg") == "channel moved" and r.get("by") == "ops" for r in records)
    for secret in ALL_SECRETS:  # ... but never their secrets
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text
    assert "unhandled error" not in text
