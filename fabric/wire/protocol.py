"""The wire's facts: every path, header, content type, limit and frame layout constant.

Server and client of Fabric's HTTP protocol (docs/protocol.md) share this module, so
each fact is written once. Limits that other layers enforce too (`MAX_CHUNK`) come
from `fabric.core.limits` and are re-exported here beside the wire's own. Constants
only: no I/O.
"""

from __future__ import annotations

import struct

from fabric.core.codec import Encoding
from fabric.core.limits import MAX_CHUNK, MAX_MANIFEST

# --- paths ---------------------------------------------------------------------------------

API = "/v1"
ARTIFACTS = f"{API}/artifacts"  # …/{a}/versions[/{v}[/signature]], …/{a}/channels[/{c}]
TRUST = f"{API}/trust"  # the newest delegations envelope (docs/protocol.md "GET /v1/trust")
CHUNKS_HAS = f"{API}/chunks/has"
CHUNKS_FETCH = f"{API}/chunks/fetch"
CHUNKS_UPLOAD = f"{API}/chunks/upload"
EVENTS = f"{API}/events"
SITES = f"{API}/sites"  # …/{site}: a site agent's report
SITE = f"{API}/site"  # a site agent's own API: status, pins
SITE_PINS = f"{SITE}/pins"
WORKERS = f"{SITE}/workers"  # a site agent's rollout API, used by agents.worker.hotloader
MANIFESTS = f"{SITE}/manifests"
UI = "/ui"  # the status page's files (fabric.wire.ui): public, like the probes; its data needs a token

# --- content types and headers -------------------------------------------------------------

CHUNK_STREAM = "application/x-fabric-chunks"
ENVELOPE = "application/vnd.fabric.envelope+json"  # a signed statement's DSSE envelope (canonical JSON)
MANIFEST_PATCH = "application/x-fabric-manifest-patch"  # Content-Type of a patched manifest
ENCODINGS_HEADER = "X-Fabric-Encodings"  # on a `has` answer: what the server decodes in uploads
BASE_HEADER = "X-Fabric-Manifest-Base"  # the id of the manifest a patch is against
MANIFEST_ID_HEADER = "X-Fabric-Manifest-Id"  # the id of the manifest in the body
PEER_HEADER = "X-Fabric-Peer"  # from a sibling site: "answer from what you hold; do not fetch upstream for me"
WAIT_HEADER = "X-Fabric-Wait"  # on a fetch: "1" = the client reads wait frames (a relay still fetching a chunk)

ENCODINGS = tuple(e.name.lower() for e in Encoding)  # what this side decodes, by name

# --- limits --------------------------------------------------------------------------------

MAX_PAYLOAD = MAX_CHUNK + (1 << 20)  # an encoded chunk may be a little larger than raw
MAX_IDS = 4096  # ids per has/fetch request
MAX_JSON = 8 << 20  # largest JSON request body
MAX_HAVE = 8  # versions a request may name in `have` (more are ignored)
MAX_ANSWER = 64 << 20  # largest JSON answer a client reads (a manifest: MAX_MANIFEST)
MAX_EVENT = 1 << 20  # largest server-sent event (its lines together) a follower reads

# --- what a server gives each connection (fabric.wire.connections; docs/protocol.md "Limits") ---

MAX_CONNECTIONS = 1024  # open connections per server (fewer if the open-file limit is low)
MAX_CONNECTIONS_PER_PEER = 128  # open connections from one IP address
HEADER_TIMEOUT = 20.0  # seconds from a request's first byte (or the connection's start) to its last header
BODY_TIMEOUT = 20.0  # seconds over which a request body, while the server waits for it, must reach …
BODY_MIN_RATE = 1024  # … this many bytes per second
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may wait for its next request

# --- the chunk stream's frame layout ---------------------------------------------------------

MAGIC = b"FBC1"
FRAME_END, FRAME_CHUNK, FRAME_MISSING = 0, 1, 2
FRAME_WAIT = 3  # a relay is still fetching this chunk upstream (only to a fetch that sent WAIT_HEADER)
WAIT_INTERVAL = 1.0  # seconds: a relay sends a wait frame after this long without sending anything
CHUNK_HEAD = struct.Struct(">32sBII")  # id, encoding, raw size, payload length (after the kind byte)
END = struct.Struct(">I")  # frame count (after the kind byte)
FRAME_OVERHEAD = 1 + CHUNK_HEAD.size  # a chunk frame's bytes before its payload

__all__ = [
    "API", "ARTIFACTS", "TRUST", "ENVELOPE", "CHUNKS_HAS", "CHUNKS_FETCH", "CHUNKS_UPLOAD", "EVENTS", "SITES", "SITE", "SITE_PINS",
    "WORKERS", "MANIFESTS", "UI", "CHUNK_STREAM", "MANIFEST_PATCH", "ENCODINGS_HEADER", "BASE_HEADER",
    "MANIFEST_ID_HEADER", "PEER_HEADER", "WAIT_HEADER", "ENCODINGS", "MAX_CHUNK", "MAX_MANIFEST", "MAX_PAYLOAD", "MAX_IDS", "MAX_JSON",
    "MAX_HAVE", "MAX_ANSWER", "MAX_EVENT", "MAX_CONNECTIONS", "MAX_CONNECTIONS_PER_PEER",
    "HEADER_TIMEOUT", "BODY_TIMEOUT", "BODY_MIN_RATE", "IDLE_TIMEOUT", "MAGIC", "FRAME_END", "FRAME_CHUNK", "FRAME_MISSING", "FRAME_WAIT", "WAIT_INTERVAL", "CHUNK_HEAD", "END", "FRAME_OVERHEAD",
]
