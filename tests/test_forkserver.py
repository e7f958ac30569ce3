"""
The fork server's side of a kernel's ready pipe, with real pipes and no fork.

A kernel is forked by a process that puts it in its own PID namespace, says
"P<pid>" on the pipe and exits; the kernel says "R<json>" once its sockets
are bound (kernel_child). The fork server must follow the kernel, not the
process that forked it, whatever order the pipe, the exits and its own
reaping come in.

And what the master is left with after preloading (in a fresh interpreter):
the IPython shell it made, and nothing a fork must not copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

from twisted.trial import unittest

from sagecell_tw import forkserver

OUTER = 990001
KERNEL = 990002


class ReadyPipeTests(unittest.TestCase):
    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="sagecell-fs-test-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.fs = forkserver.ForkServer(None, forkserver.ForkConfig(base_dir=self.base))
        self.sent: list[dict] = []
        self.fs._send = self.sent.append
        self.killed: list[int] = []
        self.patch(forkserver, "_killpg", self.killed.append)
        kdir = os.path.join(self.base, "k1")
        os.mkdir(kdir)
        r, self.w = os.pipe()
        os.set_blocking(r, False)
        self.addCleanup(self._close_w)
        self.child = forkserver.Child("k1", OUTER, kdir, "key", r, 0.0)
        self.fs.children["k1"] = self.child
        self.fs.by_pid[OUTER] = self.child

    def _close_w(self):
        if self.w is not None:
            os.close(self.w)

    def say(self, data: bytes) -> None:
        os.write(self.w, data)

    def events(self, name: str) -> list[dict]:
        return [m for m in self.sent if m.get("event") == name]

    def test_the_kernel_is_followed_once_it_is_named(self):
        self.say(b"P%d\n" % KERNEL)
        self.fs._hear(self.child)
        self.assertEqual(self.child.pid, KERNEL)
        self.assertIs(self.fs.by_pid[KERNEL], self.child)
        self.assertEqual(self.child.state, "starting")
        self.assertIsNotNone(self.child.ready_fd)
        with open(os.path.join(self.child.dir, "pid")) as f:
            self.assertEqual(f.read().split()[0], str(KERNEL))
        self.say(b'R["no disk quota"]')
        self.fs._hear(self.child)
        self.assertEqual(self.child.state, "ready")
        self.assertIsNone(self.child.ready_fd)
        [ready] = self.events("ready")
        self.assertEqual(ready["kernel"]["pid"], KERNEL)
        self.assertEqual(ready["kernel"]["missing_protections"], ["no disk quota"])

    def test_name_and_ready_in_one_read(self):
        self.say(b"P%d\nR[]" % KERNEL)
        self.fs._hear(self.child)
        self.assertEqual(self.child.state, "ready")
        self.assertEqual(self.events("ready")[0]["kernel"]["pid"], KERNEL)

    def test_a_half_written_name_waits_for_the_rest(self):
        self.say(b"P%d" % KERNEL)
        self.fs._hear(self.child)
        self.assertEqual(self.child.pid, OUTER)
        self.say(b"\n")
        self.fs._hear(self.child)
        self.assertEqual(self.child.pid, KERNEL)

    def test_the_outer_process_exiting_after_the_name_is_no_death(self):
        self.say(b"P%d\n" % KERNEL)
        self.fs._hear(self.child)
        statuses = [(OUTER, 0), (0, 0)]
        self.patch(forkserver.os, "waitpid", lambda pid, flags: statuses.pop(0))
        self.fs._reap()
        self.assertEqual(self.events("dead"), [])
        self.assertEqual(self.fs.reaped_unclaimed, {})
        self.assertNotIn(OUTER, self.fs.by_pid)
        self.assertIs(self.fs.by_pid[KERNEL], self.child)

    def test_the_outer_process_exiting_is_no_death(self):
        self.say(b"P%d\n" % KERNEL)  # written before it exits; not read yet
        statuses = [(OUTER, 0), (0, 0)]
        self.patch(forkserver.os, "waitpid", lambda pid, flags: statuses.pop(0))
        self.fs._reap()
        self.assertEqual(self.events("dead"), [])
        self.assertIn("k1", self.fs.children)
        self.assertIs(self.fs.by_pid[KERNEL], self.child)

    def test_a_kernel_reaped_before_it_was_named_is_buried_when_named(self):
        # Killed the moment it was forked: we reap a pid we do not know yet...
        statuses = [(KERNEL, signal.SIGKILL), (0, 0)]
        self.patch(forkserver.os, "waitpid", lambda pid, flags: statuses.pop(0))
        self.fs._reap()
        self.assertIn("k1", self.fs.children)
        # ... and its name comes after: it is dead, and said so.
        self.say(b"P%d\n" % KERNEL)
        self.fs._hear(self.child)
        [dead] = self.events("dead")
        self.assertEqual(dead["id"], "k1")
        self.assertIn("SIGKILL", dead["reason"])
        self.assertNotIn("k1", self.fs.children)
        self.assertNotIn(KERNEL, self.fs.by_pid)
        self.assertFalse(os.path.exists(self.child.dir))

    def test_a_kernel_dying_before_it_is_ready_is_reported(self):
        self.say(b"P%d\n" % KERNEL)
        os.close(self.w)
        self.w = None
        statuses = [(OUTER, 0), (KERNEL, 1 << 8), (0, 0)]
        self.patch(forkserver.os, "waitpid", lambda pid, flags: statuses.pop(0))
        self.fs._reap()
        [dead] = self.events("dead")
        self.assertIn("exited with status 1", dead["reason"])
        self.assertEqual(self.fs.failures, 1)

    def test_a_name_that_is_not_a_pid_changes_nothing(self):
        for bad in (b"Pxyz\n", b"P1\n", b"P0\n"):
            self.say(bad)
            self.fs._hear(self.child)
            self.assertEqual(self.child.pid, OUTER)
        self.assertIs(self.fs.by_pid[OUTER], self.child)


#: run in a fresh interpreter: what the master is left with after preloading
MASTER_CHECK = r"""
import asyncio, json, os, sys
main, hook = sys.modules["__main__"], sys.excepthook
from sagecell_tw import forkserver, ipython_kernel
failed = forkserver.preload(())
import zmq
shell = ipython_kernel.MASTER_SHELL
print(json.dumps({
    "failed": failed,
    "shell": type(shell).__name__ if shell is not None else None,
    "threads": len(os.listdir("/proc/self/task")),
    "zmq_context": zmq.Context._instance is not None,
    "event_loop": asyncio.get_event_loop_policy()._local._loop is not None,
    "main_kept": sys.modules["__main__"] is main,
    "excepthook_kept": sys.excepthook is hook,
}))
"""


class MasterTests(unittest.TestCase):
    def test_the_master_makes_the_shell_and_nothing_a_fork_must_not_inherit(self):
        """
        The shell every kernel adopts is made before any fork: the master
        must still have one thread, no zmq context and no event loop, and
        its own ``__main__`` and excepthook.
        """
        import json
        import subprocess
        import sys

        home = tempfile.mkdtemp(prefix="sagecell-master-test-")
        self.addCleanup(shutil.rmtree, home, True)
        env = dict(os.environ, HOME=home, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env.pop("IPYTHONDIR", None)
        out = subprocess.run(
            [sys.executable, "-c", MASTER_CHECK], env=env, cwd=home, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertEqual(
            seen,
            {
                "failed": [],
                "shell": "Shell",
                "threads": 1,
                "zmq_context": False,
                "event_loop": False,
                "main_kept": True,
                "excepthook_kept": True,
            },
        )
