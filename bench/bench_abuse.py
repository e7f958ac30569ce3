#!/usr/bin/env python3
"""
Benchmark of issue 13: what a hostile visitor can make the daemon hold, and how much others notice.

Starts one real daemon on a loopback port (tests/support.py's Daemon, default
limits but --max-kernels-per-client 32 so that one address can run every
attack) and runs each attack in turn, bounded in count and time, while a
bystander session runs ``1+1`` round trips on its own WebSocket. For each
attack: the daemon's RSS before, at its peak (sampled every 20 ms) and after,
and the bystander's round trip median/p99 during it. Budget: the daemon's
RSS at most 100 MB over its level before each attack.

  bodies       4 POSTs declaring 95 MB to /no/such/path, each sending its body
  ws_frames    20 WebSockets each sending most of a 10 MB frame (and 20 declaring
               20 MB), never finishing it
  service      8 concurrent /service runs printing 7.8M 'é' each
  errors       24 error messages of 1 MiB each in one execution
  restarts     POST .../restart as fast as answered for 2 s, in two sessions
  file_scan    3 kernels with 10,000 files each, running executions back to back

    .venv/bin/python bench/bench_abuse.py [--json out.json] [--only bodies,service]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import threading
import time

from benchlib import Daemon, RawWS, http, new_kernel, rss_mib, stored_bytes, summary

BUDGET_MB = 100
ATTACKS = ("bodies", "ws_frames", "service", "errors", "restarts", "file_scan")


class Watch:
    """Samples the daemon's RSS, and a bystander's round trips, while an attack runs."""

    def __init__(self, daemon: Daemon, bystander: RawWS):
        self.daemon = daemon
        self.bystander = bystander
        self.stop = threading.Event()
        self.rss: list[float] = []
        self.rtts: list[float] = []
        self.errors = 0

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.rss.append(rss_mib(self.daemon.proc.pid))
            time.sleep(0.02)

    def _bystand(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                reply, _ = self.bystander.run("1+1", timeout=30)
                if reply.get("status") != "ok":
                    self.errors += 1
            except Exception:
                self.errors += 1
                return
            self.rtts.append(time.perf_counter() - t0)
            time.sleep(0.01)

    def __enter__(self):
        self.before = rss_mib(self.daemon.proc.pid)
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._sample, self._bystand)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)  # a few more round trips once the attack is over
        self.stop.set()
        for t in self.threads:
            t.join(40)
        time.sleep(1.0)
        self.after = rss_mib(self.daemon.proc.pid)

    def figures(self) -> dict:
        peak = max(self.rss + [self.before])
        rtt = summary(self.rtts, 1000) if self.rtts else {}
        return {
            "rss_before_mib": round(self.before, 1),
            "rss_peak_mib": round(peak, 1),
            "rss_after_mib": round(self.after, 1),
            "rss_growth_mb": round((peak - self.before) * 1.048576, 1),
            "within_budget": (peak - self.before) * 1.048576 <= BUDGET_MB,
            "bystander_rtt_ms": {k: round(v, 2) if isinstance(v, float) else v for k, v in rtt.items()},
            "bystander_errors": self.errors,
        }


def _parallel(fns) -> list:
    results = [None] * len(fns)

    def run(i, f):
        try:
            results[i] = f()
        except Exception as e:  # reported, not raised: the figures say what happened
            results[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


# -- the attacks ------------------------------------------------------------------------


def attack_bodies(d: Daemon) -> dict:
    stored = [stored_bytes(d.proc.pid)]

    def post() -> str:
        with socket.create_connection(("127.0.0.1", d.port), 30) as s:
            s.sendall(b"POST /no/such/path HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (95 << 20))
            s.settimeout(2)
            try:
                early = s.recv(4096).split(b"\r\n", 1)[0].decode()
            except OSError:
                early = ""
            chunk, sent = b"x" * (1 << 20), 0
            try:
                for i in range(95):
                    s.sendall(chunk)
                    sent += 1
                    if i == 60:
                        stored.append(stored_bytes(d.proc.pid))
            except OSError:
                pass
            if early:
                return f"{early} before the body; {sent} MiB of it sent before the close"
            s.settimeout(10)
            try:
                answer = s.recv(4096).split(b"\r\n", 1)[0].decode()
            except OSError as e:
                answer = f"no answer: {e}"
            return f"{answer} only after {sent} MiB sent"

    answers = _parallel([post] * 4)
    return {"answers": answers, "daemon_spooled_mb_peak": round(max(stored) / 1e6, 1)}


def _frame_head(length: int) -> bytes:
    return struct.pack("!BBQ", 0x82, 0x80 | 127, length) + b"\0\0\0\0"


def attack_ws_frames(d: Daemon) -> dict:
    kid = new_kernel(d.port)
    socks, outcomes = [], []
    for declared in [(10 << 20) - 1024] * 20 + [20 << 20] * 20:
        try:
            ws = RawWS(d.port, kid)
        except Exception as e:
            outcomes.append(f"refused: {e}"[:80])
            continue
        socks.append(ws)
        try:
            ws.sock.sendall(_frame_head(declared))
            ws.sock.settimeout(5)
            ws.sock.sendall(b"x" * (declared - (1 << 20) if declared < (20 << 20) else 1 << 20))
            outcomes.append("sent")
        except OSError as e:
            outcomes.append(f"closed while sending: {type(e).__name__}")
    time.sleep(1.0)
    closed = 0
    for ws in socks:
        ws.sock.settimeout(0.5)
        try:
            while True:
                data = ws.sock.recv(1 << 16)
                if not data or b"\x88" in data[:1]:
                    closed += 1
                    break
        except OSError as e:
            closed += not isinstance(e, TimeoutError)
        ws.sock.close()
    return {"sockets": len(socks), "closed_by_daemon": closed, "outcomes": sorted(set(outcomes))}


def attack_service(d: Daemon) -> dict:
    def run() -> dict:
        status, body = http(d.port, "POST", "/service", {"code": "print('é' * 7_800_000)"}, timeout=120)
        body = body if isinstance(body, dict) else {}
        stdout = body.get("stdout") or ""
        return {
            "status": status,
            "stdout_chars": len(stdout),
            "reply_bytes": len(json.dumps(body, ensure_ascii=False).encode()),
            "error": (body.get("error") or "")[:60],
        }

    runs = _parallel([run] * 8)
    return {"runs": runs, "largest_reply_bytes": max(r["reply_bytes"] for r in runs if isinstance(r, dict))}


def attack_errors(d: Daemon) -> dict:
    ws = RawWS(d.port, new_kernel(d.port))
    code = "for i in range(24):\n    try:\n        raise ValueError('e' * (1 << 20))\n    except ValueError:\n        get_ipython().showtraceback()\n"
    reply, outputs = ws.run(code, timeout=120)
    ws.close()
    errors = [m for m in outputs if m["msg_type"] == "error"]
    notices = [m for m in outputs if m["header"].get("session") == "sagecell-daemon"]
    return {"reply": reply.get("status"), "errors_shown": len(errors), "notices": len(notices)}


def attack_restarts(d: Daemon) -> dict:
    kids = [new_kernel(d.port) for _ in range(2)]
    codes: dict[int, int] = {}
    deadline = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < deadline and n < 200:
        status, _ = http(d.port, "POST", f"/api/kernels/{kids[n % 2]}/restart", {})
        codes[status] = codes.get(status, 0) + 1
        n += 1
    return {"requests": n, "statuses": codes}


def attack_file_scan(d: Daemon) -> dict:
    kids = [new_kernel(d.port) for _ in range(3)]
    make = "import os\nfor i in range(10000):\n    open(f'f{i:05d}', 'w').close()\n"
    touch = "import os\nfor i in range(0, 10000, 7):\n    os.utime(f'f{i:05d}')\n"
    clients = [RawWS(d.port, k) for k in kids]
    for ws in clients:
        ws.run(make, timeout=120)
    counts = _parallel(
        [lambda ws=ws: sum(1 for _ in range(15) if ws.run(touch, timeout=60)[0]["status"] == "ok") for ws in clients]
    )
    for ws in clients:
        ws.close()
    return {"executions_ok": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=",".join(ATTACKS))
    args = ap.parse_args()
    d = Daemon(pool_size=4, max_kernels_per_client=32).start()
    results: dict = {"budget_mb": BUDGET_MB}
    try:
        bystander = RawWS(d.port, new_kernel(d.port))
        quiet = []
        for _ in range(50):
            t0 = time.perf_counter()
            bystander.run("1+1")
            quiet.append(time.perf_counter() - t0)
        results["quiet_rtt_ms"] = {
            k: round(v, 2) if isinstance(v, float) else v for k, v in summary(quiet, 1000).items()
        }
        print(f"quiet: bystander 1+1 median {statistics.median(quiet) * 1000:.2f} ms", flush=True)
        for name in args.only.split(","):
            attack = globals()[f"attack_{name}"]
            with Watch(d, bystander) as watch:
                outcome = attack(d)
            figures = {**watch.figures(), "outcome": outcome}
            results[name] = figures
            rtt = figures["bystander_rtt_ms"]
            print(
                f"{name:10s} rss {figures['rss_before_mib']:.0f} -> peak {figures['rss_peak_mib']:.0f} -> "
                f"{figures['rss_after_mib']:.0f} MiB (+{figures['rss_growth_mb']:.0f} MB, budget {BUDGET_MB}); "
                f"bystander median {rtt.get('median', float('nan')):.2f} ms p99 {rtt.get('p99', float('nan')):.2f} ms "
                f"n={rtt.get('n', 0)} errors={figures['bystander_errors']}\n           {json.dumps(outcome)[:300]}",
                flush=True,
            )
        bystander.close()
    finally:
        d.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
