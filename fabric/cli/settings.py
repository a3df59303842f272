"""`fabric config show`: the client settings a command would use, and where each came from.

The settings and their precedence (flag, environment, config file, default) are
fabric/config.py's; this prints them, the token masked.
"""

from __future__ import annotations

from typing import Optional

import typer

from fabric.cli.options import AgentOpt, JsonOpt, OriginOpt, StoreOpt, TokenOpt
from fabric.cli.output import emit, errors, out, table
from fabric.config import config_path, load_client_config

config_app = typer.Typer(no_args_is_help=True, help="The client settings (store, origin, token, agent).")

_KEYS = ("store", "origin", "token", "agent")


def mask(token: str) -> str:
    """A token as it may be shown: its last 4 characters, and only if it is long enough to spare them."""
    return "****" + token[-4:] if len(token) >= 16 else "****"


@config_app.command("show")
def show(store: Optional[str] = StoreOpt, origin: Optional[str] = OriginOpt, token: Optional[str] = TokenOpt,
         agent: Optional[str] = AgentOpt, as_json: bool = JsonOpt):
    """Print the effective store, origin, token (masked) and agent, and where each came from."""
    with errors(as_json):
        cfg = load_client_config(store=store, origin=origin, token=token, agent=agent)
        sources = dict(cfg.sources)
        items = []
        for key in _KEYS:
            value = getattr(cfg, key)
            if key == "token" and value:
                value = mask(value)
            items.append({"setting": key, "value": value, "source": sources.get(key, "unset")})
        obj = {"config_file": str(config_path()), "settings": {i["setting"]: {"value": i["value"], "source": i["source"]}
                                                              for i in items}}

        def human():
            out.print(f"config file: {config_path()}", markup=False, highlight=False)
            table(["setting", "value", "source"], items)
        emit(obj, as_json, human)
