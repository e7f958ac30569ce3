#!/usr/bin/env python3
"""
Benchmark of issue 7: instant sessions, fast lossless output, flood control.

Starts real daemons on loopback ports (tests/support.py's Daemon) and drives
them with the lean client of bench/benchlib.py. Figures (medians; p99 where
it says so), each with its target on a 2-core machine:

  start_warm_ms        POST /api/kernels -> WebSocket -> first execute_reply,
                       one session at a time, warm pool          <= 10 (p99 <= 30)
  start_cold_ms        the same with no kernel pooled (--pool-size 0): the
                       session waits for a fork
  burst20_ms           20 new sessions at once, each to its first reply
                                                     every one answered, p99 <= 300
  burst100_ms          100 at once (reported, no target)
  burst20_pool20_ms    20 at once against a daemon whose pool is sized for
                       it (--pool-size 20): what an operator who expects
                       bursts of 20 gets            all answered, p99 <= 300
  tiny_execute_ms      ``1+1`` round trip to execute_reply and idle  <= 2
  print_200k_s         ``for i in range(200000): print(i)``: until all delivered
  write_flush_20k      write+flush of 20k lines, checked complete and in order,
                       lines/s                                         >= 20,000
  display_2000         ``display(i)`` x 2,000, display_data/s          >= 5,000
  flood_2M             2M printed lines in one session while another runs tiny
                       executes: their p99 (ms)                        <= 20
                       and the daemon's RSS growth (MB)                <= 50
  pss_idle_kernel_mib  PSS of an idle pooled kernel (its whole process group)
                                                                       <= 20
  daemon_rss_200_mib   the daemon's RSS with 200 kernels in use (and 200 sockets)

    .venv/bin/python bench/bench_output.py [--samples 20] [--json out.json]
        [--only start_warm,tiny_execute,...] [--skip daemon_rss_200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import threading
import time

from benchlib import (
    Daemon,
    RawWS,
    a_http,
    burst,
    execute,
    http,
    kernel_private_mib,
    kernel_pss_mib,
    new_kernel,
    new_session_to_reply,
    rss_mib,
    summary,
)

TARGETS = {
    "start_warm_ms": "median <= 10, p99 <= 30",
    "burst20_ms": "all answered, p99 <= 300",
    "burst20_pool20_ms": "all answered, p99 <= 300",
    "tiny_execute_ms": "median <= 2",
    "write_flush_20k_lines_per_s": ">= 20000",
    "display_2000_per_s": ">= 5000",
    "flood_other_session_rtt_ms": "p99 <= 20",
    "flood_daemon_rss_growth_mb": "<= 50",
    "pss_idle_kernel_mib": "<= 20",
}

# -- helpers ---------------------------------------------------------------------


def kernel_pids(d: Daemon) -> dict[str, int]:
    """kernel id -> host pid of the kernel (PID 1 of its namespace), from the daemon's log."""
    return {k: int(p) for k, p in re.findall(r"kernel (\w+) ready \(pid (\d+)\)", d.log())}


def session_kernels(d: Daemon) -> dict[str, str]:
    """session id -> its latest kernel id, from the daemon's log."""
    out = {}
    for sid, kid in re.findall(r"session (\w+) (?:has|got) kernel (\w+)", d.log()):
        out[sid] = kid
    return out


def wait_pool_full(d: Daemon, size: int, timeout: float = 60.0) -> None:
    """Until ``size`` warm kernels wait in the pool (/healthz says how many)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _status, body = http(d.port, "GET", "/healthz")
        if isinstance(body, dict) and isinstance(body.get("pool"), int) and body["pool"] >= size:
            return
        time.sleep(0.02)


def delete_all(d: Daemon, kids: list[str]) -> None:
    async def main():
        await asyncio.gather(*(a_http(d.port, "DELETE", f"/api/kernels/{k}") for k in kids))

    if kids:
        asyncio.run(main())


def stdout_text(outputs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


# -- the figures -----------------------------------------------------------------


def bench_start_warm(d: Daemon, pool: int, samples: int) -> dict:
    times = []
    for _ in range(samples):
        wait_pool_full(d, pool)
        time.sleep(0.05)
        dt, kid = new_session_to_reply(d.port)
        times.append(dt)
        http(d.port, "DELETE", f"/api/kernels/{kid}")
    return summary(times, 1e3)


def bench_start_cold(samples: int) -> dict:
    d = Daemon(pool_size=0, max_kernels=50, max_kernels_per_client=50)
    # pool_size 0: /healthz/ready never says ready, so start by hand
    d.wait_pool = lambda n, timeout=30.0: time.sleep(1.0)  # type: ignore[method-assign]
    d.start()
    try:
        times = []
        for _ in range(samples):
            time.sleep(0.3)
            dt, kid = new_session_to_reply(d.port)
            times.append(dt)
            http(d.port, "DELETE", f"/api/kernels/{kid}")
        return summary(times, 1e3)
    finally:
        d.stop()


def bench_burst(d: Daemon, pool: int, n: int, rounds: int) -> dict:
    times: list[float] = []
    errors: list[str] = []
    for _ in range(rounds):
        wait_pool_full(d, pool)
        time.sleep(1.0)
        t, kids, errs = burst(d.port, n)
        times += t
        errors += errs
        delete_all(d, kids)
    out = summary(times, 1e3) if times else {"n": 0}
    out["answered"] = f"{len(times)}/{len(times) + len(errors)}"
    if errors:
        out["errors"] = errors[:5]
    return out


def bench_burst_sized(n: int, rounds: int) -> dict:
    """A burst of ``n`` against a daemon of its own whose pool holds ``n``."""
    d = Daemon(pool_size=n, max_kernels=2 * n + 8, max_kernels_per_client=2 * n + 8)
    d.start()
    try:
        return bench_burst(d, n, n, rounds)
    finally:
        d.stop()


def bench_tiny(d: Daemon, n: int = 300) -> dict:
    ws = RawWS(d.port, new_kernel(d.port))
    for _ in range(20):
        ws.run("1+1")
    rtts = []
    cpu0 = time.process_time()
    for _ in range(n):
        payload, mid = execute("1+1", ws.session)
        t0 = time.perf_counter()
        ws.send(payload)
        ws.wait(mid)
        rtts.append(time.perf_counter() - t0)
    client_cpu = (time.process_time() - cpu0) / n
    ws.close()
    out = summary(rtts, 1e3)
    out["client_cpu_ms_per_rt"] = client_cpu * 1e3
    return out


def bench_print_200k(d: Daemon) -> dict:
    ws = RawWS(d.port, new_kernel(d.port))
    ws.run("1+1")
    t0 = time.perf_counter()
    reply, outputs = ws.run("for i in range(200000):\n    print(i)", timeout=300)
    dt = time.perf_counter() - t0
    text = stdout_text(outputs)
    ok = text == "".join(f"{i}\n" for i in range(200000))
    ws.close()
    return {"median": dt, "n": 1, "lines_per_s": 200000 / dt, "complete_in_order": ok, "messages": len(outputs)}


def bench_write_flush(d: Daemon, rounds: int = 3) -> dict:
    ws = RawWS(d.port, new_kernel(d.port))
    ws.run("import sys")
    rates, oks = [], []
    code = "for i in range(20000):\n    sys.stdout.write(f'{i}\\n')\n    sys.stdout.flush()"
    expected = "".join(f"{i}\n" for i in range(20000))
    msgs = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        reply, outputs = ws.run(code, timeout=300)
        dt = time.perf_counter() - t0
        rates.append(20000 / dt)
        oks.append(stdout_text(outputs) == expected)
        msgs = sum(1 for m in outputs if m["msg_type"] == "stream")
    ws.close()
    return {"median": statistics.median(rates), "n": rounds, "complete_in_order": all(oks), "stream_messages": msgs}


def bench_display(d: Daemon, rounds: int = 3) -> dict:
    ws = RawWS(d.port, new_kernel(d.port))
    ws.run("from IPython.display import display")
    rates, oks = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        reply, outputs = ws.run("for i in range(2000):\n    display(i)", timeout=300)
        dt = time.perf_counter() - t0
        shown = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "display_data"]
        oks.append(shown == [str(i) for i in range(2000)])
        rates.append(2000 / dt)
    ws.close()
    return {"median": statistics.median(rates), "n": rounds, "complete_in_order": all(oks)}


def bench_flood(d: Daemon, lines: int = 2_000_000) -> dict:
    """One session prints ``lines`` lines while another measures tiny executes; the daemon's RSS is sampled."""
    pid = d.proc.pid
    flood = RawWS(d.port, new_kernel(d.port))
    flood.run("1+1")
    other = RawWS(d.port, new_kernel(d.port))
    for _ in range(20):
        other.run("1+1")
    rss0 = rss_mib(pid)
    peak = [rss0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result: dict = {}

    def run_flood():
        t0 = time.perf_counter()
        payload, mid = execute(f"for i in range({lines}):\n    print(i)", flood.session)
        flood.send(payload)
        n_bytes = 0
        notices = []
        reply = None
        idle = False
        while reply is None or not idle:
            m = flood.recv(600)
            if m.get("parent_header", {}).get("msg_id") != mid:
                continue
            if m["channel"] == "shell":
                reply = m["content"]
            elif m["msg_type"] == "stream":
                if m["header"].get("session") == "sagecell-daemon":
                    notices.append(m["content"]["text"].strip())
                else:
                    n_bytes += len(m["content"]["text"])
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        result.update(seconds=time.perf_counter() - t0, bytes_shown=n_bytes, notices=notices, status=reply.get("status"))

    flooder = threading.Thread(target=run_flood, daemon=True)
    flooder.start()
    time.sleep(0.3)
    rtts = []
    while flooder.is_alive():
        payload, mid = execute("1+1", other.session)
        t0 = time.perf_counter()
        other.send(payload)
        other.wait(mid)
        rtts.append(time.perf_counter() - t0)
        time.sleep(0.01)
    flooder.join()
    stop.set()
    sampler.join()
    other_ok = other.run("40+2")[0]["status"] == "ok"
    flood_ok = flood.run("1+1")[0]["status"] == "ok"
    flood.close()
    other.close()
    return {
        "other_rtt": summary(rtts, 1e3) if rtts else {"n": 0},
        "rss_growth_mb": (peak[0] - rss0) * 1.048576,
        "flood": result,
        "both_sessions_work_after": other_ok and flood_ok,
    }


def bench_pss(d: Daemon, pool: int) -> dict:
    wait_pool_full(d, pool)
    time.sleep(2.0)
    # the pooled kernels: ready, never handed to a session
    used = set(session_kernels(d).values())
    pids = [p for k, p in kernel_pids(d).items() if k not in used]
    alive = [p for p in pids if kernel_pss_mib(p) > 0][-pool:]
    pss = [kernel_pss_mib(p) for p in alive]
    priv = [kernel_private_mib(p) for p in alive]
    return {"median": statistics.median(pss), "max": max(pss), "n": len(pss), "private_mib": statistics.median(priv)}


def bench_daemon_rss_200(n: int = 200) -> dict:
    d = Daemon(pool_size=8, max_kernels=n + 8, max_kernels_per_client=n + 8)
    d.start()
    try:
        wait_pool_full(d, 8)
        rss0 = rss_mib(d.proc.pid)
        socks = []
        kids = []
        for _ in range(n // 20):
            _t, k, errs = burst(d.port, 20)
            kids += k
        for kid in kids:
            socks.append(RawWS(d.port, kid))
        time.sleep(2.0)
        # every session still answers
        ok = sum(1 for ws in socks[:: max(1, len(socks) // 10)] if ws.run("1+1")[0]["status"] == "ok")
        rss = rss_mib(d.proc.pid)
        pss = [kernel_pss_mib(p) for p in list(kernel_pids(d).values())[-20:]]
        pss = [p for p in pss if p > 0]
        for ws in socks:
            ws.close()
        delete_all(d, kids)
        return {
            "median": rss,
            "n": len(kids),
            "rss_before_mib": rss0,
            "per_kernel_kib": (rss - rss0) * 1024 / max(1, len(kids)),
            "sampled_sessions_ok": ok,
            "pss_kernel_mib_at_200": statistics.median(pss) if pss else None,
        }
    finally:
        d.stop()


# -- main ---------------------------------------------------------------------------

SECTIONS = (
    "pss_idle_kernel",
    "start_warm",
    "start_cold",
    "tiny_execute",
    "burst20",
    "burst100",
    "burst20_pool20",
    "print_200k",
    "write_flush_20k",
    "display_2000",
    "flood_2M",
    "daemon_rss_200",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--flood-lines", type=int, default=2_000_000)
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s} or set(SECTIONS)
    only -= {s for s in args.skip.split(",") if s}
    results: dict[str, dict] = {}
    d = Daemon(pool_size=args.pool_size, max_kernels=260, max_kernels_per_client=260)
    d.start()
    try:
        wait_pool_full(d, args.pool_size)
        if "pss_idle_kernel" in only:
            results["pss_idle_kernel_mib"] = bench_pss(d, args.pool_size)
        if "start_warm" in only:
            results["start_warm_ms"] = bench_start_warm(d, args.pool_size, args.samples)
        if "tiny_execute" in only:
            results["tiny_execute_ms"] = bench_tiny(d)
        if "burst20" in only:
            results["burst20_ms"] = bench_burst(d, args.pool_size, 20, 3)
        if "burst100" in only:
            results["burst100_ms"] = bench_burst(d, args.pool_size, 100, 1)
        if "print_200k" in only:
            results["print_200k_s"] = bench_print_200k(d)
        if "write_flush_20k" in only:
            results["write_flush_20k_lines_per_s"] = bench_write_flush(d)
        if "display_2000" in only:
            results["display_2000_per_s"] = bench_display(d)
        if "flood_2M" in only:
            f = bench_flood(d, args.flood_lines)
            results["flood_other_session_rtt_ms"] = f["other_rtt"]
            results["flood_daemon_rss_growth_mb"] = {"median": f["rss_growth_mb"], "n": 1, **f["flood"], "both_sessions_work_after": f["both_sessions_work_after"]}
    finally:
        d.stop()
    if "start_cold" in only:
        results["start_cold_ms"] = bench_start_cold(max(5, args.samples // 2))
    if "burst20_pool20" in only:
        results["burst20_pool20_ms"] = bench_burst_sized(20, 3)
    if "daemon_rss_200" in only:
        results["daemon_rss_200_mib"] = bench_daemon_rss_200()

    print(f"{'figure':34} {'median':>10} {'p99/max':>10} {'n':>5}  target / notes")
    for name, r in results.items():
        second = r.get("p99", r.get("max", float("nan")))
        notes = [TARGETS.get(name, "")]
        for key in ("answered", "complete_in_order", "client_cpu_ms_per_rt", "private_mib", "lines_per_s", "bytes_shown", "notices", "both_sessions_work_after", "per_kernel_kib", "pss_kernel_mib_at_200", "errors"):
            if key in r:
                v = r[key]
                notes.append(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}")
        median = r.get("median", float("nan"))
        print(f"{name:34} {median:10.2f} {second:10.2f} {r.get('n', 0):5d}  {'; '.join(n for n in notes if n)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
