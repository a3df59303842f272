"""A real `fabric origin` process on a loopback port, and the `fabric` CLI as a process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .cli import FABRIC
from .files import toml_lines
from .http import request
from .ports import free_port
from .store import chunk_count, stored_payload_size  # noqa: F401  (tests import them from here too)

# Tokens every wire test may use. Secrets are long and distinctive so a log scan can find them.
PUBLISH_SECRET = "pub-secret-4f1c9a7e2b6d8053"
PULL_SECRET = "site-secret-0a9b8c7d6e5f4321"
ADMIN_SECRET = "admin-secret-77e3a1c0d9b2f865"
LLAMA_SECRET = "llama-only-secret-5c2e9f0b1a"
HASHED_SECRET = "hashed-secret-3b8d1e6f0c2a9475"
DEFAULT_TOKENS = [
    {"name": "publisher", "secret": PUBLISH_SECRET, "scopes": ["publish", "pull"]},
    {"name": "site-fra", "secret": PULL_SECRET, "scopes": ["pull"]},
    {"name": "ops", "secret": ADMIN_SECRET, "scopes": ["admin"]},
    {"name": "llama-site", "secret": LLAMA_SECRET, "scopes": ["pull", "publish"], "artifacts": ["llama-*"]},
    {"name": "hashed", "secret_sha256": hashlib.sha256(HASHED_SECRET.encode()).hexdigest(), "scopes": ["pull"]},
]
ALL_SECRETS = [PUBLISH_SECRET, PULL_SECRET, ADMIN_SECRET, LLAMA_SECRET, HASHED_SECRET]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without FABRIC_* settings and with no config file, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env["FABRIC_CONFIG"] = os.devnull  # an empty config: FABRIC_CONFIG must name a file that exists
    env.update(extra)
    return env


def write_token_file(path: Path, tokens: list[dict] | None = None) -> Path:
    lines = []
    for t in tokens if tokens is not None else DEFAULT_TOKENS:
        lines.append("[[token]]")
        lines += toml_lines(t)
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {"name{labels}": value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


class OriginProcess:
    """`fabric origin --store STORE --listen 127.0.0.1:PORT --tokens FILE`, logging to a file."""

    def __init__(self, store: Path, tokens: Path, log: Path, port: int | None = None, args: list[str] = ()):
        self.store, self.tokens, self.log_path = Path(store), Path(tokens), Path(log)
        self.args = [str(a) for a in args]  # more `fabric origin` flags
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.env: dict[str, str] = {}  # FABRIC_* settings for the process (clean_env drops the test's own)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "OriginProcess":
        for attempt in range(3):
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    FABRIC + ["origin", "--store", str(self.store), "--listen", f"127.0.0.1:{self.port}",
                              "--tokens", str(self.tokens), *self.args],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env(**self.env))
            if self._wait_live(timeout):
                return self
            rc = self.proc.poll()
            if rc is not None and not self._fixed_port and attempt < 2:
                self.port = free_port()  # someone took the port between probe and bind
                continue
            self.stop()
            raise RuntimeError(f"origin did not come up (rc={rc}):\n{self.log_text()[-3000:]}")
        raise AssertionError("unreachable")

    def _wait_live(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if request(self.url, "GET", "/livez", timeout=2).status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` and reap the process; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> "OriginProcess":
        self.stop()
        self._fixed_port = True  # same port, same store
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self, token: str = ADMIN_SECRET) -> dict[str, float]:
        r = request(self.url, "GET", "/metrics", token=token)
        assert r.status == 200, r
        return parse_metrics(r.body.decode())

    def counter(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def __enter__(self):
        """Start it unless it runs already (`with start_origin(...)` must not start a second one)."""
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc):
        self.stop()


def start_origin(root: Path, tokens: list[dict] | None = None) -> OriginProcess:
    """A fresh origin with its own store, token file and log under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tok = write_token_file(root / "tokens.toml", tokens)
    return OriginProcess(root / "origin-store", tok, root / "origin.log").start()


# --- the CLI ----------------------------------------------------------------------------

def fabric(*args, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(FABRIC + [str(a) for a in args], capture_output=True, text=True,
                          env=clean_env(), timeout=timeout, **popen)


def fabric_json(*args, timeout: float = 300, expect_rc: int = 0) -> dict:
    p = fabric(*args, "--json", timeout=timeout)
    assert p.returncode == expect_rc, f"fabric {args}: rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}"
    return json.loads(p.stdout)


def fabric_popen(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(FABRIC + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env(), **kw)


# --- trees ----------------------------------------------------------------------------------

def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path → (sha256 of the bytes, permission bits) for every file under root,
    but a site's seal (`.fabric-seal.json` at the top: Fabric's, not the version's; tests/agents/test_seal.py)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if name == ".fabric-seal.json" and Path(dirpath) == Path(root):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = (h.hexdigest(), p.stat().st_mode & 0o777)
    return out
