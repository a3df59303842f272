"""Traces: OpenTelemetry spans along a version's path, one trace per published version.

The one module that imports OpenTelemetry, an optional extra (`pip install .[tracing]`:
opentelemetry-api and -sdk). Without it every function here is a cheap no-op and
nothing is traced; with it, spans are recorded only in processes that `setup` found an
exporter for (`FABRIC_TRACES_FILE`, read by `fabric.config.traces_file`: one JSON object
per finished span, appended, so several processes may share one file).

The chain, carried by W3C `traceparent` values:

1. the publisher's `publish` span; its commit request carries `traceparent`
   (`fabric.wire.client.RemoteTarget.commit`);
2. the origin's `origin.commit` span is its child; the origin keeps the version's
   traceparent and puts it in the version's events (`version`, and `channel` moves to it);
3. each site agent's `agent.deploy` span is a child of that, and its fetch requests
   carry its own traceparent to its upstream, where the server edge opens an
   `http <route>` span under it (a hub relaying to an edge);
4. a worker's `worker.load` span is a child of the deploy that assigned the version
   (the assignment's `traceparent`).
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    _PROPAGATOR = TraceContextTextMapPropagator()
except ImportError:  # the extra is not installed: nothing is traced
    trace = None
    _PROPAGATOR = None

HEADER = "traceparent"


def available() -> bool:
    """Whether the OpenTelemetry API is installed."""
    return trace is not None


def setup(service: str, path: str | None = None) -> bool:
    """Record this process's spans as `service` into `path` (default: `FABRIC_TRACES_FILE`).

    Returns whether spans are recorded: False without the SDK or without a file. Called
    once by each entry point (origin, agent, hook, worker, `fabric publish`).
    """
    from fabric.config import traces_file
    path = path or traces_file()
    if trace is None or not path:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    except ImportError:
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(_file_exporter(path)))
    trace.set_tracer_provider(provider)
    return True


@contextmanager
def span(name: str, *, parent: str | None = None, **attributes) -> Iterator[object]:
    """A span named `name`, the current one while the block runs.

    Its parent is `parent` (a traceparent value from another process) when given and
    valid, else the current span. Attributes that are None are left out.
    """
    if trace is None:
        yield None
        return
    ctx = _PROPAGATOR.extract({HEADER: parent}) if parent else None
    attrs = {k: v if isinstance(v, (str, bool, int, float)) else str(v) for k, v in attributes.items()
             if v is not None}
    with trace.get_tracer("fabric").start_as_current_span(name, context=ctx, attributes=attrs) as s:
        yield s


def incoming(name: str, headers) -> ContextManager:
    """A server span for a request that came with a `traceparent` (nothing for one without)."""
    parent = headers.get(HEADER)
    return span(name, parent=parent) if parent and trace is not None else nullcontext()


def traceparent() -> str | None:
    """The current span's W3C traceparent, or None when nothing is being traced."""
    if trace is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(HEADER)


def headers() -> dict[str, str]:
    """`{"traceparent": …}` for an outgoing request made in the current span (or `{}`)."""
    tp = traceparent()
    return {HEADER: tp} if tp else {}


def _file_exporter(path: str):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):
        """Finished spans as JSON lines, appended to `path` (one write per span)."""

        def __init__(self):
            self._lock = threading.Lock()

        def export(self, spans) -> SpanExportResult:
            lines = "".join(json.dumps(_span_json(s)) + "\n" for s in spans)
            with self._lock:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, lines.encode())
                finally:
                    os.close(fd)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    return FileExporter()


def _span_json(s) -> dict:
    ctx, parent = s.get_span_context(), s.parent
    return {"name": s.name, "service": s.resource.attributes.get("service.name"),
            "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
            "parent_span_id": f"{parent.span_id:016x}" if parent else None,
            "start_ns": s.start_time, "end_ns": s.end_time, "attributes": dict(s.attributes or {})}
