"""`fabric worker …`: inference workers that hot-load what their site agent activates.

The commands import torch (through agents.worker.reference) only when they run, so the
rest of the CLI loads without it.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from fabric.config import load_client_config
from fabric.cli.exits import exit_code
from fabric.errors import FabricError, InvalidInput

worker_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Inference workers that hot-load new versions (needs torch).")


@worker_app.command("demo")
def demo(agent: str = typer.Option("http://127.0.0.1:7070", "--agent", help="The site agent's URL."),
         artifact: Optional[str] = typer.Option(None, "--artifact", "-a", help="Artifact to serve."),
         channel: Optional[str] = typer.Option(None, "--channel", "-c", help="Channel (checked against the agent's)."),
         listen: str = typer.Option("127.0.0.1:8100", "--listen", help="HOST:PORT to serve /infer on."),
         mode: str = typer.Option("in-place", "--mode", help="in-place or double-buffered."),
         worker_id: Optional[str] = typer.Option(None, "--worker-id", help="Name in the agent's status."),
         token: Optional[str] = typer.Option(None, "--token", help="Token for the agent (or FABRIC_TOKEN)."),
         poll: float = typer.Option(15.0, "--poll", help="Long-poll wait, seconds (the agent's heartbeat)."),
         slow_load: float = typer.Option(0.0, "--slow-load", help="Sleep this long before each swap after "
                                         "the first load (to show a worker dying mid-load)."),
         health_timeout: float = typer.Option(10.0, "--health-timeout", help="Seconds the health check may take."),
         make_weights: Optional[str] = typer.Option(None, "--make-weights", help="Write a version of the "
                                                    "demo model's weights into this folder, then exit."),
         seed: int = typer.Option(1, "--seed", help="With --make-weights: random seed."),
         base: Optional[str] = typer.Option(None, "--base", help="With --make-weights: start from this version."),
         change: float = typer.Option(1.0, "--change", help="With --base: fraction of tensors to change."),
         nan: bool = typer.Option(False, "--nan", help="With --make-weights: poison a tensor (fails the canary)."),
         log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error.")):
    """Serve a small MLP over HTTP and hot-swap it as the agent activates versions."""
    from fabric import logs
    try:
        from agents.worker import reference as worker_demo
    except ImportError as e:
        typer.echo(f"error[missing_dependency]: {e}; install the worker extra (pip install 'edge-fabric[worker]')",
                   err=True)
        raise typer.Exit(1)
    try:
        if make_weights:
            dest = worker_demo.make_weights(make_weights, seed, base=base, change=change, nan=nan)
            typer.echo(json.dumps({"weights": str(dest / "model.safetensors"), "seed": seed, "base": base,
                                   "change": change if base else 1.0, "nan": nan}))
            return
        if not artifact:
            raise InvalidInput("worker demo needs --artifact (or --make-weights DIR)")
        if mode not in ("in-place", "double-buffered"):
            raise InvalidInput(f"--mode must be in-place or double-buffered, not {mode!r}")
        logs.setup(log_level)
        cfg = load_client_config(token=token)
        worker_demo.run_worker(agent=agent, artifact=artifact, channel=channel, listen=listen, mode=mode,
                               token=cfg.token, worker_id=worker_id, poll_s=poll, slow_load=slow_load,
                               health_timeout=health_timeout)
    except FabricError as e:
        typer.echo(f"error[{e.code}]: {e.message}", err=True)
        raise typer.Exit(exit_code(e))
