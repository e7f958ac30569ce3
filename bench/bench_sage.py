#!/usr/bin/env python3
"""
New Sage sessions, side by side: this daemon's Sage kernels (forked from a
warm Sage master) and Jupyter Server with passagemath's own ``sagemath``
kernelspec, in one run. Medians and p99, in ms:

  - a new session (POST /api/kernels, WebSocket) to the first result of
    ``factor(2^64-1)``, of ``integrate(sin(x)^2, x)``, and to the first
    ``plot(sin(x), (x, 0, pi))`` image delivered;
  - a burst of 20 new Sage sessions at once, each to its ``factor`` result;
  - memory: PSS and private memory of an idle pooled Sage kernel (pool 4),
    and of each of 50 idle Sage kernels.

Everything on 127.0.0.1. Needs passagemath (and jupyter_server for the
comparison: without it, only this daemon is measured).

    .venv/bin/python bench/bench_sage.py [--samples 20] [--jupyter-samples 5] [--burst 20] [--many 50]
        [--pool 4] [--no-jupyter | --no-ours]

Jupyter Server is looked for beside this Python (``jupyter-server``); the
daemon measured is this worktree's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import Daemon, RawWS, burst, descendants, execute, http, new_kernel, pct, rollup

CELLS = {
    "factor": "factor(2^64-1)",
    "integrate": "integrate(sin(x)^2, x)",
    "plot": "plot(sin(x), (x, 0, pi))",
}


def first_result(port: int, code: str, timeout: float = 120.0) -> float:
    """Seconds from POST /api/kernels to the first result of ``code`` (its image, for a plot)."""
    t0 = time.perf_counter()
    kid = new_kernel(port, "sagemath")
    ws = RawWS(port, kid, timeout=timeout)
    payload, mid = execute(code, ws.session)
    ws.send(payload)
    want = "image/png" if code.startswith("plot") else "text/plain"
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(max(0.1, deadline - time.monotonic()))
        if m.get("parent_header", {}).get("msg_id") != mid:
            continue
        if m["msg_type"] in ("execute_result", "display_data") and want in m["content"]["data"]:
            break
        if m["msg_type"] == "error":
            raise RuntimeError(f"{code}: {m['content']['ename']}: {m['content']['evalue']}")
    dt = time.perf_counter() - t0
    ws.close()
    http(port, "DELETE", f"/api/kernels/{kid}")
    return dt


def sage_kernel_pids(root: int) -> list[int]:
    """The Sage kernels under process ``root``: ECL loaded, in a PID namespace of their own (the master is in ours)."""
    mine = os.readlink("/proc/self/ns/pid")
    found = []
    for pid in descendants(root):
        name = str(pid)
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == mine:
                continue
            with open(f"/proc/{name}/maps") as f:
                if "libecl" in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def memory(pids: list[int]) -> tuple[list[float], list[float]]:
    """(PSS, private) MiB of each process."""
    rolls = [rollup(p) for p in pids]
    pss = [r.get("Pss", 0) / 1024 for r in rolls]
    private = [(r.get("Private_Dirty", 0) + r.get("Private_Clean", 0)) / 1024 for r in rolls]
    return pss, private


def wait_sage_pool(port: int, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = http(port, "GET", "/healthz")
        if isinstance(body, dict) and body.get("pools", {}).get("sagemath", 0) >= n:
            return
        time.sleep(0.05)
    raise SystemExit(f"the Sage pool did not reach {n} kernels in {timeout} s")


#: what --json writes: {"sagecell_tw": {label: figures}, "jupyter_server": {...}}
FIGURES: dict[str, dict] = {}
_section = ["sagecell_tw"]


def record(label: str, **figures) -> None:
    FIGURES.setdefault(_section[0], {})[label] = figures


def row(label: str, values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    record(label, median_ms=statistics.median(ms), p99_ms=pct(ms, 99), n=len(ms))
    return f"  {label:34s} median {statistics.median(ms):8.1f}  p99 {pct(ms, 99):8.1f}  (n={len(ms)})"


def ours(args) -> None:
    print(f"sagecell_tw: Sage kernels forked from a warm master, pool {args.pool}")
    _section[0] = "sagecell_tw"
    d = Daemon(
        kernels="sagemath,python3",
        pool_size=args.pool,
        max_kernels_per_client=args.many + 8,
        max_kernels=args.many + 16,
    )
    t0 = time.perf_counter()
    d.start(timeout=180)
    try:
        wait_sage_pool(d.port, args.pool)
        print(f"  daemon start to a full Sage pool       {time.perf_counter() - t0:8.1f} s")
        pss, private = memory(sage_kernel_pids(d.proc.pid))
        record(
            f"idle pooled kernel, pool {args.pool}",
            pss_mib=statistics.median(pss),
            private_mib=statistics.median(private),
        )
        print(
            f"  idle pooled Sage kernel (pool {args.pool}): PSS {statistics.median(pss):.1f} MiB, private {statistics.median(private):.1f} MiB"
        )
        for name, code in CELLS.items():
            times = []
            for _ in range(args.samples):
                wait_sage_pool(d.port, args.pool)
                times.append(first_result(d.port, code))
            print(row(f"new session to first {name}", times))
        wait_sage_pool(d.port, args.pool)
        time.sleep(1)
        before = spawn_seconds(d.port)
        times, kids, errors = burst(d.port, args.burst, timeout=300, name="sagemath", code=CELLS["factor"])
        print(row(f"burst of {args.burst}: each to its factor", times) + f"  answered {len(times)}/{args.burst}")
        for e in errors[:3]:
            print(f"    error: {e}")
        wait_sage_pool(d.port, args.pool)
        after = spawn_seconds(d.port)
        forks = after[1] - before[1]
        if forks:
            print(
                f"    where it goes: {forks:.0f} kernels forked during and after it (the pool refilled), "
                f"fork to ready {1e3 * (after[0] - before[0]) / forks:.0f} ms each on average, "
                f"at most {os.cpu_count()} at once (one per core)"
            )
        for kid in kids:
            http(d.port, "DELETE", f"/api/kernels/{kid}")
        wait_sage_pool(d.port, args.pool)
        kids = []
        for _ in range(args.many):
            kid = new_kernel(d.port, "sagemath")
            ws = RawWS(d.port, kid)
            ws.run("1")
            ws.close()
            kids.append(kid)
        wait_sage_pool(d.port, args.pool)
        time.sleep(1)
        pss, private = memory(sage_kernel_pids(d.proc.pid))
        record(
            f"{len(pss)} kernels",
            pss_mib=statistics.median(pss),
            private_mib=statistics.median(private),
            pss_total_mib=sum(pss),
        )
        print(
            f"  {len(pss)} Sage kernels ({args.many} used once, {args.pool} pooled): PSS median {statistics.median(pss):.1f} MiB, private median {statistics.median(private):.1f} MiB, PSS total {sum(pss):.0f} MiB"
        )
        for kid in kids:
            http(d.port, "DELETE", f"/api/kernels/{kid}")
    finally:
        d.stop()


def spawn_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the daemon's fork-to-ready histogram (its /metrics)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    found = [re.search(rf"^sagecell_spawn_seconds_{k}(?:{{[^}}]*}})? (\S+)$", text, re.M) for k in ("sum", "count")]
    return tuple(float(m.group(1)) if m else 0.0 for m in found)


def passagemath_jupyter_dir() -> str:
    """The share/jupyter of the prefix passagemath is installed in (its kernelspec), whatever Python runs this."""
    import sage

    site = os.path.dirname(os.path.abspath(sage.__path__[0]))  # .../lib/python3.X/site-packages
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(site))), "share", "jupyter")
    return path if os.path.isdir(os.path.join(path, "kernels", "sagemath")) else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jupyter(args) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "jupyter-server")
    if not os.path.exists(script):
        print("Jupyter Server: not installed here (pip install jupyter_server), not measured")
        return
    print("Jupyter Server with passagemath's sagemath kernelspec")
    _section[0] = "jupyter_server"
    port = free_port()
    root = tempfile.mkdtemp(prefix="sagecell-bench-jupyter-")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", ""), HOME=root)
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [passagemath_jupyter_dir(), env.get("JUPYTER_PATH", "")]))
    log = open(os.path.join(root, "server.log"), "wb")
    proc = subprocess.Popen(
        [
            script,
            f"--port={port}",
            "--ip=127.0.0.1",
            "--no-browser",
            "--ServerApp.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http(port, "GET", "/api")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("Jupyter Server did not start")
        for name, code in CELLS.items():
            times = [first_result(port, code, timeout=180) for _ in range(args.jupyter_samples)]
            print(row(f"new session to first {name}", times))
        times, kids, errors = burst(port, args.burst, timeout=600, name="sagemath", code=CELLS["factor"])
        print(row(f"burst of {args.burst}: each to its factor", times) + f"  answered {len(times)}/{args.burst}")
        for e in errors[:3]:
            print(f"    error: {e}")
        time.sleep(2)
        pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-f", "sage.repl.ipython_kernel"], capture_output=True, text=True
            ).stdout.split()
        ]
        if pids:
            pss, private = memory(pids)
            record(f"{len(pids)} idle kernels", pss_mib=statistics.median(pss), private_mib=statistics.median(private))
            print(
                f"  {len(pids)} idle Sage kernels: PSS median {statistics.median(pss):.1f} MiB, private median {statistics.median(private):.1f} MiB"
            )
        for kid in kids:
            http(port, "DELETE", f"/api/kernels/{kid}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--jupyter-samples", type=int, default=5)
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--many", type=int, default=50)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--no-jupyter", action="store_true")
    p.add_argument("--no-ours", action="store_true", help="Jupyter Server only")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args()
    if not args.no_ours:
        ours(args)
    if not args.no_jupyter:
        jupyter(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pool": args.pool, "burst": args.burst, "figures": FIGURES}, f, indent=2)


if __name__ == "__main__":
    main()
