"""The options several `fabric` commands share, and where a command's work happens.

`--store`, `--origin`, `--token`, `--json`, the S3 flags and `--agent` are defined once
here; `open_local_store`, `open_registry` and `open_target` turn them (with FABRIC_* settings from
fabric/config.py) into the store, registry or publish target a command works on, and
`uses_origin` says which of the two a command's flags and settings name.

The command modules import the origin's client (`fabric.wire.client`, and with it aiohttp:
~70 ms, a third of the CLI's start-up) only inside the commands, on the path that talks to an
origin or an agent, so that `fabric publish --store` and `fabric --help` never pay for it
(`tests/cli/test_startup.py` checks).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional

import typer

from fabric.config import load_client_config, parse_byte_rate
from fabric.errors import InvalidInput
from fabric.publish import LocalTarget
from fabric.store.registry import Registry
from fabric.store.store import open_store

StoreOpt = typer.Option(None, "--store", help="Store folder (or FABRIC_STORE).")
OriginOpt = typer.Option(None, "--origin", help="Origin URL (or FABRIC_ORIGIN); default: work on --store.")
TokenOpt = typer.Option(None, "--token", help="Bearer token for --origin (or FABRIC_TOKEN).")
JsonOpt = typer.Option(False, "--json", help="Print a JSON report on stdout.")
S3EndpointOpt = typer.Option(None, "--s3-endpoint", help="S3 endpoint URL for s3:// paths (or AWS_ENDPOINT_URL).")
S3KeyOpt = typer.Option(None, "--s3-access-key", help="S3 access key (or AWS_ACCESS_KEY_ID).")
S3SecretOpt = typer.Option(None, "--s3-secret-key", help="S3 secret key (or AWS_SECRET_ACCESS_KEY).")
AgentOpt = typer.Option(None, "--agent", help="The site agent's URL (or FABRIC_AGENT; default "
                        "http://127.0.0.1:7070).")


def open_local_store(store: Optional[str], create: bool = False, s3=None):
    cfg = load_client_config(store=store)
    if not cfg.store:
        raise InvalidInput("no store given: pass --store DIR or set FABRIC_STORE")
    return open_store(cfg.store, create=create, s3=s3)


def s3_options(endpoint: Optional[str], access_key: Optional[str], secret_key: Optional[str]):
    """S3 settings from flags; what is not given comes from boto3's chain (AWS_* variables, ~/.aws)."""
    if not (endpoint or access_key or secret_key):
        return None
    from fabric.store.s3 import S3Options
    return S3Options(endpoint=endpoint, access_key=access_key, secret_key=secret_key)


def uses_origin(cfg, store: Optional[str], origin: Optional[str]) -> bool:
    """Whether a command works on the origin (`--origin`, or FABRIC_ORIGIN without `--store`)."""
    return bool(origin or (cfg.origin and not store))


@contextmanager
def open_registry(store: Optional[str], origin: Optional[str], token: Optional[str]):
    """The registry to work on: the origin's when one is configured, else the local store's."""
    cfg = load_client_config(store=store, origin=origin, token=token)
    if uses_origin(cfg, store, origin):
        from fabric.wire.client import RemoteRegistry, SyncOrigin
        with SyncOrigin(cfg.origin, cfg.token) as so:
            yield RemoteRegistry(so)
    else:
        yield Registry(open_local_store(store))


@contextmanager
def open_target(store: Optional[str], origin: Optional[str], token: Optional[str], s3=None):
    """Where `publish` stores a version: the origin when one is configured, else the local store."""
    cfg = load_client_config(store=store, origin=origin, token=token)
    if uses_origin(cfg, store, origin):
        from fabric.wire.client import RemoteTarget, SyncOrigin
        with SyncOrigin(cfg.origin, cfg.token) as so:
            yield RemoteTarget(so)
    else:
        yield LocalTarget(open_local_store(store, create=True, s3=s3))


def parse_meta(pairs: List[str]) -> dict:
    meta = {}
    for p in pairs:
        if "=" not in p:
            raise InvalidInput(f"--meta {p!r}: expected key=value")
        k, v = p.split("=", 1)
        meta[k] = v
    return meta


def parse_rate(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        rate = parse_byte_rate(text)
    except ValueError:
        raise InvalidInput(f"--max-rate {text!r}: expected bytes per second, e.g. 50M") from None
    if rate <= 0:
        raise InvalidInput(f"--max-rate {text!r}: must be more than 0 bytes per second")
    return rate
