"""
Fixtures for the embed widget's browser tests: the widget bundle (built with
npm when stale), a real sagecell_tw server, a second HTTP server on another
origin for embedding pages, and headless Chromium (Debian's, never a
downloaded one) through Playwright.

A failing test leaves a screenshot and the page's console in test-artifacts/.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "js"
STATIC = REPO / "sagecell_tw" / "static"
BUNDLE = STATIC / "embed.js"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("SAGECELL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # Keep each phase's report on the item, so fixtures can see a failure.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# -- the widget bundle --------------------------------------------------------


def _bundle_is_stale() -> bool:
    if not BUNDLE.exists():
        return True
    built = BUNDLE.stat().st_mtime
    sources = [JS_DIR / "package-lock.json", JS_DIR / "build.mjs"]
    sources += list((JS_DIR / "src").rglob("*"))
    return any(p.stat().st_mtime > built for p in sources if p.exists())


@pytest.fixture(scope="session")
def embed_bundle() -> Path:
    """sagecell_tw/static/embed.js, rebuilt with npm when older than js/src."""
    if _bundle_is_stale():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to build the widget (cd js && npm ci && npm run build)")
        if not (JS_DIR / "node_modules" / "esbuild").exists():
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=JS_DIR,
                check=True,
                timeout=600,
            )
        subprocess.run([npm, "run", "build"], cwd=JS_DIR, check=True, timeout=300)
    assert BUNDLE.exists(), "the widget build made no sagecell_tw/static/embed.js"
    return BUNDLE


# -- servers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: object = None, timeout: float = 10.0):
    """One JSON request to the server under test; returns (status, parsed body)."""
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def sagecell_server(embed_bundle: Path, daemon) -> str:
    """Base URL of the real `twistd -n sagecell` that tests/conftest.py starts."""
    return daemon.url


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class OtherOrigin:
    """A static HTTP server on another port: pages there embed the widget."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def page(self, name: str, html: str) -> str:
        """Write a page and return its URL."""
        (self.root / name).write_text(html, encoding="utf-8")
        return f"{self.base}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def other_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtherOrigin]:
    server = OtherOrigin(tmp_path_factory.mktemp("other-origin"))
    try:
        yield server
    finally:
        server.close()


# -- the browser --------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_browser():
    from playwright.sync_api import expect

    # Outputs arrive over a WebSocket from a real kernel: allow for a slow CI.
    expect.set_options(timeout=15_000)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium_browser, request: pytest.FixtureRequest):
    """A fresh page; on failure its screenshot and console go to test-artifacts/."""
    from playwright.sync_api import Error as PlaywrightError

    context = chromium_browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    console: list[str] = []
    pg.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    pg.console_log = console
    try:
        yield pg
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
            try:
                pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            except PlaywrightError as e:  # the page may be gone; keep the log anyway
                console.append(f"(screenshot failed: {e})")
            (ARTIFACTS / f"{name}.console.txt").write_text("\n".join(console), encoding="utf-8")
        context.close()
