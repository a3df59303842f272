"""The demo's request stream: a bounded stream of `POST /infer` requests to every worker,
each answer checked against the weights of the version that says it answered."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from fabric.demo.state import MAX_REQUESTS, MAX_STREAM_S, RATE


class RequestStream:
    """POST /infer to every worker, `RATE` per second each, one thread and connection per worker.

    A request fails when it gets no answer, a status other than 200, or an output that
    differs from what the named version's weights give on the fixed input. Each thread
    stops after `MAX_REQUESTS` requests or `MAX_STREAM_S` seconds, or at `stop()`.
    """

    def __init__(self, workers: dict[str, str], expected: dict[str, np.ndarray]):
        self.workers, self.expected = workers, expected
        self.answers: dict[str, Counter] = {w: Counter() for w in workers}  # worker -> version -> count
        self.failures: dict[str, list[str]] = {w: [] for w in workers}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w, u), name=f"stream-{w}", daemon=True)
                         for w, u in workers.items()]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def answered(self, worker: str, version: str | None = None) -> int:
        c = self.answers[worker]
        return c[version] if version else sum(c.values())

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.answers.values()) + self.failed

    @property
    def failed(self) -> int:
        return sum(len(f) for f in self.failures.values())

    def versions(self) -> Counter:
        out: Counter = Counter()
        for c in self.answers.values():
            out.update(c)
        return out

    def _run(self, worker: str, url: str) -> None:
        u = urlsplit(url)
        conn: http.client.HTTPConnection | None = None
        start = next_at = time.monotonic()
        for _ in range(MAX_REQUESTS):
            if self._stop.is_set() or time.monotonic() - start > MAX_STREAM_S:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                conn.request("POST", "/infer", body=b"")
                r = conn.getresponse()
                body = r.read()
                why = self._check(worker, r.status, body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                why = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            if why:
                self.failures[worker].append(why)
            next_at += 1.0 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def _check(self, worker: str, status: int, body: bytes) -> str | None:
        """None for a good answer (counted under its version), else why it is not."""
        if status != 200:
            return f"HTTP {status}: {body[:200]!r}"
        obj = json.loads(body)
        version = obj.get("version")
        if self.expected:
            want = self.expected.get(version)
            if want is None:
                return f"answer from an unknown version {version!r}"
            got = np.asarray(obj["output"], dtype=np.float32)
            if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-4):
                return f"output differs from what {version}'s weights give"
        self.answers[worker][version] += 1
        return None


def expected_outputs(weights: Path) -> dict[str, np.ndarray]:
    """Each version's output on the worker's fixed input, computed here with torch ({} without it)."""
    try:
        import torch

        from agents.worker.reference import fixed_input, model_from
    except ImportError:
        return {}
    with torch.inference_mode():
        return {v.name: model_from(v)(fixed_input()).numpy().astype(np.float32)
                for v in sorted(weights.iterdir()) if v.is_dir()}
