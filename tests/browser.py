"""A real server on a loopback port and Debian's headless Chromium driving pages on it.

Browser downloads fail on this project's machines, so Playwright is pointed at the system
Chromium (`apt-get install chromium`; `.ci/run` installs it). Without it the browser tests
skip and say why.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Flags for a headless root session on a machine without network: no sandbox (root), and no
# background traffic to Google's hosts that would only be refused.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` (lifespan included) with uvicorn on a free loopback port; yields its base
    URL once the server accepts connections."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(600):  # up to a minute for the model's warm-up
        if server.started:
            started.set()
            break
        if not thread.is_alive():
            break
        started.wait(0.1)
    if not started.is_set():
        server.should_exit = True
        raise RuntimeError("the test server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chromium_path() -> str:
    for path in CHROMIUM_PATHS:
        if Path(path).exists():
            return path
    found = shutil.which("chromium")
    if found:
        return found
    pytest.skip(
        "needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run "
        "installs it): Playwright's own browser download is not reachable here"
    )


@dataclass
class RequestLog:
    """Every URL the page asked for, to prove nothing left the server."""

    base: str
    urls: list[str] = field(default_factory=list)

    def external(self) -> list[str]:
        return [u for u in self.urls if not u.startswith((self.base, "data:", "blob:"))]


@contextlib.contextmanager
def browser_page(base: str) -> Iterator[tuple[object, RequestLog]]:
    """A fresh headless Chromium page, and the log of every request it makes."""
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    log = RequestLog(base)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: log.urls.append(request.url))
            yield page, log
        finally:
            browser.close()
