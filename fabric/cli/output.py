"""What the `fabric` commands print: reports, tables, sizes, progress bars and errors.

A report goes to stdout as a table or sentence, or as JSON with `--json`; progress and
errors go to stderr, so `--json` output on stdout stays machine-readable. An error is a
`FabricError` turned into one line `error[code]: message` (plus a hint where one helps)
or, with `--json`, a JSON object on stdout; the exit code comes from exits.py's table.
`--quiet` drops the progress bars and the human report (never an error, never the JSON
report). Every size a person reads goes through `size` (IEC units: KiB, MiB), progress
bars included; every string from outside (names, paths, site reports) is printed with
rich markup escaped (`esc`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from fabric.cli.exits import exit_code
from fabric.errors import FabricError

out = Console()
err = Console(stderr=True)

# What to try next, per error code: shown under the error message.
HINTS = {
    "destination_exists": "pull into an empty folder, or add --force",
    "version_exists": "choose another --version, or omit it for a timestamp",
    "artifact_not_found": "run `fabric ls` to see the artifacts",
    "version_not_found": "run `fabric ls NAME` to see its versions",
    "channel_not_found": "run `fabric show NAME` to see its channels, or `fabric promote`",
    "invalid_safetensors": "check the file with `python -c 'import safetensors'` tooling, or publish it under another name",
    "source_changed": "wait for the writer to finish, then publish again",
    "missing_chunks": "run `fabric fsck`; the store lost chunks this version needs",
    # signed versions (docs/trust.md "What is refused, and its code")
    "unsigned": "the publisher signs with `fabric publish --sign-key KEY` or `fabric sign NAME@VERSION`",
    "signature_invalid": "the statement was altered after signing: do not use what this origin serves",
    "unknown_key": "if you trust the signer: `fabric trust add FILE --key KEY.pub --artifacts GLOB`",
    "key_revoked": "the key was revoked: the publisher signs again with a current key",
    "key_out_of_scope": "the key's rules do not cover this artifact or channel: see `fabric trust show FILE`",
    "threshold_not_met": "more of the rule's keys must sign: `fabric sign NAME@VERSION --sign-key KEY`",
    "statement_expired": "the channel's move expired: the publisher moves it again (`fabric promote --sign-key`)",
    "sequence_rollback": "an older or replayed channel move than one accepted before: the origin may be stale or lying",
    "statement_mismatch": "the signed statement names another artifact, version or manifest than the one served",
    "statement_malformed": "the statement is damaged or truncated: docs/formats.md \"Signed statements\" says its form",
    "statement_not_canonical": "statements are canonical JSON, re-encoded byte for byte: docs/formats.md \"Signed statements\"",
    "key_file_invalid": "`fabric key generate NAME --out DIR` writes a valid key; keep NAME.key at chmod 600",
}


def fail(e: FabricError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": e.to_json()}))
    else:
        # soft_wrap: one line whatever the terminal width, so scripts can match it
        err.print(f"error[{e.code}]: {e.message}", style="red", markup=False, highlight=False,
                  soft_wrap=True)
        if e.code in HINTS:
            err.print(f"  hint: {HINTS[e.code]}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code(e))


@contextmanager
def errors(as_json: bool):
    try:
        yield
    except FabricError as e:
        fail(e, as_json)


def emit(obj: dict, as_json: bool, human, quiet: bool = False) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    elif not quiet:
        human()


def esc(value) -> str:
    """Any value as text that rich prints literally: `[/]` in a name is not markup."""
    return escape(str(value))


def table(cols: list[str], rows: list[dict]) -> None:
    """Rows as a table; cells are printed literally (no rich markup)."""
    t = Table(*cols)
    for r in rows:
        t.add_row(*[Text(_cell(r[c])) for c in cols])
    out.print(t)


def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}→{x}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _Bytes(ProgressColumn):
    """Bytes done of the total, in `size`'s units."""

    def render(self, task) -> Text:
        total = "?" if task.total is None else size(task.total)
        return Text(f"{size(task.completed)}/{total}", style="progress.download")


class _Speed(ProgressColumn):
    """Bytes per second, in `size`'s units."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{size(speed)}/s", style="progress.data.speed")


@contextmanager
def progress_bar(total: int | None, label: str, quiet: bool):
    """A bar on stderr (with or without `--json`, which writes stdout), unless `quiet`
    or stderr is not a terminal: a bar drawn into a pipe or log is noise."""
    if quiet or not err.is_terminal:
        yield None
        return
    columns = ("{task.description}", BarColumn(), _Bytes(), _Speed(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        yield _Bar(bar, bar.add_task(esc(label), total=total), esc(label))


class _Bar:
    """A progress callback: `bar(n)` advances by n bytes; `set_total` sizes it once known."""

    def __init__(self, bar: Progress, task, label: str):
        self.bar, self.task, self.label = bar, task, label

    def __call__(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)

    def reused(self, chunks: int, nbytes: int) -> None:
        """Count chunks the store already held: done at once, and named in the label."""
        self.bar.update(self.task, advance=nbytes, description=f"{self.label} ({chunks} chunks reused)")
