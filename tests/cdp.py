"""Drive Debian's Chromium over the DevTools protocol (a websocket, with aiohttp): launch it headless,
open pages, evaluate JavaScript, take screenshots. No browser is downloaded; tests skip without one.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")

# Headless and quiet: no sandbox (containers, root), no GPU, nothing fetched from the network
# behind the test's back (QUIC, component and sync updates, background services).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    # A fake camera (Chromium's test pattern, or the file given to launch()), and the
    # permission prompt answered as a person trying the page would: allow.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class DevToolsError(RuntimeError):
    """A DevTools command failed, or JavaScript on the page threw."""


class Browser:
    """One Chromium process and its DevTools websocket."""

    def __init__(self, process: asyncio.subprocess.Process, http: aiohttp.ClientSession,
                 socket: aiohttp.ClientWebSocketResponse, log: deque[str], drain: asyncio.Task[None]) -> None:
        self.process = process
        self.log = log
        self._http = http
        self._socket = socket
        self._drain = drain
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict]] = {}
        self._events: dict[str | None, asyncio.Queue[dict]] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def launch(cls, user_data_dir: Path, *, fake_video: Path | None = None, timeout: float = 30.0) -> "Browser":
        """Start Chromium with a fresh profile in ``user_data_dir``; its camera plays ``fake_video`` (y4m) in a loop."""
        flags = [*FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-port=0"]
        if fake_video is not None:
            flags.append(f"--use-file-for-fake-video-capture={fake_video}")
        process = await asyncio.create_subprocess_exec(
            str(CHROMIUM), *flags, "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        log: deque[str] = deque(maxlen=200)
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def drain() -> None:
            # Keep reading stderr for the browser's whole life: a full pipe would block it.
            assert process.stderr is not None
            async for raw in process.stderr:
                line = raw.decode(errors="replace").rstrip()
                log.append(line)
                match = _LISTENING.search(line)
                if match and not found.done():
                    found.set_result(match.group(1))
            if not found.done():
                found.set_exception(DevToolsError("chromium exited before DevTools listened:\n" + "\n".join(log)))

        drainer = asyncio.ensure_future(drain())
        try:
            url = await asyncio.wait_for(found, timeout)
        except BaseException:
            process.kill()
            await process.wait()
            drainer.cancel()
            raise
        http = aiohttp.ClientSession()
        socket = await http.ws_connect(url, max_msg_size=0)
        return cls(process, http, socket, log, drainer)

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._events.setdefault(data.get("sessionId"), asyncio.Queue()).put_nowait(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DevToolsError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
                   timeout: float = 30.0) -> dict[str, Any]:
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        await self._socket.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}")
        return reply.get("result", {})

    async def new_page(self, url: str, timeout: float = 30.0) -> "Page":
        """A new tab showing ``url``, loaded."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, target["targetId"], attached["sessionId"])
        self._events.setdefault(page.session, asyncio.Queue())
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.navigate(url, timeout)
        return page

    def events(self, session: str) -> asyncio.Queue[dict]:
        return self._events.setdefault(session, asyncio.Queue())

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.send("Browser.close"), 5)
        except (DevToolsError, asyncio.TimeoutError, ConnectionError):
            pass
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        self._drain.cancel()
        await asyncio.gather(self._reader, self._drain, return_exceptions=True)
        await self._socket.close()
        await self._http.close()


class Page:
    """One tab, driven through its flattened DevTools session."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session
        self.console: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session, timeout=timeout)

    def _take_events(self) -> list[dict]:
        queue = self.browser.events(self.session)
        taken = []
        while not queue.empty():
            event = queue.get_nowait()
            self._note(event)
            taken.append(event)
        return taken

    def _note(self, event: dict) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif event.get("method") == "Runtime.exceptionThrown":
            self.console.append("exception: " + params["exceptionDetails"].get("exception", {}).get("description", ""))

    async def navigate(self, url: str, timeout: float = 30.0) -> None:
        self._take_events()
        await self.send("Page.navigate", {"url": url})
        queue = self.browser.events(self.session)
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(queue.get(), max(0.1, deadline - time.monotonic()))
            self._note(event)
            if event.get("method") == "Page.loadEventFired":
                return

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON; DevToolsError when it throws."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True, "timeout": timeout * 1000,
        }, timeout=timeout + 5)
        self._take_events()
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"{expression[:80]!r} threw: {description}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"console: {self.console[-10:]}")
            await asyncio.sleep(0.2)
        return value

    async def screenshot(self, path: Path) -> int:
        """A PNG of the visible page; its size in bytes."""
        data = base64.b64decode((await self.send("Page.captureScreenshot", {"format": "png"}))["data"])
        path.write_bytes(data)
        return len(data)

    async def close(self) -> None:
        """Close the tab as a person would (the page gets its pagehide event)."""
        await self.browser.send("Target.closeTarget", {"targetId": self.target})
