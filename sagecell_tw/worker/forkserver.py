# -*- test-case-name: tests.test_forkserver -*-
"""
The fork server's manager: a plain blocking loop, no zmq, no threads.

It keeps ``pool_size`` kernels forked and ready, and the table of every
kernel (id, host pid, dir, key). Kernels are not forked from here: a
process holding that table must never be copied into a kernel. They are
forked by the zygote (zygote.py), a clean interpreter started by this
process, which preloads ipykernel and the configured modules and hands over
each new kernel's ready pipe. Each kernel picks its own id and key and makes
its own dirs (kernel.child), says them on that pipe, and becomes a child of
this process (a child subreaper). Which host process each kernel is goes in
records (records.py) where no kernel can write.

It talks to the spawner front (which owns the zmq link to the daemon) over
a SOCK_SEQPACKET socket pair, one JSON object per packet:

front -> here   {"cmd": "take", "id"}       a ready kernel now belongs to a session
                {"cmd": "kill", "id"}       SIGKILL its process group, clean up
                {"cmd": "interrupt", "id"}  SIGINT to a taken kernel (Sage's: see kernel.sage)
                {"cmd": "sync", "keep"}     kernels in base_dir that are not ours: adopt
                                            those in ``keep`` (still in use), end the rest;
                                            end our taken ones not in ``keep``
                {"cmd": "demand", "waiting"}  sessions waiting for a kernel: fork that
                                            many beyond ``pool_size`` (parallel, per core)
                {"cmd": "shutdown"}         kill everything, remove every dir, exit
here -> front   {"event": "ready", "kernel": {...}}   (kernel["spawn_seconds"]: fork to ready)
                {"event": "dead", "id", "status", "reason"}
                {"event": "pool", "ready", "starting", "taken"}
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field

from .. import SOURCE_ROOT
from ..files.quota import DiskQuota
from ..files.store import UPLOAD_TEMP, disk_use
from ..kernel import cgroup, sandbox
from ..kernel import ipython as ipython_kernel
from ..kernel import sage as sage_kernel
from . import records, zygote
from .pool import Pool

#: Longest wait in one turn of the loop: bounds how late a death is noticed.
TICK = 0.1


@dataclass
class ForkConfig:
    """What the fork server needs; built by the spawner front from its options."""

    base_dir: str
    pool_size: int = 4
    max_kernels: int = 64
    #: most bytes a kernel's dir (work, log, state) may hold (0: no check)
    disk_quota: int = 0
    preload: tuple[str, ...] = ()
    #: the kernels forked here ("python3", or "sagemath": Sage's master, see kernel.sage)
    kernel_name: str = "python3"
    limits: sandbox.Limits = field(default_factory=sandbox.Limits)
    network: bool = False
    userns: bool = True
    #: group that may reach kernel dirs (the daemon's), or None: private 0700
    daemon_gid: int | None = None
    host: str = "localhost"
    #: dirs each kernel must not see (other kernels' dirs, the control socket)
    hide: tuple[str, ...] = ()
    #: kernels starting at once at most: one per core; more at once only
    #: slow each other down and delay the first of them
    parallel_forks: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    #: when the front dies without a shutdown, leave the kernels in use
    #: running for the next spawner to adopt: the daemon reaches them
    #: directly. False on a worker host, whose relay went with the front:
    #: nobody can reach its kernels any more, so they end at once.
    keep_in_use: bool = True
    #: the memory cgroup each kernel makes its own in (kernel.cgroup.Parent.as_json), or None
    memory_cgroup: dict | None = None
    #: what every kernel lacks, for the daemon's log (no memory cgroup here, and why)
    notes: tuple[str, ...] = ()

    def kernel_template(self) -> dict:
        """What every kernel child starts from (kernel.child.run), as JSON: nothing of any one kernel."""
        return {
            "base_dir": self.base_dir,
            "daemon_gid": self.daemon_gid,
            "limits": self.limits.as_json(),
            "network": self.network,
            "userns": self.userns,
            "hide": [self.base_dir, *self.hide],
            "preload": list(self.preload),
            "kernel_name": self.kernel_name,
            # The configured memory limit (a Sage master raises the address-space rlimit, not this).
            "memory": {"cgroup": self.memory_cgroup, "limit": self.limits.address_space},
            "notes": list(self.notes),
        }


@dataclass
class Child:
    #: the kernel's own id, once it has said it ("I"); until then a
    #: placeholder starting with "~" (never a kernel id)
    id: str
    #: the kernel's host pid once the process that forked it into its PID
    #: namespace has said it ("P", see kernel.child._become_pid1): PID 1 of
    #: that namespace, whose parent we become as child subreaper. None before.
    pid: int | None
    dir: str
    key: str
    ready_fd: int | None
    started: float
    state: str = "starting"  # starting -> ready -> taken; dying once killed
    reason: str = ""
    #: left by an earlier fork server: not our child, so watched through /proc
    adopted_start: str | None = None
    #: what the child has written on its ready pipe and we have not handled yet
    said: bytes = b""

    def info(self, config: ForkConfig) -> dict:
        ipc = os.path.join(self.dir, "ipc", "k")
        return {
            "id": self.id,
            "name": config.kernel_name,
            # Sage's C libraries compute holding the GIL: its kernel's control
            # thread cannot take an interrupt_request until they are done.
            "interrupt_mode": "signal" if config.kernel_name == sage_kernel.KERNEL_NAME else "message",
            "pid": self.pid,
            "dir": self.dir,
            "workdir": os.path.join(self.dir, "work"),
            "connection": ipython_kernel.connection_info(ipc, self.key),
            "host": config.host,
        }


#: seconds between two checks of the kernels' disk use
QUOTA_EVERY = 1.0
#: at most this many directory entries are looked at per kernel and check
QUOTA_MAX_ENTRIES = 50000


def dir_usage(path: str, stop_above: int) -> int:
    """Bytes allocated under ``path`` (no symlinks followed); stops early once over ``stop_above``."""
    total = 0
    seen = 0
    upload_skipped = False
    stack = [path]
    while stack:
        top = stack.pop()
        try:
            entries = os.scandir(top)
        except OSError:
            continue
        with entries:
            for entry in entries:
                seen += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not upload_skipped and UPLOAD_TEMP.fullmatch(entry.name):
                    upload_skipped = True  # the daemon's upload in progress, see store.UPLOAD_TEMP
                    continue
                total += disk_use(st)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                if total > stop_above:
                    return total
                if seen > QUOTA_MAX_ENTRIES:
                    # So many files are a quota breach of their own.
                    return stop_above + 1
    return total


#: at most this many processes of one kernel are looked at per check
QUOTA_MAX_PROCESSES = 1000


def deleted_usage(pid: int, dev: int) -> int:
    """
    Bytes allocated on device ``dev`` to files that process ``pid`` and those
    under it hold open but have deleted: no directory scan sees them, yet they
    fill the disk (open, unlink, write on: one file size limit per open file).
    """
    total = 0
    seen: set[int] = set()
    for p in _process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{p}/fd/{fd}"
            try:
                if not os.readlink(link).endswith(" (deleted)"):
                    continue
                st = os.stat(link)
            except OSError:
                continue
            if st.st_dev == dev and stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += disk_use(st)
    return total


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (host pids), at most QUOTA_MAX_PROCESSES."""
    out, todo = [], [pid]
    while todo and len(out) < QUOTA_MAX_PROCESSES:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
    return out


class ForkServer:
    """Keeps the pool full and reports kernel births and deaths."""

    def __init__(self, sock: socket.socket, config: ForkConfig):
        self.sock = sock
        self.config = config
        self.children: dict[str, Child] = {}
        self.by_pid: dict[int, Child] = {}
        #: exit statuses of children we reaped before we knew whose they were
        #: (a kernel killed before its "P" was read): its "P" buries it
        self.reaped_unclaimed: dict[int, int] = {}
        self.stopping = False
        #: the front went away without a shutdown (it crashed): leave the
        #: kernels in use running for the next spawner to adopt
        self.abandoned = False
        #: how many kernels to fork, and when (``pool.Pool``)
        self.pool = Pool(config.pool_size, config.parallel_forks, config.max_kernels)
        #: the zygote kernels are forked from (started in ``serve``)
        self.zygote: Zygote | None = None
        #: this manager, as the owner in its kernels' records
        self.owner = ""
        #: kernels forked that have not said their id yet
        self._unnamed = 0
        self._next_quota = 0.0
        #: dead kernels whose memory cgroup could not be removed yet (kernel.cgroup.remove)
        self.cgroups_left: set[str] = set()
        self.quota: DiskQuota | None = None
        if config.disk_quota:
            try:
                self.quota = DiskQuota(config.disk_quota)
            except OSError as e:
                sys.stderr.write(
                    f"sagecell fork server: no inotify ({e}); disk quota checked every {QUOTA_EVERY} s only\n"
                )

    # -- the loop ----------------------------------------------------------

    def serve(self) -> None:
        # Kernels are forked by a grandchild of ours that exits (the zygote's
        # child, see kernel.child._become_pid1): they must become ours, not init's.
        sandbox.prctl(sandbox.PR_SET_CHILD_SUBREAPER, 1)
        records.prepare(self.config.base_dir)
        self.owner = records.owner_tag()
        if self.zygote is None:
            self.zygote = Zygote(self.config)
            failed = self.zygote.wait_up()
            if failed:
                sys.stderr.write(f"sagecell fork server: could not preload {', '.join(failed)}\n")
        # A front that stops reading must not wedge us: time out and stop.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._announce_pool()
        while not self.stopping:
            self._drain_quota()
            self._fill_pool()
            fds = [self.sock.fileno()] + [c.ready_fd for c in self.children.values() if c.ready_fd is not None]
            if self.quota is not None:
                fds.append(self.quota.fileno())
            try:
                readable, _, _ = select.select(fds, [], [], TICK)
            except InterruptedError:
                readable = []
            for fd in readable:
                if self.quota is not None and fd == self.quota.fileno():
                    self._drain_quota()
                elif fd == self.sock.fileno():
                    if not self._read_command():
                        self.stopping = True
                        break
                else:
                    self._child_ready(fd)
            self._reap()
            self._watch_adopted()
            self._expire_starting()
            self._check_quotas()
            self._remove_cgroups_left()
        self._shutdown()

    def _on_term(self, _signo, _frame) -> None:
        self.stopping = True

    def _read_command(self) -> bool:
        try:
            data = self.sock.recv(1 << 16)
        except (ConnectionResetError, OSError):
            self.abandoned = True
            return False
        if not data:
            self.abandoned = True
            return False
        try:
            msg = json.loads(data)
            cmd = msg["cmd"]
        except (ValueError, KeyError, TypeError):
            return True
        if cmd == "take":
            self._take(str(msg.get("id")))
        elif cmd == "kill":
            self._kill(str(msg.get("id")), str(msg.get("reason", "killed")))
        elif cmd == "interrupt":
            self._interrupt(str(msg.get("id")))
        elif cmd == "sync":
            keep = msg.get("keep")
            self._sync({str(k) for k in keep} if isinstance(keep, list) else set())
        elif cmd == "demand":
            waiting = msg.get("waiting")
            self.pool.wanted_by(waiting)
        elif cmd == "shutdown":
            return False
        elif cmd == "status":
            self._announce_pool()
            for child in self.children.values():
                if child.state in ("ready", "taken"):
                    self._send({"event": "ready", "kernel": child.info(self.config), "state": child.state})
        return True

    def _send(self, msg: dict) -> None:
        try:
            self.sock.send(json.dumps(msg).encode())
        except OSError:
            self.stopping = True

    # -- births --------------------------------------------------------------

    def _counts(self) -> tuple[int, int, int]:
        states = [c.state for c in self.children.values()]
        return states.count("ready"), states.count("starting"), states.count("taken")

    def _fill_pool(self) -> None:
        """Fork as many kernels as the pool wants now (``Pool.forks``)."""
        ready, starting, _taken = self._counts()
        for _ in range(self.pool.forks(ready, starting, len(self.children), time.monotonic())):
            if self.stopping:
                break
            self._fork()
            # A fork of this big process takes a while: a kernel filling the
            # disk must not get to write on while we fork several.
            self._drain_quota()

    def _fork(self) -> None:
        """Have the zygote fork a kernel; it says who it is on its ready pipe."""
        assert self.zygote is not None
        try:
            r = self.zygote.fork()
        except OSError as e:
            sys.stderr.write(f"sagecell fork server: the zygote is gone ({e}); stopping\n")
            self._lost_zygote()
            return
        os.set_blocking(r, False)
        self._unnamed += 1
        child = Child(f"~{self._unnamed}", None, "", "", r, time.monotonic())
        self.children[child.id] = child

    def _lost_zygote(self) -> None:
        """No more forks: stop as if the front had gone (kernels in use stay for the next spawner where they may)."""
        self.stopping = True
        self.abandoned = True

    def _child_ready(self, fd: int) -> None:
        child = next((c for c in self.children.values() if c.ready_fd == fd), None)
        if child is not None:
            self._hear(child)

    def _hear(self, child: Child) -> None:
        """
        Take what ``child`` wrote on its ready pipe: "I<id> <key>\\n" (the
        kernel's own id and key, made after the fork), "P<pid>\\n" (its host
        pid, from the process that forked it into its PID namespace), then
        "R<json>" (ready; the protections it could not have) or "E<why>" (it
        refused to run unconfined). EOF before that: it died while starting;
        ``_reap`` reports a kernel whose pid we know, we bury the others.
        """
        fd = child.ready_fd
        if fd is None:
            return
        while True:  # until the pipe is empty (a short read is no EOF) or at EOF
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                break
            child.said += data
            while child.said.startswith((b"I", b"P")) and b"\n" in child.said:
                line, child.said = child.said.split(b"\n", 1)
                if line.startswith(b"I"):
                    self._kernel_named(child, line[1:])
                else:
                    self._kernel_pid(child, line[1:])
            if child.ready_fd is None:
                return  # buried meanwhile
            if child.said.startswith((b"R", b"E")):
                break
        os.close(fd)
        child.ready_fd = None
        said, child.said = child.said, b""
        if said.startswith(b"R") and child.state == "starting":
            if child.pid is None or child.id.startswith("~"):
                self._kill(child.id, "it did not say which kernel it is")
                return
            child.state = "ready"
            self.pool.ready()
            info = child.info(self.config)
            info["spawn_seconds"] = round(time.monotonic() - child.started, 4)
            try:
                info["missing_protections"] = json.loads(said[1:] or b"[]")
            except ValueError:
                info["missing_protections"] = ["unknown (the kernel's report was garbled)"]
            self._send({"event": "ready", "kernel": info, "state": "ready"})
            self._announce_pool()
        else:
            if said.startswith(b"E"):
                child.reason = "its sandbox could not be set up: " + said[1:].decode(errors="replace")
                sys.stderr.write(f"sagecell fork server: a kernel refused to run unconfined: {child.reason}\n")
            if child.pid is None:
                # Never became ours (no "P"): the zygote reaps what there was.
                child.reason = child.reason or "the kernel died while starting"
                self._bury(child, None)

    def _kernel_named(self, child: Child, text: bytes) -> None:
        """The kernel says its id and key: file it under that id."""
        try:
            kid, key = text.decode().split(" ")
        except (UnicodeDecodeError, ValueError):
            return
        if not child.id.startswith("~") or not records.valid_id(kid) or kid in self.children:
            return
        del self.children[child.id]
        child.id, child.key, child.dir = kid, key, os.path.join(self.config.base_dir, kid)
        self.children[kid] = child

    def _kernel_pid(self, child: Child, text: bytes) -> None:
        """The kernel ``child`` forked into its PID namespace is ``text``: follow it from now on."""
        try:
            pid = int(text)
        except ValueError:
            return
        if pid <= 1 or pid in self.by_pid or child.pid is not None:
            return
        child.pid = pid
        status = self.reaped_unclaimed.pop(pid, None)
        if status is not None:  # it died before we knew it was this kernel
            self._bury(child, status)
            return
        self.by_pid[pid] = child
        if not child.id.startswith("~"):
            records.write(self.config.base_dir, child.id, pid, self.owner)
            if self.quota is not None:  # its dirs exist by now: it made them before it forked the kernel
                self.quota.watch(child.id, child.dir)  # all of it: its log is in there too
        if child.state == "dying":  # killed before we knew its pid
            _killpg(pid)

    def _check_quotas(self) -> None:
        """
        A full count of every kernel dir each QUOTA_EVERY s: backs up the
        inotify accounting (DiskQuota), which cannot see writes through mmap.
        The whole kernel dir, not only its work dir: the kernel's log (its
        stdout and stderr) is in ipc/, and in a kernel without a private
        /tmp its state dir (IPython's, matplotlib's) is in the kernel dir.
        And the files its processes deleted but still hold open
        (``deleted_usage``), which no directory scan or inotify event sees.
        """
        quota = self.config.disk_quota
        now = time.monotonic()
        if not quota or now < self._next_quota:
            return
        self._next_quota = now + QUOTA_EVERY
        for child in list(self.children.values()):
            if child.state in ("ready", "taken") and self._disk_usage(child, quota) > quota:
                self._over_quota(child.id)

    @staticmethod
    def _disk_usage(child: Child, quota: int) -> int:
        """What ``child`` holds on disk: its dir, and the files it deleted but keeps open."""
        used = dir_usage(child.dir, quota)
        if used > quota:
            return used
        try:
            dev = os.stat(child.dir).st_dev
        except OSError:
            return used
        return used + deleted_usage(child.pid, dev)

    def _drain_quota(self) -> None:
        """Take the pending inotify events; end the kernels they put over quota."""
        if self.quota is not None:
            for kid in self.quota.read():
                self._over_quota(kid)

    def _over_quota(self, kid: str) -> None:
        child = self.children.get(kid)
        if child is not None and child.state != "dying":
            self._kill(kid, f"its files exceeded the disk quota of {self.config.disk_quota // (1 << 20)} MiB")

    def _expire_starting(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.state == "starting" and Pool.overdue(child.started, now):
                self._kill(child.id, "did not start in time")

    # -- the pool ------------------------------------------------------------

    def _take(self, kid: str) -> None:
        child = self.children.get(kid)
        if child is None or child.state != "ready":
            self._send({"event": "dead", "id": kid, "status": None, "reason": "no such ready kernel"})
            return
        child.state = "taken"
        self.pool.took(time.monotonic())
        self._announce_pool()

    def _announce_pool(self) -> None:
        ready, starting, taken = self._counts()
        self._send({"event": "pool", "ready": ready, "starting": starting, "taken": taken})

    # -- a restarted spawner: kernels of the last one ---------------------------

    def _sync(self, keep: set[str]) -> None:
        """Adopt the kernels in use that an earlier fork server left; end everything else not ours."""
        for child in list(self.children.values()):
            if child.state == "taken" and child.id not in keep:
                self._kill(child.id, "no session uses it")
        base = self.config.base_dir
        try:
            names = {n for n in os.listdir(base) if not n.startswith(".")}
        except OSError:
            return
        # A kernel says its id before it makes its dir: hear them now, so a
        # dir listed above is never taken for a leftover of a kernel of ours.
        for child in [c for c in self.children.values() if c.ready_fd is not None]:
            self._hear(child)
        for kid in sorted(names | set(records.kernel_ids(base))):
            if kid in self.children:
                continue
            if kid in keep and self._adopt(kid):
                keep.discard(kid)
                continue
            if records.valid_id(kid):
                records.end(base, kid)
            else:
                records.remove_tree(os.path.join(base, kid))
        for kid in keep - set(self.children):
            self._send(
                {"event": "dead", "id": kid, "status": None, "reason": "the kernel ended while no spawner watched it"}
            )

    def _adopt(self, kid: str) -> bool:
        """Take over kernel ``kid`` if our records say which process it is and that process really is it."""
        base = self.config.base_dir
        record = records.read(base, kid)
        if record is None or not records.is_kernel(record):
            return False
        kdir = os.path.join(base, kid)
        child = Child(kid, record.pid, kdir, "", None, time.monotonic(), state="taken", adopted_start=record.start)
        self.children[kid] = child
        records.write(base, kid, record.pid, self.owner)
        sys.stderr.write(f"sagecell fork server: adopted kernel {kid} (pid {record.pid})\n")
        return True

    def _watch_adopted(self) -> None:
        """Adopted kernels are not our children: no SIGCHLD, so look at /proc each turn."""
        for child in list(self.children.values()):
            if child.adopted_start is None or child.pid is None:
                continue
            if records.start_time(child.pid) != child.adopted_start or records.zombie(child.pid):
                child.reason = child.reason or "the kernel ended"
                self._bury(child, None)

    # -- deaths --------------------------------------------------------------

    def _interrupt(self, kid: str) -> None:
        """SIGINT to the kernel (only: not its process group, where Sage's pexpect programs get ^C from it)."""
        child = self.children.get(kid)
        if child is not None and child.state == "taken" and child.pid is not None:
            try:
                os.kill(child.pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill(self, kid: str, reason: str) -> None:
        child = self.children.get(kid)
        if child is None:
            self._send({"event": "dead", "id": kid, "status": None, "reason": "no such kernel"})
            return
        child.reason = child.reason or reason
        child.state = "dying"
        if child.pid is not None:
            _killpg(child.pid)
        # else: killed once it says its pid (``_kernel_pid``), or buried at EOF

    def _reap(self) -> None:
        # Learn the kernels' pids first: a kernel forked a moment ago may
        # already have died (any "P" is in its pipe before it can).
        for child in [c for c in self.children.values() if c.state in ("starting", "dying") and c.ready_fd is not None]:
            self._hear(child)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.zygote is not None and pid == self.zygote.pid:
                sys.stderr.write(f"sagecell fork server: the zygote ended ({_describe(status)}); stopping\n")
                self.zygote.pid = None
                self._lost_zygote()
                continue
            child = self.by_pid.pop(pid, None)
            if child is None:
                self.reaped_unclaimed[pid] = status
                while len(self.reaped_unclaimed) > 64:
                    del self.reaped_unclaimed[next(iter(self.reaped_unclaimed))]
                continue
            self._bury(child, status)

    def _bury(self, child: Child, status: int | None) -> None:
        named = not child.id.startswith("~")
        if child.pid is not None:
            # Whatever the kernel started lives in its process group: end it too.
            _killpg(child.pid)
            if self.by_pid.get(child.pid) is child:
                del self.by_pid[child.pid]
        if self.quota is not None and named:
            self.quota.unwatch(child.id)
        if child.ready_fd is not None:
            os.close(child.ready_fd)
            child.ready_fd = None
        if named:
            records.remove_tree(child.dir)
            records.remove(self.config.base_dir, child.id)
        self.children.pop(child.id, None)
        reason = child.reason or self._out_of_memory(child) or _describe(status)
        if named:
            self._remove_cgroup(child.id)
        if child.state == "starting":
            self.pool.died_starting(time.monotonic())
            sys.stderr.write(f"sagecell fork server: a kernel died while starting: {reason}\n")
        if named:
            self._send({"event": "dead", "id": child.id, "status": status, "reason": reason})
        self._announce_pool()

    def _out_of_memory(self, child: Child) -> str:
        """Why ``child`` died, if Linux killed it (or one of its processes) for its memory limit."""
        parent = self.config.memory_cgroup
        if parent is None or child.id.startswith("~") or not cgroup.oom_kills(parent, child.id):
            return ""
        return f"the kernel ran out of memory (its limit is {self.config.limits.address_space >> 20} MiB)"

    def _remove_cgroup(self, kid: str) -> None:
        """A dead kernel's memory cgroup goes; while a process of it is still exiting, it is retried each turn."""
        parent = self.config.memory_cgroup
        if parent is None:
            return
        self.cgroups_left.discard(kid)
        try:
            if not cgroup.remove(parent, kid):
                self.cgroups_left.add(kid)
        except OSError as e:
            sys.stderr.write(f"sagecell fork server: the memory cgroup of {kid} stays ({e})\n")

    def _remove_cgroups_left(self) -> None:
        for kid in list(self.cgroups_left)[:64]:
            self._remove_cgroup(kid)

    def _shutdown(self) -> None:
        if self.abandoned and self.config.keep_in_use:
            # Our front died under a live daemon: a new spawner adopts the
            # kernels in use (by their records); pooled ones are nobody's, end them.
            for child in list(self.children.values()):
                if child.state == "taken":
                    if child.ready_fd is not None:
                        os.close(child.ready_fd)
                    self.by_pid.pop(child.pid, None)
                    del self.children[child.id]
        if self.zygote is not None:
            self.zygote.close()
        # Kernels still starting may not have said who they are yet: hear
        # them as long as we wait, so each is ended and its dir removed
        # (its "I" comes before it makes the dir).
        ended: set[int] = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for child in list(self.children.values()):
                child.reason = child.reason or "spawner shut down"
                if child.ready_fd is not None:
                    self._hear(child)
                if child.pid is not None and child.pid not in ended:
                    ended.add(child.pid)
                    _killpg(child.pid)
            if not self.by_pid and not any(c.ready_fd is not None for c in self.children.values()):
                break
            self._reap()
            time.sleep(0.01)
        for child in list(self.children.values()):
            if not child.id.startswith("~"):
                records.remove_tree(child.dir)
                records.remove(self.config.base_dir, child.id)
                self.cgroups_left.add(child.id)
        self.children.clear()
        self._remove_cgroups_left()


class Zygote:
    """
    The manager's handle on the zygote (zygote.py): started clean with
    ``posix_spawn``, so it shares no memory with this process, and asked
    for one kernel at a time over a SOCK_SEQPACKET pair.
    """

    def __init__(self, config: ForkConfig):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        root = SOURCE_ROOT
        paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
        env = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL")}
        env.update(
            PATH="/usr/local/bin:/usr/bin:/bin",
            PYTHONPATH=os.pathsep.join(paths),
            PYTHONUNBUFFERED="1",
            PYDEVD_DISABLE_FILE_VALIDATION="1",
            HOME=config.base_dir,
        )
        template = json.dumps(config.kernel_template())
        argv = [sys.executable, "-P", "-m", "sagecell_tw.worker.zygote", str(theirs.fileno()), template]
        try:
            self.pid: int | None = os.posix_spawn(sys.executable, argv, env)
        finally:
            theirs.close()
        self.sock = ours

    def wait_up(self) -> list[str]:
        """Block until the zygote has preloaded; the modules it could not import."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise OSError(errno.EPIPE, "the zygote died while preloading")
        return list(json.loads(data).get("failed", []))

    def fork(self) -> int:
        """A new kernel child's ready pipe (its read end, ours now)."""
        self.sock.settimeout(30)
        self.sock.send(zygote.FORK)
        _msg, fds, _flags, _addr = socket.recv_fds(self.sock, 16, 1)
        if not fds:
            raise OSError(errno.EPIPE, "no answer from the zygote")
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        """Its end of the socket sees EOF and it exits; the manager reaps it as any process (no longer as the zygote)."""
        self.sock.close()
        self.pid = None


def _killpg(pid: int) -> None:
    records.killpg(pid)


def _describe(status: int | None) -> str:
    if status is None:
        return "the kernel ended"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGXCPU:
            return "the kernel used up its CPU time limit"
        return f"the kernel was killed by {name}"
    if os.WIFEXITED(status):
        return f"the kernel exited with status {os.WEXITSTATUS(status)}"
    return "the kernel ended"


def serve(sock: socket.socket, config: ForkConfig) -> None:
    """Entry point in the freshly forked manager process; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        ForkServer(sock, config).serve()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
