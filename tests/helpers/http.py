"""A blocking HTTP client for tests: returns every status, never raises on 4xx/5xx."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def error(self) -> dict:
        """The JSON error body, checked to be exactly {"code", "message"} strings."""
        obj = self.json()
        assert set(obj) == {"code", "message"}, obj
        assert isinstance(obj["code"], str) and isinstance(obj["message"], str), obj
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return obj


def _encode(body, headers: dict) -> bytes | None:
    if body is None or isinstance(body, (bytes, bytearray)):
        return body
    headers.setdefault("Content-Type", "application/json")
    return json.dumps(body).encode()


class Session:
    """One keep-alive connection to `base_url`; reconnects when the server drops it."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.token, self.timeout = token, timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body=None, *, token: str | None = None,
                headers: dict | None = None) -> Reply:
        hdrs = dict(headers or {})
        tok = token if token is not None else self.token
        if tok:
            hdrs.setdefault("Authorization", f"Bearer {tok}")
        data = _encode(body, hdrs)
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=hdrs)
                resp = self._conn.getresponse()
                payload = resp.read()
                reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
                if resp.will_close:
                    self.close()
                return reply
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


def request(base_url: str, method: str, path: str, body=None, *, token: str | None = None,
            headers: dict | None = None, timeout: float = 30.0) -> Reply:
    s = Session(base_url, token, timeout)
    try:
        return s.request(method, path, body, headers=headers)
    finally:
        s.close()


def raw_exchange(host: str, port: int, data: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh TCP connection and return what comes back until the server
    closes it (send `Connection: close`). With read=False, close right after sending."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out
