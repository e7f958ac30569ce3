# -*- test-case-name: tests.test_spawner -*-
"""
The warm master that forks kernels: a plain blocking loop, no zmq, no threads.

It imports ipykernel and the configured modules once, then keeps ``pool_size``
kernels forked and ready. It talks to the spawner front (which owns the zmq
link to the daemon) over a SOCK_SEQPACKET socket pair, one JSON object per
packet:

front -> here   {"cmd": "take", "id"}       a ready kernel now belongs to a session
                {"cmd": "kill", "id"}       SIGKILL its process group, clean up
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
import gc
import importlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from . import ipython_kernel, kernel_child, sandbox
from .quota import UPLOAD_TEMP, DiskQuota

#: How long a kernel may take from fork to bound sockets before it is killed.
START_TIMEOUT = 60.0
#: Longest wait in one turn of the loop: bounds how late a death is noticed.
TICK = 0.1
#: While kernels were taken this recently, the pool is refilled one fork at a
#: time: the cores go to the kernels sessions wait for and to their first
#: cells, not to kernels nobody has asked for yet.
BUSY = 0.25


@dataclass
class ForkConfig:
    """What the fork server needs; built by the spawner front from its options."""

    base_dir: str
    pool_size: int = 4
    max_kernels: int = 64
    #: most bytes a kernel's dir (work, log, state) may hold (0: no check)
    disk_quota: int = 0
    preload: tuple[str, ...] = ()
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


@dataclass
class Child:
    id: str
    #: the kernel's host pid: first the process we forked, then (once it has
    #: said "P", see kernel_child._become_pid1) the kernel it forked, PID 1
    #: of its own namespace, whose parent we become as child subreaper
    pid: int
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
            "pid": self.pid,
            "dir": self.dir,
            "workdir": os.path.join(self.dir, "work"),
            "connection": ipython_kernel.connection_info(ipc, self.key),
            "host": config.host,
        }


def preload(modules: tuple[str, ...]) -> list[str]:
    """
    Import ``modules`` and whatever kernel start-up will import; return failures.

    Memory: every page a kernel writes to after the fork becomes its own, so
    the master imports with the cyclic GC off (no freed holes for the
    children's allocations to land in) and then freezes everything it holds
    (``gc.freeze``: no collection in a child walks, and so writes to, the
    master's objects). See bench/bench_output.py for the PSS this buys.
    """
    import ipykernel.kernelapp  # noqa: F401

    gc.disable()
    failed = []
    for name in modules:
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
    their pages shared. The trial starts a kernel the way ``kernel_child``
    does (same app, same plots and random-seed set-up) and runs one cell.
    """
    import tempfile

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
                    upload_skipped = True  # the daemon's upload in progress, see quota.UPLOAD_TEMP
                    continue
                total += st.st_blocks * 512
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
                total += st.st_blocks * 512
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


def remove_tree(path: str) -> None:
    """Remove a kernel dir even if the code in it chmod-ed parts of it to 000."""

    def fix(func, p, _exc):
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``: tells a reused pid from ours."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_pid_file(kdir: str, pid: int) -> None:
    """Which process the kernel in ``kdir`` is (with its start time, against pid reuse), for a later fork server."""
    with open(os.path.join(kdir, "pid"), "w") as f:
        f.write(f"{pid} {_start_time(pid)}")


def end_orphan(kdir: str) -> None:
    """End the kernel that ``kdir`` belonged to, if it still runs, and remove ``kdir``."""
    try:
        with open(os.path.join(kdir, "pid")) as f:
            pid_text, started = f.read().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        pid = None
    if pid is not None and _start_time(pid) == started:
        _killpg(pid)
    remove_tree(kdir)


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
        #: consecutive kernels that died before they were ready, and when the
        #: next fork may happen: a broken setup must not fork in a tight loop.
        self.failures = 0
        self.next_fork = 0.0
        #: sessions the daemon has waiting for a kernel (its last "demand"):
        #: the pool grows by that many, so a burst is served by parallel forks
        #: instead of one refill per take
        self.demand = 0
        self.last_take = 0.0
        self._next_quota = 0.0
        self.quota: DiskQuota | None = None
        if config.disk_quota:
            try:
                self.quota = DiskQuota(config.disk_quota)
            except OSError as e:
                sys.stderr.write(f"sagecell fork server: no inotify ({e}); disk quota checked every {QUOTA_EVERY} s only\n")

    # -- the loop ----------------------------------------------------------

    def serve(self) -> None:
        # Kernels are forked by a child of ours that exits (see
        # kernel_child._become_pid1): they must become ours, not init's.
        sandbox.prctl(sandbox.PR_SET_CHILD_SUBREAPER, 1)
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
        elif cmd == "sync":
            keep = msg.get("keep")
            self._sync({str(k) for k in keep} if isinstance(keep, list) else set())
        elif cmd == "demand":
            waiting = msg.get("waiting")
            self.demand = max(0, min(int(waiting), self.config.max_kernels)) if isinstance(waiting, int) else 0
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
        """
        Fork towards ``pool_size`` ready kernels plus one per waiting session:
        as many at once as sessions wait, up to a core each; one at a time
        for the pool alone while sessions are being served (``BUSY``).
        """
        ready, starting, _taken = self._counts()
        now = time.monotonic()
        if now < self.next_fork:
            return
        target = self.config.pool_size + self.demand
        parallel = self.config.parallel_forks
        if now - self.last_take < BUSY:
            parallel = min(parallel, max(1, self.demand))
        while (
            ready + starting < target
            and starting < parallel
            and len(self.children) < self.config.max_kernels
            and not self.stopping
        ):
            self._fork()
            # A fork of this big process takes a while: a kernel filling the
            # disk must not get to write on while we fork several.
            self._drain_quota()
            starting += 1

    def _fork(self) -> None:
        kid = uuid.uuid4().hex
        kdir = os.path.join(self.config.base_dir, kid)
        private = os.path.join(kdir, "ipc")
        work = os.path.join(kdir, "work")
        group = self.config.daemon_gid
        os.mkdir(kdir, 0o700)
        os.mkdir(private, 0o700)
        os.mkdir(work, 0o700)
        if group is not None:
            for path, mode in ((kdir, 0o750), (private, 0o750), (work, 0o2770)):
                os.chown(path, -1, group)
                os.chmod(path, mode)
        key = secrets.token_hex(32)
        spec = {
            "id": kid,
            "dir": kdir,
            "workdir": work,
            "private": private,
            "ipc_prefix": os.path.join(private, "k"),
            "key": key,
            "log": os.path.join(private, "kernel.log"),
            "limits": self.config.limits.as_json(),
            "network": self.config.network,
            "userns": self.config.userns,
            "hide": (self.config.base_dir, *self.config.hide),
        }
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the kernel
            kernel_child.run(spec, w)
        os.close(w)
        os.set_blocking(r, False)
        _write_pid_file(kdir, pid)
        child = Child(kid, pid, kdir, key, r, time.monotonic())
        self.children[kid] = child
        self.by_pid[pid] = child
        if self.quota is not None:
            self.quota.watch(kid, kdir)  # all of it: the kernel writes its log in ipc/ too

    def _child_ready(self, fd: int) -> None:
        child = next((c for c in self.children.values() if c.ready_fd == fd), None)
        if child is not None:
            self._hear(child)

    def _hear(self, child: Child) -> None:
        """
        Take what ``child`` wrote on its ready pipe: "P<pid>\\n" (the kernel's
        host pid, from the process that forked it into its PID namespace),
        then "R<json>" (ready; the protections it could not have) or
        "E<why>" (it refused to run unconfined). EOF before that: it died
        while starting, and ``_reap`` reports it.
        """
        fd = child.ready_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            child.said += data
            while child.said.startswith(b"P") and b"\n" in child.said:
                line, child.said = child.said.split(b"\n", 1)
                self._kernel_pid(child, line[1:])
            if child.ready_fd is None or not child.said.startswith((b"R", b"E")):
                return  # buried meanwhile, or more to come
        os.close(fd)
        child.ready_fd = None
        said, child.said = child.said, b""
        if said.startswith(b"R") and child.state == "starting":
            child.state = "ready"
            self.failures = 0
            info = child.info(self.config)
            info["spawn_seconds"] = round(time.monotonic() - child.started, 4)
            try:
                info["missing_protections"] = json.loads(said[1:] or b"[]")
            except ValueError:
                info["missing_protections"] = ["unknown (the kernel's report was garbled)"]
            self._send({"event": "ready", "kernel": info, "state": "ready"})
            self._announce_pool()
        elif said.startswith(b"E"):
            child.reason = "its sandbox could not be set up: " + said[1:].decode(errors="replace")
            sys.stderr.write(f"sagecell fork server: a kernel refused to run unconfined: {child.reason}\n")

    def _kernel_pid(self, child: Child, text: bytes) -> None:
        """The kernel ``child`` forked into its PID namespace is ``text``: follow it from now on."""
        try:
            pid = int(text)
        except ValueError:
            return
        if pid <= 1 or pid in self.by_pid:
            return
        # The outer process stays in by_pid until we reap it: its exit,
        # whenever it comes, is then known for no kernel's death (_reap).
        child.pid = pid
        status = self.reaped_unclaimed.pop(pid, None)
        if status is not None:  # it died before we knew it was this kernel
            self._bury(child, status)
            return
        self.by_pid[pid] = child
        _write_pid_file(child.dir, pid)

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
            if child.state == "starting" and now - child.started > START_TIMEOUT:
                self._kill(child.id, "did not start in time")

    # -- the pool ------------------------------------------------------------

    def _take(self, kid: str) -> None:
        child = self.children.get(kid)
        if child is None or child.state != "ready":
            self._send({"event": "dead", "id": kid, "status": None, "reason": "no such ready kernel"})
            return
        child.state = "taken"
        self.last_take = time.monotonic()
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
        try:
            names = os.listdir(self.config.base_dir)
        except OSError:
            return
        for name in names:
            if name.startswith(".") or name in self.children:
                continue
            kdir = os.path.join(self.config.base_dir, name)
            if name in keep and self._adopt(name, kdir):
                keep.discard(name)
                continue
            end_orphan(kdir)
        for kid in keep - set(self.children):
            self._send({"event": "dead", "id": kid, "status": None, "reason": "the kernel ended while no spawner watched it"})

    def _adopt(self, kid: str, kdir: str) -> bool:
        try:
            with open(os.path.join(kdir, "pid")) as f:
                pid_text, started = f.read().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return False
        if _start_time(pid) != started or _zombie(pid):
            return False
        child = Child(kid, pid, kdir, "", None, time.monotonic(), state="taken", adopted_start=started)
        self.children[kid] = child
        sys.stderr.write(f"sagecell fork server: adopted kernel {kid} (pid {pid})\n")
        return True

    def _watch_adopted(self) -> None:
        """Adopted kernels are not our children: no SIGCHLD, so look at /proc each turn."""
        for child in list(self.children.values()):
            if child.adopted_start is not None and (_start_time(child.pid) != child.adopted_start or _zombie(child.pid)):
                child.reason = child.reason or "the kernel ended"
                self._bury(child, None)

    # -- deaths --------------------------------------------------------------

    def _kill(self, kid: str, reason: str) -> None:
        child = self.children.get(kid)
        if child is None:
            self._send({"event": "dead", "id": kid, "status": None, "reason": "no such kernel"})
            return
        child.reason = child.reason or reason
        child.state = "dying"
        _killpg(child.pid)

    def _reap(self) -> None:
        # Learn the kernels' pids first: a kernel forked a moment ago may
        # already have died (any "P" is in its pipe before it can).
        for child in [c for c in self.children.values() if c.state == "starting" and c.ready_fd is not None]:
            self._hear(child)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.pop(pid, None)
            if child is None:
                self.reaped_unclaimed[pid] = status
                while len(self.reaped_unclaimed) > 64:
                    del self.reaped_unclaimed[next(iter(self.reaped_unclaimed))]
                continue
            if child.ready_fd is not None:
                self._hear(child)  # a "P" may wait in the pipe of this exited outer process
            if child.pid != pid:
                continue  # it was the outer process: the kernel lives on, ours now
            self._bury(child, status)

    def _bury(self, child: Child, status: int | None) -> None:
        # Whatever the kernel started lives in its process group: end it too.
        _killpg(child.pid)
        if self.quota is not None:
            self.quota.unwatch(child.id)
        if child.ready_fd is not None:
            os.close(child.ready_fd)
            child.ready_fd = None
        remove_tree(child.dir)
        self.children.pop(child.id, None)
        reason = child.reason or _describe(status)
        if child.state == "starting":
            self.failures += 1
            self.next_fork = time.monotonic() + min(0.1 * 2**self.failures, 30.0)
            sys.stderr.write(f"sagecell fork server: a kernel died while starting: {reason}\n")
        self._send({"event": "dead", "id": child.id, "status": status, "reason": reason})
        self._announce_pool()

    def _shutdown(self) -> None:
        if self.abandoned:
            # Our front died under a live daemon: a new spawner adopts the
            # kernels in use; pooled ones are nobody's, end them.
            for child in list(self.children.values()):
                if child.state == "taken":
                    if child.ready_fd is not None:
                        os.close(child.ready_fd)
                    self.by_pid.pop(child.pid, None)
                    del self.children[child.id]
        for child in self.children.values():
            child.reason = child.reason or "spawner shut down"
            _killpg(child.pid)
        deadline = time.monotonic() + 5
        while self.by_pid and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        for child in list(self.children.values()):
            remove_tree(child.dir)
        self.children.clear()


def _killpg(pid: int) -> None:
    """SIGKILL the kernel's process group, and the process itself in case it has not called setsid yet."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError as e:  # pragma: no cover
            if e.errno != errno.ESRCH:
                raise


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


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
    """Entry point in the freshly forked fork-server process; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        failed = preload(config.preload)
        if failed:
            sys.stderr.write(f"sagecell fork server: could not preload {', '.join(failed)}\n")
        ForkServer(sock, config).serve()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
