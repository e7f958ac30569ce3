#!/usr/bin/env python3
"""
Benchmark of several daemons behind HAProxy (etc/haproxy.cfg), on this machine.

Starts two daemons (``--daemon-name d1``, ``d2``; Python kernels) and a real
HAProxy on loopback ports (tests/balancer.py renders the shipped
configuration), then prints and writes as JSON:
  - a burst of ``--sessions`` new sessions at once through HAProxy (POST
    /api/kernels, WebSocket, execute ``1+1``, reply): how many answered, how
    they spread over the daemons, the time to the reply;
  - with those sessions all open, every one running ``--rounds`` tiny
    executes at once through HAProxy: the p99 round trip under that load;
  - the extra hop: one kernel, one WebSocket through HAProxy and one straight
    to its daemon, tiny executes alternating between the two (side by side in
    the same run, so both see the same machine).

    .venv/bin/python bench/bench_haproxy.py [--sessions 200] [--samples 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time

from benchlib import AsyncWS, Daemon, RawWS, burst, cpu_seconds, execute, kernel_private_mib, rss_mib, summary

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from balancer import HAProxy, start_all  # noqa: E402


def start(sessions: int) -> tuple[HAProxy, dict[str, Daemon]]:
    per_daemon = sessions  # a burst may land unevenly; neither daemon refuses for want of room
    options = dict(
        pool_size=8,
        max_kernels=per_daemon + 8,
        max_kernels_per_client=per_daemon + 8,  # every visitor comes from HAProxy's 127.0.0.1
        max_connections_per_client=4 * per_daemon,
    )
    daemons = {name: Daemon(daemon_name=name, **options) for name in ("d1", "d2")}
    start_all(list(daemons.values()))
    try:
        return HAProxy({name: d.port for name, d in daemons.items()}).start(), daemons
    except BaseException:
        for d in daemons.values():
            d.stop()
        raise


def under_load(
    port: int, kids: list[str], rounds: int, on_open, timeout: float = 300.0
) -> tuple[list[float], list[str]]:
    """
    Every session's socket through ``port`` opened, ``on_open()`` called once
    they all are, then ``rounds`` tiny executes on each, all at once.
    """

    async def rounds_on(ws) -> tuple[list[float], str]:
        times = []
        if isinstance(ws, Exception):
            return times, repr(ws)
        try:
            for _ in range(rounds):
                payload, mid = execute("1+1", ws.session)
                t0 = time.perf_counter()
                ws.send(payload)
                reply = await ws.wait_reply(mid)
                times.append(time.perf_counter() - t0)
                if reply["content"].get("status") != "ok":
                    return times, f"execute failed: {reply['content']}"
            return times, ""
        except Exception as e:  # every failure is reported, none stops the others
            return times, repr(e)
        finally:
            ws.close()

    async def main():
        sockets = await asyncio.gather(*(AsyncWS.connect(port, k) for k in kids), return_exceptions=True)
        on_open()
        return await asyncio.wait_for(asyncio.gather(*(rounds_on(ws) for ws in sockets)), timeout)

    results = asyncio.run(main())
    return [t for times, _ in results for t in times], [err for _, err in results if err]


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def kernel_memory(daemons: dict[str, Daemon], kids: list[str]) -> dict | None:
    """Private memory (MiB) of the kernels behind ``kids``, found by the pids their daemons logged."""
    values = []
    for kid in kids:
        daemon = daemons[kid.split("-")[0]]
        found = re.findall(rf"session {kid} got kernel \w+ \(pid (\d+)\)", daemon.log())
        if found:
            values.append(kernel_private_mib(int(found[-1])))
    return summary(values) if values else None


def hop(front: HAProxy, daemon: Daemon, kid: str, samples: int) -> dict:
    """Tiny executes on one kernel, alternating a socket through HAProxy and one straight to the daemon."""
    via, direct = RawWS(front.port, kid), RawWS(daemon.port, kid)
    times: dict[str, list[float]] = {"haproxy": [], "direct": []}
    try:
        for ws in (via, direct):  # warm both paths
            ws.run("1+1")
        for i in range(2 * samples):
            name, ws = ("haproxy", via) if i % 2 == 0 else ("direct", direct)
            payload, mid = execute("1+1", ws.session)
            t0 = time.perf_counter()
            ws.send(payload)
            ws.wait(mid)
            times[name].append(time.perf_counter() - t0)
    finally:
        via.close()
        direct.close()
    return {name: summary(values, 1000) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="tiny executes per session under load")
    parser.add_argument("--samples", type=int, default=300, help="tiny executes on each path for the hop")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    front, daemons = start(args.sessions)
    try:
        idle_rss = {name: rss_mib(d.proc.pid) for name, d in daemons.items()} | {"haproxy": rss_mib(front.proc.pid)}
        idle_fds = {name: open_fds(d.proc.pid) for name, d in daemons.items()} | {"haproxy": open_fds(front.proc.pid)}
        t0 = time.perf_counter()
        times, kids, errors = burst(front.port, args.sessions, timeout=300)
        wall = time.perf_counter() - t0
        spread = {name: sum(1 for k in kids if k.startswith(name + "-")) for name in daemons}
        print(f"burst: {args.sessions} new sessions at once through HAProxy over {len(daemons)} daemons")
        print(f"  answered {len(times)}/{args.sessions} in {wall:.1f} s; errors {len(errors)}; spread {spread}")
        if times:
            s = summary(times, 1000)
            print(f"  POST -> first reply: median {s['median']:.0f} ms, p99 {s['p99']:.0f} ms")
        for err in errors[:5]:
            print("  error:", err)

        pids = {name: d.proc.pid for name, d in daemons.items()} | {"haproxy": front.proc.pid}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        fds: dict[str, int] = {}
        load, load_errors = under_load(
            front.port, kids, args.rounds, lambda: fds.update({name: open_fds(pid) for name, pid in pids.items()})
        )
        # each daemon relays its own sessions' executes; HAProxy all of them
        executes = {name: args.rounds * n for name, n in spread.items()} | {"haproxy": len(load)}
        cpu_ms = {name: 1000 * (cpu_seconds(pid) - cpu0[name]) / max(1, executes[name]) for name, pid in pids.items()}
        memory = {name: rss_mib(pid) for name, pid in pids.items()}
        kernels = kernel_memory(daemons, kids[:20])
        load_s = summary(load, 1000) if load else None
        print(
            f"tiny execute with {len(kids)} sessions open, all executing at once ({args.rounds} each), through HAProxy:"
        )
        if load_s:
            print(
                f"  median {load_s['median']:.1f} ms, p99 {load_s['p99']:.1f} ms (n={load_s['n']}); errors {len(load_errors)}"
            )

        print("  CPU per execute: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu_ms.items()))
        print(
            f"memory with {len(kids)} sessions (and before): "
            + ", ".join(f"{name} RSS {mib:.0f} MiB ({idle_rss[name]:.0f})" for name, mib in memory.items())
        )
        print(
            f"open files with {len(kids)} sessions connected (and before): "
            + ", ".join(f"{name} {n} ({idle_fds[name]})" for name, n in fds.items())
        )
        if kernels:
            print(f"  a Python kernel's private memory: median {kernels['median']:.1f} MiB (n={kernels['n']})")

        kid = next(k for k in kids if k.startswith("d1-"))
        hops = hop(front, daemons["d1"], kid, args.samples)
        h, d = hops["haproxy"], hops["direct"]
        print(f"tiny execute, one session at a time, {args.samples} each, alternating on one kernel:")
        print(f"  through HAProxy: median {h['median']:.2f} ms, p99 {h['p99']:.2f} ms")
        print(f"  straight:        median {d['median']:.2f} ms, p99 {d['p99']:.2f} ms")
        print(f"  the extra hop:   +{h['median'] - d['median']:.2f} ms median, +{h['p99'] - d['p99']:.2f} ms p99")

        figures = {
            "sessions": args.sessions,
            "daemons": len(daemons),
            "cpus": os.cpu_count(),
            "burst": {
                "answered": len(times),
                "errors": errors[:20],
                "wall_seconds": wall,
                "spread": spread,
                "to_first_reply_ms": summary(times, 1000) if times else None,
            },
            "tiny_execute_under_load_ms": load_s,
            "tiny_execute_under_load_errors": load_errors[:20],
            "cpu_ms_per_execute": cpu_ms,
            "rss_mib": memory,
            "rss_mib_before": idle_rss,
            "open_fds": fds,
            "open_fds_before": idle_fds,
            "kernel_private_mib": kernels,
            "hop_ms": hops,
        }
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
    finally:
        front.stop()
        for d in daemons.values():
            d.stop(timeout=60)


if __name__ == "__main__":
    main()
