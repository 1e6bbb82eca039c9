"""A headless Chromium for the browser-worker tests, driven over the DevTools protocol.

No Playwright, no browser download: the Debian ``chromium`` package, started
with ``--remote-debugging-port=0`` and a fresh profile, and a small CDP client
over tornado's WebSocket client (on its own event-loop thread, so tests stay
synchronous).  Only 127.0.0.1 URLs are opened.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
         "--remote-allow-origins=*", "--enable-features=SharedArrayBuffer"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process and a CDP connection to it."""

    def __init__(self, executable: str, *, extra_flags: tuple[str, ...] = (), timeout: float = 30.0):
        self.profile = tempfile.mkdtemp(prefix="crowdgraph-chromium-")
        self.proc = subprocess.Popen(
            [executable, *FLAGS, *extra_flags, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp", daemon=True)
        self._thread.start()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._conn: Any = None
        try:
            port = self._port(timeout)
            self._sync(self._connect(port), timeout)
        except BaseException:
            self.close()
            raise

    def _port(self, timeout: float) -> int:
        active = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise CdpError(f"chromium exited with code {self.proc.returncode}: {err}")
            try:
                lines = active.read_text().split("\n")
                if len(lines) >= 2 and lines[0].strip():
                    self._ws_path = lines[1].strip()
                    return int(lines[0])
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise CdpError(f"chromium did not open its DevTools port within {timeout:.0f} s")

    async def _connect(self, port: int) -> None:
        from tornado.websocket import websocket_connect

        self._conn = await websocket_connect(f"ws://127.0.0.1:{port}{self._ws_path}", max_message_size=256 * 2**20)
        asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self._conn.read_message()
            if msg is None:
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(CdpError("the DevTools connection closed"))
                return
            data = json.loads(msg)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is None:
                self.events.append(data)
                del self.events[:-200]
            elif "error" in data:
                fut.set_exception(CdpError(str(data["error"])))
            else:
                fut.set_result(data.get("result", {}))

    async def _send(self, method: str, params: dict[str, Any], session: str | None) -> Any:
        n = next(self._ids)
        fut = self._loop.create_future()
        self._pending[n] = fut
        msg: dict[str, Any] = {"id": n, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self._conn.write_message(json.dumps(msg))
        return await fut

    def _sync(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> Any:
        return self._sync(self._send(method, params or {}, session), timeout)

    def open(self, url: str) -> "Page":
        assert url.startswith("http://127.0.0.1:") or url.startswith("https://127.0.0.1:"), url
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        try:
            if self._conn is not None:
                self._loop.call_soon_threadsafe(self._conn.close)
        except RuntimeError:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    def renderer_rss(self) -> int:
        """Resident bytes of all Chromium processes (psutil), for the memory measurement."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        return self.browser.send(method, params, self.session, timeout)

    def eval(self, expression: str, timeout: float = 30.0) -> Any:
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      timeout)
        if "exceptionDetails" in r:
            raise CdpError(f"{expression!r} raised: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def state(self) -> dict[str, Any]:
        return self.eval("window.crowdgraph ? JSON.parse(JSON.stringify(window.crowdgraph)) : null") or {}

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "a condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = self.state()
            except CdpError:
                st = {}
            if st and predicate(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page state: {st}")

    def text(self) -> str:
        return str(self.eval("document.body.innerText"))

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.browser.send("Target.closeTarget", {"targetId": self.target}, timeout=10)
        except (CdpError, TimeoutError, Exception):
            pass
