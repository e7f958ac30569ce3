"""
The embed widget as a visitor uses it, in headless Chromium against a real
sagecell_tw server: the demo page at /, and pages on another origin that load
/embedded_sagecell.js.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import urllib.parse
import urllib.request
import zlib

import pytest
from playwright.sync_api import Page, expect

from .conftest import BUNDLE, OtherOrigin, free_port, http_json

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

RUN_TIMEOUT = 60_000  # ms; a first kernel may still be forking


# -- helpers ------------------------------------------------------------------


def cell(page: Page, i: int = 0):
    return page.locator(".sagecell-input-elements").nth(i)


def output(page: Page, i: int = 0):
    return page.locator(".sagecell-output").nth(i)


def set_code(page: Page, code: str, i: int = 0) -> None:
    page.evaluate("([i, code]) => sagecell.cells()[i].setCode(code)", [i, code])


def run(page: Page, code: str | None = None, i: int = 0, timeout: int = RUN_TIMEOUT) -> None:
    """Put code in cell i, press Evaluate and wait for the run to end."""
    if code is not None:
        set_code(page, code, i)
    cell(page, i).locator(".sagecell-evalButton").click()
    expect(output(page, i)).to_have_attribute("data-state", "done", timeout=timeout)


def open_demo(page: Page, base: str, query: str = "") -> None:
    page.goto(f"{base}/{query}")
    expect(page.locator(".sagecell-editor .cm-content")).to_be_visible()


def embed_page(server: str, body: str, script: str, script_src: str | None = None) -> str:
    src = script_src or f"{server}/embedded_sagecell.js"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>host page</title>"
        f"<script src='{src}'></script></head><body>{body}"
        f"<script>{script}</script></body></html>"
    )


@pytest.fixture(scope="module")
def files_api(sagecell_server: str) -> str:
    """Skip file tests while the files endpoints (issue 4) are not served."""
    status, model = http_json("POST", f"{sagecell_server}/api/kernels", {"name": "python3"})
    assert status == 201, (status, model)
    kid = model["id"]
    try:
        status, body = http_json("GET", f"{sagecell_server}/api/kernels/{kid}/files/")
    finally:
        http_json("DELETE", f"{sagecell_server}/api/kernels/{kid}")
    if status in (404, 405, 501) or not isinstance(body, dict) or "files" not in body:
        pytest.skip(f"GET/PUT /api/kernels/{{id}}/files/ (issue 4) is not served yet (GET answered {status})")
    return sagecell_server


# -- the demo page ------------------------------------------------------------


def test_type_code_and_evaluate_with_shift_enter(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    editor = page.locator(".sagecell-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.type("print('hello', 6 * 7)")
    page.keyboard.press("Enter")
    page.keyboard.type("sum(range(101))")
    page.keyboard.press("Shift+Enter")
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page).locator(".sagecell-stdout")).to_have_text("hello 42")
    expect(output(page).locator(".sagecell-execute-result")).to_have_text("5050")
    expect(cell(page).locator(".sagecell-status")).to_have_attribute("data-status", "idle")


def test_stdout_and_stderr_stay_in_order(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    run(
        page,
        "import sys\nprint('one', flush=True)\nprint('two', file=sys.stderr, flush=True)\nprint('three', flush=True)\n",
    )
    streams = output(page).locator(".sagecell-stream")
    expect(streams).to_have_count(3)
    expect(streams.nth(0)).to_have_text("one")
    expect(streams.nth(1)).to_have_text("two")
    expect(streams.nth(1)).to_have_class("sagecell-stream sagecell-stderr")
    expect(streams.nth(2)).to_have_text("three")


def test_error_traceback_is_coloured_html(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    run(page, "def f():\n    return 1 / 0\n\nf()\n")
    error = output(page).locator(".sagecell-error")
    expect(error).to_contain_text("ZeroDivisionError")
    expect(error).to_contain_text("division by zero")
    # ANSI colours became spans, and no escape code is left as text.
    expect(error.locator("span[class*='ansi-']").first).to_be_attached()
    assert "\x1b" not in error.inner_text()
    assert "[0;31m" not in error.inner_text()


def test_matplotlib_plot_shows_as_image(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    run(
        page,
        "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2, 3], [0, 1, 4, 9])\nplt.title('squares')\nplt.show()\n",
    )
    img = output(page).locator("img.sagecell-image")
    expect(img).to_have_count(1)
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("() => document.querySelector('.sagecell-output img').naturalWidth > 100")


def test_input_is_answered_in_an_input_box(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    set_code(page, "name = input('Your name? ')\nprint(f'Hello, {name}!')\n")
    cell(page).locator(".sagecell-evalButton").click()
    field = output(page).locator(".sagecell-input-field")
    expect(field).to_be_visible(timeout=RUN_TIMEOUT)
    expect(output(page).locator(".sagecell-input-prompt")).to_contain_text("Your name?")
    field.fill("Ada")
    field.press("Enter")
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page)).to_contain_text("Your name? Ada")
    expect(output(page)).to_contain_text("Hello, Ada!")


def test_interrupt_stops_a_long_computation(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    set_code(
        page,
        "import time\nprint('started', flush=True)\ntime.sleep(120)\nprint('never')\n",
    )
    cell(page).locator(".sagecell-evalButton").click()
    expect(output(page)).to_contain_text("started", timeout=RUN_TIMEOUT)
    status = cell(page).locator(".sagecell-status")
    expect(status).to_have_attribute("data-status", "busy")
    interrupt = cell(page).locator(".sagecell-interrupt")
    expect(interrupt).to_be_enabled()
    interrupt.click()
    expect(output(page)).to_have_attribute("data-state", "done", timeout=20_000)
    expect(output(page).locator(".sagecell-error")).to_contain_text("KeyboardInterrupt")
    # The traceback quotes the source line; what matters is that nothing ran on.
    expect(output(page).locator(".sagecell-stdout")).to_have_text("started")
    expect(status).to_have_attribute("data-status", "idle")
    expect(interrupt).to_be_disabled()


def test_rich_output_latex_display_updates_and_clear_output(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    run(
        page,
        "from IPython.display import Latex, display\n"
        "display(Latex(r'$$\\frac{a}{b}$$'))\n"
        "h = display('first', display_id=True)\n"
        "h.update('second')\n",
    )
    expect(output(page).locator(".katex")).to_have_count(1)
    expect(output(page)).to_contain_text("'second'")
    expect(output(page)).not_to_contain_text("'first'")
    # KaTeX's stylesheet comes from our server, not a CDN.
    href = page.locator("link[data-sagecell-katex]").get_attribute("href")
    assert href == f"{sagecell_server}/static/katex/katex.min.css"

    run(
        page,
        "from IPython.display import clear_output\n"
        "for i in range(3):\n"
        "    clear_output(wait=True)\n"
        "    print('tick', i)\n",
    )
    expect(output(page).locator(".sagecell-stream")).to_have_count(1)
    expect(output(page)).to_have_text("tick 2")


def test_kernel_html_cannot_reach_the_page(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    run(
        page,
        "from IPython.display import HTML\n"
        "HTML('''<p id=\"probe\">waiting</p><script>\n"
        "try { parent.document.body.dataset.pwned = '1';\n"
        "      document.getElementById('probe').textContent = 'escaped'; }\n"
        "catch (e) { document.getElementById('probe').textContent = 'blocked'; }\n"
        "</script>''')\n",
    )
    frame = output(page).locator("iframe.sagecell-html-frame")
    expect(frame).to_have_attribute("sandbox", "allow-scripts")
    expect(page.frame_locator(".sagecell-output iframe").locator("#probe")).to_have_text("blocked")
    assert page.evaluate("document.body.dataset.pwned") is None


def test_a_dead_kernel_is_reported_and_replaced(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    run(page, "x = 5")
    set_code(page, "import os\nos._exit(3)\n")
    cell(page).locator(".sagecell-evalButton").click()
    notice = output(page).locator(".sagecell-notice-error")
    expect(notice).to_be_visible(timeout=RUN_TIMEOUT)
    # The server says why, in the cell.
    expect(output(page)).to_contain_text("kernel died")
    expect(cell(page).locator(".sagecell-status")).to_have_attribute("data-status", re.compile("dead|disconnected"))
    run(page, "print('back', 'x' in dir())")
    expect(output(page)).to_contain_text("A new session was started")
    expect(output(page)).to_contain_text("back False")


def test_query_parameters_fill_the_cell(page: Page, sagecell_server: str) -> None:
    code = "print('from a link')\n# ünïcode + symbols & = ?\n"
    open_demo(page, sagecell_server, "?c=" + urllib.parse.quote(code))
    page.wait_for_function("(c) => demoCell.getCode() === c", arg=code)

    z = base64.urlsafe_b64encode(zlib.compress(code.encode("utf-8"))).decode("ascii")
    open_demo(page, sagecell_server, "?z=" + z)
    page.wait_for_function("(c) => demoCell.getCode() === c", arg=code)

    form = urllib.parse.urlencode({"code": code, "language": "python"}).encode()
    req = urllib.request.Request(f"{sagecell_server}/permalink", data=form, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        ident = json.load(resp)["query"]
    open_demo(page, sagecell_server, "?q=" + urllib.parse.quote(ident))
    page.wait_for_function("(c) => demoCell.getCode() === c", arg=code)


def test_share_button_makes_a_working_link(page: Page, sagecell_server: str) -> None:
    open_demo(page, sagecell_server)
    code = "print('shared code')"
    set_code(page, code)
    cell(page).locator(".sagecell-permalink").first.click()
    link = cell(page).locator(".sagecell-permalink-url").first
    expect(link).to_have_value(re.compile(r"\?z="))
    open_demo(page, sagecell_server, link.input_value()[len(sagecell_server) + 1 :])
    page.wait_for_function("(c) => demoCell.getCode() === c", arg=code)

    # The server also stores it for a short ?q= link.
    cell(page).locator(".sagecell-permalink").first.click()
    short = cell(page).locator(".sagecell-permalink-url").nth(1)
    expect(short).to_have_value(re.compile(r"\?q=\w+"))
    open_demo(page, sagecell_server, short.input_value()[len(sagecell_server) + 1 :])
    page.wait_for_function("(c) => demoCell.getCode() === c", arg=code)


# -- limits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(embed_bundle) -> str:
    """A second daemon with short limits, to see how the widget explains them."""
    from support import Daemon

    d = Daemon("--exec-timeout", "2", "--idle-timeout", "4", pool_size=1).start()
    try:
        yield d.url
    finally:
        d.stop()


def test_a_time_limit_is_explained(page: Page, strict_server: str) -> None:
    open_demo(page, strict_server)
    run(page, "import time\nprint('working', flush=True)\ntime.sleep(30)\n", timeout=30_000)
    expect(output(page)).to_contain_text("working")
    expect(output(page)).to_contain_text("limit of 2 s")
    expect(output(page).locator(".sagecell-error")).to_contain_text("KeyboardInterrupt")


def test_an_idle_session_end_is_explained(page: Page, strict_server: str) -> None:
    open_demo(page, strict_server)
    run(page, "x = 1")
    # The server ends the idle session: its explanation reaches the cell.
    expect(output(page)).to_contain_text("idle", timeout=30_000)
    status = cell(page).locator(".sagecell-status")
    expect(status).to_have_attribute("data-status", re.compile("dead|disconnected"))
    run(page, "print('x' in dir())")
    expect(output(page)).to_contain_text("A new session was started")
    expect(output(page).locator(".sagecell-stdout")).to_have_text("False")


# -- files (issue 4) ----------------------------------------------------------


def test_upload_by_picking_and_dropping_then_read(page: Page, files_api: str) -> None:
    open_demo(page, files_api)
    page.locator(".sagecell-file-input").set_input_files(
        files=[
            {
                "name": "picked.txt",
                "mimeType": "text/plain",
                "buffer": b"picked 314159\n",
            }
        ]
    )
    expect(cell(page).locator(".sagecell-upload[data-name='picked.txt']")).to_have_attribute(
        "data-state", "done", timeout=RUN_TIMEOUT
    )
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File(['dropped 271828\\n'], 'dropped.txt', {type: 'text/plain'}));
            const target = document.querySelector('.sagecell-input-elements');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }
        }"""
    )
    expect(cell(page).locator(".sagecell-upload[data-name='dropped.txt']")).to_have_attribute(
        "data-state", "done", timeout=RUN_TIMEOUT
    )
    run(
        page,
        "print(open('picked.txt').read().strip(), open('dropped.txt').read().strip())",
    )
    expect(output(page).locator(".sagecell-stdout")).to_have_text("picked 314159 dropped 271828")


def test_download_a_file_the_code_wrote(page: Page, files_api: str) -> None:
    open_demo(page, files_api)
    run(page, "with open('result.txt', 'w') as f:\n    f.write('downloaded 12345\\n')\n")
    link = page.locator(".sagecell-file a", has_text="result.txt")
    expect(link).to_be_visible(timeout=10_000)
    with page.expect_download() as info:
        link.click()
    path = info.value.path()
    with open(path, "rb") as f:
        assert f.read() == b"downloaded 12345\n"


def test_image_files_get_an_inline_preview(page: Page, files_api: str) -> None:
    open_demo(page, files_api)
    run(
        page,
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\nplt.savefig('plot.png')\nplt.close()\n",
    )
    preview = page.locator(".sagecell-file[data-path='plot.png'] img.sagecell-file-preview")
    expect(preview).to_be_visible(timeout=10_000)
    page.wait_for_function(
        "() => document.querySelector(\".sagecell-file[data-path='plot.png'] img\").naturalWidth > 100"
    )


# -- other origins, linked cells ----------------------------------------------


def test_linked_cells_share_a_kernel_unlinked_cells_do_not(
    page: Page, sagecell_server: str, other_origin: OtherOrigin
) -> None:
    body = (
        "<div class='linked'><script type='text/x-python'>x = 41</script></div>"
        "<div class='linked'><script type='text/x-python'>print(x + 1)</script></div>"
        "<div class='solo'><script type='text/x-python'>y = 1</script></div>"
        "<div class='solo'><script type='text/x-python'>\n"
        "    try:\n        print(y)\n    except NameError:\n        print('no y here')\n"
        "</script></div>"
    )
    script = (
        "sagecell.makeSagecell({inputLocation: 'div.linked', linked: true});"
        "sagecell.makeSagecell({inputLocation: 'div.solo'});"
    )
    page.goto(other_origin.page("linked.html", embed_page(sagecell_server, body, script)))
    expect(page.locator(".sagecell-input-elements")).to_have_count(4)
    run(page, i=0)
    run(page, i=1)
    expect(output(page, 1)).to_have_text("42")
    run(page, i=2)
    run(page, i=3)
    expect(output(page, 3)).to_have_text("no y here")
    ids = page.evaluate("sagecell.cells().map(c => c.kernelId)")
    assert ids[0] == ids[1]
    assert len({ids[0], ids[2], ids[3]}) == 3, ids


def test_embedding_from_another_origin(page: Page, sagecell_server: str, other_origin: OtherOrigin) -> None:
    body = "<h1>A page elsewhere</h1><div id='mycell'>print(6 * 7)</div><div id='out'></div>"
    script = (
        "window.made = sagecell.makeSagecell({inputLocation: '#mycell', outputLocation: '#out',"
        " evalButtonText: 'Go', hide: ['permalink', 'files'], autoeval: true});"
    )
    url = other_origin.page("embed.html", embed_page(sagecell_server, body, script))
    assert not url.startswith(sagecell_server)
    page.goto(url)
    assert page.evaluate("sagecell.serverURL") == sagecell_server
    expect(page.locator("#mycell .sagecell-evalButton")).to_have_text("Go")
    expect(page.locator("#mycell .sagecell-permalink").first).to_be_hidden()
    expect(page.locator("#mycell .sagecell-upload-button")).to_be_hidden()
    out = page.locator("#out .sagecell-output")
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(out).to_have_text("42")
    # And again by hand, on the same kernel.
    page.evaluate("made.setCode('print(7 * 6, flush=True)')")
    page.locator("#mycell .sagecell-evalButton").click()
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(out).to_have_text("42")


def test_a_python_only_server_offers_python_and_html(
    page: Page, sagecell_server: str, other_origin: OtherOrigin
) -> None:
    # This server runs python3 kernels only: of a SageMathCell page's languages,
    # those that need Sage are not offered, and a cell in one of them says so.
    body = (
        "<div id='both'><script type='text/x-sage'>print(2^10, 7 // 2)</script></div>"
        "<div id='page' data-lang='html'><script type='text/x-sage'><i id='made-here'>made</i></script></div>"
        "<div id='gp' data-lang='gp'>factor(2^64 - 1)</div>"
    )
    script = (
        "sagecell.makeSagecell({inputLocation: '#both, #page', autoeval: true,"
        " languages: ['sage', 'python', 'gp', 'html']});"
        "sagecell.makeSagecell({inputLocation: '#gp', autoeval: true});"
    )
    page.goto(other_origin.page("python-only.html", embed_page(sagecell_server, body, script)))
    assert page.evaluate("sagecell.allLanguages") == ["sage", "gap", "gp", "html", "maxima", "python", "singular"]
    select = page.locator("#both .sagecell-language select")
    expect(select.locator("option")).to_have_text(["Python", "HTML"])
    expect(select).to_have_value("python")
    out = page.locator("#both .sagecell-output")
    expect(out).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(out).to_have_text("8 3")

    frame = page.locator("#page .sagecell-output").frame_locator("iframe.sagecell-html-frame")
    expect(frame.locator("i#made-here")).to_have_text("made")

    expect(page.locator("#gp .sagecell-language")).to_be_hidden()
    notice = page.locator("#gp .sagecell-output .sagecell-notice-error")
    expect(notice).to_have_text("This server has no Sage kernel, so it cannot run GP code.")


def test_templates_hide_parts_of_a_cell(page: Page, sagecell_server: str, other_origin: OtherOrigin) -> None:
    body = (
        "<div id='minimal'><script type='text/x-sage'>\n    print('only the output')\n</script></div>"
        "<div id='restricted'>print('read only')</div>"
    )
    script = (
        "sagecell.makeSagecell({inputLocation: '#minimal', template: sagecell.templates.minimal,"
        " evalButtonText: 'Show'});"
        "sagecell.makeSagecell({inputLocation: '#restricted', template: sagecell.templates.restricted});"
    )
    page.goto(other_origin.page("templates.html", embed_page(sagecell_server, body, script)))
    expect(page.locator("#minimal .sagecell-editor")).to_be_hidden()
    expect(page.locator("#minimal .sagecell-upload-button")).to_be_hidden()
    expect(page.locator("#restricted .sagecell-editor")).to_be_visible()
    expect(page.locator("#restricted .cm-content")).to_have_attribute("contenteditable", "false")
    assert page.evaluate("sagecell.cells()[0].getCode()") == "print('only the output')"
    page.locator("#minimal .sagecell-evalButton", has_text="Show").click()
    expect(output(page, 0)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page, 0)).to_have_text("only the output")


def test_an_unreachable_server_is_reported(page: Page, embed_bundle, other_origin: OtherOrigin) -> None:
    # No sagecell server at all: the bundle comes from the other origin and
    # points at a port where nothing listens.
    shutil.copy(BUNDLE, other_origin.root / "embed.js")
    dead = f"http://127.0.0.1:{free_port()}"
    body = "<div id='c'>print(1)</div>"
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<script>window.sagecell = {{serverURL: '{dead}'}};</script>"
        "<script src='embed.js'></script></head><body>"
        + body
        + "<script>sagecell.makeSagecell({inputLocation: '#c'});</script></body></html>"
    )
    page.goto(other_origin.page("unreachable.html", html))
    cell(page).locator(".sagecell-evalButton").click()
    notice = output(page).locator(".sagecell-notice-error")
    expect(notice).to_contain_text("Cannot reach the server")
    expect(notice).to_contain_text(dead)
    expect(cell(page).locator(".sagecell-status")).to_have_attribute("data-status", "unreachable")


# -- a hostile page -------------------------------------------------------------

#: What a hostile page on any origin tries in its visitors' browsers: list the
#: server's kernels and sessions, then open each kernel it found and ask for
#: the secret. Resolves with what it got.
STEAL = """
async ([server, code]) => {
  const seen = {};
  const ids = new Set();
  for (const path of ['/api/kernels', '/api/sessions']) {
    const resp = await fetch(server + path, {credentials: 'omit'});
    seen[path] = resp.status;
    const text = await resp.text();
    for (const id of text.match(/[0-9a-f]{32}/g) || []) ids.add(id);
  }
  const stolen = [];
  for (const id of ids) {
    const got = await new Promise(resolve => {
      const ws = new WebSocket(server.replace(/^http/, 'ws') + `/api/kernels/${id}/channels`);
      const timer = setTimeout(() => { ws.close(); resolve(null); }, 10000);
      ws.onerror = () => { clearTimeout(timer); resolve(null); };
      ws.onopen = () => ws.send(JSON.stringify({
        channel: 'shell', parent_header: {}, metadata: {}, buffers: [],
        header: {msg_id: 'steal-' + id, msg_type: 'execute_request', session: 'thief', username: '',
                 date: new Date().toISOString(), version: '5.3'},
        content: {code, silent: false, store_history: false, user_expressions: {}, allow_stdin: false},
      }));
      ws.onmessage = ev => {
        const msg = JSON.parse(ev.data);
        if (msg.msg_type === 'stream' && msg.parent_header.msg_id === 'steal-' + id) {
          clearTimeout(timer); ws.close(); resolve(msg.content.text);
        }
      };
    });
    if (got) stolen.push(got);
  }
  return {seen, tried: ids.size, stolen};
}
"""


def test_a_hostile_page_cannot_reach_a_visitors_kernel(
    page: Page, sagecell_server: str, other_origin: OtherOrigin
) -> None:
    """
    A visitor's cell holds a secret; a page on another origin, in the same
    browser, finds no kernel to open: the listings answer 403, and the id
    (the kernel's capability) reached only the visitor's own page.
    """
    body = "<div id='cell'>SECRET = 'the visitor keeps this'\nprint('kept')</div>"
    script = "sagecell.makeSagecell({inputLocation: '#cell', autoeval: true});"
    page.goto(other_origin.page("visitor.html", embed_page(sagecell_server, body, script)))
    expect(output(page)).to_have_attribute("data-state", "done", timeout=RUN_TIMEOUT)
    expect(output(page)).to_have_text("kept")
    hostile = page.context.new_page()
    hostile.goto(other_origin.page("hostile.html", "<!DOCTYPE html><title>hostile</title><p>nothing to see</p>"))
    got = hostile.evaluate(STEAL, [sagecell_server, "print(SECRET)"])
    assert got["seen"] == {"/api/kernels": 403, "/api/sessions": 403}, got
    assert got["stolen"] == [] and got["tried"] == 0, got
    # The visitor's cell still works, on its own kernel.
    run(page, "print(SECRET)")
    expect(output(page)).to_have_text("the visitor keeps this")
