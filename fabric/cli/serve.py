"""`fabric origin|hook|agent`: the long-running servers, each started from its config.

Each command imports its role only when it runs, so the rest of the CLI loads without
the servers' dependencies.
"""

from __future__ import annotations

from typing import Optional

import typer

from fabric.cli.options import S3EndpointOpt, S3KeyOpt, S3SecretOpt, StoreOpt, open_local_store, s3_options
from fabric.cli.output import errors

commands = typer.Typer()


@commands.command("origin")
def origin_cmd(store: Optional[str] = StoreOpt,
               listen: str = typer.Option("127.0.0.1:7000", "--listen", help="HOST:PORT to serve on."),
               tokens: str = typer.Option(..., "--tokens", help="Token file (TOML)."),
               tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)."),
               tls_key: Optional[str] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
               log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
               metrics_listen: Optional[str] = typer.Option(None, "--metrics-listen",
                                                            help="HOST:PORT serving /metrics without a token."),
               s3_endpoint: Optional[str] = S3EndpointOpt, s3_access_key: Optional[str] = S3KeyOpt,
               s3_secret_key: Optional[str] = S3SecretOpt,
               upload_quota: str = typer.Option("256G", "--upload-quota",
                                                help="Bytes of uploads no version names yet, per token."),
               orphan_grace: str = typer.Option("1h", "--orphan-grace",
                                                help="How long an upload no version names is kept."),
               orphan_interval: str = typer.Option("1h", "--orphan-interval",
                                                   help="Time between sweeps of orphaned uploads (0: none)."),
               move_log: str = typer.Option("auto", "--move-log",
                                            help="Share moves with the other origins of the store through its "
                                                 "move log: auto (unless a local folder), on or off.")):
    """Serve a store (a folder, or s3://BUCKET/PREFIX) as an origin over HTTP(S)."""
    from fabric import logs
    from fabric.config import parse_byte_rate, parse_duration
    from fabric.errors import InvalidInput
    from fabric.origin import app as origin_mod
    from fabric.origin.peers import SharingOptions
    from fabric.origin.quotas import OriginLimits
    from fabric.wire.server import tls_context
    from fabric.wire.auth import TokenTable
    with errors(False):
        logs.setup(log_level)
        table = TokenTable.from_file(tokens)
        s3 = s3_options(s3_endpoint, s3_access_key, s3_secret_key)
        try:  # the same notations as a site's max_rate and durations
            limits = OriginLimits(upload_quota=int(parse_byte_rate(upload_quota)),
                                  orphan_grace=parse_duration(orphan_grace),
                                  orphan_interval=parse_duration(orphan_interval))
        except ValueError as e:
            raise InvalidInput(f"fabric origin: {e}") from None
        if move_log not in ("auto", "on", "off"):
            raise InvalidInput(f"fabric origin: --move-log {move_log!r}: expected auto, on or off")
        sharing = SharingOptions(move_log={"auto": None, "on": True, "off": False}[move_log])
        origin_mod.run_origin(store=open_local_store(store, create=True, s3=s3), listen=listen, tokens=table,
                              tls=tls_context(tls_cert, tls_key), limits=limits,
                              metrics_listen=_metrics_listen(metrics_listen), sharing=sharing)


def _metrics_listen(value: str | None) -> str | None:
    from fabric.errors import InvalidInput
    from fabric.config import parse_listen
    if value is not None:
        try:
            parse_listen(value)
        except InvalidInput:
            raise InvalidInput(f"--metrics-listen {value!r}: expected HOST:PORT") from None
    return value


@commands.command("hook")
def hook_cmd(config: str = typer.Option(..., "--config", help="Hook config (TOML)."),
             listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT (overrides the config).")):
    """Receive S3 bucket events and publish each checkpoint once it is complete."""
    from fabric import logs
    from fabric.hook.app import run_hook
    from fabric.hook.config import HookConfig
    with errors(False):
        cfg = HookConfig.load(config, listen=listen)
        logs.setup(cfg.log_level)
        run_hook(cfg)


@commands.command("agent")
def agent_cmd(config: str = typer.Option(..., "--config", help="Site agent config (TOML).")):
    """Run a site agent: follow channels, replicate, activate, relay."""
    from agents.site.config import SiteConfig
    from agents.site.app import run_agent
    from fabric import logs
    with errors(False):
        cfg = SiteConfig.load(config)
        logs.setup(cfg.log_level)
        run_agent(cfg)
