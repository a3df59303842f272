"""A real `fabric agent` process on a loopback port, and a small site tree to test with."""

from __future__ import annotations

import time
from pathlib import Path

from topology.lab import HOST_DISK_RETENTION

from .files import toml_lines
from .http import request
from .origin import parse_metrics
from .ports import free_port
from .process import ServerProcess

SITE_SECRETS = {  # each site's own token (pull scope); long and distinctive for log scans
    "hub": "hub-token-6d2f0a9c81e4b357",
    "edge-a": "edge-a-token-1b9e7c3d5a2f8046",
    "edge-b": "edge-b-token-94c0e2a7f6d1b385",
    "solo": "solo-token-2e8f4a6c0b9d7153",
}
SITE_TOKENS = [{"name": name, "secret": secret, "scopes": ["pull"], "site": name}  # `site`: it reports as that site
               for name, secret in SITE_SECRETS.items()]


def write_config(path: Path, settings: dict, retention: dict | None = None, sync: dict | None = None) -> Path:
    lines = toml_lines(settings)
    retention = {**HOST_DISK_RETENTION, **(retention or {})}  # the host's disk is not the site's
    for table, values in (("retention", retention), ("sync", sync)):
        if values:
            lines.append(f"[{table}]")
            lines += toml_lines(values)
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess(ServerProcess):
    """`fabric agent --config PATH`; the config is written from keyword settings."""

    def __init__(self, root: Path, site: str, origin_url: str, *, follow: list[str], tokens: Path | None = None,
                 upstreams: list[str] | None = None, topology: Path | None = None,
                 data: Path | None = None, token: str | None = None,
                 retention: dict | None = None, sync: dict | None = None, port: int | None = None,
                 extra: dict | None = None, origins: list[str] | None = None):
        self.root, self.site = Path(root), site
        self.port = port or free_port()
        self.data = Path(data) if data else self.root / site
        settings = {"site": site, "data": str(self.data), "listen": f"127.0.0.1:{self.port}",
                    "origin": origin_url, "token": token or SITE_SECRETS.get(site, SITE_SECRETS["solo"]),
                    "follow": follow, "report_interval": 0.5}
        if origins:  # several origins over one store, in preference order (instead of `origin`)
            del settings["origin"]
            settings["origins"] = list(origins)
        if tokens:
            settings["tokens"] = str(tokens)
        if upstreams:
            settings["upstreams"] = upstreams
        if topology:
            settings["topology"] = str(topology)
        settings.update(extra or {})  # more site.toml keys (`trust`, ...)
        sync = {"resync_interval": 2, "stall_timeout": 5, "give_up_after": 20, **(sync or {})}
        self.config = write_config(self.root / f"{site}.toml", settings, retention, sync)
        super().__init__(["agent", "--config", str(self.config)], self.port, self.root / f"{site}.log",
                         name=f"agent {site}")

    def active(self, artifact: str) -> str | None:
        link = self.data / "current" / artifact
        return link.resolve().name if link.is_symlink() else None

    def status(self) -> dict:
        token = SITE_SECRETS.get(self.site, SITE_SECRETS["solo"])
        r = request(self.url, "GET", "/v1/site", token=token, timeout=5)
        assert r.status == 200, r
        return r.json()

    def metrics(self) -> dict[str, float]:
        token = SITE_SECRETS.get(self.site, SITE_SECRETS["solo"])
        return parse_metrics(request(self.url, "GET", "/metrics", token=token, timeout=5).body.decode())

    def wait_active(self, artifact: str, version: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active(artifact) == version:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent {self.site} died:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.site}: {artifact} active={self.active(artifact)}, wanted {version}\n"
                             f"{self.log_text()[-3000:]}")
