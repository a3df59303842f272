"""The `fabric` command line: a thin layer over the library.

Each command parses its flags, calls one library function, and prints the result as
a table (or as JSON with `--json`). Errors are `FabricError`s turned into one line
`error[code]: message` on stderr (or a JSON object with `--json`) and exit status 1.
Progress goes to stderr, so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from contextlib import contextmanager
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from fabric import fsck as fsck_mod
from fabric import gc as gc_mod
from fabric.config import load_client_config, parse_byte_rate
from fabric.errors import FabricError, InvalidInput
from fabric.core.manifest import diff
from fabric.publish import LocalTarget, collect_files, publish as publish_fn
from fabric.pull import materialize, pull_remote
from fabric.transfer import FetchOptions
from fabric.wire.client import OriginClient, RemoteRegistry, RemoteTarget, SyncOrigin
from fabric.store.registry import Registry, parse_ref
from fabric.store.store import open_store

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fabric: replicate models and checkpoints to GPU sites.")
out = Console()
err = Console(stderr=True)

StoreOpt = typer.Option(None, "--store", help="Store folder (or FABRIC_STORE).")
OriginOpt = typer.Option(None, "--origin", help="Origin URL (or FABRIC_ORIGIN); default: work on --store.")
TokenOpt = typer.Option(None, "--token", help="Bearer token for --origin (or FABRIC_TOKEN).")
JsonOpt = typer.Option(False, "--json", help="Print a JSON report on stdout.")

# What to try next, per error code: shown under the error message.
_HINTS = {
    "destination_exists": "pull into an empty folder, or add --force",
    "version_exists": "choose another --version, or omit it for a timestamp",
    "artifact_not_found": "run `fabric ls` to see the artifacts",
    "version_not_found": "run `fabric ls NAME` to see its versions",
    "channel_not_found": "run `fabric show NAME` to see its channels, or `fabric promote`",
    "invalid_safetensors": "check the file with `python -c 'import safetensors'` tooling, or publish it under another name",
    "source_changed": "wait for the writer to finish, then publish again",
    "missing_chunks": "run `fabric fsck`; the store lost chunks this version needs",
}


def _fail(e: FabricError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": e.to_json()}))
    else:
        # soft_wrap: one line whatever the terminal width, so scripts can match it
        err.print(f"error[{e.code}]: {e.message}", style="red", markup=False, highlight=False,
                  soft_wrap=True)
        if e.code in _HINTS:
            err.print(f"  hint: {_HINTS[e.code]}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _errors(as_json: bool):
    try:
        yield
    except FabricError as e:
        _fail(e, as_json)


@contextmanager
def _progress(total: int | None, label: str, quiet: bool):
    if quiet or not err.is_terminal:  # a bar drawn into a pipe or log is noise (and a stray blank line)
        yield None
        return
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        yield _Bar(bar, bar.add_task(label, total=total))


class _Bar:
    """A progress callback: `bar(n)` advances by n bytes; `set_total` sizes it once known."""

    def __init__(self, bar: Progress, task):
        self.bar, self.task = bar, task

    def __call__(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)


def _store(store: Optional[str], create: bool = False, s3=None):
    cfg = load_client_config(store=store)
    if not cfg.store:
        raise InvalidInput("no store given: pass --store DIR or set FABRIC_STORE")
    return open_store(cfg.store, create=create, s3=s3)


S3EndpointOpt = typer.Option(None, "--s3-endpoint", help="S3 endpoint URL for s3:// paths (or AWS_ENDPOINT_URL).")
S3KeyOpt = typer.Option(None, "--s3-access-key", help="S3 access key (or AWS_ACCESS_KEY_ID).")
S3SecretOpt = typer.Option(None, "--s3-secret-key", help="S3 secret key (or AWS_SECRET_ACCESS_KEY).")


def _s3(endpoint: Optional[str], access_key: Optional[str], secret_key: Optional[str]):
    """S3 settings from flags; what is not given comes from boto3's chain (AWS_* variables, ~/.aws)."""
    if not (endpoint or access_key or secret_key):
        return None
    from fabric.store.s3 import S3Options
    return S3Options(endpoint=endpoint, access_key=access_key, secret_key=secret_key)


@contextmanager
def _registry(store: Optional[str], origin: Optional[str], token: Optional[str]):
    """The registry to work on: the origin's when one is configured, else the local store's."""
    cfg = load_client_config(store=store, origin=origin, token=token)
    if origin or (cfg.origin and not store):
        with SyncOrigin(cfg.origin, cfg.token) as so:
            yield RemoteRegistry(so)
    else:
        yield Registry(_store(store))


def _emit(obj: dict, as_json: bool, human) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        human()


def _parse_meta(pairs: List[str]) -> dict:
    meta = {}
    for p in pairs:
        if "=" not in p:
            raise InvalidInput(f"--meta {p!r}: expected key=value")
        k, v = p.split("=", 1)
        meta[k] = v
    return meta


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def _target(store: Optional[str], origin: Optional[str], token: Optional[str], s3=None):
    cfg = load_client_config(store=store, origin=origin, token=token)
    if origin or (cfg.origin and not store):
        with SyncOrigin(cfg.origin, cfg.token) as so:
            yield RemoteTarget(so)
    else:
        yield LocalTarget(_store(store, create=True, s3=s3))


@app.command()
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
    with _errors(as_json):
        metadata = _parse_meta(meta)
        s3 = _s3(s3_endpoint, s3_access_key, s3_secret_key)
        if src.startswith("s3://"):
            from fabric.s3source import list_sources
            source = list_sources(src, s3=s3)
            total = sum(s.size for s in source)
        else:
            source, total = src, sum(p.stat().st_size for _, p in collect_files(Path(src)))
        with _target(store, origin, token, s3) as target, \
                _progress(total, f"publish {artifact}", as_json) as progress:
            r = publish_fn(source, artifact=artifact, target=target, version=version,
                           channel=channel, metadata=metadata, progress=progress)
        report = r.to_json()
        report["bytes_sent"] = r.written_bytes if isinstance(target, RemoteTarget) else 0

        def human():
            out.print(f"published [bold]{r.artifact}@{r.version}[/bold]"
                      + (f" → channel {r.channel}" if r.channel else ""))
            out.print(f"  files {r.files}, {_size(r.bytes)} in {r.chunks} chunks; "
                      f"new {_size(r.new_bytes)} ({r.new_chunks} chunks, {_size(r.written_bytes)} stored or sent); "
                      f"deduplicated {r.dedup_ratio:.1%}; {r.seconds:.2f}s")
        _emit(report, as_json, human)


@app.command()
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
    with _errors(as_json):
        t0 = time.monotonic()
        cfg = load_client_config(store=store, origin=origin, token=token)
        s = _store(store, create=bool(origin or cfg.origin))
        artifact, version, channel = parse_ref(ref)
        if origin or cfg.origin:
            report = _pull_remote(cfg, s, artifact, version, channel, dest, force, connections,
                                  _parse_rate(max_rate), copy, as_json)
        else:
            reg = Registry(s)
            version = reg.resolve(artifact, version=version, channel=channel)
            m = reg.manifest(artifact, version)
            with _progress(m.size, f"pull {artifact}@{version}", as_json) as progress:
                materialize(s, m, dest, overwrite=force, progress=progress)
            report = {"artifact": artifact, "version": version, "manifest_id": m.id, "dest": dest,
                      "files": len(m.files), "bytes": m.size, "chunks_fetched": 0,
                      "chunks_reused": len(m.unique_chunks()), "bytes_received": 0, "bytes_raw": 0,
                      "wire_ratio": None, "packed": False,
                      "seconds": round(time.monotonic() - t0, 3)}
        _emit(report, as_json, lambda: out.print(
            f"pulled [bold]{artifact}@{report['version']}[/bold] into {dest}: {report['files']} files, "
            f"{_size(report['bytes'])}; fetched {report['chunks_fetched']} chunks "
            f"({_size(report['bytes_received'])} on the wire), reused {report['chunks_reused']}"))


def _pull_remote(cfg, s, artifact, version, channel, dest, force, connections, max_rate, copy, quiet) -> dict:
    async def run():
        async with OriginClient(cfg.origin, cfg.token, connections=connections) as client:
            label = f"pull {artifact}" + (f"@{version}" if version else f":{channel}" if channel else "")
            with _progress(None, label, quiet) as progress:
                result, _ = await pull_remote(client, s, artifact, dest, version=version, channel=channel,
                                              overwrite=force, progress=progress, copy=copy,
                                              options=FetchOptions(connections=connections, max_rate=max_rate),
                                              on_manifest=progress and (lambda m: progress.set_total(m.size)))
            return result.to_json()
    return asyncio.run(run())


def _parse_rate(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        return parse_byte_rate(text)
    except ValueError:
        raise InvalidInput(f"--max-rate {text!r}: expected bytes per second, e.g. 50M") from None


@app.command("ls")
def ls(name: Optional[str] = typer.Argument(None, help="Artifact to list versions of."),
       store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
       token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """List artifacts, or the versions and channels of one artifact."""
    with _errors(as_json), _registry(store, origin, token) as reg:
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
        _emit({"items": rows}, as_json, lambda: _table(cols, rows))


def _table(cols: list[str], rows: list[dict]) -> None:
    t = Table(*cols)
    for r in rows:
        t.add_row(*[_cell(r[c]) for c in cols])
    out.print(t)


def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}→{x}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


@app.command()
def show(ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME:CHANNEL."),
         store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
         token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Files, tensors, chunks and parent of a version, and what changed vs its parent."""
    with _errors(as_json), _registry(store, origin, token) as reg:
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
            out.print(f"  {len(m.files)} files, {_size(m.size)}, {len(m.unique_chunks())} unique chunks, "
                      f"{len(m.tensors)} tensors")
            _table(["path", "size", "chunks", "mode"],
                   [{"path": f.path, "size": _size(f.size), "chunks": len(f.chunks), "mode": oct(f.mode)}
                    for f in m.files])
            out.print(f"  vs parent: +{len(d.files_added)} -{len(d.files_removed)} ~{len(d.files_changed)} files, "
                      f"{len(d.tensors_changed)} tensors changed, {d.new_chunks} new chunks ({_size(d.new_bytes)})")
            for t in d.tensors_changed[:20]:
                out.print(f"    changed {t}")
        _emit(obj, as_json, human)


@app.command()
def promote(ref: str = typer.Argument(..., help="NAME@VERSION"),
            channel: str = typer.Option(..., "--channel", "-c"),
            store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
            token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Point CHANNEL at a version."""
    with _errors(as_json), _registry(store, origin, token) as reg:
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("promote needs NAME@VERSION")
        ch = reg.promote(artifact, version, channel)
        _emit(ch.to_json(), as_json, lambda: out.print(f"{artifact}:{channel} → {ch.version}"))


@app.command()
def rollback(name: str = typer.Argument(..., help="Artifact name."),
             channel: str = typer.Option(..., "--channel", "-c"),
             store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt,
             token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Move CHANNEL back to the version it pointed at before the last promotion."""
    with _errors(as_json), _registry(store, origin, token) as reg:
        ch = reg.rollback(name, channel)
        _emit(ch.to_json(), as_json, lambda: out.print(f"{name}:{channel} → {ch.version} (rolled back)"))


@app.command()
def gc(keep: int = typer.Option(..., "--keep", help="Versions to keep per artifact."),
       dry_run: bool = typer.Option(False, "--dry-run"),
       grace: float = typer.Option(3600.0, help="Spare chunks younger than this (seconds)."),
       store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Delete old versions and the chunks no remaining version needs."""
    with _errors(as_json):
        r = gc_mod.gc(_store(store), keep=keep, grace=grace, dry_run=dry_run)
        _emit(r.to_json(), as_json, lambda: out.print(
            f"{'would delete' if dry_run else 'deleted'} {len(r.versions_deleted)} versions, "
            f"{r.manifests_deleted} manifests, {r.chunks_deleted} chunks, {r.packs_deleted} packs "
            f"({_size(r.bytes_freed)})"))


@app.command()
def fsck(repair: bool = typer.Option(False, "--repair", help="Remove bad chunks and temp files."),
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Verify every chunk, manifest and version in a store."""
    with _errors(as_json):
        r = fsck_mod.fsck(_store(store), repair=repair)

        def human():
            out.print(f"{r.chunks} chunks, {r.manifests} manifests, {r.versions} versions checked")
            for c in r.bad_chunks:
                out.print(f"  [red]bad chunk[/red] {c}" + (" (removed)" if repair else ""))
            for v in r.bad_versions:
                out.print(f"  [red]incomplete version[/red] {v}")
            out.print("[green]ok[/green]" if r.ok else "[red]problems found[/red]")
        _emit(r.to_json(), as_json, human)
        if not r.ok and not repair:
            raise typer.Exit(1)


@app.command("origin")
def origin_cmd(store: Optional[str] = StoreOpt,
               listen: str = typer.Option("127.0.0.1:7000", "--listen", help="HOST:PORT to serve on."),
               tokens: str = typer.Option(..., "--tokens", help="Token file (TOML)."),
               tls_cert: Optional[str] = typer.Option(None, "--tls-cert"),
               tls_key: Optional[str] = typer.Option(None, "--tls-key"),
               log_level: str = typer.Option("info", "--log-level"),
               s3_endpoint: Optional[str] = S3EndpointOpt, s3_access_key: Optional[str] = S3KeyOpt,
               s3_secret_key: Optional[str] = S3SecretOpt):
    """Serve a store (a folder, or s3://BUCKET/PREFIX) as an origin over HTTP(S)."""
    from fabric import logs
    from fabric.origin import app as origin_mod
    from fabric.wire.server import tls_context
    from fabric.wire.auth import TokenTable
    with _errors(False):
        logs.setup(log_level)
        table = TokenTable.from_file(tokens)
        s3 = _s3(s3_endpoint, s3_access_key, s3_secret_key)
        origin_mod.run_origin(store=_store(store, create=True, s3=s3), listen=listen, tokens=table,
                              tls=tls_context(tls_cert, tls_key))


@app.command("hook")
def hook_cmd(config: str = typer.Option(..., "--config", help="Hook config (TOML)."),
             listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT (overrides the config).")):
    """Receive S3 bucket events and publish each checkpoint once it is complete."""
    from fabric import logs
    from fabric.hook.app import run_hook
    from fabric.hook.config import HookConfig
    with _errors(False):
        cfg = HookConfig.load(config, listen=listen)
        logs.setup(cfg.log_level)
        run_hook(cfg)


@app.command("agent")
def agent_cmd(config: str = typer.Option(..., "--config", help="Site agent config (TOML).")):
    """Run a site agent: follow channels, replicate, activate, relay."""
    from agents.site.config import SiteConfig
    from agents.site.app import run_agent
    from fabric import logs
    with _errors(False):
        cfg = SiteConfig.load(config)
        logs.setup(cfg.log_level)
        run_agent(cfg)


@app.command()
def status(origin: Optional[str] = OriginOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Every site, its active version per channel, and any sync in progress."""
    with _errors(as_json):
        cfg = load_client_config(origin=origin, token=token)
        if not cfg.origin:
            raise InvalidInput("status needs --origin URL (or FABRIC_ORIGIN)")
        with SyncOrigin(cfg.origin, cfg.token) as so:
            sites = so.sites()
        rows = []
        for site in sites:
            age = time.time() - site.get("received", 0)
            for ch in site.get("channels", []):
                syncing = ""
                if ch.get("syncing"):
                    total = ch.get("bytes_total") or 0
                    pct = f" {100 * ch.get('bytes_done', 0) / total:.0f}%" if total else ""
                    syncing = f"{ch['syncing']}{pct}"
                workers = ", ".join(f"{w['worker']}={w.get('serving') or '-'}"
                                    + ("" if w.get("state") == "serving" else f" ({w.get('state')})")
                                    for w in site.get("workers", []) if w.get("artifact") == ch["artifact"])
                rows.append({"site": site["site"], "channel": f"{ch['artifact']}:{ch['channel']}",
                             "active": ch.get("active"), "target": ch.get("target"), "syncing": syncing,
                             "workers": workers, "error": ch.get("error") or "", "seen": f"{age:.0f}s ago"})
        _emit({"sites": sites}, as_json,
              lambda: _table(["site", "channel", "active", "target", "syncing", "workers", "error", "seen"], rows))


AgentOpt = typer.Option("http://127.0.0.1:7070", "--agent", help="The site agent's URL.")


def _agent_call(agent: str, token: Optional[str], method: str, path: str, body: Optional[dict]) -> dict:
    cfg = load_client_config(token=token)
    with SyncOrigin(agent, cfg.token) as so:
        return so.call(method, path, body)


@app.command()
def pin(ref: str = typer.Argument(..., help="NAME@VERSION to keep at the site whatever retention says."),
        agent: str = AgentOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Pin a version at a site, so retention never removes it."""
    with _errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("pin needs NAME@VERSION")
        r = _agent_call(agent, token, "POST", "/v1/site/pins", {"artifact": artifact, "version": version})
        _emit(r, as_json, lambda: out.print(f"pinned {ref}; pins: {', '.join(r['pins'])}"))


@app.command()
def unpin(ref: str = typer.Argument(..., help="NAME@VERSION"),
          agent: str = AgentOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Remove a pin at a site."""
    with _errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("unpin needs NAME@VERSION")
        r = _agent_call(agent, token, "DELETE", f"/v1/site/pins/{artifact}/{version}", None)
        _emit(r, as_json, lambda: out.print(f"unpinned {ref}; pins: {', '.join(r['pins']) or '-'}"))


from fabric.cli.worker import worker_app  # noqa: E402 - the sub-app imports torch only when a command runs
app.add_typer(worker_app, name="worker")


def main() -> None:
    app()

