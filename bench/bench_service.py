#!/usr/bin/env python3
"""
Benchmark of SageMathCell's one-shot ``POST /service`` beside the Jupyter API's new session.

Starts a real daemon on a loopback port, then, interleaved sample by sample
(the pool refilled and settled before each), prints medians and p99s of:
  - ``service_raw``: ``POST /service`` with ``code=print(1+1)`` (JSON body),
    from a lean raw-socket client (TCP_NODELAY), to the whole response;
  - ``service_urllib``: the same from Python's urllib, form-encoded, as a
    script would do it (no TCP_NODELAY on the client side);
  - ``jupyter_new_session``: ``POST /api/kernels``, a WebSocket, execute
    ``print(1+1)``, to its execute_reply and idle status (output in hand);
  - ``rest_keepalive_*``: small REST answers on one kept-alive urllib-style
    connection (http.client, no TCP_NODELAY): where a response written in
    pieces would meet Nagle and a delayed ACK (~40 ms).

    .venv/bin/python bench/bench_service.py [--samples 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from http.client import HTTPConnection

from benchlib import Daemon, RawWS, execute, http, new_kernel, summary


def ready_count(d: Daemon) -> int:
    return len(re.findall(r"kernel \w+ ready \(pid \d+\)", d.log()))


def settle(d: Daemon, want: int, timeout: float = 30.0) -> None:
    """Wait until ``want`` kernels have been ready in all, then a little more for the pool's warm-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ready_count(d) < want:
        time.sleep(0.01)
    time.sleep(0.1)


def service_raw(port: int) -> float:
    t0 = time.perf_counter()
    status, body = http(port, "POST", "/service", {"code": "print(1+1)"})
    dt = time.perf_counter() - t0
    if status != 200 or body.get("stdout") != "2\n":
        raise RuntimeError(f"/service: {status} {body}")
    return dt


def service_urllib(port: int) -> float:
    data = urllib.parse.urlencode({"code": "print(1+1)"}).encode()
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/service", data=data, timeout=30) as r:
        body = json.loads(r.read())
    dt = time.perf_counter() - t0
    if body.get("stdout") != "2\n":
        raise RuntimeError(f"/service: {body}")
    return dt


def jupyter_new_session(port: int) -> float:
    t0 = time.perf_counter()
    kid = new_kernel(port)
    ws = RawWS(port, kid)
    payload, mid = execute("print(1+1)", ws.session)
    ws.send(payload)
    reply = idle = False
    while not (reply and idle):
        m = ws.recv()
        if m["parent_header"].get("msg_id") != mid:
            continue
        reply = reply or m["channel"] == "shell"
        idle = idle or (m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
    dt = time.perf_counter() - t0
    ws.close()
    http(port, "DELETE", f"/api/kernels/{kid}")
    return dt


def keepalive(port: int, method: str, path: str, n: int) -> list[float]:
    """``n`` requests on one kept-alive connection, as http.client makes them (Nagle left on)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request(method, path)
            r = conn.getresponse()
            r.read()
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    d = Daemon(pool_size=args.pool_size, max_kernels="200", max_kernels_per_client="200")
    d.start()
    ways = {"service_raw": service_raw, "service_urllib": service_urllib, "jupyter_new_session": jupyter_new_session}
    samples: dict[str, list[float]] = {name: [] for name in ways}
    try:
        settle(d, args.pool_size)
        for way in ways.values():  # one of each first: warm the daemon's code paths
            want = ready_count(d) + 1
            way(d.port)
            settle(d, want)
        for _ in range(args.samples):
            for name, way in ways.items():
                want = ready_count(d) + 1
                samples[name].append(way(d.port))
                settle(d, want)
        for path in ("/api", "/api/kernels", "/api/status", "/healthz"):
            samples[f"rest_keepalive GET {path}"] = keepalive(d.port, "GET", path, max(50, args.samples))
    finally:
        d.stop()
    results = {name: summary(values, 1e3) for name, values in samples.items()}
    width = max(map(len, results))
    print(f"{'(ms)':<{width}}  median     p99     min")
    for name, s in results.items():
        print(f"{name:<{width}}  {s['median']:6.1f}  {s['p99']:6.1f}  {s['min']:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{name}_ms": s for name, s in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
