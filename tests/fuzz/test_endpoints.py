"""Generated requests against every HTTP endpoint of a real origin, site agent and push hook.

Each case is one request: a route from docs/README.md's endpoint index (or a path that
matches none), path segments, a query, an Authorization header (valid tokens of each
scope, wrong ones, garbage), a Content-Type and a body (valid bodies with one field
replaced, JSON nested thousands deep, integers of thousands of digits, NaN, Infinity,
1e400, lone surrogates, random bytes). Every answer must be below 500, and every error
a JSON {"code", "message"}; after every batch each process is alive, answers /livez
and stays under MAX_RSS. The last test proves the background tasks survived: the
agent still follows events and deploys (a new version activates), still reports to the
origin; the hook's worker still runs and queues a valid event; no log holds an
unhandled error. `--fuzz-cases` sizes the suite (tests/fuzz/conftest.py).
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.http import Session, request
from helpers.origin import ADMIN_SECRET, PUBLISH_SECRET, PULL_SECRET, parse_metrics

from fuzz.conftest import HOOK_TOKEN, SITE_SECRETS
from helpers.wait import wait_until
from fuzz.strategies import ZERO_ID, as_body, header_text, hostile_texts, json_values, names, with_field

pytestmark = pytest.mark.timeout(3600)
BATCH = 250
SITE_TOKEN = SITE_SECRETS["solo"]
STATS: Counter = Counter()  # cases sent, by role and status class; max RSS seen
SHARES = {"origin": 0.3, "agent": 0.3, "hook": 0.2}  # the parsers take the rest (test_parsers.py)

ORIGIN_ROUTES = [
    ("GET", "/v1/artifacts"), ("GET", "/v1/artifacts/{a}/versions"), ("GET", "/v1/artifacts/{a}/versions/{v}"),
    ("PUT", "/v1/artifacts/{a}/versions/{v}"), ("GET", "/v1/artifacts/{a}/channels"),
    ("GET", "/v1/artifacts/{a}/channels/{c}"), ("POST", "/v1/artifacts/{a}/channels/{c}"),
    ("POST", "/v1/chunks/has"), ("POST", "/v1/chunks/fetch"), ("POST", "/v1/chunks/upload"),
    ("GET", "/v1/events"), ("POST", "/v1/sites/{s}"), ("GET", "/v1/sites"),
]
AGENT_ROUTES = [
    ("POST", "/v1/chunks/has"), ("POST", "/v1/chunks/fetch"), ("GET", "/v1/site"), ("POST", "/v1/site/pins"),
    ("DELETE", "/v1/site/pins/{a}/{v}"), ("POST", "/v1/site/workers"), ("GET", "/v1/site/workers"),
    ("GET", "/v1/site/workers/{w}/assignment"), ("POST", "/v1/site/workers/{w}/report"),
    ("DELETE", "/v1/site/workers/{w}"), ("GET", "/v1/site/manifests/{a}/{v}"),
]
HOOK_ROUTES = [("POST", "/events"), ("GET", "/checkpoints")]
PROBES = [("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/nowhere/{a}"),
          ("PATCH", "/v1/artifacts")]
UI = [("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/{a}")]  # the status page (origin and agent)

TEMPLATES = {  # a valid body per route, for with_field to break one field of
    "/v1/chunks/has": {"ids": [ZERO_ID]}, "/v1/chunks/fetch": {"ids": [ZERO_ID], "have": ["v1"]},
    "/v1/artifacts/{a}/channels/{c}": {"action": "promote", "version": "v1"},
    "/v1/sites/{s}": {"site": "solo", "ready": True, "channels": [], "workers": [], "at": 1.0},
    "/v1/site/pins": {"artifact": "m", "version": "v1"},
    "/v1/site/workers": {"worker": "w1", "artifact": "m", "channel": "prod", "poll_s": 1, "serving": "v1"},
    "/v1/site/workers/{w}/report": {"seq": 1, "ok": True, "version": "v1", "serving": "v1", "error": None,
                                    "seconds": 0.5},
    "/events": {"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "aws:s3", "s3": {
        "bucket": {"name": "fuzz"}, "object": {"key": "runs/r/step-1/x.distcp", "size": 10, "eTag": "e"}}}]},
    "/events#sns": {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": "{}",
                    "MessageId": "1", "Timestamp": "t", "SignatureVersion": "1", "Signature": "AA==",
                    "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a.pem"},
    "/events#seaweed": {"key": "/buckets/fuzz/runs/r/step-2/y", "event_type": "create", "message": {
        "new_entry": {"name": "y", "attributes": {"file_size": 3}, "extended": {}}}},
}


def tokens_for(role: str):
    valid = {"origin": [ADMIN_SECRET, PUBLISH_SECRET, PULL_SECRET, SITE_TOKEN],
             "agent": [ADMIN_SECRET, SITE_TOKEN, PULL_SECRET], "hook": [HOOK_TOKEN]}[role]
    basic = base64.b64encode(f"x:{HOOK_TOKEN}".encode()).decode()
    return st.sampled_from(valid).map(lambda t: f"Bearer {t}") | st.sampled_from(
        ["", "Bearer", "Bearer wrong-token-000000000000", f"Basic {basic}", "Basic !!!", "bearer  x"]) | header_text


@st.composite
def cases(draw, role: str):
    routes = {"origin": ORIGIN_ROUTES + UI, "agent": AGENT_ROUTES + UI, "hook": HOOK_ROUTES}[role] + PROBES
    method, template = draw(st.sampled_from(routes))
    seg = {k: draw(st.sampled_from(["m", "v1", "prod", "solo", "w1"]) | names) for k in "avcsw"}
    path = template.format(**seg)
    query = ""
    if template.endswith("/assignment"):  # a long poll: keep its wait short (an invalid one is a 422)
        query = f"?after={quote(draw(st.sampled_from(['0', '1', '-1', 'x', '1e5', '9' * 30])))}" \
                f"&wait={quote(draw(st.sampled_from(['0', '0.05', '-3', 'nan', 'abc', ''])))}"
    elif template == "/v1/events":  # only invalid `after`s: a valid one opens an endless stream
        query = "?after=" + quote(draw(st.sampled_from(["-1", "x", "1.5", "nan", "9" * 5000, "%00"])))
    elif template.endswith("/versions/{v}") and method == "GET":
        query = draw(st.sampled_from(["", "?base=v1", "?base=" + quote("../x"), "?base=" + "a" * 300]))
    key = template + draw(st.sampled_from(["", "#sns", "#seaweed"]) if template == "/events" else st.just(""))
    kind = draw(st.sampled_from(["template", "template", "hostile", "json", "none"]))
    if kind == "template" and key in TEMPLATES:
        body = with_field(TEMPLATES[key], draw(st.data()))
    elif kind == "template" and template.endswith("/versions/{v}") and method == "PUT":
        body = b"MANIFEST"  # replaced by a mutated real manifest in the test
    elif kind in ("hostile", "template"):
        body = draw(hostile_texts)
    elif kind == "json":
        body = as_body(draw(json_values))
    else:
        body = None
    headers = {"Authorization": draw(tokens_for(role))}
    headers["Content-Type"] = draw(st.sampled_from(["application/json", "application/json; charset=utf-16",
                                                    "application/json; charset=bogus", "text/plain",
                                                    "application/x-fabric-chunks"]))
    if not headers["Authorization"]:
        del headers["Authorization"]
    return method, path + query, headers, body


def check_reply(r, what) -> None:
    assert r.status < 500, (what, r.status, r.body[:300])
    if r.status >= 400:
        r.error()  # exactly {"code", "message"}, as JSON


def fuzz_role(fleet, fuzz_cases: int, role: str) -> None:
    total = max(BATCH, int(fuzz_cases * SHARES[role]))
    proc = fleet.procs()[role]
    session = Session(proc.url, timeout=30)
    manifest = request(fleet.origin.url, "GET", "/v1/artifacts/m/versions/v1", token=ADMIN_SECRET).body

    @settings(max_examples=BATCH, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases(role), st.integers(0, len(manifest) - 1), st.binary(min_size=1, max_size=8))
    def one(case, at, patch):
        method, path, headers, body = case
        if body == b"MANIFEST":
            body = manifest[:at] + patch + manifest[at + len(patch):]
        r = session.request(method, path, body, headers=headers)
        STATS[f"{role} {r.status // 100}xx"] += 1
        STATS["cases"] += 1
        check_reply(r, (method, path, body[:200] if body else body))

    sent = 0
    while sent < total:
        before = STATS["cases"]
        one()
        sent += STATS["cases"] - before
        for name, rss in fleet.check_alive().items():
            STATS[f"max rss {name}"] = max(STATS[f"max rss {name}"], rss)
    session.close()


@pytest.mark.parametrize("role", ["origin", "agent", "hook"])
def test_no_endpoint_answers_500(fleet, fuzz_cases, role):
    fuzz_role(fleet, fuzz_cases, role)


def test_every_process_and_background_task_survives(fleet):
    """Run last: the fleet still does its work after everything above."""
    t0 = time.time()
    fleet.check_alive()
    request(fleet.origin.url, "POST", "/v1/artifacts/m/channels/prod", as_body({"action": "promote",
                                                                              "version": "v1"}),
            token=ADMIN_SECRET)
    fleet.publish("v2", b"two" * 3000)  # the agent's event follower and deployer still run
    fleet.agent.wait_active("m", "v2", timeout=60)

    def reported() -> bool:  # the agent's report loop still runs
        sites = request(fleet.origin.url, "GET", "/v1/sites", token=ADMIN_SECRET).json()["sites"]
        return any(s.get("site") == "solo" and (s.get("at") or 0) > t0 for s in sites)
    wait_until(reported, 30, what="a fresh report from the agent")
    r = request(fleet.hook.url, "GET", "/readyz")  # the hook's worker task still runs, its queue takes writes
    assert r.status == 200 and r.json()["worker"], r
    r = request(fleet.hook.url, "POST", "/events", as_body(TEMPLATES["/events"]), token=HOOK_TOKEN)
    assert r.status == 200, r
    for name, p in fleet.procs().items():
        assert "unhandled error" not in p.log_text(), f"{name} hit its catch-all:\n{p.log_text()[-3000:]}"
        token = {"origin": ADMIN_SECRET, "agent": ADMIN_SECRET, "hook": HOOK_TOKEN}[name]
        m = parse_metrics(request(p.url, "GET", "/metrics", token=token).body.decode())
        assert not any('status="500"' in k and v > 0 for k, v in m.items()), name
    rss = fleet.check_alive()
    print(f"\nfuzz: {STATS['cases']} requests; by status: "
          f"{ {k: v for k, v in sorted(STATS.items()) if 'xx' in k} }; max RSS MiB: "
          f"{ {k: round(v / 2**20) for k, v in STATS.items() if k.startswith('max rss')} }; now {rss}")
