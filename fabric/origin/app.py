"""The origin server: where versions live and every site ultimately fetches from.

Routes (all JSON unless noted; docs/protocol.md has the full list with examples):

    GET  /v1/artifacts                                   artifacts the token may see
    GET  /v1/artifacts/{a}/versions                      versions, oldest first
    GET  /v1/artifacts/{a}/versions/{v}                  the manifest (canonical JSON)
    PUT  /v1/artifacts/{a}/versions/{v}                  commit a manifest (publish)
    GET  /v1/artifacts/{a}/channels                      channels with history
    GET  /v1/artifacts/{a}/channels/{c}                  one channel
    POST /v1/artifacts/{a}/channels/{c}                  {"action": "promote", "version": v} | {"action": "rollback"}
                                                         (+ "statement": the move's signed channel statement)
                                                         | {"action": "stage", "version": v} | {"action": "unstage"}
    GET  /v1/artifacts/{a}/versions/{v}/signature        the version's signed statement (fabric.origin.signatures)
    PUT  /v1/artifacts/{a}/versions/{v}/signature        keep a signed statement for it
    GET  /v1/trust, PUT /v1/trust                        the newest delegations envelope
    POST /v1/chunks/has                                  {"ids": [...]} -> {"missing": [...]}
    POST /v1/chunks/fetch                                {"ids": [...]} -> chunk stream (binary)
    POST /v1/chunks/upload                               chunk stream -> {"stored": n, "bytes": b}
    GET  /v1/events?after=SEQ                            server-sent events: new versions, channel moves
    POST /v1/sites/{site}                                a site agent reports its state
    GET  /v1/sites                                       every site's last report (fabric status)
    GET  /ui/                                            the live status page (fabric.wire.ui; public files)

Blocking store work runs in threads; handlers only parse, check and move bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import time

from aiohttp import web

from fabric.wire import frames
from fabric.wire.auth import TokenTable, visible_report
from fabric.wire.chunks import FRAMES, INDEX, chunk_routes, upload_references
from fabric.wire.warming import Warmer, warming
from fabric.config import encode_mode
from fabric.core.policy import Mode
from fabric.store.chunk_index import ChunkIndex, RegistrySource
from fabric.wire.negotiate import serve_manifest
from fabric.wire.protocol import ARTIFACTS, CHUNKS_UPLOAD, EVENTS as EVENTS_PATH, SITES as SITES_PATH
from fabric.errors import BadFrame, Forbidden, InvalidInput, InvalidManifest
from fabric.wire.events import EventLog, sse_handler
from fabric.wire.site_reports import split_report
from fabric.wire.ui import ui_routes
from fabric.logs import get_logger
from fabric.core.manifest import Manifest, check_name
from fabric.origin.metrics import OriginMetrics
from fabric.origin.peers import MoveWatch, SharingOptions, move_watch, watching
from fabric.origin.relayed import keep_relayed
from fabric.origin.signatures import signature_routes
from fabric.origin.sitereports import StoredReports, keeping
from fabric.core.lru import LRU
from fabric import tracing
from fabric.origin.quotas import REPORTS, UPLOADS, OriginLimits, QuotaMetrics, SiteReports, UploadQuota, sweeper
from fabric.store.registry import Registry
from fabric import logs
from fabric.wire.server import METRICS, STORE, add_metrics_listener, base_app, principal, read_json, run_until_signalled
from fabric.store.store import Store

log = get_logger("origin")
EVENTS = web.AppKey("events", EventLog)
REGISTRY = web.AppKey("registry", Registry)
SITES = web.AppKey("sites", dict)
SITE_METRICS = web.AppKey("site_metrics", OriginMetrics)
MOVES = web.AppKey("moves", MoveWatch)  # the store's move log (fabric.origin.peers), where origins share one
STORED = web.AppKey("stored_reports", StoredReports)  # site reports kept in the store (fabric.origin.sitereports)
TRACES = web.AppKey("traces", LRU)  # (artifact, version) -> the traceparent its commit came with
WARMER = web.AppKey("warmer", Warmer)  # encodes new versions' deltas before the first site asks
_UPLOAD_AHEAD = 4  # uploaded chunks being verified and stored while the next is read


def create_app(store: Store, tokens: TokenTable, limits: OriginLimits | None = None,
               sharing: SharingOptions | None = None) -> web.Application:
    app = base_app(store=store, tokens=tokens, refresh_metrics=lambda: app[SITE_METRICS].refresh(app[SITES],
                                                                                                   app[REGISTRY]))
    app[SITE_METRICS] = OriginMetrics(app[METRICS].registry)
    app[TRACES] = LRU(4096)
    app[REGISTRY] = Registry(store)
    app[EVENTS] = EventLog()
    app.on_shutdown.append(lambda a: a[EVENTS].close())
    app[SITES] = {}
    quota_metrics, limits = QuotaMetrics(app[METRICS].registry), limits or OriginLimits()
    app[UPLOADS], app[REPORTS] = UploadQuota(limits, quota_metrics), SiteReports(app[SITES], quota_metrics)
    app.cleanup_ctx.append(sweeper(store, limits, quota_metrics))  # collects orphaned uploads
    sharing = sharing or SharingOptions()
    watch = move_watch(store, app[EVENTS], app[METRICS].registry, sharing)  # other origins' moves, as events
    if watch is not None:
        app[MOVES] = watch
    app.cleanup_ctx.append(watching(MOVES))
    app[STORED] = StoredReports(store, app[SITES], app[REPORTS], app[METRICS].registry, save=sharing.report_save,
                                refresh=sharing.report_refresh,
                                changed=lambda site: app[EVENTS].append({"type": "site", "site": site}))
    app.cleanup_ctx.append(keeping(STORED))  # reports outlive the process (fabric.origin.sitereports)
    chunk_routes(app, index=ChunkIndex(RegistrySource(app[REGISTRY])))  # who may see which chunk
    app[WARMER] = Warmer(app[REGISTRY], app[FRAMES], app[METRICS].registry, enabled=encode_mode() != Mode.STORED)
    app.cleanup_ctx.append(warming(WARMER, EVENTS))  # fabric.wire.warming: follows the event log
    r = app.router
    r.add_get(ARTIFACTS, list_artifacts)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/versions", list_versions)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/versions/{{version}}", get_manifest)
    r.add_put(f"{ARTIFACTS}/{{artifact}}/versions/{{version}}", commit_manifest)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/channels", list_channels)
    r.add_get(f"{ARTIFACTS}/{{artifact}}/channels/{{channel}}", get_channel)
    r.add_post(f"{ARTIFACTS}/{{artifact}}/channels/{{channel}}", move_channel)
    signature_routes(app, REGISTRY)
    r.add_post(CHUNKS_UPLOAD, upload_chunks)
    r.add_get(SITES_PATH, list_sites)
    r.add_post(f"{SITES_PATH}/{{site}}", report_site)
    r.add_get(EVENTS_PATH, sse_handler(EVENTS, require=lambda req: principal(req).require("pull"),
                                                  visible=_event_visible))
    ui_routes(app, role="origin", status=SITES_PATH, events=EVENTS_PATH)  # the status page, /ui/
    return app


def _event_visible(request: web.Request, event: dict) -> bool:
    """A `site` event goes to whoever may read that site's report (`list_sites`), others by artifact."""
    p = principal(request)
    if event.get("type") == "site":
        return p.admin or p.site == event.get("site")
    return p.may("pull", event.get("artifact"))


def _artifact(request: web.Request, *scopes: str) -> str:
    """The path's artifact, if the token may do one of `scopes` on it (else Forbidden)."""
    artifact = check_name("artifact", request.match_info["artifact"])
    principal(request).require_any(scopes, artifact)
    return artifact


async def list_artifacts(request: web.Request) -> web.Response:
    p = principal(request)
    names = await asyncio.to_thread(request.app[REGISTRY].artifacts)
    return web.json_response({"artifacts": [a for a in names if p.may("pull", a)]})


async def list_versions(request: web.Request) -> web.Response:
    artifact = _artifact(request, "pull", "publish")  # a publisher finds its parent version here
    reg: Registry = request.app[REGISTRY]

    def load():
        return [{"version": v, "manifest_id": reg.manifest_id(artifact, v),
                 "created": reg.manifest(artifact, v).created} for v in reg.versions(artifact)]
    return web.json_response({"artifact": artifact, "versions": await asyncio.to_thread(load)})


async def get_manifest(request: web.Request) -> web.Response:
    artifact = _artifact(request, "pull")
    version = check_name("version", request.match_info["version"])
    reg: Registry = request.app[REGISTRY]
    base = request.query.get("base")  # a version the client holds: answer with a patch against it
    body, ctype, headers = await asyncio.to_thread(serve_manifest, reg.store, artifact, version, base)
    return web.Response(body=body, content_type=ctype, headers=headers)


async def commit_manifest(request: web.Request) -> web.Response:
    artifact = _artifact(request, "publish")
    version = check_name("version", request.match_info["version"])
    manifest = Manifest.from_bytes(await request.read())
    if (manifest.artifact, manifest.version) != (artifact, version):
        raise InvalidManifest(f"manifest is for {manifest.artifact}@{manifest.version}, URL says {artifact}@{version}")
    with tracing.span("origin.commit", parent=request.headers.get(tracing.HEADER), artifact=artifact,
                      version=version):
        mid = await asyncio.to_thread(request.app[REGISTRY].commit, manifest)
        trace = tracing.traceparent() or request.headers.get(tracing.HEADER)  # passed on, traced here or not
    request.app[UPLOADS].settle(manifest.chunk_ids())
    request.app[INDEX].add(artifact, version, manifest.chunk_ids())
    log.info("version committed", artifact=artifact, version=version, manifest_id=mid,
             by=principal(request).name)
    event = {"type": "version", "artifact": artifact, "version": version, "manifest_id": mid}
    if trace:
        request.app[TRACES].put((artifact, version), trace)
        event["traceparent"] = trace
    request.app[EVENTS].append(event)
    await _share(request, event)
    return web.json_response({"artifact": artifact, "version": version, "manifest_id": mid}, status=201)


async def list_channels(request: web.Request) -> web.Response:
    artifact = _artifact(request, "pull", "publish")
    chans = await asyncio.to_thread(request.app[REGISTRY].channels, artifact)
    return web.json_response({"artifact": artifact, "channels": [c.to_json() for c in chans]})


async def get_channel(request: web.Request) -> web.Response:
    artifact = _artifact(request, "pull", "publish")  # a publisher's parent: the channel's version
    ch = await asyncio.to_thread(request.app[REGISTRY].channel, artifact, request.match_info["channel"])
    return web.json_response(ch.to_json())


async def move_channel(request: web.Request) -> web.Response:
    artifact = _artifact(request, "publish")
    channel = check_name("channel", request.match_info["channel"])
    body = await read_json(request)
    reg: Registry = request.app[REGISTRY]
    action, statement = body.get("action"), body.get("statement")  # statement: checked, never verified
    if action == "promote":
        version = check_name("version", body.get("version"))
        ch = await asyncio.to_thread(reg.promote, artifact, version, channel, statement=statement)
    elif action == "rollback":
        steps, to = body.get("steps"), body.get("to")
        if to is not None and not isinstance(to, str):
            raise InvalidInput("'to' must be a version name")
        ch = await asyncio.to_thread(reg.rollback, artifact, channel, steps=steps, to=to, statement=statement)
    elif action == "stage":  # fetched by the sites, activated by none (docs/protocol.md "Staged versions")
        version = check_name("version", body.get("version"))
        if statement is not None:
            raise InvalidInput("a stage is not signed: it activates nothing (drop 'statement')")
        ch = await asyncio.to_thread(reg.stage, artifact, version, channel)
    elif action == "unstage":
        ch = await asyncio.to_thread(reg.unstage, artifact, channel)
    else:
        raise InvalidInput("'action' must be 'promote', 'rollback', 'stage' or 'unstage'")
    log.info("channel moved", artifact=artifact, channel=channel, version=ch.version, action=action,
             signed=statement is not None, sequence=ch.sequence, staged=ch.staged_version, by=principal(request).name)
    event = {"type": "channel", "artifact": artifact, "channel": channel, "version": ch.version, "action": action}
    if ch.staged is not None:
        event["staged"] = ch.staged_version
    trace = request.app[TRACES].get((artifact, ch.version))  # the version's trace, for the sites' deploys
    request.app[EVENTS].append(event | ({"traceparent": trace} if trace else {}))
    await _share(request, event | ({"traceparent": trace} if trace else {}))
    return web.json_response(ch.to_json())


async def _share(request: web.Request, event: dict) -> None:
    """Tell the other origins of this store (its move log, `fabric.origin.peers`), if they share one."""
    watch = request.app.get(MOVES)
    if watch is not None:
        await watch.record(event)


async def report_site(request: web.Request) -> web.Response:
    """A site agent's status report: only under a token marked as that site's (`site` in the
    token file), or an admin token."""
    site = check_name("site", request.match_info["site"])
    p = principal(request)
    if not p.speaks_for(site):
        raise Forbidden(f"token {p.name!r} may not report for site {site!r}")
    body, size = await request.app[REPORTS].read(request)  # bounded (fabric.origin.quotas)
    own, relayed = split_report(body)  # a relay's report carries its subtree's (fabric.wire.site_reports)
    sites: dict = request.app[SITES]

    def changed(name: str, previous: dict | None, new: dict) -> None:
        substance = previous is None or _substance(previous) != _substance(new)
        if substance:
            request.app[EVENTS].append({"type": "site", "site": name})  # the status page re-reads /v1/sites
        request.app[STORED].touched(name, substance)  # and into the store
    if own is not None:
        request.app[REPORTS].admit(site, max(1, size - sum(r.size for r in relayed)))
        previous = sites.get(site)
        sites[site] = dict(own, site=site, received=time.time())
        changed(site, previous, sites[site])
    keep_relayed(sites, request.app[REPORTS], site, relayed, changed)  # fabric.origin.relayed
    return web.json_response({"ok": True})


_CLOCKS = ("at", "received", "seen_s_ago", "age_s")  # what changes in every report: not a reason for a `site` event


def _substance(report: object) -> object:
    """A report without its clock readings, at any depth, to compare with the last one."""
    if isinstance(report, dict):
        return {k: _substance(v) for k, v in report.items() if k not in _CLOCKS}
    if isinstance(report, list):
        return [_substance(v) for v in report]
    return report


async def list_sites(request: web.Request) -> web.Response:
    """Every site's report for an admin; for another token, its own site's (`site` in the token
    file), with only the artifacts it may pull."""
    p = principal(request)
    sites = [visible_report(p, r) for r in request.app[SITES].values() if p.admin or r["site"] == p.site]
    return web.json_response({"sites": sorted(sites, key=lambda s: s["site"])})


async def upload_chunks(request: web.Request) -> web.Response:
    """Receive a chunk stream; verify each chunk against its id before storing it.

    A few chunks are decoded, verified and stored in threads while the next frames
    are read (on an S3 store each put is a round trip).
    """
    principal(request).require("publish")
    store: Store = request.app[STORE]
    metrics = request.app[METRICS]
    sizes: list[int] = []  # payload bytes of each chunk stored
    storing: set[asyncio.Task] = set()
    try:
        async for frame in frames.FrameReader(request.content.readexactly):
            if frame.kind != frames.FRAME_CHUNK:
                raise BadFrame("an upload may contain only chunk frames")
            request.app[UPLOADS].charge(principal(request).name, frame.chunk_id, len(frame.payload))
            refs = await upload_references(request, frame)  # only chunks this token may pull
            storing.add(asyncio.create_task(asyncio.to_thread(_store_upload, store, frame, refs)))
            if len(storing) >= _UPLOAD_AHEAD:
                done, storing = await asyncio.wait(storing, return_when=asyncio.FIRST_COMPLETED)
                sizes += [t.result() for t in done]
    finally:
        for t in asyncio.as_completed(storing):
            sizes.append(await t)
        metrics.chunks_in.inc(len(sizes))
        metrics.bytes_in.inc(sum(sizes))
    return web.json_response({"stored": len(sizes), "bytes": sum(sizes)})


def _store_upload(store: Store, frame: frames.Frame, references: frames.References) -> int:
    """Decode an uploaded frame, check it against its id, store it; its payload size. In a thread."""
    data = frames.decode_frame(frame, references=references)  # byte planes too (docs/encodings.md)
    store.put_chunk(frame.chunk_id, data, verified=True)
    return len(frame.payload)


def run_origin(*, store: Store, listen: str, tokens: TokenTable, tls: ssl.SSLContext | None = None,
               metrics_listen: str | None = None, limits: OriginLimits | None = None,
               sharing: SharingOptions | None = None) -> None:
    """Serve until signalled; `metrics_listen` ("HOST:PORT") adds a token-free /metrics listener."""
    logs.bind("origin")
    tracing.setup("fabric-origin")
    app = create_app(store, tokens, limits, sharing)
    add_metrics_listener(app, metrics_listen)
    asyncio.run(run_until_signalled(app, listen, tls, "origin"))
