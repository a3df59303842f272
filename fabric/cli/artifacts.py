"""`fabric publish|pull|ls|show|promote|rollback|gc|fsck`: versions in a store or at an origin.

Each command parses its flags, calls one library function (fabric.publish, fabric.pull,
the registry, fabric.gc, fabric.fsck) and prints the result through fabric/cli/output.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import List, Optional

import typer

from fabric import fsck as fsck_mod
from fabric import gc as gc_mod
from fabric.cli.options import (JsonOpt, OriginOpt, S3EndpointOpt, S3KeyOpt, S3SecretOpt, StoreOpt, TokenOpt,
                                open_local_store, open_registry, open_target, parse_meta, parse_rate,
                                s3_options)
from fabric.cli.output import emit, errors, out, progress_bar, size, table
from fabric.config import load_client_config
from fabric.core.manifest import diff
from fabric.errors import InvalidInput
from fabric.publish import collect_files, publish as publish_fn
from fabric.pull import materialize, pull_remote
from fabric.store.registry import Registry, parse_ref
from fabric.transfer import FetchOptions
from fabric.wire.client import OriginClient, RemoteTarget

commands = typer.Typer()


@commands.command()
def publish(src: str = typer.Argument(..., help="File or folder to publish, or s3://BUCKET/PREFIX/."),
            artifact: str = typer.Option(..., "--artifact", "-a", help="Artifact name."),
            version: Optional[str] = typer.Option(None, help="Version name (default: UTC timestamp)."),
            channel: Optional[str] = typer.Option(None, help="Move this channel to the new version."),
            meta: List[str] = typer.Option([], "--meta", help="Metadata key=value (repeatable)."),
            store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
            token: Optional[str] = TokenOpt, as_json: bool = JsonOpt,
            s3_endpoint: Optional[str] = S3EndpointOpt, s3_access_key: Optional[str] = S3KeyOpt,
            s3_secret_key: Optional[str] = S3SecretOpt):
    """Publish SRC as a new immutable version of ARTIFACT (to --store or --origin).

    SRC may be objects in a bucket (s3://BUCKET/PREFIX/): they are streamed through
    chunking without a local copy.
    """
    with errors(as_json):
        metadata = parse_meta(meta)
        s3 = s3_options(s3_endpoint, s3_access_key, s3_secret_key)
        if src.startswith("s3://"):
            from fabric.s3source import list_sources
            source = list_sources(src, s3=s3)
            total = sum(s.size for s in source)
        else:
            source, total = src, sum(p.stat().st_size for _, p in collect_files(Path(src)))
        with open_target(store, origin, token, s3) as target, \
                progress_bar(total, f"publish {artifact}", as_json) as progress:
            r = publish_fn(source, artifact=artifact, target=target, version=version,
                           channel=channel, metadata=metadata, progress=progress)
        report = r.to_json()
        report["bytes_sent"] = r.written_bytes if isinstance(target, RemoteTarget) else 0

        def human():
            out.print(f"published [bold]{r.artifact}@{r.version}[/bold]"
                      + (f" → channel {r.channel}" if r.channel else ""))
            out.print(f"  files {r.files}, {size(r.bytes)} in {r.chunks} chunks; "
                      f"new {size(r.new_bytes)} ({r.new_chunks} chunks, {size(r.written_bytes)} stored or sent); "
                      f"deduplicated {r.dedup_ratio:.1%}; {r.seconds:.2f}s")
        emit(report, as_json, human)


@commands.command()
def pull(ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME:CHANNEL."),
         dest: str = typer.Argument(..., help="Folder to write the version into."),
         force: bool = typer.Option(False, "--force", help="Replace a non-empty DEST."),
         connections: int = typer.Option(4, help="Parallel connections (with --origin)."),
         max_rate: Optional[str] = typer.Option(None, "--max-rate", help="Bandwidth cap, e.g. 100M (bytes/s)."),
         copy: bool = typer.Option(False, "--copy", help="With --origin: the store keeps its own copy of "
                                   "each fetched chunk instead of sharing DEST's files (hard links)."),
         store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
         token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Write a version's files into DEST, byte for byte (fetching missing chunks from --origin).

    With --origin, each fetched chunk is written once, into DEST, and the store shares
    DEST's files through hard links (packs) where it is on the same file system, so a
    later pull reuses them. A program that then rewrites a DEST file in place spoils the
    store's copy: Fabric detects that and fetches those chunks again.
    """
    with errors(as_json):
        t0 = time.monotonic()
        cfg = load_client_config(store=store, origin=origin, token=token)
        s = open_local_store(store, create=bool(origin or cfg.origin))
        artifact, version, channel = parse_ref(ref)
        if origin or cfg.origin:
            report = _pull_remote(cfg, s, artifact, version, channel, dest, force, connections,
                                  parse_rate(max_rate), copy, as_json)
        else:
            reg = Registry(s)
            version = reg.resolve(artifact, version=version, channel=channel)
            m = reg.manifest(artifact, version)
            with progress_bar(m.size, f"pull {artifact}@{version}", as_json) as progress:
                materialize(s, m, dest, overwrite=force, progress=progress)
            report = {"artifact": artifact, "version": version, "manifest_id": m.id, "dest": dest,
                      "files": len(m.files), "bytes": m.size, "chunks_fetched": 0,
                      "chunks_reused": len(m.unique_chunks()), "bytes_received": 0, "bytes_raw": 0,
                      "wire_ratio": None, "packed": False,
                      "seconds": round(time.monotonic() - t0, 3)}
        emit(report, as_json, lambda: out.print(
            f"pulled [bold]{artifact}@{report['version']}[/bold] into {dest}: {report['files']} files, "
            f"{size(report['bytes'])}; fetched {report['chunks_fetched']} chunks "
            f"({size(report['bytes_received'])} on the wire), reused {report['chunks_reused']}"))


def _pull_remote(cfg, s, artifact, version, channel, dest, force, connections, max_rate, copy, quiet) -> dict:
    async def run():
        async with OriginClient(cfg.origin, cfg.token, connections=connections) as client:
            label = f"pull {artifact}" + (f"@{version}" if version else f":{channel}" if channel else "")
            with progress_bar(None, label, quiet) as progress:
                result, _ = await pull_remote(client, s, artifact, dest, version=version, channel=channel,
                                              overwrite=force, progress=progress, copy=copy,
                                              options=FetchOptions(connections=connections, max_rate=max_rate),
                                              on_manifest=progress and (lambda m: progress.set_total(m.size)))
            return result.to_json()
    return asyncio.run(run())


@commands.command("ls")
def ls(name: Optional[str] = typer.Argument(None, help="Artifact to list versions of."),
       store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
       token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """List artifacts, or the versions and channels of one artifact."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        if name is None:
            rows = [{"artifact": a, "versions": len(reg.versions(a)), "latest": reg.latest(a),
                     "channels": {c.name: c.version for c in reg.channels(a)}} for a in reg.artifacts()]
            cols = ["artifact", "versions", "latest", "channels"]
        else:
            chans = reg.channels(name)
            rows = []
            for v in reg.versions(name):
                m = reg.manifest(name, v)
                rows.append({"version": v, "created": m.created, "files": len(m.files), "bytes": m.size,
                             "channels": [c.name for c in chans if c.version == v]})
            if not rows:
                reg.resolve(name)  # raises artifact_not_found
            cols = ["version", "created", "files", "bytes", "channels"]
        emit({"items": rows}, as_json, lambda: table(cols, rows))


@commands.command()
def show(ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME:CHANNEL."),
         store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
         token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Files, tensors, chunks and parent of a version, and what changed vs its parent."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        artifact, version, channel = parse_ref(ref)
        version = reg.resolve(artifact, version=version, channel=channel)
        m = reg.manifest(artifact, version)
        parent = reg.manifest(artifact, m.parent) if m.parent and m.parent in reg.versions(artifact) else None
        d = diff(parent, m)
        obj = {"manifest_id": m.id, "manifest": m.to_json(), "changes_vs_parent": d.to_json(),
               "channels": {c.name: c.version for c in reg.channels(artifact)}}

        def human():
            out.print(f"[bold]{artifact}@{version}[/bold]  {m.id}")
            out.print(f"  created {m.created}, parent {m.parent or '-'}, metadata {m.metadata or '-'}")
            out.print(f"  {len(m.files)} files, {size(m.size)}, {len(m.unique_chunks())} unique chunks, "
                      f"{len(m.tensors)} tensors")
            table(["path", "size", "chunks", "mode"],
                   [{"path": f.path, "size": size(f.size), "chunks": len(f.chunks), "mode": oct(f.mode)}
                    for f in m.files])
            out.print(f"  vs parent: +{len(d.files_added)} -{len(d.files_removed)} ~{len(d.files_changed)} files, "
                      f"{len(d.tensors_changed)} tensors changed, {d.new_chunks} new chunks ({size(d.new_bytes)})")
            for t in d.tensors_changed[:20]:
                out.print(f"    changed {t}")
        emit(obj, as_json, human)


@commands.command()
def promote(ref: str = typer.Argument(..., help="NAME@VERSION"),
            channel: str = typer.Option(..., "--channel", "-c"),
            store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
            token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Point CHANNEL at a version."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("promote needs NAME@VERSION")
        ch = reg.promote(artifact, version, channel)
        emit(ch.to_json(), as_json, lambda: out.print(f"{artifact}:{channel} → {ch.version}"))


@commands.command()
def rollback(name: str = typer.Argument(..., help="Artifact name."),
             channel: str = typer.Option(..., "--channel", "-c"),
             store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
             token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Move CHANNEL back to the version it pointed at before the last promotion."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        ch = reg.rollback(name, channel)
        emit(ch.to_json(), as_json, lambda: out.print(f"{name}:{channel} → {ch.version} (rolled back)"))


@commands.command()
def gc(keep: int = typer.Option(..., "--keep", help="Versions to keep per artifact."),
       dry_run: bool = typer.Option(False, "--dry-run"),
       grace: float = typer.Option(3600.0, help="Spare chunks younger than this (seconds)."),
       store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Delete old versions and the chunks no remaining version needs."""
    with errors(as_json):
        r = gc_mod.gc(open_local_store(store), keep=keep, grace=grace, dry_run=dry_run)
        emit(r.to_json(), as_json, lambda: out.print(
            f"{'would delete' if dry_run else 'deleted'} {len(r.versions_deleted)} versions, "
            f"{r.manifests_deleted} manifests, {r.chunks_deleted} chunks, {r.packs_deleted} packs "
            f"({size(r.bytes_freed)})"))


@commands.command()
def fsck(repair: bool = typer.Option(False, "--repair", help="Remove bad chunks and temp files."),
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Verify every chunk, manifest and version in a store."""
    with errors(as_json):
        r = fsck_mod.fsck(open_local_store(store), repair=repair)

        def human():
            out.print(f"{r.chunks} chunks, {r.manifests} manifests, {r.versions} versions checked")
            for c in r.bad_chunks:
                out.print(f"  [red]bad chunk[/red] {c}" + (" (removed)" if repair else ""))
            for v in r.bad_versions:
                out.print(f"  [red]incomplete version[/red] {v}")
            out.print("[green]ok[/green]" if r.ok else "[red]problems found[/red]")
        emit(r.to_json(), as_json, human)
        if not r.ok and not repair:
            raise typer.Exit(1)
