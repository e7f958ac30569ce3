#!/usr/bin/env python3
"""
The cost of the reverse proxy and of the replay record (issue 18, --base-url / reconnect).

  hop     a tiny execute's round trip (``1``) on one kernel, straight to the
          daemon and through a real nginx running etc/nginx-sagecell.conf
          (tests/nginx.py), 300 of each, interleaved: median and p99
  record  what recording one delivered message for replay costs the daemon
          (core/replay.Journal.record, 1 MiB bound), per message

Run: .venv/bin/python bench/bench_prefix.py   (needs nginx: setup.sh installs it)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import websocket  # noqa: E402
from nginx import PREFIX, Nginx  # noqa: E402
from support import Client, Daemon  # noqa: E402
from test_proxy import ProxiedClient, new_kernel  # noqa: E402

from sagecell_tw import messages  # noqa: E402
from sagecell_tw.core.replay import Journal  # noqa: E402


def direct_client(daemon: Daemon, kid: str) -> Client:
    client = Client.__new__(Client)
    client.session, client.backlog = uuid.uuid4().hex, []
    url = f"{daemon.ws_url}{PREFIX}/api/kernels/{kid}/channels?session_id={client.session}"
    client.ws = websocket.create_connection(url, timeout=30)
    return client


def hop() -> None:
    d = Daemon("--trusted-proxies", "127.0.0.1", base_url=PREFIX + "/", pool_size=2).start()
    proxy = Nginx(d.port).start()
    try:
        kid = new_kernel(proxy, "127.0.0.1")
        clients = {"direct": direct_client(d, kid), "nginx": ProxiedClient(proxy, kid, "127.0.0.1")}
        for c in clients.values():
            for _ in range(20):
                c.execute("1")
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(2):
            for name, c in clients.items():
                for _ in range(150):
                    t = time.perf_counter()
                    c.execute("1")
                    times[name].append((time.perf_counter() - t) * 1000)
        for name, ts in times.items():
            ts.sort()
            print(
                f"hop {name}: n={len(ts)} median {statistics.median(ts):.2f} ms, p99 {ts[int(len(ts) * 0.99) - 1]:.2f} ms"
            )
    finally:
        proxy.stop()
        d.stop()


def record() -> None:
    msg = messages.stream("x" * 80 + "\n", "k", {"msg_id": "a"}, name="stdout")
    journal = Journal(1 << 20)
    n = 300_000
    t = time.perf_counter()
    for _ in range(n):
        journal.record(msg, 300)
    print(f"record: {(time.perf_counter() - t) / n * 1e6:.2f} us per message")


if __name__ == "__main__":
    record()
    hop()
