# -*- test-case-name: tests.test_workers -*-
"""
A worker host's last word on its kernels: none outlives the spawner.

On a worker host the daemon reaches kernels only through the front's relay,
so a kernel whose front or manager is gone can never be reached again; it
must not run on, unwatched and without a time limit. The manager ends them
all itself when the front dies (``ForkConfig.keep_in_use`` is False there).
When the manager dies, or the front and the manager at once (a kill -9 of
both, the OOM killer), nothing of theirs is left to do it: this keeper is.

The front forks it (before it reads any key) right after the manager. It
holds the read ends of two pipes whose write ends only the front and the
manager hold, so it learns of either's death by EOF, whatever the death.
It then gives the manager ``ORPHAN_GRACE`` seconds for an orderly end of its
own, ends every kernel the manager's records (records.py) still list, and
exits. It runs in its own process group as the worker account, and kernels
cannot see it (their PID namespaces).
"""

from __future__ import annotations

import os
import select
import signal
import time

from ..kernel import sandbox
from . import records

#: seconds between a front's or manager's death and the end of the kernels it leaves
ORPHAN_GRACE = 3.0


def watch(base_dir: str, manager: str, alive_fds: list[int], grace: float = ORPHAN_GRACE) -> None:
    """Wait for EOF on any of ``alive_fds``; then, after ``grace``, end the kernels recorded as ``manager``'s."""
    while True:
        readable, _, _ = select.select(alive_fds, [], [])
        if any(not os.read(fd, 1) for fd in readable):
            break
    time.sleep(grace)
    for kid in records.kernel_ids(base_dir):
        record = records.read(base_dir, kid)
        if record is not None and record.owner == manager:
            records.end(base_dir, kid)


def start(base_dir: str, manager_pid: int, manager_alive: int, drop) -> int:
    """
    Fork the keeper; return the write end of the front's own alive pipe,
    which the front keeps open for as long as it lives. ``manager_alive``
    is the read end of the manager's (closed here); ``drop`` becomes the
    worker account.
    """
    manager = records.owner_tag(manager_pid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # Nothing of the front's: least of all its end of the manager's
            # socket, whose EOF tells the manager the front is gone.
            sandbox.close_fds_except((0, 1, 2, r, manager_alive))
            os.setpgid(0, 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            drop()
            watch(base_dir, manager, [r, manager_alive])
            code = 0
        finally:
            os._exit(code)
    os.close(r)
    os.close(manager_alive)
    return w
