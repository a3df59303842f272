"""The `fabric` typer app: the command groups put together, and the entry point.

The commands live by group beside this module: artifacts.py (publish, pull, ls, show,
promote, rollback, gc, fsck), serve.py (origin, hook, agent), site.py (status, pin,
unpin) and worker.py (`fabric worker …`). Shared options are in options.py; what the
commands print, errors included, is in output.py.
"""

from __future__ import annotations

import typer

from fabric.cli import artifacts, serve, site
from fabric.cli.worker import worker_app  # the sub-app imports torch only when a command runs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fabric: replicate models and checkpoints to GPU sites.")
for group in (artifacts, serve, site):
    app.add_typer(group.commands)
app.add_typer(worker_app, name="worker")


def main() -> None:
    app()
