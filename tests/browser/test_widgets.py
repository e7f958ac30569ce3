"""
Interacts in the embed widget, in headless Chromium against one real daemon
(Sage and Python kernels where passagemath is installed): ipywidgets' controls
drawn on a page of another origin, moved with the mouse and the keyboard, the
function's output following; widgets shared by linked cells; kernel HTML in
widgets that runs nothing in the page; Escape out of the editor; and the
widget code fetched only when a kernel first opens a comm.

The cells of most tests live on one page, each with its own kernel.
"""

from __future__ import annotations

import itertools
import re

import pytest
from playwright.sync_api import Page, expect
from support import Daemon
from test_sage import wait_sage_pool

from sagecell_tw import config as configmod

from .conftest import OtherOrigin

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

SAGE = configmod.sage_available()
needs_sage = pytest.mark.skipif(not SAGE, reason="passagemath is not installed")
RUN_TIMEOUT = 60_000  # ms
_ids = itertools.count()


@pytest.fixture(scope="module")
def widget_server(embed_bundle) -> str:
    # One page of many cells, each with its own kernel, all from one address.
    d = Daemon(kernels="sagemath,python3" if SAGE else "python3", pool_size=2, max_kernels_per_client=32)
    d.start(timeout=120)
    try:
        if SAGE:
            wait_sage_pool(d)
        yield d.url
    finally:
        d.stop()


def host_html(server: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>widgets</title>"
        f"<script src='{server}/embedded_sagecell.js'></script></head><body><h1>Interacts</h1></body></html>"
    )


@pytest.fixture(scope="module")
def host(chromium_browser, widget_server: str, other_origin: OtherOrigin):
    """One page on another origin; each test adds its cells to it."""
    context = chromium_browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(other_origin.page("widgets.html", host_html(widget_server)))
    try:
        yield page
    finally:
        context.close()


def add_cell(page: Page, code: str, kernel: str = "python3", link_key: str | None = None) -> str:
    """A new cell at the end of the page, run at once; returns its CSS selector."""
    cell_id = f"cell{next(_ids)}"
    page.evaluate(
        """([id, code, kernelName, linkKey]) => {
            const div = document.createElement('div');
            div.id = id;
            document.body.appendChild(div);
            const args = {inputLocation: '#' + id, code, kernelName, autoeval: true};
            if (linkKey) { args.linkKey = linkKey; }
            sagecell.makeSagecell(args);
        }""",
        [cell_id, code, kernel, link_key],
    )
    done(page, f"#{cell_id}")
    return f"#{cell_id}"


def done(page: Page, cell: str):
    """The cell's own output (not an Output widget's), once the run has ended."""
    out = page.locator(f"{cell} > .sagecell-output-elements > .sagecell-output")
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    return out


def widget_output(page: Page, cell: str):
    return page.locator(f"{cell} .sagecell-widget-output")


def drag(page: Page, handle, dx: float) -> None:
    """Drag a slider's handle dx pixels with the mouse."""
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y, steps=4)
    page.mouse.move(x + dx, y, steps=4)
    page.mouse.up()


def readout(page: Page, cell: str, i: int = 0) -> int:
    return int(page.locator(f"{cell} .widget-readout").nth(i).inner_text())


# -- loading ----------------------------------------------------------------------


def test_widget_code_is_fetched_on_the_first_comm_open_only(
    page: Page, widget_server: str, other_origin: OtherOrigin
) -> None:
    fetched = []
    page.on("response", lambda r: fetched.append((r.url, r.headers.get("content-encoding"), r.headers)))
    page.goto(other_origin.page("lazy.html", host_html(widget_server)))
    cell = add_cell(page, "print('no widgets here')")
    expect(done(page, cell)).to_have_text("no widgets here")
    entry = [f for f in fetched if f[0].endswith("/embedded_sagecell.js")]
    assert entry and entry[0][1] == "br", entry  # Chromium accepts brotli: it gets the build's copy
    assert not [u for u, _, _ in fetched if "/static/widgets-" in u], fetched
    # A comm for a target the page does not know: closed at once, and still no widget code.
    cell = add_cell(page, "from comm import create_comm\nother = create_comm(target_name='not.a.widget')")
    page.evaluate(
        "(sel) => sagecell.cells().find(c => c.inputLocation.matches(sel)).setCode('print(other._closed)')", cell
    )
    page.locator(f"{cell} .sagecell-evalButton").click()
    expect(done(page, cell)).to_have_text("True")
    assert not [u for u, _, _ in fetched if "/static/widgets-" in u], fetched

    cell = add_cell(page, "from ipywidgets import interact\ninteract(lambda x: print('x =', x), x=(0, 9))")
    expect(widget_output(page, cell)).to_contain_text("x = 4")
    add_cell(page, "from ipywidgets import interact\ninteract(lambda y: print('y =', y), y=True)")
    code = [(u, enc, h) for u, enc, h in fetched if re.search(r"/static/widgets-\w+\.(js|css)$", u)]
    assert len(code) == 2, [u for u, _, _ in code]  # one script, one stylesheet, for both kernels
    for _, enc, headers in code:
        assert enc == "br"
        assert headers["cache-control"] == "public, max-age=31536000, immutable"


# -- Python's ipywidgets ------------------------------------------------------------


def test_python_interact_follows_the_mouse_and_the_keyboard(host: Page) -> None:
    cell = add_cell(
        host,
        "from ipywidgets import interact\n"
        "@interact(n=(0, 100), word=['alpha', 'beta', 'gamma'])\n"
        "def f(n=10, word='alpha'):\n"
        "    print(f'n={n} square={n * n} {word}')\n",
    )
    out = widget_output(host, cell)
    expect(out).to_have_text("n=10 square=100 alpha")
    drag(host, host.locator(f"{cell} .noUi-handle"), 60)
    expect(out).not_to_have_text("n=10 square=100 alpha")
    n = readout(host, cell)
    assert n > 10
    expect(out).to_have_text(f"n={n} square={n * n} alpha")
    # Only the interact's output widget shows it: the cell's own output holds the controls, once.
    expect(host.locator(f"{cell} .sagecell-widget-output pre")).to_have_count(1)

    host.locator(f"{cell} .noUi-handle").focus()
    host.keyboard.press("ArrowRight")
    expect(out).to_have_text(f"n={n + 1} square={(n + 1) ** 2} alpha")
    host.locator(f"{cell} .sagecell-widget select").select_option("gamma")
    expect(out).to_have_text(f"n={n + 1} square={(n + 1) ** 2} gamma")


def test_a_plot_inside_an_interact_is_replaced(host: Page) -> None:
    cell = add_cell(
        host,
        "import matplotlib.pyplot as plt\n"
        "from ipywidgets import interact\n"
        "@interact(k=(1, 5))\n"
        "def f(k=2):\n"
        "    plt.plot([x ** k for x in range(10)])\n"
        "    plt.title(f'power {k}')\n"
        "    plt.show()\n",
    )
    images = widget_output(host, cell).locator("img.sagecell-image")
    expect(images).to_have_count(1)
    first = images.get_attribute("src")
    host.locator(f"{cell} .noUi-handle").focus()
    host.keyboard.press("ArrowRight")
    expect(images.first).not_to_have_attribute("src", first)
    expect(images).to_have_count(1)


def test_linked_cells_share_one_widget(host: Page) -> None:
    first = add_cell(
        host,
        "import ipywidgets as w\nshared = w.IntSlider(value=5, description='shared')\ndisplay(shared)",
        link_key="widgets",
    )
    second = add_cell(host, "display(shared)", link_key="widgets")
    assert readout(host, first) == 5 and readout(host, second) == 5
    host.locator(f"{first} .noUi-handle").focus()
    host.keyboard.press("ArrowRight")
    host.keyboard.press("ArrowRight")
    expect(host.locator(f"{second} .widget-readout")).to_have_text("7")
    host.evaluate(
        "(sel) => sagecell.cells().find(c => c.inputLocation.matches(sel)).setCode('print(shared.value)')", second
    )
    host.locator(f"{second} .sagecell-evalButton").click()
    expect(done(host, second)).to_contain_text("7")


# -- kernel HTML in widgets -----------------------------------------------------------

HOSTILE = (
    "<b id='kept'>kept</b>"
    "<script>document.body.dataset.pwned = 'script'</script>"
    "<img id='bad' src='data:,' onerror=\"document.body.dataset.pwned = 'onerror'\">"
    "<a id='jslink' href=\"javascript:void(document.body.dataset.pwned = 'link')\">link</a>"
)


def test_widget_html_runs_nothing_in_the_page(host: Page) -> None:
    cell = add_cell(
        host,
        "import ipywidgets as w\n"
        f"html = {HOSTILE!r}\n"
        "display(w.VBox([w.HTML(html), w.HTMLMath(html.replace('kept', 'math')),\n"
        "                w.Checkbox(description=html.replace('kept', 'desc'), description_allow_html=True)]))\n",
    )
    widget = host.locator(f"{cell} .sagecell-widget")
    expect(widget.locator("#kept")).to_have_text("kept")  # the harmless part is shown
    expect(widget.locator("#math")).to_have_text("math")
    expect(widget.locator(".widget-checkbox b")).to_have_text("desc")  # a description keeps inline tags only
    host.wait_for_timeout(300)  # an onerror would have run by now
    assert host.evaluate("document.body.dataset.pwned") is None
    host.locator(f"{cell} #jslink").first.click()
    host.wait_for_timeout(300)
    assert host.evaluate("document.body.dataset.pwned") is None
    assert widget.locator("script").count() == 0
    assert widget.locator("[onerror]").count() == 0
    hrefs = widget.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert not [h for h in hrefs if h and h.strip().lower().startswith("javascript:")], hrefs


# -- the keyboard ---------------------------------------------------------------------


def test_escape_leaves_the_editor_and_tab_reaches_the_controls(host: Page) -> None:
    cell = add_cell(
        host,
        "from ipywidgets import interact\n@interact(level=(0, 10), loud=False)\ndef f(level=3, loud=False):\n"
        "    print(('LEVEL' if loud else 'level'), level)\n",
    )
    out = widget_output(host, cell)
    expect(out).to_have_text("level 3")
    editor = host.locator(f"{cell} .cm-content")
    editor.click()
    host.keyboard.press("Tab")  # Tab indents: the editor keeps the focus
    assert host.evaluate("(sel) => document.querySelector(sel).contains(document.activeElement)", f"{cell} .cm-content")
    host.keyboard.press("Escape")
    focused = host.evaluate("document.activeElement.className")
    assert "sagecell-evalButton" in focused, focused
    # From there on, Tab walks the cell's buttons and then its controls.
    for _ in range(12):
        host.keyboard.press("Tab")
        if host.evaluate("document.activeElement.classList.contains('noUi-handle')"):
            break
    else:
        pytest.fail("Tab never reached the slider")
    handle = host.locator(f"{cell} .noUi-handle")
    expect(handle).to_have_attribute("role", "slider")
    expect(handle).to_have_accessible_name("level")
    host.keyboard.press("ArrowLeft")
    expect(out).to_have_text("level 2")
    expect(handle).to_have_attribute("aria-valuenow", re.compile(r"^2(\.0)?$"))
    for _ in range(6):
        host.keyboard.press("Tab")
        if host.evaluate("document.activeElement.type === 'checkbox'"):
            break
    else:
        pytest.fail("Tab never reached the checkbox")
    host.keyboard.press("Space")
    expect(out).to_have_text("LEVEL 2")


# -- Sage's @interact -----------------------------------------------------------------


@needs_sage
def test_sage_interact_slider_dragged_output_and_plot_follow(host: Page) -> None:
    cell = add_cell(
        host,
        "@interact\n"
        "def _(k=slider(1, 20, 1, default=5, label='k')):\n"
        "    print('k^2 =', k^2)\n"
        "    show(plot(sin(k*x), (x, 0, 3), figsize=3))\n",
        kernel="sagemath",
    )
    out = widget_output(host, cell)
    expect(out.locator("pre")).to_have_text("k^2 = 25")
    images = out.locator("img.sagecell-image")
    expect(images).to_have_count(1)
    first = images.get_attribute("src")
    drag(host, host.locator(f"{cell} .noUi-handle"), 50)
    expect(out.locator("pre")).not_to_have_text("k^2 = 25")
    k = readout(host, cell)
    assert k > 5
    expect(out.locator("pre")).to_have_text(f"k^2 = {k * k}")
    expect(images).to_have_count(1)
    expect(images.first).not_to_have_attribute("src", first)


@needs_sage
def test_sage_input_box_selector_and_checkbox(host: Page) -> None:
    cell = add_cell(
        host,
        "@interact\n"
        "def _(name=input_box('Ada', label='name', type=str),\n"
        "      colour=selector(['red', 'green', 'blue'], label='colour'),\n"
        "      loud=checkbox(False, label='loud')):\n"
        "    s = '%s likes %s' % (name, colour)\n"
        "    print(s.upper() if loud else s)\n",
        kernel="sagemath",
    )
    out = widget_output(host, cell)
    expect(out).to_have_text("Ada likes red")
    box = host.locator(f"{cell} .widget-text input")
    box.fill("Grace")
    box.press("Enter")
    expect(out).to_have_text("Grace likes red")
    host.locator(f"{cell} .sagecell-widget select").select_option("blue")
    expect(out).to_have_text("Grace likes blue")
    host.locator(f"{cell} input[type=checkbox]").check()
    expect(out).to_have_text("GRACE LIKES BLUE")


# -- permalinks -----------------------------------------------------------------------


def test_a_permalink_keeps_the_interact_values(page: Page, widget_server: str) -> None:
    page.goto(f"{widget_server}/")
    page.evaluate(
        "(code) => demoCell.setCode(code)",
        "from ipywidgets import interact\n"
        "@interact(n=(0, 10), word=['alpha', 'beta', 'gamma'], flag=False)\n"
        "def f(n=5, word='alpha', flag=False):\n"
        "    print('n', n, word, flag)\n",
    )
    page.locator(".sagecell-evalButton").click()
    out = page.locator(".sagecell-widget-output")
    expect(out).to_have_text("n 5 alpha False")
    page.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.locator(".sagecell-widget select").select_option("gamma")
    page.locator(".sagecell-widget input[type=checkbox]").check()
    expect(out).to_have_text("n 7 gamma True")

    page.locator(".sagecell-permalink").first.click()
    short = page.locator(".sagecell-permalink-url").nth(1)
    expect(short).to_have_value(re.compile(r"\?q=\w+"))
    page.goto(short.input_value())
    # Opening the link runs the cell and puts the controls back.
    expect(page.locator(".sagecell-widget-output")).to_have_text("n 7 gamma True", timeout=RUN_TIMEOUT)
    expect(page.locator(".sagecell-widget .widget-readout")).to_have_text("7")
    expect(page.locator(".sagecell-widget select")).to_have_value("gamma")
