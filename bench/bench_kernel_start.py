#!/usr/bin/env python3
"""
Where a kernel's start goes, without the daemon or the sandbox.

Preloads as the zygote does (``zygote.preload``: the default
modules, the master-made shell), then forks kernels one at a time, each
running ``kernel.ipython.kernel_app`` in a temporary dir as a real kernel does
after its sandbox is set up, and prints medians of:
  - the fork itself (parent's fork() to the child's first line);
  - ``kernel_app`` (ipykernel's initialize, sockets bound), with the time in
    each of the app's ``init_*`` steps;
  - the kernel's private memory once it is up, and after one cell.

The kernels bind ipc sockets in their temporary dirs and exit; no network.

    .venv/bin/python bench/bench_kernel_start.py [--samples 15] [--preload numpy,sympy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sagecell_tw.kernel import ipython as ipython_kernel  # noqa: E402
from sagecell_tw.worker import spawner, zygote  # noqa: E402

#: IPKernelApp.initialize's steps, in order
STEPS = (
    "init_crash_handler",
    "init_profile_dir",
    "init_config_files",
    "load_config_file",
    "init_pdb",
    "init_blackhole",
    "init_connection_file",
    "init_poller",
    "init_sockets",
    "write_connection_file",
    "log_connection_info",
    "init_io",
    "init_signal",
    "init_kernel",
    "init_path",
    "init_shell",
    "init_gui_pylab",
    "init_extensions",
    "init_code",
)


def private_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private")) / 1024


def time_steps(timings: list[tuple[str, float]]) -> None:
    """Wrap the app class's steps (in the master, before any fork) to record their wall time."""
    app_class = ipython_kernel._app_class()
    for name in STEPS:
        step = getattr(app_class, name, None)
        if step is None:
            continue

        def timed(self, *args, _step=step, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _step(self, *args, **kwargs)
            finally:
                timings.append((_name, (time.perf_counter() - t0) * 1e3))

        setattr(app_class, name, timed)


def one_kernel(timings: list[tuple[str, float]]) -> dict:
    """Fork one kernel, let it start and run a cell, and return what it measured."""
    tmp = tempfile.mkdtemp(prefix="sagecell-bench-start-")
    work = os.path.join(tmp, "work")
    os.mkdir(work)

    def start() -> bytes:
        t_child = time.perf_counter()
        os.environ.update(HOME=work, IPYTHONDIR=os.path.join(tmp, "ipython"), MPLCONFIGDIR=os.path.join(tmp, "mpl"))
        os.chdir(work)
        timings.clear()
        t1 = time.perf_counter()
        app = ipython_kernel.kernel_app(tmp, os.path.join(tmp, "k"), "bench")
        t2 = time.perf_counter()
        up = private_mib()
        app.shell.run_cell("1+1", store_history=False)
        out = {
            "fork_ms": (t_child - t0) * 1e3,
            "kernel_app_ms": (t2 - t1) * 1e3,
            "private_mib_up": up,
            "private_mib_after_cell": private_mib(),
            "steps": dict(timings),
        }
        return json.dumps(out).encode()

    t0 = time.perf_counter()
    out = zygote.output_of_child(start, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    if not out:
        raise SystemExit("a kernel did not start (or took over 60 s)")
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--preload", default=None, help="comma-separated modules (default: the daemon's default)")
    args = p.parse_args()
    modules = spawner.default_preload() if args.preload is None else tuple(m for m in args.preload.split(",") if m)
    home = tempfile.mkdtemp(prefix="sagecell-bench-master-")
    os.environ["HOME"] = home  # the master's profile dir goes here, as under base_dir in the service
    os.environ.pop("IPYTHONDIR", None)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # as kernels have it: no warning from debugpy
    try:
        timings: list[tuple[str, float]] = []
        time_steps(timings)
        failed = zygote.preload(modules)
        runs = [one_kernel(timings) for _ in range(max(1, args.samples))]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"preload: {', '.join(modules) or '(none)'}{'; failed: ' + ', '.join(failed) if failed else ''}")
    print(f"master shell: {'yes' if ipython_kernel.MASTER_SHELL is not None else 'no'}; {len(runs)} kernels")
    for key in ("fork_ms", "kernel_app_ms", "private_mib_up", "private_mib_after_cell"):
        values = [r[key] for r in runs]
        print(f"{key:28s} {statistics.median(values):8.2f}  (min {min(values):.2f}, max {max(values):.2f})")
    print("kernel_app's steps, median ms:")
    for name in STEPS:
        values = [r["steps"][name] for r in runs if name in r["steps"]]
        if values:
            print(f"  {name:26s} {statistics.median(values):8.2f}")


if __name__ == "__main__":
    main()
