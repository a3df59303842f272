"""The HTTP client pieces every server adapter shares: one session, timeouts, bounded answers,
the token, the mapping of failures onto `ServingError`s, the golden request and its comparison.

`ServerClient.call` sends one request and returns `(status, body)`, the body decoded as
bounded JSON when it is JSON (else its text, cut at MAX_ERROR_TEXT). It raises:

* `ServerUnreachable` — no connection (refused, reset, name not found);
* `ServerTimeout` — no complete answer within the timeout given;
* `ServingError` — a 5xx, with the server's own message;
* `ServerRefused` — a 4xx (the server refused; it keeps what it had).

A successful status with an unusable body is the caller's to judge. `HttpAdapter` is the
base of the vLLM and SGLang adapters (and may serve others): it holds the client, what the
server serves as far as the adapter knows, and the golden request (`check`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from fabric.core.boundedjson import decode
from fabric.errors import (FabricError, HealthCheckFailed, ServerRefused, ServerTimeout, ServerUnreachable,
                           ServingError)
from fabric.logs import get_logger

from agents.serving.base import LoadRecord, ServerConfig

log = get_logger("serving")

MAX_ANSWER = 8 << 20  # the largest answer read from an inference server (a completion, a status)
MAX_ERROR_TEXT = 500  # characters of a server's error text kept in a message


class ServerClient:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, *, timeout: float, json: Any = None,
                   params: dict | None = None) -> tuple[int, Any]:
        where = f"server {self.cfg.name} ({self.cfg.kind} at {self.cfg.url}): {method} {path}"
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=min(self.cfg.timeouts.connect_s, timeout))
        try:
            async with self._open().request(method, self.cfg.url + path, json=json, params=params,
                                            timeout=t) as r:
                raw = await _bounded(r, where)
                status = r.status
                is_json = r.content_type == "application/json"
        except asyncio.TimeoutError:
            raise ServerTimeout(f"{where}: no answer within {timeout:g}s") from None
        except aiohttp.ClientConnectionError as e:
            raise ServerUnreachable(f"{where}: {e.__class__.__name__}: {e}") from None
        body: Any
        if is_json and raw:
            try:
                body = decode(raw, what=f"the answer of {where}")
            except FabricError as e:
                raise ServingError(e.message) from None
        else:
            body = raw.decode("utf-8", "replace")
        if status >= 500:
            raise ServingError(f"{where}: {status}: {_text(body)}")
        if status >= 400:
            raise ServerRefused(f"{where}: {status}: {_text(body)}")
        return status, body


async def _bounded(r: aiohttp.ClientResponse, where: str) -> bytes:
    data = bytearray()
    async for piece in r.content.iter_chunked(1 << 16):
        data += piece
        if len(data) > MAX_ANSWER:
            raise ServingError(f"{where}: the answer is over {MAX_ANSWER} bytes")
    return bytes(data)


def _text(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if key in body:
                v = body[key]
                return (v.get("message", str(v)) if isinstance(v, dict) else str(v))[:MAX_ERROR_TEXT]
    return str(body)[:MAX_ERROR_TEXT]


# --- the golden request ------------------------------------------------------------------

def pick(body: Any, path: str) -> Any:
    """The value at dotted `path` ("choices.0.text") in a decoded answer; KeyError if absent."""
    for part in path.split("."):
        if isinstance(body, list):
            body = body[int(part)] if part.isdigit() and int(part) < len(body) else _missing(path)
        elif isinstance(body, dict) and part in body:
            body = body[part]
        else:
            _missing(path)
    return body


def _missing(path: str):
    raise KeyError(path)


def matches(answer: Any, expect: Any, tolerance: float) -> bool:
    """`answer` equals `expect`, numbers within `tolerance`, lists and tables element by element."""
    if isinstance(expect, bool) or isinstance(answer, bool):
        return answer is expect
    if isinstance(expect, (int, float)) and isinstance(answer, (int, float)):
        return abs(answer - expect) <= tolerance
    if isinstance(expect, list) and isinstance(answer, list):
        return len(answer) == len(expect) and all(matches(a, e, tolerance) for a, e in zip(answer, expect))
    if isinstance(expect, dict) and isinstance(answer, dict):
        return answer.keys() == expect.keys() and all(matches(answer[k], expect[k], tolerance) for k in expect)
    return answer == expect


class HttpAdapter:
    """Shared state and the golden request of an adapter that speaks HTTP/JSON."""

    kind = "?"
    health_path = "/v1/completions"
    health_field = "choices.0.text"

    def __init__(self, cfg: ServerConfig):
        self.config = cfg
        self.name = cfg.name
        self.client = ServerClient(cfg)
        self.loaded: str | None = None  # the version this adapter last loaded successfully
        self.last: LoadRecord | None = None  # the last load's record (restore reads `changed`)

    async def close(self) -> None:
        await self.client.close()

    def health_request(self) -> dict:
        h = self.config.health
        body = dict(h.request) if h else {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
        body.setdefault("model", self.config.model)
        return body

    async def check(self, version: str) -> None:
        """POST the golden request; it must succeed and, with `expect`, match within tolerance."""
        h = self.config.health
        path = (h.path if h and h.path else None) or self.health_path
        try:
            _, body = await self.client.call("POST", path, json=self.health_request(),
                                             timeout=self.config.timeouts.health_s)
        except FabricError as e:
            raise HealthCheckFailed(f"server {self.name}: the health request on {version} failed: "
                                    f"{e.code}: {e.message}") from None
        self._compare(body, version)

    def _compare(self, body: Any, version: str) -> None:
        """With a recorded `expect`: the health answer in `body` must match it within tolerance."""
        h = self.config.health
        if h is None or h.expect is None:
            return
        where = (h.field or self.health_field)
        try:
            answer = pick(body, where)
        except (KeyError, ValueError, IndexError, TypeError):
            raise HealthCheckFailed(f"server {self.name}: the health answer on {version} has no {where!r}") from None
        if not matches(answer, h.expect, h.tolerance):
            raise HealthCheckFailed(f"server {self.name}: the health answer on {version} is {str(answer)[:200]!r}, "
                                    f"expected {str(h.expect)[:200]!r} (tolerance {h.tolerance:g})")

    async def restore(self, previous: tuple[str, Path]) -> LoadRecord:
        """Load `previous` again if the failed load changed the server; else check it still answers."""
        version, folder = previous
        if self.last is not None and not self.last.changed and self.loaded in (None, version):
            rec = LoadRecord(version, ok=True, mode="unchanged")
            t0 = time.monotonic()
            try:
                await self.check(version)
            except FabricError as e:
                return rec.fail(e)
            rec.seconds_to_new_answers = round(time.monotonic() - t0, 4)
            self.loaded = version
            return rec
        return await self.load(version, folder, None)

    async def load(self, version: str, folder: Path, previous: tuple[str, Path] | None) -> LoadRecord:
        raise NotImplementedError


def folder_bytes(folder: Path) -> int:
    """What a whole reload reads: every weight file of the version folder (blocking; call in a thread)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))
