"""code-server and headless Chromium for tests: locate them, log in, wait for the workbench.

Run as a script, this module warms the code-server npm cache (`.ci/setup` does so).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.components import cache_root  # the repo root is on the path now
from zlh import codeserver
from zlh.errors import ZlhError

CHROMIUM = Path("/usr/bin/chromium")
SETUP_HINT = "bash .ci/setup installs it"
SESSION_COOKIE = "code-server-session"
WORKBENCH = ".monaco-workbench"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0", "--window-size=1280,800",
]


@functools.cache
def code_server_cache() -> Path:
    """The cached code-server install (built on first use: npm, the registry, apt packages)."""
    try:
        return codeserver.ensure_installed(cache_root())
    except ZlhError as exc:
        pytest.fail(f"cannot install code-server {codeserver.VERSION} into {cache_root()}: "
                    f"{exc} ({SETUP_HINT})", pytrace=False)


def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium ({SETUP_HINT})",
                    pytrace=False)
    return CHROMIUM


def login(base_url: str, password: str) -> httpx.Response:
    """POST /login the way the login form does; no redirects followed."""
    return httpx.post(f"{base_url}/login", data={"password": password},
                      follow_redirects=False, timeout=30)


# -- headless Chromium over the DevTools protocol ----------------------------------------


class Browser:
    """Debian's Chromium, headless, driven over its DevTools websocket (127.0.0.1 only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=folder))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30) -> Browser:
        with open(self.folder / "chromium.log", "wb") as log:
            self.proc = subprocess.Popen(
                [str(chromium()), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                 "about:blank"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self._env(),
            )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("chromium did not open its DevTools port; see "
                                     f"{self.folder / 'chromium.log'}")
            time.sleep(0.05)  # a poll interval
        self.port = int(port_file.read_text().split()[0])
        return self

    def _env(self) -> dict[str, str]:
        # Its crash database and caches go to the throwaway profile, not to ~/.config.
        private = str(self.profile)
        return {**os.environ, "HOME": private, "XDG_CONFIG_HOME": private,
                "XDG_CACHE_HOME": private}

    def page_ws(self) -> str:
        pages = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=10).json()
        page = next(p for p in pages if p.get("type") == "page")
        return str(page["webSocketDebuggerUrl"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the renderers go with it
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    def open_workbench(self, url: str, cookie: str, timeout: float = 90) -> dict[str, Any]:
        """Set the session cookie, load `url`, wait for the workbench; returns figures."""
        return asyncio.run(_open_workbench(self.page_ws(), url, cookie, timeout))

    def screenshot(self, path: Path) -> None:
        asyncio.run(_screenshot(self.page_ws(), path))


class _Cdp:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        wanted = self.next_id
        await self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == wanted:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))


async def _open_workbench(ws_url: str, url: str, cookie: str,
                          timeout: float) -> dict[str, Any]:
    import websockets

    async with websockets.connect(ws_url, max_size=None) as ws:
        cdp = _Cdp(ws)
        await cdp.call("Network.enable")
        await cdp.call("Network.setCookie", name=SESSION_COOKIE, value=cookie, url=url)
        started = time.monotonic()
        await cdp.call("Page.navigate", url=url)
        deadline = started + timeout
        while True:
            found = await cdp.call("Runtime.evaluate", returnByValue=True, expression=(
                f"!!document.querySelector('{WORKBENCH}') && "
                "!!document.querySelector('.monaco-workbench .part.editor')"))
            if found.get("result", {}).get("value") is True:
                break
            if time.monotonic() > deadline:
                title = await cdp.call("Runtime.evaluate", expression="document.title",
                                       returnByValue=True)
                raise AssertionError(f"no {WORKBENCH} after {timeout:g} s at {url} "
                                     f"(title {title.get('result', {}).get('value')!r})")
            await asyncio.sleep(0.1)  # a poll interval
        return {"workbench_seconds": round(time.monotonic() - started, 2)}


async def _screenshot(ws_url: str, path: Path) -> None:
    import websockets

    async with websockets.connect(ws_url, max_size=None) as ws:
        shot = await _Cdp(ws).call("Page.captureScreenshot", format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def _warm() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        print(codeserver.ensure_installed(cache_root()))
    except ZlhError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_warm())
