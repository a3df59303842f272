"""The `fabric` command line: a thin layer over the library.

Each command parses its flags, calls one library function, and prints the result as
a table (or as JSON with `--json`). Errors are `FabricError`s turned into one line
`error[code]: message` on stderr (or a JSON object with `--json`) and exit status 1.
Progress goes to stderr, so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

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

from . import fsck as fsck_mod
from . import gc as gc_mod
from .config import load_client_config
from .errors import FabricError, InvalidInput
from .manifest import diff
from .publish import LocalTarget, collect_files, publish as publish_fn
from .pull import materialize
from .registry import Registry, parse_ref
from .store import open_store

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fabric: replicate models and checkpoints to GPU sites.")
out = Console()
err = Console(stderr=True)

StoreOpt = typer.Option(None, "--store", help="Store folder (or FABRIC_STORE).")
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
        err.print(f"error[{e.code}]: {e.message}", style="red", markup=False, highlight=False)
        if e.code in _HINTS:
            err.print(f"  hint: {_HINTS[e.code]}", markup=False, highlight=False)
    raise typer.Exit(1)


@contextmanager
def _errors(as_json: bool):
    try:
        yield
    except FabricError as e:
        _fail(e, as_json)


@contextmanager
def _progress(total: int, label: str, quiet: bool):
    if quiet:
        yield None
        return
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _store(store: Optional[str], create: bool = False):
    cfg = load_client_config(store=store)
    if not cfg.store:
        raise InvalidInput("no store given: pass --store DIR or set FABRIC_STORE")
    return open_store(cfg.store, create=create)


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


@app.command()
def publish(src: str = typer.Argument(..., help="File or folder to publish."),
            artifact: str = typer.Option(..., "--artifact", "-a", help="Artifact name."),
            version: Optional[str] = typer.Option(None, help="Version name (default: UTC timestamp)."),
            channel: Optional[str] = typer.Option(None, help="Move this channel to the new version."),
            meta: List[str] = typer.Option([], "--meta", help="Metadata key=value (repeatable)."),
            store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Publish SRC as a new immutable version of ARTIFACT."""
    with _errors(as_json):
        metadata = _parse_meta(meta)
        target = LocalTarget(_store(store, create=True))
        total = sum(p.stat().st_size for _, p in collect_files(Path(src)))
        with _progress(total, f"publish {artifact}", as_json) as progress:
            r = publish_fn(src, artifact=artifact, target=target, version=version,
                           channel=channel, metadata=metadata, progress=progress)

        def human():
            out.print(f"published [bold]{r.artifact}@{r.version}[/bold]"
                      + (f" → channel {r.channel}" if r.channel else ""))
            out.print(f"  files {r.files}, {_size(r.bytes)} in {r.chunks} chunks; "
                      f"new {_size(r.new_bytes)} ({r.new_chunks} chunks, {_size(r.written_bytes)} stored); "
                      f"deduplicated {r.dedup_ratio:.1%}; {r.seconds:.2f}s")
        _emit(r.to_json(), as_json, human)


@app.command()
def pull(ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME:CHANNEL."),
         dest: str = typer.Argument(..., help="Folder to write the version into."),
         force: bool = typer.Option(False, "--force", help="Replace a non-empty DEST."),
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Write a version's files into DEST, byte for byte."""
    with _errors(as_json):
        t0 = time.monotonic()
        s = _store(store)
        reg = Registry(s)
        artifact, version, channel = parse_ref(ref)
        version = reg.resolve(artifact, version=version, channel=channel)
        m = reg.manifest(artifact, version)
        with _progress(m.size, f"pull {artifact}@{version}", as_json) as progress:
            materialize(s, m, dest, overwrite=force, progress=progress)
        report = {"artifact": artifact, "version": version, "manifest_id": m.id, "dest": dest,
                  "files": len(m.files), "bytes": m.size, "chunks_fetched": 0,
                  "chunks_reused": len(m.unique_chunks()), "bytes_received": 0,
                  "seconds": round(time.monotonic() - t0, 3)}
        _emit(report, as_json, lambda: out.print(
            f"pulled [bold]{artifact}@{version}[/bold] into {dest}: {len(m.files)} files, {_size(m.size)}"))


@app.command("ls")
def ls(name: Optional[str] = typer.Argument(None, help="Artifact to list versions of."),
       store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """List artifacts, or the versions and channels of one artifact."""
    with _errors(as_json):
        reg = Registry(_store(store))
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
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Files, tensors, chunks and parent of a version, and what changed vs its parent."""
    with _errors(as_json):
        reg = Registry(_store(store))
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
            store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Point CHANNEL at a version."""
    with _errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("promote needs NAME@VERSION")
        ch = Registry(_store(store)).promote(artifact, version, channel)
        _emit(ch.to_json(), as_json, lambda: out.print(f"{artifact}:{channel} → {ch.version}"))


@app.command()
def rollback(name: str = typer.Argument(..., help="Artifact name."),
             channel: str = typer.Option(..., "--channel", "-c"),
             store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Move CHANNEL back to the version it pointed at before the last promotion."""
    with _errors(as_json):
        ch = Registry(_store(store)).rollback(name, channel)
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
            f"{r.manifests_deleted} manifests, {r.chunks_deleted} chunks ({_size(r.bytes_freed)})"))


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
