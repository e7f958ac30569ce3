#!/usr/bin/env python3
"""
Interacts on the daemon's side: medians and p99, in ms, over loopback.

  - a control change to its output: a comm_msg setting an interact's slider
    (as ipywidgets' page code sends it, at most 60 a second as a drag makes
    them) to the re-run's printed line, and to the kernel's idle for it; for Python's ``ipywidgets.interact`` and, with
    passagemath installed, Sage's ``@interact``;
  - how many control updates a second one session can push: a client sends
    comm messages as fast as it can for a few seconds, and the kernel counts
    what reaches it each second, at the default --max-messages-per-second
    (100) and with the limit out of the way (100000); another session's tiny
    execute round trip is measured during each flood.

    .venv/bin/python bench/bench_comms.py [--samples 200] [--flood-seconds 5] [--no-sage]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
import uuid

from benchlib import Daemon, RawWS, _frame, new_kernel, pct, request

PYTHON_INTERACT = """
from ipywidgets import interact
@interact(x=(0, 1000))
def f(x=3):
    print('x is', x)
"""
SAGE_INTERACT = """
@interact
def f(x=(0, 1000)):
    print('x is', x)
"""
#: a comm target that notes when each message reaches the kernel
COUNTER = """
import time
_arrivals = []
def _counted(comm, open_msg):
    comm.on_msg(lambda m: _arrivals.append(time.monotonic()))
get_ipython().kernel.comm_manager.register_target("bench.count", _counted)
"""


def slider_of(outputs: list[dict]) -> str:
    for m in outputs:
        if m["msg_type"] == "comm_open" and m["content"]["data"]["state"]["_model_name"] == "IntSliderModel":
            return m["content"]["comm_id"]
    raise RuntimeError("no IntSlider among the interact's messages")


#: changes a second, as a dragged slider makes them (pointer events come ~60 times a second)
DRAG_RATE = 60


def change_to_output(ws: RawWS, slider: str, samples: int) -> tuple[list[float], list[float]]:
    """
    Seconds from each slider change sent to its printed line, and to the
    kernel's idle for it; a change each 1/DRAG_RATE s at most, as a drag
    makes them (ipywidgets' page code sends one and waits for its idle).
    """
    to_output, to_idle = [], []
    for i in range(samples):
        time.sleep(max(0.0, 1 / DRAG_RATE - (to_idle[-1] if to_idle else 0)))
        value = i % 1000
        update = {"method": "update", "state": {"value": value}, "buffer_paths": []}
        payload, mid = request("comm_msg", {"comm_id": slider, "data": update}, ws.session)
        t0 = time.perf_counter()
        ws.send(payload)
        printed, text = None, ""
        while True:
            m = ws.recv(30)
            if m.get("parent_header", {}).get("msg_id") != mid:
                continue
            if m["msg_type"] == "stream":  # a print may come in pieces
                text += m["content"]["text"]
                if text == f"x is {value}\n":
                    printed = time.perf_counter() - t0
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        if printed is None:
            raise RuntimeError(f"the change to {value} printed {text!r}")
        to_output.append(printed)
        to_idle.append(time.perf_counter() - t0)
    return to_output, to_idle


def interact_figures(port: int, kernel: str, code: str, samples: int) -> dict:
    ws = RawWS(port, new_kernel(port, kernel))
    reply, out = ws.run(code)
    if reply.get("status") != "ok":
        raise RuntimeError(f"{kernel} interact: {reply}")
    slider = slider_of(out)
    change_to_output(ws, slider, 10)  # warm
    to_output, to_idle = change_to_output(ws, slider, samples)
    ws.close()
    return {
        "output_median": 1000 * statistics.median(to_output),
        "output_p99": 1000 * pct(to_output, 99),
        "idle_median": 1000 * statistics.median(to_idle),
        "idle_p99": 1000 * pct(to_idle, 99),
    }


def round_trips(ws: RawWS, seconds: float) -> list[float]:
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        ws.run("1")
        times.append(time.perf_counter() - t0)
    return times


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood(port: int, seconds: float, daemon_pid: int) -> dict:
    """A client pushing comm messages as fast as it can; what reaches its kernel each second."""
    flooder_kernel = new_kernel(port)
    flooder = RawWS(port, flooder_kernel)
    other = RawWS(port, new_kernel(port))
    flooder.run(COUNTER)
    comm_id = uuid.uuid4().hex
    flooder.send(
        request("comm_open", {"comm_id": comm_id, "target_name": "bench.count", "data": {}}, flooder.session)[0]
    )
    other.run("1")
    quiet = round_trips(other, 1.0)
    update = request("comm_msg", {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 1}}}, "s")[0]
    template = json.loads(update)
    stop = threading.Event()
    sent = [0]

    def push():
        while not stop.is_set():
            template["header"]["msg_id"] = uuid.uuid4().hex
            try:
                flooder.sock.sendall(_frame(json.dumps(template).encode()))
            except OSError:
                return
            sent[0] += 1

    def drain():
        while not stop.is_set():
            try:
                if not flooder.sock.recv(1 << 16):
                    return
            except OSError:
                return

    flooder.sock.settimeout(None)
    workers = [threading.Thread(target=push), threading.Thread(target=drain)]
    cpu0 = cpu_seconds(daemon_pid)
    for w in workers:
        w.start()
    try:
        time.sleep(seconds)  # the daemon's CPU for the flood alone
        cpu = cpu_seconds(daemon_pid) - cpu0
        during = round_trips(other, seconds)
    finally:
        stop.set()
        flooder.sock.shutdown(socket.SHUT_RDWR)
        for w in workers:
            w.join(10)
    flooder.sock.close()
    checker = RawWS(port, flooder_kernel)
    reply, out = checker.run(
        f"_t0 = _arrivals[0] if _arrivals else 0\nprint(sum(1 for t in _arrivals if t - _t0 < {seconds}))",
        timeout=600,
    )
    taken = int("".join(m["content"]["text"] for m in out if m["msg_type"] == "stream"))
    return {
        "taken_per_s": taken / seconds,
        "daemon_cpu": cpu / seconds,
        "sent_per_s": sent[0] / seconds,
        "other_quiet_median": 1000 * statistics.median(quiet),
        "other_during_median": 1000 * statistics.median(during),
        "other_during_p99": 1000 * pct(during, 99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--flood-seconds", type=float, default=5.0)
    ap.add_argument("--no-sage", action="store_true")
    args = ap.parse_args()
    from sagecell_tw.config import sage_available

    kernels = "python3" if args.no_sage or not sage_available() else "python3,sagemath"
    d = Daemon(pool_size=2, kernels=kernels).start(timeout=120)
    try:
        if "sagemath" in kernels:
            d.wait_pool(1, timeout=120)
        for name, code in (("python3", PYTHON_INTERACT), ("sagemath", SAGE_INTERACT)):
            if name in kernels:
                f = interact_figures(d.port, name, code, args.samples)
                print(
                    f"{name}: change to output {f['output_median']:.2f} / {f['output_p99']:.2f} ms, "
                    f"to idle {f['idle_median']:.2f} / {f['idle_p99']:.2f} ms (median / p99, {args.samples} changes)"
                )
        f = flood(d.port, args.flood_seconds, d.proc.pid)
        print(
            f"flood, --max-messages-per-second 100: the kernel took {f['taken_per_s']:.0f} updates/s, the daemon used {100 * f['daemon_cpu']:.0f}% of a core; another "
            f"session's round trip {f['other_quiet_median']:.2f} ms quiet, {f['other_during_median']:.2f} / "
            f"{f['other_during_p99']:.2f} ms during"
        )
    finally:
        d.stop()
    d = Daemon(pool_size=2, max_messages_per_second=100000).start()
    try:
        f = flood(d.port, args.flood_seconds, d.proc.pid)
        print(
            f"flood, limit out of the way (100000): the kernel took {f['taken_per_s']:.0f} updates/s, the daemon used {100 * f['daemon_cpu']:.0f}% of a core; another "
            f"session's round trip {f['other_quiet_median']:.2f} ms quiet, {f['other_during_median']:.2f} / "
            f"{f['other_during_p99']:.2f} ms during"
        )
    finally:
        d.stop()


if __name__ == "__main__":
    main()
