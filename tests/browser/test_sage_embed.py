"""
Sage cells in headless Chromium: a page on another origin embeds cells of
the ``sagemath`` kernel (``kernelName``) from a real daemon serving Sage and
Python kernels. Skipped where passagemath is not installed.
"""

from __future__ import annotations

import pytest
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
