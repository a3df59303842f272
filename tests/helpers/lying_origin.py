"""A lying origin: a real aiohttp server in front of a real `fabric origin`, for the signed
versions tests (tests/e2e/test_signed_versions.py).

It forwards every request to the real origin (the event stream and chunk streams
streamed through), except what a lie replaces, as an attacker who controls the origin
(its store, its process or the path to it) but holds no publisher key would:

* `channels[(artifact, channel)] = {...}`: that channel JSON instead of the real one (an
  old one recorded earlier: replay, a lower sequence; another channel's: mix-and-match;
  one with a forged, expired, altered or truncated statement);
* `signatures[(artifact, version)] = bytes`: that envelope for the version's signature;
* `manifests[(artifact, version)] = bytes`: that manifest JSON for the version;
* `strip = True`: withhold every statement (channel JSON without `statement` and
  `sequence`, 404 for version signatures and `/v1/trust`); `strip_signatures = True`,
  `strip_trust = True`: withhold only the version signatures, only the delegations.

`forge_channel` and `forge_version` sign what an attacker wants with a key it does hold
(its own, untrusted one, or a publisher key trusted for other artifacts); `altered`
changes a genuine statement and keeps its signatures; `substituted_manifest` serves
another version's files under a version's name. Runs its own event loop in a thread
(tests/helpers/threaded.py), so blocking tests can use it; set the lies from the test at any time.
"""

from __future__ import annotations

import base64
import dataclasses
import re

import aiohttp
from aiohttp import web

from fabric.core.manifest import Manifest
from fabric.trust import Envelope, Key, VersionStatement, canonical, sign

from .threaded import ThreadedProxy

_CHANNEL = re.compile(r"^/v1/artifacts/([^/]+)/channels/([^/]+)$")
_SIGNATURE = re.compile(r"^/v1/artifacts/([^/]+)/versions/([^/]+)/signature$")
_MANIFEST = re.compile(r"^/v1/artifacts/([^/]+)/versions/([^/]+)$")
_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


class LyingOrigin(ThreadedProxy):
    _session_options = {"timeout": aiohttp.ClientTimeout(total=None)}
    _runner_options = {"shutdown_timeout": 1}
    _stop_wait = 15.0

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.channels: dict[tuple[str, str], dict] = {}
        self.signatures: dict[tuple[str, str], bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.strip = False
        self.strip_signatures = False
        self.strip_trust = False
        self.served: dict[str, int] = {}  # lies served, by kind

    def tell_the_truth(self) -> None:
        self.channels.clear(), self.signatures.clear(), self.manifests.clear()
        self.strip = self.strip_signatures = self.strip_trust = False

    # --- serving ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.method == "GET":
            if m := _CHANNEL.match(path):
                return await self._channel(request, (m[1], m[2]))
            if m := _SIGNATURE.match(path):
                key = (m[1], m[2])
                if key in self.signatures:
                    return self._lie("signature", web.Response(body=self.signatures[key],
                                                               content_type="application/vnd.fabric.envelope+json"))
                if self.strip or self.strip_signatures:
                    return self._lie("strip", _error(404, "signature_not_found", "no signature (withheld)"))
            elif m := _MANIFEST.match(path):
                key = (m[1], m[2])
                if key in self.manifests:
                    return self._lie("manifest", web.Response(body=self.manifests[key],
                                                              content_type="application/json"))
            elif path == "/v1/trust" and (self.strip or self.strip_trust):
                return self._lie("strip", _error(404, "trust_not_found", "no delegations (withheld)"))
        return await self._forward(request)

    async def _channel(self, request: web.Request, key: tuple[str, str]) -> web.StreamResponse:
        if key in self.channels:
            return self._lie("channel", web.json_response(self.channels[key]))
        if not self.strip:
            return await self._forward(request)
        async with self._session.get(self.upstream + request.path_qs, headers=_headers(request)) as up:
            body = await up.json() if up.status == 200 else None
            if body is None:
                return web.Response(status=up.status, body=await up.read(), content_type="application/json")
        body.pop("statement", None), body.pop("sequence", None)
        return self._lie("strip", web.json_response(body))

    def _lie(self, kind: str, response: web.Response) -> web.Response:
        self.served[kind] = self.served.get(kind, 0) + 1
        return response

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=_headers(request),
                                         data=body, allow_redirects=False, auto_decompress=False) as up:
            out = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items()
                                                                if k.lower() not in _HOP})
            if "Content-Encoding" in up.headers:
                out.headers["Content-Encoding"] = up.headers["Content-Encoding"]
            await out.prepare(request)
            async for block in up.content.iter_any():  # the event stream and chunk streams, as they come
                await out.write(block)
            await out.write_eof()
            return out


def _headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length",
                                                                          "transfer-encoding")}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


# --- what an attacker can make with the keys it holds ------------------------------------------------

def forge_channel(real: dict, keys: list[Key], **changes) -> dict:
    """`real` (a channel JSON with a signed statement) with its statement changed (`version`,
    `manifest`, `sequence`, `expires`, ...) and signed again by `keys`; `version` follows."""
    stmt = dataclasses.replace(Envelope.from_json(real["statement"]).statement, **changes)
    return _pointing(real, stmt, sign(stmt, keys).to_json())


def altered(real: dict, **changes) -> dict:
    """`real` with its statement's payload changed but its signatures kept (they no longer verify)."""
    env = Envelope.from_json(real["statement"])
    stmt = dataclasses.replace(env.statement, **changes)
    payload = base64.b64encode(canonical(stmt.to_json())).decode()
    return _pointing(real, stmt, dict(env.to_json(), payload=payload))


def _pointing(real: dict, stmt, envelope: dict) -> dict:
    """The channel JSON `real` moved to what `stmt` says, carrying `envelope`."""
    history = list(real.get("history", []))
    if stmt.version != real.get("version"):
        history.append({"action": "promote", "version": stmt.version, "at": "2026-01-01T00:00:00.000000Z"})
    return dict(real, statement=envelope, version=stmt.version, sequence=stmt.sequence, history=history)


def forge_version(artifact: str, version: str, manifest_id: str, keys: list[Key]) -> bytes:
    """A version envelope for artifact@version = manifest_id, signed by `keys`."""
    return sign(VersionStatement(artifact, version, manifest_id), keys).to_bytes()


def substituted_manifest(manifest: Manifest, **changes) -> bytes:
    """`manifest` under other names (`version=...`): another version's files served as this one."""
    return dataclasses.replace(manifest, **changes).canonical()
