"""`fabric status|pin|unpin`: what the sites report, and pins at one site's agent.

`status` reads the site reports the origin keeps, treating every field of them as
untrusted, and counts per channel the sites holding its staged version; `pin` and
`unpin` call a site agent (--agent, FABRIC_AGENT or the config file).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import typer

from fabric.cli.options import AgentOpt, JsonOpt, OriginOpt, TokenOpt
from fabric.cli.output import emit, errors, esc, out, table
from fabric.config import load_client_config
from fabric.errors import InvalidInput
from fabric.store.registry import parse_ref

commands = typer.Typer()


AgentTokenOpt = typer.Option(None, "--token", help="Bearer token for --agent (or FABRIC_TOKEN).")


@commands.command()
def status(origin: Optional[str] = OriginOpt, token: Optional[str] = TokenOpt, as_json: bool = JsonOpt):
    """Every site, its active version per channel, and any sync in progress."""
    with errors(as_json):
        cfg = load_client_config(origin=origin, token=token)
        if not cfg.origin:
            raise InvalidInput("status needs --origin URL (or FABRIC_ORIGIN)")
        from fabric.wire.client import SyncOrigin
        with SyncOrigin(cfg.origin, cfg.token) as so:
            sites = so.sites()
        rows = [row for site in _items(sites) for row in _site_rows(site)]
        staged = staged_summary(sites)

        def human():
            if not _items(sites):
                out.print(f"no sites have reported to {esc(cfg.origin)} yet")
            else:
                staging = ["staged"] if any(r["staged"] for r in rows) else []  # a column only while it says something
                table(["site", "channel", "active", "target", *staging, "trust", "syncing", "workers", "error",
                       "seen"], rows)
            for s in staged:
                out.print(f"staged {esc(s['channel'])} {esc(s['version'])}: held at {s['held']} of {s['sites']} "
                          f"site(s) following it" + (f", {s['fetching']} fetching" if s["fetching"] else "")
                          + (f", {s['failed']} failed or refused" if s["failed"] else ""))
        emit({"sites": sites, "staged": staged}, as_json, human)


def staged_summary(sites) -> list[dict]:
    """Per channel and staged version: how many of the sites following the channel hold it
    (docs/protocol.md "Staged versions"), from the sites' reports (untrusted)."""
    following: dict[str, int] = {}
    counts: dict[tuple[str, str], dict] = {}
    for site in _items(sites):
        for ch in _items(site.get("channels")):
            name = f"{_text(ch.get('artifact'))}:{_text(ch.get('channel'))}"
            following[name] = following.get(name, 0) + 1
            st = ch.get("staged")
            if not isinstance(st, dict) or not _text(st.get("version")):
                continue
            c = counts.setdefault((name, _text(st.get("version"))), {"held": 0, "fetching": 0, "failed": 0})
            state = _text(st.get("state"))
            c["held" if state == "held" else "fetching" if state == "fetching" else "failed"] += 1
    return [{"channel": name, "version": v, "sites": following[name], **c} for (name, v), c in sorted(counts.items())]


def _staged(ch: dict) -> str:
    st = ch.get("staged")
    if not isinstance(st, dict) or not _text(st.get("version")):
        return ""
    state = _text(st.get("state"))
    total, done = _number(st.get("bytes_total")) or 0, _number(st.get("bytes_done")) or 0
    if state == "fetching" and total > 0:
        state = f"{100 * min(done, total) / total:.0f}%"
    return f"{_text(st.get('version'))} {state}".strip()


# A site report is what a site said about itself: every field is untrusted, any may be
# missing or of the wrong type, and none may crash `status` (tests/cli/test_hostile.py).

def _items(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _text(value) -> str:
    return "" if value is None or isinstance(value, (dict, list)) else str(value)[:200]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _trust(ch: dict) -> str:
    """verified | unsigned | stale | refused (signed versions, docs/trust.md), with the refusal's code."""
    err = ch.get("trust_error")
    code = _text(err.get("code")) if isinstance(err, dict) else ""
    return _text(ch.get("trust")) + (f" ({code})" if code else "")


def _site_rows(site: dict) -> list[dict]:
    received = _number(site.get("received"))
    seen = f"{time.time() - received:.0f}s ago" if received is not None else "?"
    rows = []
    for ch in _items(site.get("channels")):
        syncing = ""
        if ch.get("syncing"):
            total, done = _number(ch.get("bytes_total")) or 0, _number(ch.get("bytes_done")) or 0
            pct = f" {100 * done / total:.0f}%" if total > 0 else ""
            syncing = f"{_text(ch['syncing'])}{pct}"
        workers = ", ".join(f"{_text(w.get('worker'))}={_text(w.get('serving')) or '-'}"
                            + ("" if w.get("state") == "serving" else f" ({_text(w.get('state'))})")
                            for w in _items(site.get("workers")) if w.get("artifact") == ch.get("artifact"))
        rows.append({"site": _text(site.get("site")), "channel": f"{_text(ch.get('artifact'))}:{_text(ch.get('channel'))}",
                     "active": _text(ch.get("active")), "target": _text(ch.get("target")), "staged": _staged(ch),
                     "trust": _trust(ch), "syncing": syncing,
                     "workers": workers, "error": _text(ch.get("error")), "seen": seen})
    return rows


def _agent_call(agent: Optional[str], token: Optional[str], method: str, path: str, body: Optional[dict]) -> dict:
    cfg = load_client_config(token=token, agent=agent)
    from fabric.wire.client import SyncOrigin
    with SyncOrigin(cfg.agent, cfg.token) as so:
        return so.call(method, path, body)


def _pins(r) -> str:
    pins = r.get("pins") if isinstance(r, dict) else None
    return ", ".join(map(_text, pins)) if isinstance(pins, list) else ""


@commands.command()
def pin(ref: str = typer.Argument(..., help="NAME@VERSION to keep at the site whatever retention says."),
        agent: Optional[str] = AgentOpt, token: Optional[str] = AgentTokenOpt, as_json: bool = JsonOpt):
    """Pin a version at a site, so retention never removes it."""
    with errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("pin needs NAME@VERSION")
        r = _agent_call(agent, token, "POST", "/v1/site/pins", {"artifact": artifact, "version": version})
        emit(r, as_json, lambda: out.print(f"pinned {esc(ref)}; pins: {esc(_pins(r))}"))


@commands.command()
def unpin(ref: str = typer.Argument(..., help="NAME@VERSION whose pin to remove."),
          agent: Optional[str] = AgentOpt, token: Optional[str] = AgentTokenOpt, as_json: bool = JsonOpt):
    """Remove a pin at a site."""
    with errors(as_json):
        artifact, version, _ = parse_ref(ref)
        if not version:
            raise InvalidInput("unpin needs NAME@VERSION")
        r = _agent_call(agent, token, "DELETE", f"/v1/site/pins/{artifact}/{version}", None)
        emit(r, as_json, lambda: out.print(f"unpinned {esc(ref)}; pins: {esc(_pins(r) or '-')}"))
