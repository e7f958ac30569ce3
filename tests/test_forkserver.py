"""
The fork server's manager's side of a kernel's ready pipe, with real pipes and no fork.

The zygote forks a kernel child and hands the manager its ready pipe; the
child says its own id and key ("I<id> <key>"), then the process that forks
the kernel into its PID namespace says its host pid ("P<pid>") and exits;
the kernel says "R<json>" once its sockets are bound (kernel.child). The
manager must follow the kernel, whatever order the pipe, the exits and its
own reaping come in, and record its pid only where no kernel writes.

And what the master is left with after preloading (in a fresh interpreter):
the IPython shell it made, and nothing a fork must not copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial import unittest

from sagecell_tw.kernel import sandbox
from sagecell_tw.worker import forkserver, records

KERNEL = 990002
KID = "0123456789abcdef0123456789abcdef"
KEY = "ab" * 32


class ReadyPipeTests(unittest.TestCase):
    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="sagecell-fs-test-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.fs = forkserver.ForkServer(None, forkserver.ForkConfig(base_dir=self.base))
        records.prepare(self.base)
        self.fs.owner = "1:1"
        self.sent: list[dict] = []
        self.fs._send = self.sent.append
        self.killed: list[int] = []
        self.patch(forkserver, "_killpg", self.killed.append)
        self.kdir = os.path.join(self.base, KID)
        os.mkdir(self.kdir)
        r, self.w = os.pipe()
        os.set_blocking(r, False)
        self.addCleanup(self._close_w)
        self.child = forkserver.Child("~1", None, "", "", r, 0.0)
        self.fs.children["~1"] = self.child

    def _close_w(self):
        if self.w is not None:
            os.close(self.w)
            self.w = None

    def say(self, data: bytes) -> None:
        os.write(self.w, data)

    def events(self, name: str) -> list[dict]:
        return [m for m in self.sent if m.get("event") == name]

    def test_the_kernel_names_itself_and_is_followed_once_its_pid_is_said(self):
        self.say(b"I%s %s\n" % (KID.encode(), KEY.encode()))
        self.fs._hear(self.child)
        self.assertEqual((self.child.id, self.child.key, self.child.dir), (KID, KEY, self.kdir))
        self.assertIs(self.fs.children[KID], self.child)
        self.assertNotIn("~1", self.fs.children)
        self.say(b"P%d\n" % KERNEL)
        self.fs._hear(self.child)
        self.assertEqual(self.child.pid, KERNEL)
        self.assertIs(self.fs.by_pid[KERNEL], self.child)
        self.assertEqual(self.child.state, "starting")
        # Recorded where kernels cannot write, never in the kernel's dir.
        self.assertEqual(records.read(self.base, KID).pid, KERNEL)
        self.assertEqual(os.listdir(self.kdir), [])
        self.say(b'R["no disk quota"]')
        self.fs._hear(self.child)
        self.assertEqual(self.child.state, "ready")
        self.assertIsNone(self.child.ready_fd)
        [ready] = self.events("ready")
        self.assertEqual((ready["kernel"]["id"], ready["kernel"]["pid"]), (KID, KERNEL))
        self.assertEqual(ready["kernel"]["connection"]["key"], KEY)
        self.assertEqual(ready["kernel"]["missing_protections"], ["no disk quota"])

    def test_everything_in_one_read(self):
        self.say(b"I%s %s\nP%d\nR[]" % (KID.encode(), KEY.encode(), KERNEL))
        self.fs._hear(self.child)
        self.assertEqual(self.child.state, "ready")
        self.assertEqual(self.events("ready")[0]["kernel"]["pid"], KERNEL)

    def test_a_half_written_line_waits_for_the_rest(self):
        self.say(b"I%s %s\nP%d" % (KID.encode(), KEY.encode(), KERNEL))
        self.fs._hear(self.child)
        self.assertIsNone(self.child.pid)
        self.say(b"\n")
        self.fs._hear(self.child)
        self.assertEqual(self.child.pid, KERNEL)

    def test_a_kernel_reaped_before_it_was_named_is_buried_when_named(self):
        self.say(b"I%s %s\n" % (KID.encode(), KEY.encode()))
        self.fs._hear(self.child)
        # Killed the moment it was forked: we reap a pid we do not know yet...
        statuses = [(KERNEL, signal.SIGKILL), (0, 0)]
        self.patch(forkserver.os, "waitpid", lambda pid, flags: statuses.pop(0))
        self.fs._reap()
        self.assertIn(KID, self.fs.children)
        # ... and its pid comes after: it is dead, and said so.
        self.say(b"P%d\n" % KERNEL)
        self.fs._hear(self.child)
        [dead] = self.events("dead")
        self.assertEqual(dead["id"], KID)
        self.assertIn("SIGKILL", dead["reason"])
        self.assertNotIn(KID, self.fs.children)
        self.assertNotIn(KERNEL, self.fs.by_pid)
        self.assertFalse(os.path.exists(self.kdir))
        self.assertIsNone(records.read(self.base, KID))

    def test_a_kernel_dying_before_it_is_ready_is_reported(self):
        self.say(b"I%s %s\nP%d\n" % (KID.encode(), KEY.encode(), KERNEL))
        self._close_w()
        statuses = [(KERNEL, 1 << 8), (0, 0)]
        self.patch(forkserver.os, "waitpid", lambda pid, flags: statuses.pop(0))
        self.fs._reap()
        [dead] = self.events("dead")
        self.assertIn("exited with status 1", dead["reason"])
        self.assertEqual(self.fs.pool.failures, 1)
        self.assertFalse(os.path.exists(self.kdir))

    def test_a_child_dying_before_its_pid_is_said_is_buried_at_eof(self):
        self.say(b"I%s %s\n" % (KID.encode(), KEY.encode()))
        self._close_w()
        self.fs._hear(self.child)
        [dead] = self.events("dead")
        self.assertEqual(dead["id"], KID)
        self.assertEqual(self.fs.children, {})
        self.assertFalse(os.path.exists(self.kdir))

    def test_a_child_that_never_named_itself_is_forgotten_without_a_word(self):
        self._close_w()
        self.fs._hear(self.child)
        self.assertEqual(self.fs.children, {})
        self.assertEqual(self.events("dead"), [])
        self.assertEqual(self.fs.pool.failures, 1)

    def test_names_that_are_not_ids_or_pids_change_nothing(self):
        for bad in (b"Ixyz k\n", b"I../../etc k\n", b"I%s\n" % KID.encode(), b"P1\n", b"P0\n", b"Pxyz\n"):
            self.say(bad)
            self.fs._hear(self.child)
        self.assertEqual(self.child.id, "~1")
        self.assertIsNone(self.child.pid)
        self.assertEqual(self.fs.by_pid, {})

    def test_a_kernel_ready_without_saying_who_it_is_is_killed(self):
        self.say(b"P%d\nR[]" % KERNEL)
        self.fs._hear(self.child)
        self.assertEqual(self.events("ready"), [])
        self.assertEqual(self.child.state, "dying")
        self.assertIn(KERNEL, self.killed)


class RecordTests(unittest.TestCase):
    """Adoption trusts a record only for the very process it names."""

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="sagecell-rec-test-")
        self.addCleanup(shutil.rmtree, self.base, True)
        records.prepare(self.base)
        self.proc = subprocess.Popen(["sleep", "60"])
        self.addCleanup(self._end)

    def _end(self):
        self.proc.kill()
        self.proc.wait()

    def test_a_live_process_of_ours_with_its_start_time_is_the_kernel(self):
        records.write(self.base, KID, self.proc.pid, "me")
        record = records.read(self.base, KID)
        self.assertEqual((record.pid, record.owner), (self.proc.pid, "me"))
        self.assertTrue(records.is_kernel(record))
        self.assertEqual(oct(os.stat(records.path(self.base)).st_mode & 0o777), "0o700")

    def test_a_reused_pid_a_zombie_or_pid_1_is_not(self):
        records.write(self.base, KID, self.proc.pid, "me")
        record = records.read(self.base, KID)
        self.assertFalse(records.is_kernel(records.Record(record.pid, str(int(record.start) - 1), "me")))
        self.assertFalse(records.is_kernel(records.Record(1, records.start_time(1) or "", "me")))
        self.proc.kill()
        os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped yet
        self.assertFalse(records.is_kernel(record))

    def test_end_kills_the_recorded_kernel_and_removes_dir_and_record(self):
        os.mkdir(os.path.join(self.base, KID))
        records.write(self.base, KID, self.proc.pid, "me")
        records.end(self.base, KID)
        self.assertEqual(self.proc.wait(5), -signal.SIGKILL)
        self.assertFalse(os.path.exists(os.path.join(self.base, KID)))
        self.assertEqual(records.kernel_ids(self.base), [])

    def test_only_kernel_ids_are_records(self):
        with self.assertRaises(ValueError):
            records.write(self.base, "../x", self.proc.pid, "me")
        self.assertIsNone(records.read(self.base, "../x"))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class ManagerTests(unittest.TestCase):
    """A real manager, zygote and kernels, no daemon: who forks whom, whose child each kernel is, what is where."""

    def start(self, userns: bool, keep_in_use: bool = True) -> None:
        self.base = tempfile.mkdtemp(prefix="sagecell-manager-test-")
        os.chmod(self.base, 0o711)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = forkserver.ForkConfig(
            base_dir=self.base, pool_size=1, userns=userns, preload=(), keep_in_use=keep_in_use
        )
        pid = os.fork()
        if pid == 0:
            ours.close()
            forkserver.serve(theirs, config)
        theirs.close()
        self.sock, self.manager = ours, pid
        self.addCleanup(self.stop)

    def stop(self) -> None:
        try:
            self.send({"cmd": "shutdown"})
        except OSError:
            pass
        deadline = time.monotonic() + 20
        try:
            while os.waitpid(self.manager, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(self.manager, signal.SIGKILL)
                    os.waitpid(self.manager, 0)
                    break
                time.sleep(0.05)
        except ChildProcessError:
            pass  # the test reaped it
        self.sock.close()
        shutil.rmtree(self.base, True)

    def send(self, msg: dict) -> None:
        self.sock.send(json.dumps(msg).encode())

    def event(self, name: str, timeout: float = 60.0, **fields) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.sock.recv(1 << 16))
            if msg.get("event") == name and all(msg.get(k) == v for k, v in fields.items()):
                return msg
        raise AssertionError(f"no {name} event in time")

    def check_a_kernels_life(self) -> None:
        kernel = self.event("ready")["kernel"]
        kid, pid = kernel["id"], kernel["pid"]
        self.assertTrue(records.valid_id(kid), kid)
        self.assertRegex(kernel["connection"]["key"], "^[0-9a-f]{64}$")
        self.assertEqual(kernel["dir"], os.path.join(self.base, kid))
        # No pid file in reach of its code (its state dir is there only without a private /tmp).
        self.assertIn(sorted(os.listdir(kernel["dir"])), (["ipc", "work"], ["ipc", "state", "work"]))
        # The kernel is the manager's child (a subreaper), never the zygote's,
        # and the zygote is a fresh interpreter, not a fork of the manager.
        self.assertEqual(parent_of(pid), self.manager)
        with open(f"/proc/{self.manager}/task/{self.manager}/children") as f:
            others = [int(c) for c in f.read().split() if int(c) != pid]
        self.assertEqual(len([c for c in others if self.is_zygote(c)]), 1, others)
        record = records.read(self.base, kid)
        self.assertEqual(record.pid, pid)
        self.assertTrue(records.is_kernel(record))
        self.send({"cmd": "take", "id": kid})
        self.send({"cmd": "kill", "id": kid, "reason": "test"})
        dead = self.event("dead")
        self.assertEqual((dead["id"], dead["reason"]), (kid, "test"))
        self.assertFalse(os.path.exists(kernel["dir"]))
        self.assertIsNone(records.read(self.base, kid))

    def is_zygote(self, pid: int) -> bool:
        """The zygote, not one of the kernels forked from it (each in a session of its own)."""
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")[1:4]
        return cmdline == [b"-P", b"-m", b"sagecell_tw.worker.zygote"] and os.getsid(pid) == os.getsid(self.manager)

    def test_a_dead_zygote_stops_the_manager_and_leaves_kernels_in_use_to_adopt(self):
        self.start(userns=sandbox.user_namespaces_available())
        kernel = self.event("ready")["kernel"]
        self.send({"cmd": "take", "id": kernel["id"]})
        self.event("pool", taken=1)
        with open(f"/proc/{self.manager}/task/{self.manager}/children") as f:
            [zygote] = [int(c) for c in f.read().split() if self.is_zygote(int(c))]
        os.kill(zygote, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while os.waitpid(self.manager, os.WNOHANG)[0] == 0:
            self.assertLess(time.monotonic(), deadline, "the manager did not stop")
            time.sleep(0.05)
        self.addCleanup(records.end, self.base, kernel["id"])
        record = records.read(self.base, kernel["id"])
        self.assertTrue(
            record is not None and records.is_kernel(record), "the kernel in use should be left for the next spawner"
        )

    def test_with_user_namespaces(self):
        if not sandbox.user_namespaces_available():
            raise unittest.SkipTest("no user namespaces here")
        self.start(userns=True)
        self.check_a_kernels_life()

    def test_without_user_namespaces(self):
        self.start(userns=False)
        self.check_a_kernels_life()


#: run in a fresh interpreter: what the master is left with after preloading
MASTER_CHECK = r"""
import asyncio, json, os, sys
main, hook = sys.modules["__main__"], sys.excepthook
from sagecell_tw.kernel import ipython as ipython_kernel
from sagecell_tw.worker import zygote
failed = zygote.preload(())
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
