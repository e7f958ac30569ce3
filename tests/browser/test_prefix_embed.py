"""
The embed widget in headless Chromium through a real nginx, the server under
a path prefix (etc/nginx-sagecell.conf, --base-url /sagecell/): every request
the widget makes goes under the prefix; a WebSocket broken from the page is
opened again by the widget, which says so, and nothing of the output is lost;
its reconnect attempts back off as kernel.js says (Chromium's clock, faked).
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from playwright.sync_api import Page, expect

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nginx import PREFIX, Nginx  # noqa: E402
from support import Daemon  # noqa: E402

from .conftest import OtherOrigin  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

RUN_TIMEOUT = 60_000
BREAK_SOCKET = "() => sagecell.cells()[0].cell.group.kernel.ws.close()"


@pytest.fixture(scope="module")
def proxied(embed_bundle):
    """nginx in front of a daemon serving under /sagecell/ (and trusting nginx)."""
    d = Daemon("--trusted-proxies", "127.0.0.1", base_url=PREFIX + "/", pool_size=2, replay_bytes="64k").start()
    proxy = None
    try:
        proxy = Nginx(d.port).start()
        yield proxy
    finally:
        if proxy is not None:
            proxy.stop()
        d.stop()


def output(page: Page):
    return page.locator(".sagecell-output").first


def status(page: Page):
    return page.locator(".sagecell-status").first


def start(page: Page, code: str) -> None:
    page.evaluate("(code) => sagecell.cells()[0].setCode(code)", code)
    page.locator(".sagecell-evalButton").first.click()


def watch_requests(page: Page) -> list[str]:
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    return urls


def test_the_demo_page_and_its_widget_under_the_prefix(page: Page, proxied: Nginx) -> None:
    urls = watch_requests(page)
    page.goto(f"{proxied.url}/")
    page.locator(".sagecell-file-input").set_input_files(
        files=[{"name": "up.txt", "mimeType": "text/plain", "buffer": b"uploaded through nginx\n"}]
    )
    expect(page.locator(".sagecell-upload[data-name='up.txt']")).to_have_attribute(
        "data-state", "done", timeout=RUN_TIMEOUT
    )
    start(page, "print(open('up.txt').read().strip())\nopen('down.txt', 'w').write('written 2718')\n")
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page).locator(".sagecell-stdout")).to_have_text("uploaded through nginx")
    link = page.locator(".sagecell-file a", has_text="down.txt")
    expect(link).to_be_visible(timeout=10_000)
    assert link.get_attribute("href").startswith(f"{proxied.url}/api/kernels/")
    with page.expect_download() as info:
        link.click()
    with open(info.value.path(), "rb") as f:
        assert f.read() == b"written 2718"
    assert page.evaluate("sagecell.serverURL") == proxied.url
    assert any("/channels?" in u for u in urls)
    strays = [u for u in urls if not u.startswith((f"{proxied.url}/", f"{proxied.ws_url}/"))]
    assert strays == []


def test_a_page_elsewhere_embeds_the_widget_from_under_the_prefix(
    page: Page, proxied: Nginx, other_origin: OtherOrigin
) -> None:
    url = other_origin.page(
        "prefixed.html",
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<script src='{proxied.url}/embedded_sagecell.js'></script></head><body>"
        "<div class='compute'><script type='text/x-python'>print(6 * 7)</script></div>"
        "<script>sagecell.makeSagecell({inputLocation: 'div.compute', autoeval: true});</script>"
        "</body></html>",
    )
    urls = watch_requests(page)
    page.goto(url)
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page).locator(".sagecell-stdout")).to_have_text("42")
    ours = [u for u in urls if not u.startswith(other_origin.base)]
    assert ours and all(u.startswith((f"{proxied.url}/", f"{proxied.ws_url}/")) for u in ours), ours


def test_a_socket_broken_mid_output_is_reopened_and_nothing_is_lost(page: Page, proxied: Nginx) -> None:
    page.goto(f"{proxied.url}/")
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    start(page, "import time\nfor i in range(60):\n    print(i, flush=True)\n    time.sleep(0.05)\n")
    expect(output(page).locator(".sagecell-stdout")).to_contain_text("10", timeout=RUN_TIMEOUT)
    page.evaluate(BREAK_SOCKET)
    expect(output(page)).to_contain_text("The connection to the server was lost; reconnecting")
    expect(output(page)).to_contain_text("Reconnected: the output produced meanwhile follows.")
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    printed = " ".join(output(page).locator(".sagecell-stdout").all_inner_texts()).split()
    assert printed == [str(i) for i in range(60)]
    expect(status(page)).to_have_attribute("data-status", "idle")
    assert len(sockets) == 2 and "last_msg_id=" in sockets[1]
    # the same session: its variables are still there
    start(page, "print('i is', i)")
    expect(output(page).locator(".sagecell-stdout")).to_have_text("i is 59", timeout=RUN_TIMEOUT)
    assert len(sockets) == 2


def test_output_past_the_replay_bound_is_said_to_be_missing(page: Page, proxied: Nginx) -> None:
    page.goto(f"{proxied.url}/")
    start(
        page,
        "import time\nprint('started', flush=True)\ntime.sleep(1.5)\nfor i in range(300):\n    print(str(i).ljust(999))\n",
    )
    expect(output(page).locator(".sagecell-stdout")).to_have_text("started", timeout=RUN_TIMEOUT)
    # The network goes for a few seconds: reconnect attempts fail until it is back, after the output.
    page.evaluate(
        "() => { const Real = window.WebSocket; window.RealWebSocket = Real;"
        " window.WebSocket = function (url) { return new Real(url.replace(/^ws:\\/\\/[^/]+/, 'ws://127.0.0.1:9')); };"
        " window.WebSocket.OPEN = Real.OPEN; }"
    )
    page.evaluate(BREAK_SOCKET)
    page.wait_for_timeout(3000)
    page.evaluate("() => { window.WebSocket = window.RealWebSocket; }")
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page)).to_contain_text(
        "could not be kept for you (this server keeps the last 65536 bytes per session)"
    )
    printed = " ".join(output(page).locator(".sagecell-stdout").all_inner_texts()).split()
    assert printed[0] == "started" and printed[-1] == "299"
    tail = [int(x) for x in printed[1:]]
    assert 10 < len(tail) < 300 and tail == list(range(300 - len(tail), 300))


def test_reconnect_attempts_back_off_and_give_up_with_a_notice(page: Page, proxied: Nginx) -> None:
    """kernel.js: attempts 250 ms, then doubling to 8 s apart, for 90 s; then "could not reconnect"."""
    page.clock.install()
    page.goto(f"{proxied.url}/")
    start(page, "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    expect(output(page).locator(".sagecell-stdout")).to_have_text("started", timeout=RUN_TIMEOUT)
    attempts: list[str] = []
    page.on("websocket", lambda ws: attempts.append(ws.url))
    # Every attempt fails: the page's WebSockets and session checks are refused from now on.
    page.route("**/api/kernels/*", lambda route: route.abort())
    page.evaluate(
        "() => { const Real = window.WebSocket; window.WebSocket = function (url) {"
        " const ws = new Real(url.replace(/^ws:\\/\\/[^/]+/, 'ws://127.0.0.1:9')); return ws; };"
        " window.WebSocket.OPEN = Real.OPEN; }"
    )
    page.clock.pause_at(page.evaluate("Date.now()") + 10)  # from here the page's time moves only when told
    page.evaluate(BREAK_SOCKET)
    expect(status(page)).to_have_attribute("data-status", "reconnecting")
    expect(output(page)).to_contain_text("reconnecting")
    waits = [250, 500, 1000, 2000, 4000, 8000, 8000]
    for n, wait in enumerate(waits, 1):
        settle()
        page.clock.run_for(wait - 20)
        settle()
        assert len(attempts) == n - 1, f"attempt {n} came before its {wait} ms"
        page.clock.run_for(40)
        deadline = time.monotonic() + 10
        while len(attempts) < n and time.monotonic() < deadline:
            page.wait_for_timeout(20)
        assert len(attempts) == n, f"no attempt {n} after {wait} ms"
    for _ in range(12):  # past 90 s in all
        settle()
        page.clock.run_for(8000)
    expect(output(page)).to_contain_text("could not reconnect", timeout=10_000)
    expect(status(page)).to_have_attribute("data-status", "disconnected")


def settle() -> None:
    """Real time for a refused attempt and its session check to fail, before the (fake) clock moves on."""
    time.sleep(0.2)
