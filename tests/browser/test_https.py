"""
The demo page over ``https:`` in headless Chromium: the browser offers ALPN
(h2, http/1.1) as every browser does, loads the page and the widget, and
evaluates a cell over a ``wss:`` WebSocket.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
from playwright.sync_api import expect

from .test_embed import RUN_TIMEOUT, open_demo, output, run

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def https_server(embed_bundle):
    from support import Daemon
    from test_tls import self_signed

    tmp = tempfile.mkdtemp(prefix="sagecell-https-")
    key, cert = self_signed(tmp)
    d = Daemon("--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1", pool_size=1).start()
    try:
        yield f"https://localhost:{d.port}"
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_demo_page_over_https_evaluates_over_wss(chromium_browser, https_server: str) -> None:
    context = chromium_browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        open_demo(page, https_server)
        run(page, "print(6 * 7)", timeout=RUN_TIMEOUT)
        expect(output(page).locator(".sagecell-stdout")).to_have_text("42")
        assert sockets and all(url.startswith("wss://localhost:") for url in sockets), sockets
    finally:
        context.close()
