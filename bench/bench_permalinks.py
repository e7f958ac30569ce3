#!/usr/bin/env python3
"""
Benchmark of the permalink store's two back ends, through a real daemon.

Starts a throwaway PostgreSQL server (tests/pgserver.py: Debian's binaries,
a unix socket, fsync off), then one daemon on a SQLite file and one on a
PostgreSQL database, and times, sample by sample, from a raw-socket client on
a fresh loopback connection each:
  - ``post``: ``POST /permalink`` of new code (JSON body), to the whole answer;
  - ``get``: ``GET /permalink?q=ID`` of a stored one.

    .venv/bin/python bench/bench_permalinks.py [--samples 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from benchlib import Daemon, http, summary
from pgserver import PostgresServer


def measure(daemon: Daemon, samples: int) -> dict:
    post, get, ids = [], [], []
    for i in range(samples):
        code = f"print({i})\n" + "x = 1\n" * 20
        t = time.perf_counter()
        status, body = http(daemon.port, "POST", "/permalink", {"code": code, "language": "python"})
        post.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"POST /permalink: {status} {body}")
        ids.append(body["query"])
    for ident in ids:
        t = time.perf_counter()
        status, body = http(daemon.port, "GET", f"/permalink?q={ident}")
        get.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"GET /permalink: {status} {body}")
    return {"post": summary(post, 1000), "get": summary(get, 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    results = {}
    server = PostgresServer().start()
    try:
        for name, extra in (("sqlite", ()), ("postgresql", ("--permalink-db", server.new_database()))):
            daemon = Daemon(*extra, pool_size=1, permalinks_per_minute=1_000_000).start()
            try:
                results[name] = measure(daemon, args.samples)
            finally:
                daemon.stop()
    finally:
        server.remove()
    for name, figures in results.items():
        for what, s in figures.items():
            print(f"{name:<10} {what:<4} median {s['median']:6.2f} ms  p99 {s['p99']:6.2f} ms  (n={s['n']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
