"""Each input of issue 13's "Robustness of parsers" that once crashed a handler, a background
task or the CLI, replayed against the real fleet (or the parser it reached): each is now a
4xx or a named error, and the process serves on."""

from __future__ import annotations

import json
import math

import pytest

from agents.site.config import SiteConfig
from fabric.config import Checker
from fabric.core.manifest import Manifest
from fabric.errors import ConfigError, Forbidden, InvalidManifest, MalformedEvent
from fabric.hook import envelopes
from fabric.hook.config import HookConfig
from fabric.hook.sns import verify

from helpers.http import request
from helpers.origin import ADMIN_SECRET
from helpers.wait import wait_until

from fuzz.conftest import HOOK_TOKEN, SITE_SECRETS
from fuzz.test_parsers import LOADERS, MANIFEST

SITE = SITE_SECRETS["solo"]
DEEP = b'{"seq": 1, "error": ' + b"[" * 1000 + b"]" * 1000 + b"}"


def post(url: str, path: str, body: bytes, token: str):
    return request(url, "POST", path, body, token=token, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/chunks/has", "/v1/chunks/fetch"])
@pytest.mark.parametrize("role", ["origin", "agent"])
def test_an_integer_of_thousands_of_digits_is_a_422(fleet, role, path):
    url = fleet.procs()[role].url
    r = post(url, path, b'{"ids": [' + b"7" * 5000 + b"]}", ADMIN_SECRET)
    assert r.status == 422 and r.error()["code"] == "invalid_input", r
    fleet.check_alive()


def test_worker_reports_with_infinity_nesting_or_nan_are_refused_and_the_agent_reports_on(fleet):
    url = fleet.agent.url
    r = post(url, "/v1/site/workers", json.dumps({"worker": "hostile", "artifact": "m"}).encode(), SITE)
    assert r.status == 200, r
    for body in (b'{"seq": Infinity}', b'{"seq": 1e400}', DEEP, b'{"seq": 1, "error": {"a": [1]}}'):
        r = post(url, "/v1/site/workers/hostile/report", body, SITE)
        assert r.status == 422 and r.error()["code"] == "invalid_input", (body[:40], r)
    for wait in ("nan", "NaN"):
        r = request(url, "GET", f"/v1/site/workers/hostile/assignment?after=0&wait={wait}", token=SITE)
        assert r.status == 422, r
    r = post(url, "/v1/site/workers", b'{"worker": "hostile", "artifact": "m", "poll_s": NaN}', SITE)
    assert r.status == 422, r
    fleet.check_alive()
    def solo_at():
        return [s["at"] for s in request(fleet.origin.url, "GET", "/v1/sites", token=ADMIN_SECRET).json()["sites"]
                if s["site"] == "solo"]
    before = solo_at()
    wait_until(lambda: solo_at() > before, timeout=15, interval=0.2,  # report_interval is 0.5 s
               what="a report after the hostile requests: the report loop still runs")


def _record(size: bytes) -> bytes:
    return (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "fuzz"}, '
            b'"object": {"key": "runs/r/step-9/x", "size": ' + size + b'}}}]}')


@pytest.mark.parametrize("size", [b"1e400", b"1" + b"0" * 30, b'"' + b"4" * 40 + b'"', b"10000000000000000000"])
def test_hook_events_with_sizes_sqlite_cannot_hold_are_refused(fleet, size):
    r = post(fleet.hook.url, "/events", _record(size), HOOK_TOKEN)
    assert r.status in (200, 400), r
    assert r.status == 400 or r.json()["queued"] == 0, r  # refused, or the record ignored as malformed
    assert request(fleet.hook.url, "GET", "/readyz").status == 200


def test_deeply_nested_hook_events_are_400(fleet):
    r = post(fleet.hook.url, "/events", b'{"Records": ' + b"[" * 1000 + b"]" * 1000 + b"}", HOOK_TOKEN)
    assert r.status == 400 and r.error()["code"] == "malformed_event", r
    sns = {"Type": "Notification", "TopicArn": "t", "Message": "[" * 1000 + "]" * 1000}
    assert envelopes.parse(json.dumps(sns).encode()).kind == "unknown"
    with pytest.raises(MalformedEvent):
        envelopes.parse(_record(b"NaN"))


@pytest.mark.parametrize("url", ["https://[::1", "https://sns.us-east-1.amazonaws.com:port/x.pem",
                                 "https://sns.us-east-1.amazonaws.com/%00/..pem", "https://[zz]/a.pem"])
def test_a_malformed_signing_cert_url_is_forbidden(fleet, tmp_path, url):
    msg = {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": "{}",
           "SigningCertURL": url, "SignatureVersion": "1", "Signature": "AA=="}
    with pytest.raises(Forbidden):
        verify(msg, tmp_path)
    r = post(fleet.hook.url, "/events", json.dumps(msg).encode(), HOOK_TOKEN)
    assert r.status == 403 and r.error()["code"] == "forbidden", r


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10 ** 400])
@pytest.mark.parametrize("key", ["report_interval", "sync.resync_interval"])
def test_nan_and_infinity_are_refused_in_configs(tmp_path, key, value):
    load, valid = LOADERS["site"]
    raw = json.loads(json.dumps(valid))
    table, _, name = key.rpartition(".")
    (raw[table] if table else raw)[name] = value
    with pytest.raises(ConfigError, match=name):
        SiteConfig.from_dict(raw, "site.toml", tmp_path)
    with pytest.raises(ConfigError):
        Checker({"poll_s": value}, "w").duration("poll_s", 1.0)


def test_a_short_hook_token_is_refused(tmp_path):
    _, valid = LOADERS["hook"]
    with pytest.raises(ConfigError, match="token: must be at least 16"):
        HookConfig.from_dict({**valid, "token": "t"}, "hook.toml", tmp_path)
    with pytest.raises(ConfigError, match="token"):
        SiteConfig.from_dict({**LOADERS["site"][1], "token": "short"}, "site.toml", tmp_path)


def test_a_chunk_id_with_two_sizes_is_refused():
    m = json.loads(json.dumps(MANIFEST))
    m["files"][1]["chunks"][0][0] = m["files"][0]["chunks"][0][0]
    with pytest.raises(InvalidManifest, match="two sizes"):
        Manifest.from_bytes(json.dumps(m).encode())


@pytest.mark.parametrize("path", ["a" * 256, "é" * 128, "/".join(["d"] * 65), "/".join(["p" * 250] * 17)])
def test_paths_no_file_system_takes_are_refused(path):
    m = json.loads(json.dumps(MANIFEST))
    m["files"][0]["path"] = path
    with pytest.raises(InvalidManifest, match="path"):
        Manifest.from_bytes(json.dumps(m).encode())
