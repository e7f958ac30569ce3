# -*- test-case-name: tests.test_forkserver -*-
"""
The warm master every kernel is forked from: ``python -m sagecell_tw.worker.zygote FD TEMPLATE``.

A forked kernel starts with a copy of all its master's memory, freed heap
included. So this process is started clean (``posix_spawn`` of a fresh
interpreter, by the fork server's manager) and holds code, nothing else:
no kernel's id, key, pid or dir, no CurveZMQ secret. It preloads (forkserver.
preload), then answers each b"F" from the manager on the SOCK_SEQPACKET
socket FD: it forks a kernel child, which picks its own id, makes its own
dirs and key (kernel.child.run with TEMPLATE, the JSON of what all kernels
share), and hands the manager the read end of that child's ready pipe
(SCM_RIGHTS), keeping nothing about it.

The child it forks exits as soon as it has forked the kernel proper, which
then becomes the manager's (a child subreaper); SIGCHLD is ignored here so
those exits are reaped by the system. The manager gone (EOF), this exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback

#: the manager's one command: fork a kernel
FORK = b"F"


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
    from . import forkserver

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernel_name = template.get("kernel_name", "python3")
    failed = forkserver.preload(tuple(template.pop("preload", ())), kernel_name)
    if kernel_name == sage_kernel.KERNEL_NAME:
        limits = sage_kernel.kernel_limits(sandbox.Limits(**template["limits"]))
        template["limits"] = limits.as_json()
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
