#!/usr/bin/env python3
"""
Benchmark of the ZMTP guard's hop (sagecell_tw/worker/guard.py) on its own.

A "kernel" process binds a ROUTER that echoes and a PUB; a guard runs in a
process of its own (as in the spawner front); this process measures, with
samples interleaved, the round trip of a small Jupyter-sized request on a
DEALER connected straight to the kernel and on one through the guard, then
the throughput of output (PUB -> SUB) both ways:

    .venv/bin/python bench/bench_guard.py [--samples 3000]

With ``--against TREE`` (a checkout of other code, main's say), it instead
starts a real daemon of each tree at once and measures the tiny execute
round trip (``1+1`` to its reply) on both, samples interleaved, so that the
load of the machine falls on both alike:

    git archive main | tar -x -C /tmp/main
    .venv/bin/python bench/bench_guard.py --against /tmp/main --samples 1000
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time

import zmq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import Client, Daemon, msg  # noqa: E402

from sagecell_tw.worker.guard import Guard  # noqa: E402

#: a small request as the daemon sends it: delimiter, signature, four JSON parts
REQUEST = [b"<IDS|MSG>", b"0" * 64, b"{" + b"h" * 200 + b"}", b"{}", b"{}", b'{"code": "1+1"}']
#: output runs: (messages, bytes of each message's content)
RUNS = ((20000, 4 << 10), (300, 256 << 10))


def kernel(prefix: str, commands: int) -> None:
    """Echo on shell; on a command "N SIZE" from the pipe, publish N messages of SIZE bytes, then b"end"."""
    ctx = zmq.Context()
    shell = ctx.socket(zmq.ROUTER)
    shell.bind(f"ipc://{prefix}-1")
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"ipc://{prefix}-2")
    poller = zmq.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(commands, zmq.POLLIN)
    while True:
        for what, _ in poller.poll():
            if what is shell:
                shell.send_multipart(shell.recv_multipart())
            else:
                n, size = (int(x) for x in os.read(commands, 64).split())
                body = b"x" * size
                for _ in range(n):
                    pub.send_multipart([*REQUEST[:5], body])
                pub.send(b"end")


def guard(base: str, prefix: str) -> None:
    g = Guard(base, lambda kid, why: None, limit=1 << 30)
    g.open({"id": "k1", "connection": {"ip": prefix}})
    while True:
        if select.select([g.fileno()], [], [], 1)[0]:
            g.service()


def fork(work, *args) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            work(*args)
        finally:
            os._exit(0)
    return pid


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def tiny_execute(c: Client) -> float:
    req = c.send(msg("execute_request", {"code": "1+1", "silent": False}))
    mid = req["header"]["msg_id"]
    t0 = time.perf_counter()
    rtt, idle = None, False
    while rtt is None or not idle:
        m = c.recv(30)
        if m["parent_header"].get("msg_id") != mid:
            continue
        if m["msg_type"] == "execute_reply":
            rtt = time.perf_counter() - t0
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    return rtt


def against(other: str, samples: int) -> None:
    """The tiny execute round trip through a daemon of this tree and one of ``other``, interleaved."""
    daemons = {}
    try:
        for name, root in (("this", os.path.abspath(ROOT)), ("other", os.path.abspath(other))):
            d = Daemon(pool_size=2)
            d.env["PYTHONPATH"] = root
            daemons[name] = d.start()
        clients = {name: Client(d, d.new_kernel()) for name, d in daemons.items()}
        for c in clients.values():
            for _ in range(20):
                tiny_execute(c)
        rtts: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(samples):
            for name in sorted(clients, reverse=bool(i % 2)):
                rtts[name].append(tiny_execute(clients[name]))
        for name, v in rtts.items():
            guarded = os.path.exists(os.path.join(daemons[name].run_dir, "kernels", ".guard"))
            print(
                f"{name:6} ({'guarded' if guarded else 'no guard'}) tiny execute round trip: "
                f"median {statistics.median(v) * 1e3:.2f} ms, p99 {pct(v, 99) * 1e3:.2f} ms, n {len(v)}"
            )
    finally:
        for d in daemons.values():
            d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--against", default=None, help="a tree of other code: compare whole daemons")
    args = ap.parse_args()
    if args.against:
        against(args.against, args.samples)
        return
    base = tempfile.mkdtemp(prefix="sagecell-bench-guard-")
    os.makedirs(f"{base}/k1/ipc")
    prefix, guarded = f"{base}/k1/ipc/k", f"{base}/.guard/k1"
    r, w = os.pipe()
    pids = [fork(kernel, prefix, r), fork(guard, base, prefix)]
    ctx = zmq.Context()
    try:
        time.sleep(0.5)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{guarded}-2")  # the guard takes shell once iopub is subscribed
        dealers = {"direct": ctx.socket(zmq.DEALER), "guarded": ctx.socket(zmq.DEALER)}
        dealers["direct"].connect(f"ipc://{prefix}-1")
        dealers["guarded"].connect(f"ipc://{guarded}-1")
        rtts: dict[str, list[float]] = {name: [] for name in dealers}
        for i in range(args.samples + 100):
            for name in sorted(dealers, reverse=bool(i % 2)):
                t0 = time.perf_counter()
                dealers[name].send_multipart(REQUEST)
                dealers[name].recv_multipart()
                if i >= 100:  # after a warm-up
                    rtts[name].append(time.perf_counter() - t0)
        for name, v in rtts.items():
            print(f"{name:8} round trip: median {statistics.median(v) * 1e6:6.0f} us, p99 {pct(v, 99) * 1e6:6.0f} us")
        sub.close(0)
        for n, size in RUNS:
            for name, address in (("direct", f"ipc://{prefix}-2"), ("guarded", f"ipc://{guarded}-2")):
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(address)
                time.sleep(0.5)  # subscribed
                t0 = time.perf_counter()
                os.write(w, f"{n} {size}".encode())
                got = 0
                while sub.recv_multipart()[0] != b"end":
                    got += 1
                dt = time.perf_counter() - t0
                assert got == n, (got, n)
                print(
                    f"{name:8} {n} messages of {size >> 10} KiB: {n / dt:8.0f} messages/s, {n * size / dt / 1e6:5.0f} MB/s"
                )
                sub.close(0)
    finally:
        ctx.destroy(linger=0)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
