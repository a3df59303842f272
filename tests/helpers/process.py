"""A `fabric` daemon as a real process: start it, wait until it answers, stop or kill it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .cli import FABRIC
from .http import request
from .origin import clean_env


class ServerProcess:
    """`fabric ARGV…` serving on 127.0.0.1:`port`; `probe` is the path polled until it answers 200."""

    def __init__(self, argv: list[str], port: int, log_path: Path, *, name: str, probe: str = "/livez"):
        self.argv, self.port, self.log_path = list(argv), port, Path(log_path)
        self.name, self.probe = name, probe
        self.env: dict[str, str] = {}  # FABRIC_* settings for the process (clean_env drops the test's own)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(FABRIC + self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=clean_env(**self.env))
        return self

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        """Spawn, then wait until `probe` answers 200 (fail fast if the process exits)."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc={self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if request(self.url, "GET", self.probe, timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name} did not come up:\n{self.log_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self):
        """Start it unless it runs already (a helper that returns a started process may be used in `with`)."""
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc):
        self.stop()
