"""Traces (fabric.tracing, the `tracing` extra): spans and traceparent propagation in one
process with the SDK's in-memory exporter, and one version's trace through real processes
(publish → origin → hub and edge deploys → the hub serving the edge → the edge's worker),
written by each process to the FABRIC_TRACES_FILE they share."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fabric import tracing

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra (opentelemetry-sdk) is not installed")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import helpers.origin as helpers_origin  # noqa: E402
import helpers.process as helpers_process  # noqa: E402
from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess  # noqa: E402
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, fabric, start_origin  # noqa: E402
from helpers.ports import free_port  # noqa: E402
from helpers.process import ServerProcess  # noqa: E402

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def memory():
    """This process's spans, in memory (the global provider can be set once per process)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        pytest.skip("another tracer provider is installed in this process")
    yield _EXPORTER


def test_a_remote_parent_makes_a_child_in_the_same_trace(memory):
    memory.clear()
    with tracing.span("publish", artifact="m", version="v1"):
        sent = tracing.headers()
    assert set(sent) == {"traceparent"}
    with tracing.span("origin.commit", parent=sent["traceparent"], version="v1", unset=None):
        event_trace = tracing.traceparent()
    with tracing.incoming("http POST /v1/chunks/fetch", {"traceparent": event_trace}):
        pass
    with tracing.incoming("http GET /v1/artifacts", {}):  # no traceparent: no span
        assert tracing.traceparent() is None
    publish, commit, served = memory.get_finished_spans()
    assert (publish.name, commit.name, served.name) == ("publish", "origin.commit", "http POST /v1/chunks/fetch")
    assert commit.parent.span_id == publish.context.span_id and served.parent.span_id == commit.context.span_id
    assert len({s.context.trace_id for s in (publish, commit, served)}) == 1
    assert dict(commit.attributes) == {"version": "v1"}


def test_a_malformed_traceparent_starts_a_fresh_trace(memory):
    memory.clear()
    with tracing.span("agent.deploy", parent="00-not-a-trace"):
        pass
    [s] = memory.get_finished_spans()
    assert s.parent is None


def test_without_opentelemetry_nothing_is_traced_and_nothing_breaks(monkeypatch):
    monkeypatch.setattr(tracing, "trace", None)
    with tracing.span("publish") as s:
        assert s is None and tracing.traceparent() is None and tracing.headers() == {}
    with tracing.incoming("http GET /", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
        pass
    assert tracing.setup("fabric-test", path="/nonexistent/traces.jsonl") is False


# --- real processes -------------------------------------------------------------------------------

class WorkerProcess(ServerProcess):
    def __init__(self, root: Path, agent_url: str, token: str):
        port = free_port()
        super().__init__(["worker", "demo", "--agent", agent_url, "--artifact", "demo-mlp", "--channel", "prod",
                          "--listen", f"127.0.0.1:{port}", "--worker-id", "w1", "--token", token, "--poll", "0.5"],
                         port, root / "worker.log", name="worker w1")


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_one_version_is_one_trace_from_publish_to_the_edge_worker(tmp_path, monkeypatch):
    from agents.worker.reference import make_weights
    traces = tmp_path / "traces.jsonl"
    real_env = helpers_origin.clean_env
    env = lambda **extra: real_env(FABRIC_TRACES_FILE=str(traces), **extra)  # noqa: E731
    monkeypatch.setattr(helpers_origin, "clean_env", env)
    monkeypatch.setattr(helpers_process, "clean_env", env)
    origin = start_origin(tmp_path / "origin", DEFAULT_TOKENS + SITE_TOKENS)
    hub = AgentProcess(tmp_path, "hub", origin.url, follow=["demo-mlp:prod"])
    edge = AgentProcess(tmp_path, "edge-a", origin.url, follow=["demo-mlp:prod"], upstreams=[hub.url])
    worker = WorkerProcess(tmp_path, edge.url, SITE_SECRETS["edge-a"])
    try:
        hub.start()
        edge.start()
        worker.spawn()  # registered before the version exists: it is the canary of v1
        deadline = time.monotonic() + 30
        while not edge.status()["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        weights = make_weights(tmp_path / "v1", 1)
        p = fabric("publish", weights, "--artifact", "demo-mlp", "--version", "v1", "--channel", "prod",
                   "--origin", origin.url, "--token", PUBLISH_SECRET)
        assert p.returncode == 0, p.stderr
        hub.wait_active("demo-mlp", "v1")
        edge.wait_active("demo-mlp", "v1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(s["name"] == "worker.load" for s in _spans(traces)):
            time.sleep(0.2)
    finally:
        worker.stop()
        edge.stop()
        hub.stop()
        origin.stop()
    spans = _spans(traces)
    by_id = {s["span_id"]: s for s in spans}
    [publish] = [s for s in spans if s["name"] == "publish"]
    trace_id = publish["trace_id"]
    mine = [s for s in spans if s["trace_id"] == trace_id]

    def parent(s: dict) -> dict:
        return by_id[s["parent_span_id"]]

    [commit] = [s for s in mine if s["name"] == "origin.commit"]
    assert commit["service"] == "fabric-origin" and parent(parent(commit)) is publish
    deploys = {s["attributes"]["site"]: s for s in mine if s["name"] == "agent.deploy"}
    assert set(deploys) == {"hub", "edge-a"}, [s["name"] for s in spans]
    assert all(parent(d) is commit and d["service"] == "fabric-agent" for d in deploys.values())
    served = [s for s in mine if s["name"] == "http POST /v1/chunks/fetch" and s["parent_span_id"]
              and parent(s) is deploys["edge-a"]]
    assert served, "the hub's answer to the edge's fetch is not in the edge's deploy"
    [load] = [s for s in mine if s["name"] == "worker.load"]
    assert load["service"] == "fabric-worker" and parent(load) is deploys["edge-a"]
    assert load["attributes"]["version"] == "v1"
