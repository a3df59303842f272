"""The `fabric` typer app: the command groups put together, global flags, and the entry point.

The commands live by group beside this module: artifacts.py (publish, pull, ls, show,
promote, rollback, gc, fsck), serve.py (origin, hook, agent), site.py (status, pin,
unpin), settings.py (`fabric config show`), trust.py (`fabric key generate`, `fabric trust …`),
signing.py (`fabric sign`, `fabric verify`, `fabric trust publish`)
and worker.py (`fabric worker …`). Shared
options are in options.py; what the commands print, errors included, is in output.py;
exit codes in exits.py.

`main` runs the app. A usage error (an unknown flag, a missing argument) exits 2; with
`--json` anywhere on the command line it is a JSON error object on stdout, like every
other error. Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from fabric.cli import artifacts, exits, serve, signing, site
from fabric.cli.output import fail
from fabric.cli.settings import config_app
from fabric.cli.trust import key_app, trust_app
from fabric.cli.worker import worker_app  # the sub-app imports torch only when a command runs
from fabric.errors import InvalidInput

app = typer.Typer(no_args_is_help=True,  # typer adds --install-completion and --show-completion
                  help="Fabric: replicate models and checkpoints to GPU sites.")
for group in (artifacts, serve, site, signing):  # signing also adds `trust publish` to trust_app
    app.add_typer(group.commands)
app.add_typer(config_app, name="config")
app.add_typer(worker_app, name="worker")
app.add_typer(key_app, name="key")
app.add_typer(trust_app, name="trust")

SHELLS = ("bash", "zsh", "fish")


def version() -> str:
    from importlib import metadata  # here, not at the top: 15 ms every command would pay for `--version`
    try:
        return metadata.version("edge-fabric")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fabric {version()}")
        raise typer.Exit()


@app.callback()
def _global(show_version: Optional[bool] = typer.Option(None, "--version", callback=_print_version,
                                                         is_eager=True, help="Print Fabric's version and exit.")):
    """Fabric: replicate models and checkpoints to GPU sites."""


@app.command()
def completion(shell: str = typer.Argument(..., help="bash, zsh or fish.")):
    """Print the shell completion script for SHELL (e.g. `fabric completion bash >> ~/.bashrc`)."""
    from typer._completion_shared import get_completion_script  # typer's own scripts, for our program name
    if shell not in SHELLS:
        fail(InvalidInput(f"completion: unknown shell {shell!r} (known: {', '.join(SHELLS)})"), False)
    typer.echo(get_completion_script(prog_name="fabric", complete_var="_FABRIC_COMPLETE", shell=shell))


def main() -> None:
    if "--json" not in sys.argv[1:]:
        app()  # typer formats usage errors (exit code 2) and turns Ctrl-C into exit code 130
        return
    try:
        rv = app(standalone_mode=False)
    except typer.TyperException as e:  # typer's usage errors have exit_code 2
        if e.exit_code != exits.USAGE:
            raise
        try:
            fail(InvalidInput(f"usage: {e.format_message()}"), True)
        except typer.Exit as ex:
            sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(exits.INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)
