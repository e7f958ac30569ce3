#!/usr/bin/env python3
"""
Benchmark of the core service: session start, tiny execute round trip, PSS.

Starts a real daemon on a loopback port (tests/support.py's Daemon), then
prints medians and p99s:
  - POST /api/kernels to the first execute_reply of ``1+1``, one new session
    at a time (pool refilled between samples) and 20 sessions at once;
  - the round trip of a tiny execute on a warm kernel;
  - the PSS of each idle pooled kernel.

    .venv/bin/python bench/bench_core.py [--samples 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from support import Client, Daemon, msg  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def new_session_to_reply(d: Daemon) -> float:
    t0 = time.perf_counter()
    kid = d.new_kernel()
    c = Client(d, kid)
    req = c.send(msg("execute_request", {"code": "1+1", "silent": False}))
    while True:
        m = c.recv(30)
        if m["msg_type"] == "execute_reply" and m["parent_header"].get("msg_id") == req["header"]["msg_id"]:
            break
    dt = time.perf_counter() - t0
    c.close()
    d.request("DELETE", f"/api/kernels/{kid}")
    return dt


def ready_pids(d: Daemon) -> list[int]:
    return [int(p) for p in re.findall(r"kernel \w+ ready \(pid (\d+)\)", d.log())]


def wait_pool_full(d: Daemon, total_ready: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(ready_pids(d)) < total_ready:
        time.sleep(0.01)


def pss_kib(pid: int, fields: tuple[str, ...] = ("Pss:",)) -> int | None:
    """Sum of the given smaps_rollup fields (kB) of one process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(fields))
    except OSError:
        return None


def kernel_pss_kib(pid: int, fields: tuple[str, ...] = ("Pss:",)) -> int | None:
    """A kernel's whole cost: the process the spawner forked plus the kernel it
    runs as PID 1 of its own namespace (its child), and anything under that."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += pss_kib(p, fields) or 0
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--preload", default=None, help="the daemon's --preload (default: its own default)")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    extra = {} if args.preload is None else {"preload": args.preload}
    d = Daemon(pool_size=args.pool_size, max_kernels="200", max_kernels_per_client="200", **extra)
    d.start()
    try:
        wait_pool_full(d, args.pool_size)
        time.sleep(1.0)
        pss = [p for p in (kernel_pss_kib(pid) for pid in ready_pids(d)[: args.pool_size]) if p]
        results["pss_idle_pooled_kernel_mib"] = {"median": statistics.median(pss) / 1024, "max": max(pss) / 1024, "n": len(pss)}
        private = [p for p in (kernel_pss_kib(pid, ("Private_Clean:", "Private_Dirty:")) for pid in ready_pids(d)[: args.pool_size]) if p]
        results["private_idle_pooled_kernel_mib"] = {"median": statistics.median(private) / 1024, "max": max(private) / 1024, "n": len(private)}

        # one new session at a time, warm pool
        single = []
        for _ in range(args.samples):
            n = len(ready_pids(d))
            single.append(new_session_to_reply(d))
            wait_pool_full(d, n + 1)
            time.sleep(0.05)
        results["new_session_to_first_reply_ms"] = {"median": statistics.median(single) * 1e3, "p99": pct(single, 99) * 1e3, "n": len(single)}

        # tiny execute on a warm kernel
        c = Client(d, d.new_kernel())
        c.execute("1+1")
        rtts = []
        for _ in range(max(200, args.samples)):
            req = c.send(msg("execute_request", {"code": "1+1", "silent": False}))
            mid = req["header"]["msg_id"]
            t0 = time.perf_counter()
            replied = idle = False
            while not (replied and idle):
                m = c.recv(30)
                if m["parent_header"].get("msg_id") != mid:
                    continue
                if m["msg_type"] == "execute_reply":
                    replied = True
                    rtts.append(time.perf_counter() - t0)
                elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    idle = True
        results["tiny_execute_round_trip_ms"] = {"median": statistics.median(rtts) * 1e3, "p99": pct(rtts, 99) * 1e3, "n": len(rtts)}
        c.close()

        # bursts of 20 new sessions at once
        bursts = []
        for _ in range(3):
            wait_pool_full(d, len(ready_pids(d)))
            time.sleep(1.0)
            out: list[float] = []
            lock = threading.Lock()

            def one(out=out, lock=lock):
                dt = new_session_to_reply(d)
                with lock:
                    out.append(dt)

            threads = [threading.Thread(target=one) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            bursts.extend(out)
        results["burst20_new_session_to_first_reply_ms"] = {"median": statistics.median(bursts) * 1e3, "p99": pct(bursts, 99) * 1e3, "n": len(bursts)}
    finally:
        d.stop()

    print(f"{'figure':45} {'median':>10} {'p99/max':>10} {'n':>5}")
    for name, r in results.items():
        second = r.get("p99", r.get("max"))
        print(f"{name:45} {r['median']:10.2f} {second:10.2f} {r['n']:5d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
