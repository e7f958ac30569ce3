"""
Sage cells in headless Chromium: pages on another origin embed cells from a
real daemon serving Sage and Python kernels, by ``kernelName`` or, as pages
written for SageMathCell do, by language (``languages``, ``data-lang``,
``<script type="text/x-sage">``): gp, maxima, html, python and sage code,
and Sage's output (plots, typeset ``show()``, ``html()``, 3D scenes drawn
with three.js from this server). Skipped where passagemath is not installed.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
import time
import urllib.parse
import urllib.request

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect
from support import Daemon
from test_sage import wait_sage_pool

from sagecell_tw import config as configmod

from .conftest import OtherOrigin

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not configmod.sage_available(), reason="passagemath is not installed"),
]

RUN_TIMEOUT = 60_000  # ms


@pytest.fixture(scope="module")
def sage_server(embed_bundle) -> str:
    d = Daemon(kernels="sagemath,python3", pool_size=2)
    d.start(timeout=120)
    try:
        wait_sage_pool(d)
        yield d.url
    finally:
        d.stop()


def sage_page(server: str, other_origin: OtherOrigin, name: str, code: str) -> str:
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<script src='{server}/embedded_sagecell.js'></script></head><body>"
        f"<div id='c'></div><script>sagecell.makeSagecell({{inputLocation: '#c', kernelName: 'sagemath', "
        f"code: {code!r}, autoeval: true}});</script></body></html>"
    )
    return other_origin.page(name, html)


def done(page: Page):
    out = page.locator("#c .sagecell-output")
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    return out


def test_sage_arithmetic_and_factor(page: Page, sage_server: str, other_origin: OtherOrigin) -> None:
    page.goto(sage_page(sage_server, other_origin, "sage-factor.html", "print(2^10, 1/2 + 1/3)\nfactor(2^64 - 1)"))
    out = done(page)
    expect(out).to_contain_text("1024 5/6")
    expect(out).to_contain_text("3 * 5 * 17 * 257 * 641 * 65537 * 6700417")


def test_sage_plot_shows_as_an_image(page: Page, sage_server: str, other_origin: OtherOrigin) -> None:
    page.goto(sage_page(sage_server, other_origin, "sage-plot.html", "plot(sin(x), (x, 0, pi))"))
    out = done(page)
    img = out.locator("img.sagecell-image")
    expect(img).to_have_count(1)
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("() => document.querySelector('#c .sagecell-output img').naturalWidth > 100")


def test_sage_show_is_typeset(page: Page, sage_server: str, other_origin: OtherOrigin) -> None:
    page.goto(sage_page(sage_server, other_origin, "sage-show.html", "show(integrate(sin(x)^2, x))"))
    out = done(page)
    # Typeset with KaTeX from its text/latex, not its HTML in a frame with no math renderer.
    expect(out.locator(".katex").first).to_be_visible()
    expect(out.locator("iframe")).to_have_count(0)


# -- languages and Sage's output, on one page as SageMathCell pages have them ----

#: the cells of a page written for SageMathCell: one `languages` list for all,
#: `data-lang` choosing each cell's, code in <script type="text/x-sage">
LANGUAGE_CELLS = {
    "gp": ("gp", "factor(2^64 - 1)"),
    "maxima": ("maxima", "integrate(x^2, x)"),
    "html": ("html", '<b id="made-by-html">bold</b> and $x^2$'),
    "switch": (None, "print(2^10)"),
    "scene": (None, "y = var('y')\nplot3d(x * y, (x, -1, 1), (y, -1, 1))"),
}


class RefusingProxy:
    """
    The browser's proxy: Chromium sends every request that leaves loopback
    through it (loopback never goes through a proxy), from any frame, even
    those Playwright's request events do not see (sandboxed frames). It
    records each request line and answers 403.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(4096).decode("latin-1").strip()
                proxy.seen.append(line)
                self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def languages_page(chromium_browser, sage_server: str, other_origin: OtherOrigin):
    """
    The page, loaded once for the tests below (its cells run at once, each in
    a Sage kernel), in a browser whose requests off loopback all go to a
    proxy that records and refuses them (``page.outside``).
    """
    cells = "".join(
        f"<div class='compute' id='{name}'{f' data-lang={lang!r}' if lang else ''}>"
        f"<script type='text/x-sage'>{code}</script></div>"
        for name, (lang, code) in LANGUAGE_CELLS.items()
    )
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<script src='{sage_server}/embedded_sagecell.js'></script></head><body>{cells}"
        "<script>sagecell.makeSagecell({inputLocation: 'div.compute', evalButtonText: 'Go', autoeval: true,"
        " languages: ['sage', 'python', 'gp', 'maxima', 'html']});</script></body></html>"
    )
    proxy = RefusingProxy()
    context = chromium_browser.new_context(
        viewport={"width": 1100, "height": 900}, proxy={"server": proxy.url, "bypass": "127.0.0.1,localhost,[::1]"}
    )
    context.set_default_timeout(30_000)
    pg = context.new_page()
    pg.outside = proxy.seen
    pg.goto(other_origin.page("sage-languages.html", html))
    try:
        yield pg
    finally:
        context.close()
        proxy.close()


def cell_done(page: Page, name: str):
    out = page.locator(f"#{name} .sagecell-output")
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    return out


def test_data_lang_gp_cell_runs_in_gp(languages_page: Page) -> None:
    out = cell_done(languages_page, "gp")
    # GP's factor matrix, as gp.eval prints it; Sage's factor would print "3 * 5 * ...".
    expect(out).to_contain_text("[6700417 1]")
    expect(languages_page.locator("#gp .sagecell-language select")).to_have_value("gp")


def test_data_lang_maxima_cell_runs_in_maxima(languages_page: Page) -> None:
    out = cell_done(languages_page, "maxima")
    expect(out).to_have_text(re.compile(r"^\s*x\^3/3\s*$"))


def test_html_language_renders_html(languages_page: Page) -> None:
    out = cell_done(languages_page, "html")
    frame = out.frame_locator("iframe.sagecell-html-frame")
    expect(frame.locator("b#made-by-html")).to_have_text("bold")
    # html() writes $x^2$ as \(x^2\), for MathJax: typeset with KaTeX, styled by its stylesheet.
    expect(frame.locator(".katex .katex-html")).to_have_text("x2")
    expect(frame.locator(".katex-mathml")).to_have_css("position", "absolute")


def test_selector_switches_between_sage_and_python(languages_page: Page) -> None:
    page = languages_page
    select = page.locator("#switch .sagecell-language select")
    expect(select).to_be_visible()
    options = select.locator("option")
    expect(options).to_have_text(["Sage", "Python", "GP", "Maxima", "HTML"])
    out = cell_done(page, "switch")
    expect(out).to_have_text(re.compile(r"^\s*1024\s*$"))  # Sage: ^ is a power

    select.select_option("python")
    page.locator("#switch .sagecell-evalButton").click()
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(out).to_have_text(re.compile(r"^\s*8\s*$"))  # Python: ^ is XOR

    select.select_option("sage")
    page.locator("#switch .sagecell-evalButton").click()
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(out).to_have_text(re.compile(r"^\s*1024\s*$"))


#: in the frame of Sage's 3D scene: what three.js drew, read back from WebGL
#: (Sage's renderer keeps its drawing buffer)
SCENE_PIXELS = """() => {
    const canvas = document.querySelector("canvas");
    if (!window.THREE || !canvas) { return null; }
    const gl = canvas.getContext("webgl2") || canvas.getContext("webgl");
    if (!gl) { return {revision: THREE.REVISION, webgl: false}; }
    const w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
    const px = new Uint8Array(w * h * 4);
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
    let drawn = 0;
    for (let i = 0; i < px.length; i += 4) {
        if (px[i] < 200 || px[i + 1] < 200 || px[i + 2] < 200) { drawn++; }
    }
    const scripts = Array.from(document.querySelectorAll("script[src]"), (s) => s.src);
    return {revision: THREE.REVISION, webgl: true, pixels: w * h, drawn, scripts};
}"""


def test_plot3d_renders_with_threejs_from_this_server(languages_page: Page, sage_server: str) -> None:
    page = languages_page
    out = cell_done(page, "scene")
    expect(out.locator("iframe.sagecell-html-frame")).to_have_count(1)
    scene = None
    deadline = time.monotonic() + 30
    while scene is None and time.monotonic() < deadline:
        for frame in page.frames:
            if frame.parent_frame is not None and frame.parent_frame.parent_frame is not None:
                try:
                    found = frame.evaluate(SCENE_PIXELS)
                except PlaywrightError:
                    continue  # still loading
                if found and found.get("drawn"):
                    scene = found
        if scene is None:
            page.wait_for_timeout(200)
    assert scene is not None, f"no three.js scene was drawn; requests off loopback: {page.outside}"
    assert scene["webgl"] and scene["drawn"] > scene["pixels"] // 100, scene
    assert scene["scripts"] == [f"{sage_server}/static/threejs-sage/r{scene['revision']}/three.min.js"], scene
    assert page.outside == [], page.outside


def test_no_request_of_the_page_left_loopback(languages_page: Page) -> None:
    for name in LANGUAGE_CELLS:
        cell_done(languages_page, name)
    assert languages_page.outside == []


def test_a_permalink_restores_its_language(page: Page, sage_server: str) -> None:
    form = urllib.parse.urlencode({"code": "factor(2^64 - 1)", "language": "gp"}).encode()
    req = urllib.request.Request(f"{sage_server}/permalink", data=form, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        ident = json.load(resp)["query"]
    page.goto(f"{sage_server}/?q={urllib.parse.quote(ident)}")
    page.wait_for_function("() => demoCell.getCode() === 'factor(2^64 - 1)'")
    expect(page.locator(".sagecell-language select")).to_have_value("gp")

    page.goto(f"{sage_server}/?c=print(2%5E10)&lang=python")
    page.wait_for_function("() => demoCell.getCode() === 'print(2^10)'")
    expect(page.locator(".sagecell-language select")).to_have_value("python")
    page.locator(".sagecell-evalButton").click()
    out = page.locator(".sagecell-output")
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(out).to_have_text(re.compile(r"^\s*8\s*$"))
