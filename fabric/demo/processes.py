"""The demo's processes and how it talks to them: starting and stopping every `fabric`
process (each logging to `logs/NAME.log`), waiting for a condition, small HTTP and
Prometheus readers, free loopback ports, and writing the TOML files the processes read."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from fabric.cli import fabric_command
from fabric.errors import DemoFailed
from fabric.demo.state import START_TIMEOUT, Demo, Node, shown

FABRIC = fabric_command()


class Processes:
    """The `fabric` processes the demo starts, each logging to `logs/NAME.log`.

    `stop` ends every one still running: SIGTERM, then SIGKILL for any still alive
    after a grace period. On Linux a server started before any thread exists also
    gets SIGTERM if the demo dies without running `stop` (PR_SET_PDEATHSIG).
    """

    def __init__(self, d: Demo):
        self.d = d
        self.logs = d.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.servers: dict[str, subprocess.Popen] = {}
        self.all: list[subprocess.Popen] = []
        # No FABRIC_* variable or config file of the user's leaks into the demo's processes.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
        self.env["FABRIC_CONFIG"] = os.devnull  # an empty client config, whatever the user has

    def _env(self, token: str | None, extra: dict | None) -> dict:
        env = dict(self.env, **(extra or {}))
        if token:
            env["FABRIC_TOKEN"] = self.d.secrets[token]
        return env

    def _show(self, args: list, token: str | None) -> None:
        line = " ".join(shlex.quote(shown(self.d, a) if isinstance(a, Path) else str(a)) for a in args)
        note = f"  [dim](FABRIC_TOKEN: {token}'s token)[/dim]" if token else ""
        self.d.console.print(f"[dim]$[/dim] [cyan]fabric {line}[/cyan]{note}", highlight=False, soft_wrap=True)

    def start(self, name: str, args: list, *, token: str | None = None, capture: bool = False,
              env: dict | None = None) -> subprocess.Popen:
        """Start `fabric ARGS`; a server (capture False) logs to logs/NAME.log and must keep running."""
        self._show(args, token)
        cmd = FABRIC + [str(a) for a in args]
        if capture:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 text=True, env=self._env(token, env))
        else:
            with open(self.logs / f"{name}.log", "ab") as log:
                p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._env(token, env), preexec_fn=_die_with_parent())
            self.servers[name] = p
        self.all.append(p)
        return p

    def run(self, name: str, args: list, *, token: str | None = None, env: dict | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run `fabric ARGS` to its end; its output goes to logs/NAME.log too. Fails on a non-zero status."""
        p = self.start(name, args, token=token, capture=True, env=env)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            raise DemoFailed(f"`fabric {args[0]}` ({name}) did not finish within {timeout:.0f}s")
        (self.logs / f"{name}.log").write_text(stdout + stderr)
        if p.returncode != 0:
            raise DemoFailed(f"`fabric {args[0]}` ({name}) failed with status {p.returncode}:\n{stderr.strip()}")
        return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)

    def check(self) -> None:
        """Raise if a server exited."""
        for name, p in self.servers.items():
            if p.poll() is not None:
                raise DemoFailed(f"{name} exited with status {p.returncode}; "
                                 f"the end of {shown(self.d, self.logs / (name + '.log'))}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM to every process still running, SIGKILL after `grace` seconds; how many there were."""
        alive = [p for p in self.all if p.poll() is None]
        for p in alive:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return len(alive)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the demo dies (None where unsafe)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None  # a preexec_fn is unsafe once threads exist
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG



def wait(d: Demo, what: str, predicate: Callable[[], bool], timeout: float, fail: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        d.procs.check()
        try:
            if predicate():
                return True
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            if fail:
                raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}; logs in "
                                 f"{shown(d, d.root / 'logs')}/")
            return False
        time.sleep(0.1)


def wait_live(d: Demo, nodes: list[Node]) -> None:
    def live() -> bool:
        return all(http_request(n.url, "GET", "/livez", timeout=2)[0] == 200 for n in nodes)
    wait(d, "/livez of " + ", ".join(n.name for n in nodes), live, START_TIMEOUT)


def http_request(url: str, method: str, path: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def metrics(url: str, token: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value}."""
    status, body = http_request(url, "GET", "/metrics", token=token)
    out = {}
    for line in body.decode().splitlines() if status == 200 else []:
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def loopback_url(url: str, taken: set[int]) -> str:
    """http://127.0.0.1:PORT with the URL's port if it is free, else a free one."""
    port = urlsplit(url).port
    if port is None or port in taken or not port_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    taken.add(port)
    return f"http://127.0.0.1:{port}"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def listen(url: str) -> str:
    u = urlsplit(url)
    return f"{u.hostname}:{u.port}"


def write_toml(path: Path, data: dict, header: str = "") -> None:
    """A small TOML writer for the demo's files: scalars and lists, then tables and arrays of tables."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a JSON string is a TOML basic string

    def pairs(table: dict) -> list[str]:
        return [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)
                and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]

    lines = pairs(data)
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *pairs(v)]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                lines += ["", f"[[{k}]]", *pairs(x)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join(lines).lstrip("\n") + "\n")
