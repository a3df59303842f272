"""`fabric publish|pull|ls|show|promote|stage|rollback|gc|fsck`: versions in a store or at an origin.

Each command parses its flags, calls one library function (fabric.publish, fabric.pull,
the registry, fabric.gc, fabric.fsck) and prints the result through fabric/cli/output.py.
What only a command that talks to an origin needs (fabric.pull's fetch, fabric.transfer,
fabric.wire.client, asyncio) is imported inside it, so a local command starts without
aiohttp (fabric/cli/options.py says why).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import List, Optional

import typer

from fabric import fsck as fsck_mod
from fabric import gc as gc_mod
from fabric.cli.options import (JsonOpt, OriginOpt, S3EndpointOpt, S3KeyOpt, S3SecretOpt, StoreOpt, TokenOpt,
                                open_local_store, open_registry, open_target, parse_meta, parse_rate,
                                s3_options, uses_origin)
from fabric.cli import exits
from fabric.cli.signing import ExpiryOpt, SignKeyOpt, TrustOpt, load_trust, signer, warn_unsigned
from fabric.cli.dryrun import DryRunTarget, existing_store, local_holds, publish_plan, pull_plan, remote_holds
from fabric.cli.output import emit, errors, esc, out, progress_bar, size, table
from fabric.config import load_client_config
from fabric.core.manifest import diff
from fabric.errors import InvalidInput
from fabric.publish import collect_files, publish as publish_fn
from fabric.signing import SigningTarget, check_origin, check_ref
from fabric.store.registry import Registry, parse_ref

commands = typer.Typer()


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar and no report (errors still go to "
                        "stderr; --json still prints its report).")


@commands.command()
def publish(src: str = typer.Argument(..., help="File or folder to publish, or s3://BUCKET/PREFIX/."),
            artifact: str = typer.Option(..., "--artifact", "-a", help="Artifact name."),
            version: Optional[str] = typer.Option(None, help="Version name (default: UTC timestamp)."),
            channel: Optional[str] = typer.Option(None, help="Move this channel to the new version."),
            meta: List[str] = typer.Option([], "--meta", help="Metadata key=value (repeatable)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Read and hash SRC, and report the chunks and "
                                         "bytes that are new vs already held where it would go; store nothing."),
            quiet: bool = QuietOpt, sign_key: Optional[str] = SignKeyOpt, statement_expiry: str = ExpiryOpt,
            store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
            token: Optional[str] = TokenOpt, as_json: bool = JsonOpt,
            s3_endpoint: Optional[str] = S3EndpointOpt, s3_access_key: Optional[str] = S3KeyOpt,
            s3_secret_key: Optional[str] = S3SecretOpt):
    """Publish SRC as a new immutable version of ARTIFACT (to --store or --origin).

    SRC may be objects in a bucket (s3://BUCKET/PREFIX/): they are streamed through
    chunking without a local copy. With --sign-key, the committed version is signed and
    the channel moved with a signed statement (sequence + 1, valid for --statement-expiry).
    """
    with errors(as_json):
        metadata = parse_meta(meta)
        sig = None if dry_run else signer(sign_key, statement_expiry)  # a bad key fails before any upload
        s3 = s3_options(s3_endpoint, s3_access_key, s3_secret_key)
        if src.startswith("s3://"):
            from fabric.s3source import list_sources
            source = list_sources(src, s3=s3)
            total = sum(s.size for s in source)
        else:
            source, total = src, sum(p.stat().st_size for _, p in collect_files(Path(src)))
        if dry_run:
            return _publish_dry(source, total, artifact, version, channel, metadata, store, origin, token, s3,
                                quiet, as_json)
        from fabric import tracing
        remote = uses_origin(load_client_config(store=store, origin=origin, token=token), store, origin)
        tracing.setup("fabric-publish")  # with FABRIC_TRACES_FILE (and the tracing extra): the version's trace
        with open_target(store, origin, token, s3) as target, \
                progress_bar(total, f"publish {artifact}", quiet) as progress, \
                tracing.span("publish", artifact=artifact, version=version, channel=channel):
            target = SigningTarget(target, sig) if sig else target
            r = publish_fn(source, artifact=artifact, target=target, version=version,
                           channel=channel, metadata=metadata, progress=progress)
        report = r.to_json()
        report["bytes_sent"] = r.written_bytes if remote else 0
        if sig:
            report["signed_by"] = sig.keyids

        def human():
            out.print(f"published [bold]{esc(r.artifact)}@{esc(r.version)}[/bold]"
                      + (f" → channel {esc(r.channel)}" if r.channel else "")
                      + (f", signed by {sig.keyids[0][:16]}…" if sig else ""))
            out.print(f"  files {r.files}, {size(r.bytes)} in {r.chunks} chunks; "
                      f"new {size(r.new_bytes)} ({r.new_chunks} chunks, {size(r.written_bytes)} stored or sent); "
                      f"deduplicated {r.dedup_ratio:.1%}; {r.seconds:.2f}s")
        emit(report, as_json, human, quiet)


def _publish_dry(source, total, artifact, version, channel, metadata, store, origin, token, s3, quiet, as_json):
    cfg = load_client_config(store=store, origin=origin, token=token)
    with contextlib.ExitStack() as stack:
        if uses_origin(cfg, store, origin):
            from fabric.wire.client import RemoteRegistry, SyncOrigin
            so = stack.enter_context(SyncOrigin(cfg.origin, cfg.token))
            target, where = DryRunTarget(remote_holds(so), RemoteRegistry(so)), cfg.origin
        else:
            s = existing_store(open_local_store, store, s3=s3)
            target = DryRunTarget(local_holds(s), Registry(s) if s else None)
            where = cfg.store
        with progress_bar(total, f"publish {artifact} (dry run)", quiet) as progress:
            r = publish_fn(source, artifact=artifact, target=target, version=version,
                           channel=channel, metadata=metadata, progress=progress)
    plan = publish_plan(r, target)
    emit(dict(plan.to_json(), target=where), as_json, lambda: out.print(
        f"would publish [bold]{esc(plan.artifact)}@{esc(plan.version)}[/bold] to {esc(where)}: "
        f"{plan.files} files, {size(plan.bytes)}; new {plan.chunks_new} chunks ({size(plan.bytes_new)}) "
        f"to store or send, {plan.chunks_present} chunks ({size(plan.bytes_present)}) already there; "
        f"nothing written"), quiet)


@commands.command()
def pull(ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME:CHANNEL."),
         dest: str = typer.Argument(..., help="Folder to write the version into."),
         force: bool = typer.Option(False, "--force", help="Replace a non-empty DEST."),
         connections: int = typer.Option(4, help="Parallel connections (with --origin)."),
         max_rate: Optional[str] = typer.Option(None, "--max-rate", help="With --origin: cap the transfer at "
                                                "this many bytes per second, e.g. 100M (K, M, G: powers of 1000)."),
         copy: bool = typer.Option(False, "--copy", help="With --origin: the store keeps its own copy of "
                                   "each fetched chunk instead of sharing DEST's files (hard links)."),
         dry_run: bool = typer.Option(False, "--dry-run", help="Report the chunks and bytes the store lacks "
                                      "(what would be fetched); write nothing."),
         quiet: bool = QuietOpt, trust: Optional[str] = TrustOpt,
         store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
         token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Write a version's files into DEST, byte for byte (fetching missing chunks from --origin).

    With --trust FILE the version's signed statement (and for NAME:CHANNEL the channel's)
    is verified against the manifest before any chunk is fetched; a refusal exits 6 with
    its code and leaves DEST as it was. Without it, a pull from an origin warns that it is
    unverified.

    With --origin, each fetched chunk is written once, into DEST, and the store shares
    DEST's files through hard links (packs) where it is on the same file system, so a
    later pull reuses them. A program that then rewrites a DEST file in place spoils the
    store's copy: Fabric detects that and fetches those chunks again. Ctrl-C stops a
    pull at once (exit code 130); the chunks already fetched stay in the store, so the
    next pull resumes from them.
    """
    with errors(as_json):
        t0 = time.monotonic()
        rate = parse_rate(max_rate)
        if connections < 1:
            raise InvalidInput(f"--connections must be at least 1, not {connections}")
        cfg = load_client_config(store=store, origin=origin, token=token)
        remote = bool(origin or cfg.origin)
        artifact, version, channel = parse_ref(ref)
        if dry_run:
            return _pull_dry(cfg, store, remote, artifact, version, channel, dest, force, quiet, as_json)
        policy = load_trust(trust)
        s = open_local_store(store, create=remote)
        if remote:
            if policy is None:
                warn_unsigned()
            report = _pull_remote(cfg, s, artifact, version, channel, dest, force, connections,
                                  rate, copy, quiet, policy)
        else:
            from fabric.pull import materialize
            reg = Registry(s)
            check = check_ref(reg, policy, artifact, version, channel, memory=s) if policy else None
            version = check.version if check else reg.resolve(artifact, version=version, channel=channel)
            m = reg.manifest(artifact, version)
            with progress_bar(m.size, f"pull {artifact}@{version}", quiet) as progress:
                materialize(s, m, dest, overwrite=force, progress=progress)
            report = {"artifact": artifact, "version": version, "manifest_id": m.id, "dest": dest,
                      "files": len(m.files), "bytes": m.size, "chunks_fetched": 0,
                      "chunks_reused": len(m.unique_chunks()), "bytes_received": 0, "bytes_raw": 0,
                      "wire_ratio": None, "packed": False,
                      "seconds": round(time.monotonic() - t0, 3)}
            if check:
                report["trust"] = check.to_json()
        emit(report, as_json, lambda: out.print(
            f"pulled [bold]{esc(artifact)}@{esc(report['version'])}[/bold] into {esc(dest)}: {report['files']} files, "
            f"{size(report['bytes'])}; fetched {report['chunks_fetched']} chunks "
            f"({size(report['bytes_received'])} on the wire), reused {report['chunks_reused']}"), quiet)


def _pull_remote(cfg, s, artifact, version, channel, dest, force, connections, max_rate, copy, quiet,
                 policy=None) -> dict:
    import asyncio  # here, not at the top, like the origin's client: only a pull from an origin runs a loop

    from fabric.pacing import keep_freed_payloads
    from fabric.pull import pull_remote
    from fabric.transfer import FetchOptions
    from fabric.wire.client import OriginClient

    def sized(progress, m) -> None:
        """Size the bar by the chunks to write, and count the ones the store holds as done."""
        sizes = m.unique_chunks()
        held = set(sizes) - set(s.missing(list(sizes)))
        progress.set_total(sum(sizes.values()))
        progress.reused(len(held), sum(sizes[c] for c in held))

    keep_freed_payloads()  # a one-shot pull: no fresh zeroed pages for every payload

    async def run():
        async with OriginClient(cfg.origin, cfg.token, connections=connections) as client:
            label = f"pull {artifact}" + (f"@{version}" if version else f":{channel}" if channel else "")
            resolved, check, verify = version, None, None
            if policy is not None:  # the signed word picks the version; the manifest is checked on arrival
                resolved, check, verify = await check_origin(client, policy, artifact, version, channel, memory=s)
            with progress_bar(None, label, quiet) as progress:
                def on_manifest(m) -> None:
                    if verify:
                        verify(m)  # raises before any chunk is fetched
                    if progress:
                        sized(progress, m)
                result, _ = await pull_remote(client, s, artifact, dest,
                                              version=resolved, channel=None if check else channel,
                                              overwrite=force, progress=progress, copy=copy,
                                              options=FetchOptions(connections=connections, max_rate=max_rate),
                                              on_manifest=on_manifest)
            report = result.to_json()
            if check:
                report["trust"] = check.to_json()
            return report
    return asyncio.run(run())


def _pull_dry(cfg, store, remote, artifact, version, channel, dest, force, quiet, as_json) -> None:
    from fabric.pull import check_dest
    check_dest(Path(dest).absolute(), force)
    s = existing_store(open_local_store, store) if remote else open_local_store(store)
    if remote:
        from fabric.wire.client import SyncOrigin
        with SyncOrigin(cfg.origin, cfg.token) as so:
            version = so.resolve(artifact, version, channel)
            m = so.manifest(artifact, version)
    else:
        reg = Registry(s)
        version = reg.resolve(artifact, version=version, channel=channel)
        m = reg.manifest(artifact, version)
    plan = pull_plan(m, s)
    emit(dict(plan.to_json(), dest=dest), as_json, lambda: out.print(
        f"would pull [bold]{esc(artifact)}@{esc(version)}[/bold] into {esc(dest)}: {plan.files} files, "
        f"{size(plan.bytes)}; fetch {plan.chunks_new} chunks ({size(plan.bytes_new)}) the store lacks, "
        f"reuse {plan.chunks_present} ({size(plan.bytes_present)}); nothing written"), quiet)


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
            out.print(f"[bold]{esc(artifact)}@{esc(version)}[/bold]  {m.id}")
            out.print(f"  created {esc(m.created)}, parent {esc(m.parent or '-')}, metadata {esc(m.metadata or '-')}")
            out.print(f"  {len(m.files)} files, {size(m.size)}, {len(m.unique_chunks())} unique chunks, "
                      f"{len(m.tensors)} tensors")
            table(["path", "size", "chunks", "mode"],
                  [{"path": f.path, "size": size(f.size), "chunks": len(f.chunks), "mode": oct(f.mode)}
                   for f in m.files])
            out.print(f"  vs parent: +{len(d.files_added)} -{len(d.files_removed)} ~{len(d.files_changed)} files, "
                      f"{len(d.tensors_changed)} tensors changed, {d.new_chunks} new chunks ({size(d.new_bytes)})")
            for t in d.tensors_changed[:20]:
                out.print(f"    changed {esc(t)}")
        emit(obj, as_json, human)


@commands.command()
def promote(ref: str = typer.Argument(..., help="NAME@VERSION: the version the channel is to point at."),
            channel: str = typer.Option(..., "--channel", "-c", help="The channel to move (created if new)."),
            quiet: bool = QuietOpt, sign_key: Optional[str] = SignKeyOpt, statement_expiry: str = ExpiryOpt,
            store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
            token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Point CHANNEL at a version (with --sign-key: a signed move, the channel's sequence + 1)."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("promote needs NAME@VERSION")
        sig = signer(sign_key, statement_expiry)
        ch = sig.promote(reg, artifact, version, channel) if sig else reg.promote(artifact, version, channel)
        emit(ch.to_json(), as_json, lambda: out.print(f"{esc(artifact)}:{esc(channel)} → {esc(ch.version)}"), quiet)


@commands.command()
def stage(ref: str = typer.Argument(..., help="NAME@VERSION to stage (NAME alone with --clear)."),
          channel: str = typer.Option(..., "--channel", "-c", help="The channel whose sites are to hold it."),
          clear: bool = typer.Option(False, "--clear", help="Clear the channel's staged version instead."),
          quiet: bool = QuietOpt, store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
          token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Make every site following CHANNEL fetch a version and hold it without activating it, so
    that a later `fabric promote` of it is only the switch (`fabric status` shows who holds it).

    Never signed, even on a signed channel: it moves nothing (the promote stays signed)."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        artifact, version, _ = parse_ref(ref)
        if clear:
            ch = reg.unstage(artifact, channel)
        elif not version:
            raise InvalidInput("stage needs NAME@VERSION (or NAME --clear)")
        else:
            ch = reg.stage(artifact, version, channel)
        emit(ch.to_json(), as_json, lambda: out.print(
            f"{esc(artifact)}:{esc(channel)} → {esc(ch.version)}, staged: {esc(ch.staged_version or '-')}"), quiet)


@commands.command()
def rollback(name: str = typer.Argument(..., help="Artifact name."),
             channel: str = typer.Option(..., "--channel", "-c", help="The channel to move back."),
             to: Optional[str] = typer.Option(None, "--to", help="Roll back to this earlier version of the "
                                              "channel (the nearest one on its stack)."),
             steps: Optional[int] = typer.Option(None, "--steps", help="Roll back this many promotions "
                                                 "(default 1)."),
             quiet: bool = QuietOpt, sign_key: Optional[str] = SignKeyOpt, statement_expiry: str = ExpiryOpt,
             store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
             token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Move CHANNEL back to the version before the last promotion (or --steps N back, or --to VERSION).

    With --sign-key the move is signed for the version the rollback leaves on top."""
    with errors(as_json), open_registry(store, origin, token) as reg:
        if to is not None and steps is not None:
            raise InvalidInput("rollback takes --to or --steps, not both")
        if steps is not None and steps < 1:
            raise InvalidInput(f"--steps must be at least 1, not {steps}")
        sig = signer(sign_key, statement_expiry)
        ch = (sig.rollback(reg, name, channel, steps=steps, to=to) if sig
              else reg.rollback(name, channel, steps=steps, to=to))
        emit(ch.to_json(), as_json,
             lambda: out.print(f"{esc(name)}:{esc(channel)} → {esc(ch.version)} (rolled back)"), quiet)


@commands.command()
def gc(keep: int = typer.Option(..., "--keep", help="Versions to keep per artifact."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be deleted; delete nothing."),
       grace: float = typer.Option(3600.0, help="Spare chunks younger than this (seconds)."),
       quiet: bool = QuietOpt,
       store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Delete old versions and the chunks no remaining version needs."""
    with errors(as_json):
        r = gc_mod.gc(open_local_store(store), keep=keep, grace=grace, dry_run=dry_run)
        emit(r.to_json(), as_json, lambda: out.print(
            f"{'would delete' if dry_run else 'deleted'} {len(r.versions_deleted)} versions, "
            f"{r.manifests_deleted} manifests, {r.chunks_deleted} chunks, {r.packs_deleted} packs "
            f"({size(r.bytes_freed)})"), quiet)


@commands.command()
def fsck(repair: bool = typer.Option(False, "--repair", help="Remove bad chunks and temp files."),
         quiet: bool = QuietOpt,
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Verify every chunk, manifest and version in a store (exit code 6 if it finds problems)."""
    with errors(as_json):
        r = fsck_mod.fsck(open_local_store(store), repair=repair)

        def human():
            out.print(f"{r.chunks} chunks, {r.manifests} manifests, {r.versions} versions checked")
            for c in r.bad_chunks:
                out.print(f"  [red]bad chunk[/red] {esc(c)}" + (" (removed)" if repair else ""))
            for v in r.bad_versions:
                out.print(f"  [red]incomplete version[/red] {esc(v)}")
            for v in r.bad_signatures:
                out.print(f"  [red]bad signature[/red] {esc(v)}" + (" (removed)" if repair else ""))
            out.print("[green]ok[/green]" if r.ok else "[red]problems found[/red]")
        emit(r.to_json(), as_json, human, quiet)
        if not r.ok and not repair:
            raise typer.Exit(exits.INTEGRITY)
