"""
The embed widget on a site of two daemons behind HAProxy (etc/haproxy.cfg),
in headless Chromium: when the daemon that holds the visitor's kernel dies
mid-computation, the cell says the connection closed, and the next Evaluate
gets a new kernel from the other daemon.
"""

from __future__ import annotations

import pytest
from balancer import HAProxy, crash, start_all
from playwright.sync_api import Page, expect
from support import Daemon

from .test_embed import RUN_TIMEOUT, cell, open_demo, output, run, set_code

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def site(embed_bundle):
    daemons = {name: Daemon(daemon_name=name, pool_size=2) for name in ("d1", "d2")}
    front = None
    try:
        start_all(list(daemons.values()))
        front = HAProxy({name: d.port for name, d in daemons.items()}).start()
        yield front, daemons
    finally:
        if front is not None:
            front.stop()
        for d in daemons.values():
            d.stop()


def kernel_id(page: Page) -> str:
    return page.evaluate("sagecell.cells()[0].kernelId")


def test_a_dead_daemons_cell_says_so_and_the_next_run_goes_to_the_other(page: Page, site) -> None:
    front, daemons = site
    open_demo(page, front.url)
    run(page, "x = 5")
    first = kernel_id(page)
    holder, other = ("d1", "d2") if first.startswith("d1-") else ("d2", "d1")
    assert first.startswith(holder + "-"), first

    set_code(page, "import time\nprint('working')\ntime.sleep(60)")
    cell(page).locator(".sagecell-evalButton").click()
    expect(output(page)).to_contain_text("working", timeout=RUN_TIMEOUT)
    crash(daemons[holder])

    notice = output(page).locator(".sagecell-notice-error")
    expect(notice).to_contain_text("The connection to the server closed", timeout=RUN_TIMEOUT)
    # The widget tried to reconnect, asked for its kernel, and shows the balancer's answer.
    expect(notice).to_contain_text("kernel lost")
    expect(notice).to_contain_text("Evaluate again to start a new session")

    run(page, "print('back', 'x' in dir())")
    expect(output(page)).to_contain_text("back False")
    assert kernel_id(page).startswith(other + "-"), kernel_id(page)
