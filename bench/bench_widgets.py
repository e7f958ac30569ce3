#!/usr/bin/env python3
"""
Benchmark of issue 17 in headless Chromium: what the embed widget weighs on
the wire, how soon a cell is usable on a cold cache, and how fast an
interact's output follows its control.

A real daemon (tests/support.py's Daemon) serves the widget; the page that
embeds it is on another origin (a static server on loopback), as on a site
that embeds cells. Figures:

  wire                     bytes of the entry script (embedded_sagecell.js) as the
                           server sends it for each Accept-Encoding; the widget
                           code's (JS + CSS), loaded on the first comm_open
  page_no_widgets          a page with one cell run once, cold cache: every script
                           and stylesheet Chromium fetched, bytes over the wire
                           (bodies as sent, plus headers); no widget code among them
  cold_*_ms                new browser context each sample (cold cache): navigation
                           start to the cell's editor and button (cell_ready), and
                           to its first output with autoeval (first_output, which
                           includes a kernel); on loopback, and on an emulated
                           link of 10 Mbit/s with 40 ms round trips
  control_to_output_ms     an interact's slider moved by a key press (in the page)
                           to the function's printed line on the page
                                                            median <= 30 (p99 reported),
                           split into the page's part before the comm_msg is sent,
                           the daemon's and kernel's (to the stream message back),
                           and the page's part after it
  updates_per_s            the slider pressed as fast as the page can for 2 s:
                           how many updates the kernel's function ran per second
                           (ipywidgets sends one at a time, each after the last
                           one's idle, and always ends on the final value)

  before_*                 with --before: the same cold visits with a previous
                           embed.js, served uncompressed (as the server did before)

    .venv/bin/python bench/bench_widgets.py [--samples 200] [--cold 5] [--json out.json]
        [--before path/to/previous/embed.js]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

from benchlib import Daemon, pct, summary

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

CHROMIUM = os.environ.get("SAGECELL_CHROMIUM", "/usr/bin/chromium")
SLOW_LINK = {"offline": False, "latency": 20, "downloadThroughput": 10e6 / 8, "uploadThroughput": 10e6 / 8}
TARGETS = {"control_to_output_ms": "median <= 30"}

INTERACT = (
    "from ipywidgets import interact\n"
    "calls = 0\n"
    "@interact(n=(0, 1000))\n"
    "def f(n=500):\n"
    "    global calls\n"
    "    calls += 1\n"
    "    print(f'n={n} calls={calls}')\n"
)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class Pages:
    """The embedding site: a static server on another loopback port."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="sagecell-bench-pages-")
        handler = functools.partial(_Quiet, directory=self.root)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def page(self, name: str, server: str, code: str, autoeval: bool, script: str = "") -> str:
        """A page with one cell; its script is the server's embedded_sagecell.js unless ``script`` names another."""
        src = script or f"{server}/embedded_sagecell.js"
        html = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<script>window.sagecell = {{serverURL: {json.dumps(server)}}};</script>"
            f"<script src='{src}'></script></head><body><div id='c'></div><script>"
            "new MutationObserver((_, obs) => {"
            "  const out = document.querySelector('#c .sagecell-output');"
            "  if (out && out.dataset.state === 'done') { window.firstOutput = performance.now(); obs.disconnect(); }"
            "}).observe(document.body, {subtree: true, attributes: true, childList: true});"
            f"sagecell.makeSagecell({{inputLocation: '#c', code: {json.dumps(code)}, autoeval: {json.dumps(autoeval)},"
            " callback: () => { window.cellReady = performance.now(); }});"
            "</script></body></html>"
        )
        with open(os.path.join(self.root, name), "w", encoding="utf-8") as f:
            f.write(html)
        return f"{self.base}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wire_sizes(server: str) -> dict:
    """Bytes of the entry script and the widget code as sent for each Accept-Encoding."""
    out = {}
    for coding in ("identity", "gzip", "br"):
        req = urllib.request.Request(f"{server}/embedded_sagecell.js", headers={"Accept-Encoding": coding})
        with urllib.request.urlopen(req, timeout=10) as resp:
            out[f"entry_{coding}_bytes"] = len(resp.read())
            out[f"entry_{coding}_encoding"] = resp.headers.get("content-encoding") or "identity"
    static = os.path.join(HERE, "..", "sagecell_tw", "static")
    for name in sorted(os.listdir(static)):
        if name.startswith("widgets-") and name.endswith((".js", ".css")):
            kind = name.rsplit(".", 1)[1]
            out[f"widgets_{kind}_bytes"] = os.path.getsize(os.path.join(static, name))
            out[f"widgets_{kind}_br_bytes"] = os.path.getsize(os.path.join(static, name + ".br"))
    return out


def fetched_bytes(page) -> list:
    """Every script and stylesheet the page fetched: (url, body bytes as sent, header bytes)."""
    got = []

    def on_finished(request):
        if request.resource_type in ("script", "stylesheet"):
            sizes = request.sizes()
            got.append((request.url, sizes["responseBodySize"], sizes["responseHeadersSize"]))

    page.on("requestfinished", on_finished)
    return got


def cold_load(browser, url: str, link: dict | None) -> dict:
    """One visit with an empty cache: when the cell was usable, when it first showed output, bytes fetched."""
    context = browser.new_context()
    try:
        page = context.new_page()
        got = fetched_bytes(page)
        if link:
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", link)
        page.goto(url)
        page.wait_for_function("() => window.firstOutput !== undefined", timeout=60_000)
        times = page.evaluate("[window.cellReady, window.firstOutput]")
        return {"cell_ready": times[0], "first_output": times[1], "fetched": got}
    finally:
        context.close()


def bench_cold(browser, pages: Pages, server: str, samples: int, before: str | None) -> dict:
    url = pages.page("plain.html", server, "print('hello')", True)
    out = {}
    for label, link in (("loopback", None), ("10mbit_40ms", SLOW_LINK)):
        runs = [cold_load(browser, url, link) for _ in range(samples)]
        out[f"cold_cell_ready_ms_{label}"] = summary([r["cell_ready"] for r in runs])
        out[f"cold_first_output_ms_{label}"] = summary([r["first_output"] for r in runs])
    fetched = runs[-1]["fetched"]
    if before:
        # The previous widget as the previous server sent it: one uncompressed file, from a plain static server.
        shutil.copy(before, os.path.join(pages.root, "before_embed.js"))
        old = pages.page("before.html", server, "print('hello')", True, script=f"{pages.base}/before_embed.js")
        for label, link in (("loopback", None), ("10mbit_40ms", SLOW_LINK)):
            runs_before = [cold_load(browser, old, link) for _ in range(samples)]
            out[f"before_cold_cell_ready_ms_{label}"] = summary([r["cell_ready"] for r in runs_before])
            out[f"before_cold_first_output_ms_{label}"] = summary([r["first_output"] for r in runs_before])
        out["before_page_bytes"] = sum(b + h for _, b, h in runs_before[-1]["fetched"])
    out["page_no_widgets"] = {
        "files": [u.rsplit("/", 1)[-1] for u, _, _ in fetched],
        "body_bytes": sum(b for _, b, _ in fetched),
        "with_headers_bytes": sum(b + h for _, b, h in fetched),
        "widget_code_fetched": any("/static/widgets-" in u for u, _, _ in fetched),
    }
    return out


#: Before the page's scripts: note when the page sends on a WebSocket and when a stream message arrives.
WIRE_TIMES = """
window.__wire = {sends: [], streams: []};
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) { window.__wire.sends.push(performance.now()); return send.call(this, data); };
const onmessage = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage');
Object.defineProperty(WebSocket.prototype, 'onmessage', {
  get() { return onmessage.get.call(this); },
  set(fn) {
    onmessage.set.call(this, (ev) => {
      if (typeof ev.data === 'string' && ev.data.includes('"stream"')) window.__wire.streams.push(performance.now());
      return fn(ev);
    });
  },
});
"""

#: In the page: press the slider's keys, one at a time, and time each press to the printed line:
#: [total, key to the comm_msg sent, sent to the stream message back, that message to the DOM].
PRESS_AND_TIME = """
async ([count]) => {
  const handle = document.querySelector('#c .noUi-handle');
  const out = document.querySelector('#c .sagecell-widget-output');
  const readout = () => Number(document.querySelector('#c .widget-readout').textContent);
  const rows = [];
  for (let i = 0; i < count; i++) {
    const key = i % 2 ? 'ArrowLeft' : 'ArrowRight';
    const want = readout() + (i % 2 ? -1 : 1);
    window.__wire.sends = []; window.__wire.streams = [];
    const seen = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no output for n=' + want)), 10000);
      const obs = new MutationObserver(() => {
        if (out.textContent.includes('n=' + want + ' ')) {
          obs.disconnect(); clearTimeout(timer); resolve(performance.now());
        }
      });
      obs.observe(out, {subtree: true, childList: true, characterData: true});
    });
    const t0 = performance.now();
    handle.dispatchEvent(new KeyboardEvent('keydown', {key, bubbles: true, cancelable: true}));
    const t1 = await seen;
    const sent = window.__wire.sends[0], back = window.__wire.streams[0];
    rows.push([t1 - t0, sent - t0, back - sent, t1 - back]);
    await new Promise(r => setTimeout(r, 5));
  }
  return rows;
}
"""

#: In the page: press ArrowRight as fast as the page runs for `ms`; returns the presses and the final value.
FLOOD = """
async ([ms]) => {
  const handle = document.querySelector('#c .noUi-handle');
  const end = performance.now() + ms;
  let presses = 0;
  while (performance.now() < end) {
    handle.dispatchEvent(new KeyboardEvent('keydown', {key: presses % 400 < 200 ? 'ArrowRight' : 'ArrowLeft',
      bubbles: true, cancelable: true}));
    presses++;
    await new Promise(r => setTimeout(r, 0));
  }
  return [presses, Number(document.querySelector('#c .widget-readout').textContent)];
}
"""


def bench_interact(browser, pages: Pages, server: str, samples: int) -> dict:
    context = browser.new_context()
    context.add_init_script(WIRE_TIMES)
    try:
        page = context.new_page()
        page.goto(pages.page("interact.html", server, INTERACT, True))
        page.wait_for_function(
            "() => (document.querySelector('#c .sagecell-widget-output') || {}).textContent?.includes('n=500')",
            timeout=60_000,
        )
        page.evaluate(PRESS_AND_TIME, [20])  # warm up
        rows = page.evaluate(PRESS_AND_TIME, [samples])
        times = [r[0] for r in rows]
        calls_before = int(page.locator("#c .sagecell-widget-output").inner_text().split("calls=")[1])
        t0 = time.monotonic()
        presses, final = page.evaluate(FLOOD, [2000])
        page.wait_for_function(
            "(n) => document.querySelector('#c .sagecell-widget-output').textContent.includes('n=' + n + ' ')",
            arg=final,
            timeout=30_000,
        )
        elapsed = time.monotonic() - t0
        calls = int(page.locator("#c .sagecell-widget-output").inner_text().split("calls=")[1]) - calls_before
        return {
            "control_to_output_ms": {**summary(times), "p90": pct(times, 90), "mean": statistics.mean(times)},
            # where the time goes: the page before it sends, the daemon and kernel, the page after
            "key_to_send_ms": summary([r[1] for r in rows]),
            "send_to_stream_ms": summary([r[2] for r in rows]),
            "stream_to_dom_ms": summary([r[3] for r in rows]),
            "updates": {
                "presses": presses,
                "kernel_runs": calls,
                "seconds": round(elapsed, 3),
                "updates_per_s": round(calls / elapsed, 1),
                "ended_on_final_value": True,
            },
        }
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="key presses timed (control_to_output_ms)")
    parser.add_argument("--cold", type=int, default=5, help="cold-cache visits per link")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--before", help="a previous embed.js, to time the same visits with it (served uncompressed)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    d = Daemon(pool_size=3).start()
    pages = Pages()
    try:
        results = {"wire": wire_sizes(d.url)}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                results["chromium"] = browser.version
                results.update(bench_cold(browser, pages, d.url, args.cold, args.before))
                results.update(bench_interact(browser, pages, d.url, args.samples))
            finally:
                browser.close()
    finally:
        pages.close()
        d.stop()
    results["targets"] = TARGETS
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
