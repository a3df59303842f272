"""A real headless Chromium, driven over the Chrome DevTools Protocol (CDP) with aiohttp's
websocket client: nothing is downloaded, no driver binary is needed.

`Chromium.start()` runs Debian's `chromium` with a fresh profile and
`--remote-debugging-port=0`, reads the port it chose from the profile's
`DevToolsActivePort` file, opens one page and attaches to it. `evaluate` runs a JS
expression in the page, `wait_for` polls one until it is truthy, `type_into` focuses a
field and inserts text as a keyboard would, `screenshot` writes a PNG. Everything the
page logs as an error (a thrown exception, a CSP refusal) is kept in `problems`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    def __init__(self, log: Path, width: int = 1280, height: int = 960):
        self.log_path, self.width, self.height = Path(log), width, height
        self.profile = Path(tempfile.mkdtemp(prefix="fabric-chromium-"))
        self.proc: subprocess.Popen | None = None
        self.problems: list[str] = []
        self._ids = 0
        self._pending: dict[int, asyncio.Future] = {}

    async def start(self, timeout: float = 30.0) -> "Chromium":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([chromium_path(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (rc={self.proc.poll()}):\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        target = await self.send("Target.createTarget", url="about:blank", session=None)
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True, session=None)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send("Page.bringToFront")  # a page in the background paints no new frames
        await self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        return self

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = json.loads(msg.data)
            if "id" in m and m["id"] in self._pending:
                self._pending.pop(m["id"]).set_result(m)
            elif m.get("method") == "Runtime.exceptionThrown":
                d = m["params"]["exceptionDetails"]
                self.problems.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m.get("method") == "Log.entryAdded":
                e = m["params"]["entry"]
                if e["level"] == "error" and "Failed to load resource" not in e["text"]:
                    self.problems.append(f"{e['source']}: {e['text']}")  # a CSP refusal is a `security` entry
            elif m.get("method") == "Runtime.consoleAPICalled" and m["params"]["type"] == "error":
                self.problems.append(f"console.error: {[a.get('value') for a in m['params']['args']]}")

    async def send(self, method: str, session: str | None | bool = True, **params) -> dict:
        self._ids += 1
        msg = {"id": self._ids, "method": method, "params": params}
        if session is True:
            msg["sessionId"] = self.session
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = fut
        await self._ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def evaluate(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str | None = None):
        """Poll `expression` until it is truthy; its value. On timeout, fail saying what the page shows."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                shown = await self.evaluate("document.body ? document.body.innerText.slice(0, 3000) : ''")
                raise AssertionError(f"timed out waiting for {what or expression}; the page shows:\n{shown}\n"
                                     f"problems: {self.problems}")
            await asyncio.sleep(0.1)

    async def type_into(self, selector: str, text: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    async def screenshot(self, path: Path) -> Path:
        """The page as it is now: after two animation frames, so the DOM's last change is painted."""
        await self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))")
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        try:
            if getattr(self, "_ws", None) is not None:
                try:
                    await asyncio.wait_for(self.send("Browser.close", session=None), 5)
                except (asyncio.TimeoutError, RuntimeError, ConnectionError):
                    pass
                await self._ws.close()
                self._reader.cancel()
                await self._http.close()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def __aenter__(self) -> "Chromium":
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.close()
