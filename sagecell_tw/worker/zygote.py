# -*- test-case-name: tests.test_forkserver,tests.test_comms -*-
"""
The warm master every kernel is forked from: ``python -m sagecell_tw.worker.zygote FD TEMPLATE``.

A forked kernel starts with a copy of all its master's memory, freed heap
included. So this process is started clean (``posix_spawn`` of a fresh
interpreter, by the fork server's manager) and holds code, nothing else:
no kernel's id, key, pid or dir, no CurveZMQ secret. It preloads
(``preload``: ipykernel, the configured modules and what a kernel's start
imports, learnt from a trial child), then answers each b"F" from the manager on the SOCK_SEQPACKET
socket FD: it forks a kernel child, which picks its own id, makes its own
dirs and key (kernel.child.run with TEMPLATE, the JSON of what all kernels
share), and hands the manager the read end of that child's ready pipe
(SCM_RIGHTS), keeping nothing about it.

The child it forks exits as soon as it has forked the kernel proper, which
then becomes the manager's (a child subreaper); SIGCHLD is ignored here so
those exits are reaped by the system. The manager gone (EOF), this exits.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

#: the manager's one command: fork a kernel
FORK = b"F"
#: imported in every master, where installed: a kernel's first interact then
#: takes ~10 ms, not ~100 (its import); each kernel registers its comm
#: targets (``kernel.ipython._widget_targets``)
WIDGETS = ("ipywidgets",)


def preload(modules: tuple[str, ...], kernel_name: str = "python3", base_dir: str = "") -> list[str]:
    """
    Import ``modules`` and whatever kernel start-up will import; return failures.
    For Sage kernels (``kernel_name`` "sagemath"), Sage first, then a warm-up
    once the shell is made, and GAP's saved workspaces (kept in ``base_dir``;
    ``kernel.sage``).

    Memory: every page a kernel writes to after the fork becomes its own, so
    the master imports with the cyclic GC off (no freed holes for the
    children's allocations to land in) and then freezes everything it holds
    (``gc.freeze``: no collection in a child walks, and so writes to, the
    master's objects). See bench/bench_output.py for the PSS this buys.
    """
    from ..kernel import ipython as ipython_kernel
    from ..kernel import sage as sage_kernel

    sage = kernel_name == sage_kernel.KERNEL_NAME
    gc.disable()
    if sage:
        sage_kernel.prepare()
    import ipykernel.kernelapp  # noqa: F401

    failed = []
    for name in (*WIDGETS, *modules):
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
    # Some of these only import once a sibling has put its vendored folder on
    # sys.path (debugpy's pydevd): two passes settle that. What still fails
    # was optional to kernel start-up, so it is only slower, not broken.
    pending = _initialize_imports()
    for _ in range(2):
        retry = []
        for name in pending:
            try:
                importlib.import_module(name)
            except Exception:
                retry.append(name)
        pending = retry
    ipython_kernel.prepare_master()
    if sage:
        if ipython_kernel.MASTER_SHELL is None:
            failed.append("the Sage shell (each kernel makes its own, slower)")
        else:
            failed += sage_kernel.warm(ipython_kernel.MASTER_SHELL)
        failed += sage_kernel.prepare_gap()
        if base_dir and output_of_child(lambda: sage_kernel.save_gap_workspaces(base_dir), timeout=180) != b"ok":
            failed.append("GAP's saved workspaces (libgap and gap(...) start slower, or not at all)")
    gc.freeze()
    gc.enable()
    return failed


def output_of_child(work: Callable[[], bytes], timeout: float) -> bytes:
    """
    What ``work()`` returns, run in a forked child with stdin, stdout and
    stderr on /dev/null; b"" if it fails or takes over ``timeout`` seconds.
    The child is killed (by its pid) and reaped either way.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.write(w, work())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 1.0)
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    return b"".join(chunks)


def _initialize_imports() -> list[str]:
    """
    The modules a kernel imports from start-up to its first execution, learnt from a trial child.

    Importing them here, once, is what makes fork-to-ready fast and keeps
    their pages shared. The trial starts a kernel the way ``kernel.child``
    does (same app, same plots and random-seed set-up) and runs one cell.
    """
    import tempfile

    from ..kernel import child as kernel_child
    from ..kernel import ipython as ipython_kernel

    before = set(sys.modules)
    tmp = tempfile.mkdtemp(prefix="sagecell-trial-")

    def trial() -> bytes:
        os.setsid()
        os.chdir(tmp)
        os.environ["IPYTHONDIR"] = os.path.join(tmp, "ipython")
        os.environ["MPLCONFIGDIR"] = os.path.join(tmp, "mpl")
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        kernel_child._reseed()
        app = ipython_kernel.kernel_app(tmp, os.path.join(tmp, "k"), "trial")
        app.shell.run_cell("1+1", store_history=False)
        return json.dumps(sorted(set(sys.modules) - before)).encode()

    out = output_of_child(trial, timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        names = json.loads(out or b"[]")
    except ValueError:
        return []
    # Leave out private test helpers and main-module oddities.
    return [n for n in names if not n.startswith("__main__")]


def fork_kernel(sock: socket.socket, template: dict) -> None:
    """Fork one kernel child; give the manager its ready pipe, keep nothing."""
    from ..kernel import child as kernel_child

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        kernel_child.run(template, w)
    os.close(w)
    try:
        socket.send_fds(sock, [FORK], [r])
    finally:
        os.close(r)


def serve(sock: socket.socket, template: dict) -> None:
    from ..kernel import sage as sage_kernel
    from ..kernel import sandbox

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernel_name = template.get("kernel_name", "python3")
    failed = preload(tuple(template.pop("preload", ())), kernel_name, template.get("base_dir", ""))
    if kernel_name == sage_kernel.KERNEL_NAME:
        template["binds"] = sage_kernel.gap_binds(template["base_dir"])
        limits = sage_kernel.kernel_limits(sandbox.Limits(**template["limits"]))
        template["limits"] = limits.as_json()
        memory = template.get("memory") or {}
        if memory.get("cgroup"):
            # Once its memory cgroup holds a kernel (kernel.child), the address-space limit is a loose one.
            memory["address_space"] = sage_kernel.cgroup_address_space(memory["limit"])
        else:
            template.setdefault("notes", []).append(sage_kernel.MEMORY_NOTE)
    # After preloading, whose trial child is waited for.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sock.send(json.dumps({"event": "up", "failed": failed}).encode())
    while True:
        data = sock.recv(16)
        if not data:
            return
        if data == FORK:
            fork_kernel(sock, template)


def main(argv: list[str]) -> int:
    code = 1
    try:
        sock = socket.socket(fileno=int(argv[0]))
        sock.set_inheritable(False)
        serve(sock, json.loads(argv[1]))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
    return code  # pragma: no cover


if __name__ == "__main__":
    main(sys.argv[1:])
