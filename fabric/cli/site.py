"""`fabric status|pin|unpin`: what the sites report, and pins at one site's agent.

`status` reads the site reports the origin keeps; `pin` and `unpin` call a site agent.
"""

from __future__ import annotations

import time
from typing import Optional

import typer

from fabric.cli.options import AgentOpt, JsonOpt, OriginOpt, TokenOpt
from fabric.cli.output import emit, errors, out, table
from fabric.config import load_client_config
from fabric.errors import InvalidInput
from fabric.store.registry import parse_ref
from fabric.wire.client import SyncOrigin

commands = typer.Typer()


@commands.command()
def status(origin: Optional[str] = OriginOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Every site, its active version per channel, and any sync in progress."""
    with errors(as_json):
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
        emit({"sites": sites}, as_json,
              lambda: table(["site", "channel", "active", "target", "syncing", "workers", "error", "seen"], rows))


def _agent_call(agent: str, token: Optional[str], method: str, path: str, body: Optional[dict]) -> dict:
    cfg = load_client_config(token=token)
    with SyncOrigin(agent, cfg.token) as so:
        return so.call(method, path, body)


@commands.command()
def pin(ref: str = typer.Argument(..., help="NAME@VERSION to keep at the site whatever retention says."),
        agent: str = AgentOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Pin a version at a site, so retention never removes it."""
    with errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("pin needs NAME@VERSION")
        r = _agent_call(agent, token, "POST", "/v1/site/pins", {"artifact": artifact, "version": version})
        emit(r, as_json, lambda: out.print(f"pinned {ref}; pins: {', '.join(r['pins'])}"))


@commands.command()
def unpin(ref: str = typer.Argument(..., help="NAME@VERSION"),
          agent: str = AgentOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Remove a pin at a site."""
    with errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("unpin needs NAME@VERSION")
        r = _agent_call(agent, token, "DELETE", f"/v1/site/pins/{artifact}/{version}", None)
        emit(r, as_json, lambda: out.print(f"unpinned {ref}; pins: {', '.join(r['pins']) or '-'}"))
