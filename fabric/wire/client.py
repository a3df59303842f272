"""The client side of Fabric's HTTP protocol: talk to an origin or a relay.

`OriginClient` is async (aiohttp) and used by the sync engine and agents.
`UploadEncoder` encodes a publisher's chunks for upload, standalone (`encode_upload`).
`SyncOrigin` wraps it with a private event loop in a background thread, for the
CLI and for `publish`, whose worker threads call `RemoteTarget.offer` directly.

A server's JSON error body becomes the matching typed `FabricError`
(`errors.from_code`); a refused or broken connection becomes `TransferError`, and so
does an answer over its limit (`read_body`: `MAX_ANSWER` for JSON, `MAX_MANIFEST` for a
manifest), which is refused before more than the limit and one read buffer is held.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from typing import Any, AsyncIterator, Coroutine, Iterable

import aiohttp

from fabric import tracing
from fabric.config import encode_mode
from fabric.core import codec, digest
from fabric.core.boundedjson import decode as decode_json
from fabric.core.codec import Encoding
from fabric.core.policy import EncodePolicy, Mode
from fabric.wire import frames
from fabric.wire.events import read_events
from fabric.wire.negotiate import ManifestBase, parse_encodings, read_manifest_body
from fabric.wire.protocol import (ARTIFACTS, CHUNK_STREAM, CHUNKS_HAS, CHUNKS_UPLOAD, ENCODINGS_HEADER, ENVELOPE,
                                  EVENTS, MAX_ANSWER, MAX_IDS, MAX_MANIFEST, SITES, TRUST)
from fabric.core.limits import MAX_STATEMENT_BYTES
from fabric.errors import (ArtifactNotFound, BadFrame, ChannelNotFound, FabricError, InvalidManifest,
                     SignatureNotFound, TransferError, TrustNotFound, from_code)
from fabric.core.manifest import Manifest
from fabric.store.registry import Channel, _channel_from, resolve_ref

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds any one socket read may wait (the event stream's keepalives come every 15)
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
# aiohttp reads ahead up to 2x this per connection, waiting reader or not (4 MiB cost a site
# 8 MiB a connection, issue 17); 256 KiB is one socket read (asyncio's max_size). It is the
# frame reader's piece (`frames.PIECE`): a larger read would raise the read-ahead to match.
READ_BUFFER = frames.PIECE


class OriginClient:
    def __init__(self, url: str, token: str | None = None, *, connections: int = 8,
                 ssl_context: ssl.SSLContext | bool | None = None, headers: dict | None = None):
        self.url = url.rstrip("/")
        self._headers = dict(headers or {})
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._connections = connections
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self.upload_encodings: list[str] | None = None  # what the server decodes (its `has` answer)

    def __repr__(self) -> str:
        return f"OriginClient({self.url})"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=_TIMEOUT, connector=connector,
                                                  read_bufsize=READ_BUFFER)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # --- plumbing --------------------------------------------------------------

    async def _request(self, method: str, path: str, *, with_headers: bool = False, manifest: bool = False,
                       statement: bool = False, **kw):
        limit = ((MAX_MANIFEST, "MAX_MANIFEST") if manifest else
                 (MAX_STATEMENT_BYTES, "MAX_STATEMENT_BYTES") if statement else (MAX_ANSWER, "MAX_ANSWER"))
        kw["headers"] = tracing.headers() | (kw.get("headers") or {})  # the current span's trace, if any
        try:
            async with self.session.request(method, self.url + path, **kw) as resp:
                body = await read_body(resp, limit[0], f"{method} {self.url}{path}", limit[1])
                if resp.status >= 400:
                    raise error_from(resp.status, body)
                return (body, resp.content_type, resp.headers) if with_headers else body
        except aiohttp.ClientError as e:
            raise TransferError(f"{method} {self.url}{path}: {e}") from None
        except asyncio.TimeoutError:
            raise TransferError(f"{method} {self.url}{path}: timed out") from None

    async def _json(self, method: str, path: str, **kw) -> Any:
        return decode_json(await self._request(method, path, **kw), what=f"the answer to {method} {path}")

    async def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """A JSON request to any endpoint (site agent APIs, tools)."""
        return await self._json(method, path, json=body)

    # --- registry ----------------------------------------------------------------

    async def artifacts(self) -> list[str]:
        return (await self._json("GET", f"{ARTIFACTS}"))["artifacts"]

    async def versions(self, artifact: str) -> list[dict]:
        return (await self._json("GET", f"{ARTIFACTS}/{artifact}/versions"))["versions"]

    async def manifest(self, artifact: str, version: str, base: ManifestBase | None = None) -> Manifest:
        """The manifest; with `base` (one we hold), fetched as a patch against it."""
        path = f"{ARTIFACTS}/{artifact}/versions/{version}"
        body, ctype, headers = await self._request("GET", path, with_headers=True, manifest=True,
                                                   params={"base": base.version} if base else None)
        try:
            body = read_manifest_body(body, ctype, headers, base)
        except BadFrame:
            if base is None:
                raise
            return await self.manifest(artifact, version)  # the patch did not check out: plain JSON
        m = Manifest.from_bytes(body)
        if digest.digest(body) != m.id:
            raise InvalidManifest(f"{self.url} sent {artifact}@{version} in a non-canonical form")
        if (m.artifact, m.version) != (artifact, version):
            raise InvalidManifest(f"{self.url} answered {artifact}@{version} with {m.artifact}@{m.version}")
        return m

    async def commit(self, manifest: Manifest, *, traceparent: str | None = None) -> str:
        """Commit `manifest`; `traceparent` (`fabric.tracing`) makes the origin's span and the
        version's events part of the publisher's trace."""
        path = f"{ARTIFACTS}/{manifest.artifact}/versions/{manifest.version}"
        headers = {"Content-Type": "application/json"} | ({tracing.HEADER: traceparent} if traceparent else {})
        body = await self._json("PUT", path, data=manifest.canonical(), headers=headers)
        return body["manifest_id"]

    async def channels(self, artifact: str) -> list[Channel]:
        body = await self._json("GET", f"{ARTIFACTS}/{artifact}/channels")
        return [_channel_from(artifact, c["channel"], json.dumps(c).encode()) for c in body["channels"]]

    async def channel(self, artifact: str, channel: str) -> Channel:
        body = await self._request("GET", f"{ARTIFACTS}/{artifact}/channels/{channel}")
        return _channel_from(artifact, channel, body)

    async def move_channel(self, artifact: str, channel: str, action: dict, *,
                           statement: dict | None = None) -> Channel:
        """Move a channel (`action`: the move's body); `statement`: its signed channel statement."""
        body = action if statement is None else dict(action, statement=statement)
        raw = await self._request("POST", f"{ARTIFACTS}/{artifact}/channels/{channel}", json=body)
        return _channel_from(artifact, channel, raw)

    async def promote(self, artifact: str, version: str, channel: str, *, statement: dict | None = None) -> Channel:
        return await self.move_channel(artifact, channel, {"action": "promote", "version": version},
                                       statement=statement)

    async def rollback(self, artifact: str, channel: str, *, steps: int | None = None,
                       to: str | None = None, statement: dict | None = None) -> Channel:
        body: dict = {"action": "rollback"}
        if steps is not None:
            body["steps"] = steps
        if to is not None:
            body["to"] = to
        return await self.move_channel(artifact, channel, body, statement=statement)

    async def stage(self, artifact: str, version: str, channel: str) -> Channel:
        """Stage `version` on the channel: sites fetch it, none activates it (never signed)."""
        return await self.move_channel(artifact, channel, {"action": "stage", "version": version})

    async def unstage(self, artifact: str, channel: str) -> Channel:
        return await self.move_channel(artifact, channel, {"action": "unstage"})

    # --- signed statements (docs/protocol.md: the origin stores them, never verifies them) ---------

    async def get_signature(self, artifact: str, version: str) -> bytes | None:
        """The version's envelope as the origin holds it (bytes, unverified), or None if it has none."""
        try:
            return await self._request("GET", f"{ARTIFACTS}/{artifact}/versions/{version}/signature",
                                       statement=True)
        except SignatureNotFound:
            return None

    async def put_signature(self, artifact: str, version: str, envelope: bytes) -> bytes:
        """Add a version envelope's signatures at the origin; the envelope it holds now."""
        return await self._request("PUT", f"{ARTIFACTS}/{artifact}/versions/{version}/signature",
                                   statement=True, data=envelope, headers={"Content-Type": ENVELOPE})

    async def get_trust(self) -> bytes | None:
        """The newest delegations envelope the origin holds (unverified), or None."""
        try:
            return await self._request("GET", TRUST, statement=True)
        except TrustNotFound:
            return None

    async def put_trust(self, envelope: bytes) -> int:
        """Publish a delegations envelope (admin); the version the origin now holds."""
        body = await self._json("PUT", TRUST, data=envelope, headers={"Content-Type": ENVELOPE})
        return body["version"]

    async def resolve(self, artifact: str, version: str | None, channel: str | None) -> str:
        """The version that `artifact@version`, `artifact:channel` or bare `artifact` names."""
        if version:
            return version
        if channel:
            ch = await self.channel(artifact, channel)
            if ch.version is None:
                raise ChannelNotFound(f"channel {artifact}:{channel} points at no version")
            return ch.version
        versions = await self.versions(artifact)
        if not versions:
            raise ArtifactNotFound(f"no artifact named {artifact!r} at {self.url}")
        return versions[-1]["version"]

    # --- sites ---------------------------------------------------------------------

    async def report_site(self, site: str, status: dict) -> None:
        await self._request("POST", f"{SITES}/{site}", json=status)

    async def sites(self) -> list[dict]:
        return (await self._json("GET", f"{SITES}"))["sites"]

    # --- chunks ------------------------------------------------------------------

    async def missing(self, ids: list[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(ids), MAX_IDS):
            body, _, headers = await self._request("POST", CHUNKS_HAS, with_headers=True,
                                                   json={"ids": ids[i:i + MAX_IDS]})
            out += decode_json(body, what="the answer to has")["missing"]
            self.upload_encodings = parse_encodings(headers.get(ENCODINGS_HEADER))
        return out

    async def upload(self, chunks: list[tuple[str, int, int, bytes]]) -> int:
        """Upload (id, encoding, raw size, payload) chunks in one stream; returns payload bytes sent."""
        stream = [frames.chunk_frame(cid, enc, size, payload) for cid, enc, size, payload in chunks]
        await self._request("POST", CHUNKS_UPLOAD, data=frames.encode_stream(stream),
                            headers={"Content-Type": CHUNK_STREAM})
        return sum(len(p) for *_, p in chunks)

    async def events(self, after: int = 0) -> AsyncIterator[tuple[str, dict]]:
        """Server-sent events as (event type, data); ends when the connection does.

        Each line and event is bounded (`fabric.wire.events.read_events`); a stream that
        breaks the rules raises `TransferError`, like a broken connection."""
        source = f"event stream from {self.url}"
        try:
            async with self.session.get(f"{self.url}{EVENTS}", params={"after": after}) as resp:
                if resp.status >= 400:
                    raise error_from(resp.status, await read_body(resp, MAX_ANSWER, source))
                async for item in read_events(resp.content.iter_any(), source=source):
                    yield item
        except aiohttp.ClientError as e:
            raise TransferError(f"{source}: {e}") from None
        except asyncio.TimeoutError:
            raise TransferError(f"{source}: timed out") from None


async def read_body(resp: aiohttp.ClientResponse, limit: int, what: str, name: str = "MAX_ANSWER") -> bytes:
    """`resp`'s body, refused with `TransferError` as soon as it passes `limit` bytes (the
    protocol's limit `name`)."""
    over = f"{what}: the answer is over {name} ({limit} bytes)"
    if resp.content_length is not None and resp.content_length > limit:
        raise TransferError(f"{over}: it says {resp.content_length}")
    body = bytearray()
    async for piece in resp.content.iter_any():
        body += piece
        if len(body) > limit:
            raise TransferError(over)
    return bytes(body)


def error_from(status: int, body: bytes) -> FabricError:
    """The typed error a server's JSON error body names (or a TransferError)."""
    try:
        obj = decode_json(body, what="an error body")
        return from_code(obj["code"], obj["message"])
    except (ValueError, KeyError, TypeError):
        return TransferError(f"HTTP {status}: {body[:200]!r}")


# --- publishing: a publisher has no older bytes, so it encodes standalone -------------------------------

def encode_upload(data: bytes | memoryview, dtype: str | None, *, allow_entropy: bool = True,
                  level: int = 3, encodings: Iterable[str] | None = None) -> tuple[int, int, bytes | memoryview]:
    """Frame fields for uploading one chunk standalone (byte planes for float tensors).

    `encodings` are those the origin advertised (its `has` answer); by default
    raw and zstd only, which every origin decodes.
    """
    allowed = [e for e in (encodings or ("raw", "zstd")) if e not in ("xor", "patch")]
    enc = codec.encode(data, dtype=dtype, reference=None, reference_id=None, level=level,
                       allow_entropy=allow_entropy, encodings=allowed)
    return enc.tag, enc.raw_size, enc.body


class UploadEncoder:
    """Encodes a publisher's new chunks for upload, under an `EncodePolicy`.

    `frames` encodes one upload's chunks (`STORED` mode sends them raw, tag 0);
    the caller reports the upload's payload bytes and seconds to `uploaded`. Safe to
    call from the publisher's worker threads.
    """

    def __init__(self, policy: EncodePolicy | None = None, *, level: int = 3):
        self.policy = policy or EncodePolicy(workers=2, fixed=encode_mode())
        self.level = level

    def frames(self, chunks: Iterable[tuple[str, bytes | memoryview, str | None]],
               encodings: Iterable[str] | None) -> list[tuple[str, int, int, bytes | memoryview]]:
        encodings = list(encodings or ("raw", "zstd"))
        out = []
        for chunk_id, data, dtype in chunks:
            mode = self.policy.choose()
            if mode == Mode.STORED:
                out.append((chunk_id, int(Encoding.RAW), len(data), data))
                self.policy.encoded(mode, len(data), len(data), 0.0)
                continue
            t0 = time.perf_counter()
            tag, raw_size, payload = encode_upload(data, dtype, allow_entropy=mode == Mode.FULL, level=self.level,
                                                   encodings=encodings)
            self.policy.encoded(mode, raw_size, len(payload), time.perf_counter() - t0, stored=len(data))
            out.append((chunk_id, tag, raw_size, payload))
        return out

    def uploaded(self, nbytes: int, seconds: float) -> None:
        self.policy.wrote(nbytes, seconds)


class SyncOrigin:
    """Blocking calls to an `OriginClient`, run on a private loop in a daemon thread."""

    def __init__(self, url: str, token: str | None = None, **kw):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fabric-client", daemon=True)
        self._thread.start()
        self.client = OriginClient(url, token, **kw)

    def run(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        self.run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name: str):
        """`sync.versions("m")` runs `client.versions("m")` and waits for it."""
        method = getattr(self.client, name)
        return lambda *a, **kw: self.run(method(*a, **kw))


class RemoteTarget:
    """A publish `Target` on an origin: ask what it lacks, upload only that, encoded by
    each chunk's dtype. Its `registry` reads the origin's versions and channels."""

    def __init__(self, origin: SyncOrigin):
        self.origin = origin
        self.registry = RemoteRegistry(origin)
        self.encoder = UploadEncoder()

    def offer(self, chunks: list[tuple[str, bytes]], dtypes: list[str | None] | None = None) -> list[int]:
        missing = set(self.origin.missing([cid for cid, _ in chunks]))
        todo = [(cid, data, dtype) for (cid, data), dtype in zip(chunks, dtypes or [None] * len(chunks))
                if cid in missing]
        sent: dict[str, int] = {}
        if todo:
            frames = self.encoder.frames(todo, self.origin.client.upload_encodings)
            t0 = time.perf_counter()
            self.origin.upload(frames)
            sent = {cid: len(payload) for cid, _, _, payload in frames}
            self.encoder.uploaded(sum(sent.values()), time.perf_counter() - t0)
        return [sent.get(cid, 0) for cid, _ in chunks]

    def flush(self) -> None:
        """Nothing to do: every `offer` has uploaded its chunks before returning."""

    def commit(self, manifest: Manifest) -> str:
        with tracing.span("publish.commit", artifact=manifest.artifact, version=manifest.version):
            return self.origin.commit(manifest, traceparent=tracing.traceparent())  # read in this thread

    def promote(self, artifact: str, version: str, channel: str) -> None:
        self.origin.promote(artifact, version, channel)


class RemoteRegistry:
    """The `Registry` calls the CLI makes (ls, show, promote, rollback), answered by an origin."""

    def __init__(self, origin: SyncOrigin):
        self.origin = origin

    def artifacts(self) -> list[str]:
        return self.origin.artifacts()

    def versions(self, artifact: str) -> list[str]:
        return [v["version"] for v in self.origin.versions(artifact)]

    def latest(self, artifact: str) -> str | None:
        vs = self.versions(artifact)
        return vs[-1] if vs else None

    def manifest(self, artifact: str, version: str) -> Manifest:
        return self.origin.manifest(artifact, version)

    def channels(self, artifact: str) -> list[Channel]:
        return self.origin.channels(artifact)

    def channel(self, artifact: str, channel: str) -> Channel:
        return self.origin.channel(artifact, channel)

    def promote(self, artifact: str, version: str, channel: str, *, statement: dict | None = None) -> Channel:
        return self.origin.promote(artifact, version, channel, statement=statement)

    def rollback(self, artifact: str, channel: str, *, steps: int | None = None,
                 to: str | None = None, statement: dict | None = None) -> Channel:
        return self.origin.rollback(artifact, channel, steps=steps, to=to, statement=statement)

    def stage(self, artifact: str, version: str, channel: str) -> Channel:
        return self.origin.stage(artifact, version, channel)

    def unstage(self, artifact: str, channel: str) -> Channel:
        return self.origin.unstage(artifact, channel)

    def manifest_id(self, artifact: str, version: str) -> str:
        return self.origin.manifest(artifact, version).id

    def signature(self, artifact: str, version: str) -> bytes | None:
        return self.origin.get_signature(artifact, version)

    def put_signature(self, artifact: str, version: str, envelope: bytes) -> bytes:
        return self.origin.put_signature(artifact, version, envelope)

    def trust(self) -> bytes | None:
        return self.origin.get_trust()

    def put_trust(self, envelope: bytes) -> int:
        return self.origin.put_trust(envelope)

    def resolve(self, artifact: str, *, version: str | None = None, channel: str | None = None) -> str:
        return resolve_ref(self, artifact, version=version, channel=channel, where=f" at {self.origin.client.url}")
