# -*- test-case-name: tests.test_security -*-
"""
What runs in a forked kernel child, from ``fork()`` to ``os._exit()``.

The process and its sandbox: namespaces, PID 1, the private file system,
Landlock, rlimits; then the kernel itself (``kernel.ipython``). The fork
server has already imported ipykernel and friends and made the IPython
shell, but created no zmq context, thread or event loop; everything of that
kind is made here, after the fork. Nothing here imports the daemon's
Twisted side.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import signal
import sys
import traceback

from . import cgroup, sandbox
from . import ipython as ipython_kernel


def run(template: dict, ready_fd: int, keep_fds: tuple[int, ...] = ()) -> None:
    """Turn this freshly forked process into a sandboxed kernel; never returns."""
    code = 1
    try:
        spec = _own_identity(template, ready_fd)
        _prepare_process(ready_fd, keep_fds, spec["log"])
        _memory_cgroup(spec)
        if not spec.get("userns"):
            _leave_to_the_manager(ready_fd)
        missing = _enter_sandbox(spec, ready_fd)
        if missing and spec.get("userns"):
            # Namespaces work here, yet part of the box failed: run nothing
            # unconfined. Say why; the fork server logs it.
            os.write(ready_fd, b"E" + "; ".join(missing).encode()[:3000])
            return
        # What this Linux lacks (reported, not fatal: the rest still holds).
        _start_kernel(spec, ready_fd, missing + spec.get("notes", []))
        code = 0
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _own_identity(template: dict, ready_fd: int) -> dict:
    """
    Pick this kernel's id and HMAC key, make its dirs, and say id and key
    ("I<id> <key>\\n") on the ready pipe: the spec of this kernel.

    All of it happens here, after the fork: the master we were forked from
    (the zygote) never holds any kernel's id, key or dir, so no kernel finds
    another's in the memory it inherited.
    """
    kid = secrets.token_hex(16)
    key = secrets.token_hex(32)
    # Said first: a dir made is then always one the manager knows to remove.
    os.write(ready_fd, b"I%s %s\n" % (kid.encode(), key.encode()))
    kdir = os.path.join(template["base_dir"], kid)
    private = os.path.join(kdir, "ipc")
    work = os.path.join(kdir, "work")
    os.mkdir(kdir, 0o700)
    os.mkdir(private, 0o700)
    os.mkdir(work, 0o700)
    group = template.get("daemon_gid")
    if group is not None:
        # The daemon's group reaches the sockets and the files, never writes the dir itself.
        for path, mode in ((kdir, 0o750), (private, 0o750), (work, 0o2770)):
            os.chown(path, -1, group)
            os.chmod(path, mode)
    spec = dict(template, id=kid, dir=kdir, workdir=work, private=private, key=key)
    spec.update(ipc_prefix=os.path.join(private, "k"), log=os.path.join(private, "kernel.log"))
    return spec


def _memory_cgroup(spec: dict) -> None:
    """
    Into a memory cgroup of our own (kernel.cgroup), before the sandbox:
    all this kernel forks is then inside its limit. Where the spawner has
    none, its note says why; where ours cannot be made, our note says why.
    """
    memory = spec.get("memory") or {}
    if not memory.get("cgroup"):
        return
    try:
        cgroup.join(memory["cgroup"], spec["id"], memory["limit"])
        if "address_space" in memory:  # what the master asks for once a cgroup holds real memory
            spec["limits"] = dict(spec["limits"], address_space=memory["address_space"])
    except OSError as e:
        spec["notes"] = [
            *spec.get("notes", []),
            f"a memory cgroup of its own ({e.strerror}): real memory is held by the address-space limit only",
        ]


def _leave_to_the_manager(ready_fd: int) -> None:
    """
    Without namespaces: fork once more, as ``_become_pid1`` does, so the
    kernel becomes the manager's child (a child subreaper), not the zygote's.
    """
    _become_pid1(ready_fd)
    os.setsid()  # a process group of its own: the manager ends a kernel by it


def _prepare_process(ready_fd: int, keep_fds: tuple[int, ...], log_path: str) -> None:
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    # Forget everything the fork server had open: other kernels' pipes, the
    # link to the spawner front, listening sockets.
    sandbox.close_fds_except({0, 1, 2, ready_fd, *keep_fds})
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _enter_sandbox(spec: dict, ready_fd: int) -> list[str]:
    """
    Box this process in; return the protections that could not be had.

    With user namespaces (the normal case), the child unshares its own user,
    mount, PID, IPC, UTS and (unless allowed) network namespaces, forks once
    more so the kernel is PID 1 of its own PID namespace (the process that
    forked exits: see ``_become_pid1``), hides every other
    kernel's dir, the control socket and the shared temp dirs behind fresh
    tmpfs mounts, and mounts a fresh /proc that shows only its own processes.
    """
    missing: list[str] = []
    uid, gid = os.getuid(), os.getgid()
    # Sockets 0770 (the daemon's group connects); and bound while the
    # kernel may still make them: see kernel.ipython.bind_ipc_sockets.
    os.umask(0o007)
    ipython_kernel.bind_ipc_sockets(spec["ipc_prefix"])
    if spec.get("userns"):
        flags = sandbox.CLONE_NEWNS | sandbox.CLONE_NEWPID | sandbox.CLONE_NEWIPC | sandbox.CLONE_NEWUTS
        if not spec.get("network"):
            flags |= sandbox.CLONE_NEWNET
        try:
            sandbox.enter_user_namespace(uid, gid, flags)
        except OSError as e:
            missing.append(f"user/mount/PID/network namespaces ({e.strerror})")
        else:
            _become_pid1(ready_fd)
            missing += _private_filesystem(spec)
            if not spec.get("network"):
                try:
                    sandbox.bring_up_loopback()
                except OSError:
                    pass
    else:
        missing.append("user/mount/PID/network namespaces (not available here)")
    # What IPython and matplotlib write (profile, %store, caches) and the
    # connection file: not in the visitor's work dir, nor in ipc/ (sockets only).
    spec["state"] = _state_dir(spec)
    sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
    try:
        sandbox.drop_capabilities()
    except OSError as e:
        missing.append(f"dropping capabilities ({e.strerror})")
    if sandbox.landlock_abi() < 1:
        spec.setdefault("notes", []).append("Landlock (not in this Linux): the kernel may read what its account may")
    else:
        try:
            sandbox.landlock(landlock_rules(spec))
        except OSError as e:
            missing.append(f"Landlock ({e.strerror})")
    sandbox.apply_rlimits(sandbox.Limits(**spec["limits"]))
    work = spec["workdir"]
    os.chdir(work)
    state = spec["state"]
    os.environ.clear()
    os.environ.update(
        {
            "HOME": work,
            "IPYTHONDIR": os.path.join(state, "ipython"),
            "MPLCONFIGDIR": os.path.join(state, "matplotlib"),
            "XDG_CACHE_HOME": os.path.join(state, "cache"),  # fontconfig's, pip's: not the visitor's files
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "TMPDIR": work,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            "JPY_SESSION_NAME": "",
        }
    )
    _reseed()
    return missing


#: what every kernel may read (and run): the system's programs, libraries and settings
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")


def landlock_rules(spec: dict) -> list[tuple[str, int]]:
    """
    What a kernel may open: its work dir, its state dir and (when it has them)
    its private temp dirs in full; the rest of its own dir (log, records,
    the ipc sockets bound before: ``kernel.ipython.bind_ipc_sockets``) and
    the system's dirs, Python's and those on ``sys.path`` to read; the
    devices of ``HOST_DEVICES`` and ptys; its own /proc. Nothing else, even
    where its account may: the daemon's files when both run as one account,
    the other accounts' world-readable ones. So every byte it can write is
    in its kernel dir (counted by the disk quota) or in a size-capped tmpfs.
    """
    every = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path)
    # Never "/" (a PYTHONPATH of "/" must not open up everything).
    python = {p for p in every if p and os.path.isabs(p) and os.path.normpath(p) != "/"}
    writable = (spec["workdir"], spec["state"], *(SCRATCH if spec.get("private_tmp") else ()))
    return [
        *((d, sandbox.READ) for d in (*SYSTEM_DIRS, *sorted(python))),
        # The devices a /dev of its own has (``_private_dev``), and no other
        # (where it sees the host's /dev: no namespaces), nor files there.
        ("/dev", sandbox.FS_READ_DIR),
        *((f"/dev/{name}", sandbox.DEVICES) for name in (*HOST_DEVICES, "pts", "ptmx")),
        ("/proc", sandbox.READ | sandbox.FS_WRITE_FILE),
        (spec["dir"], sandbox.LOOK),
        *((d, sandbox.EVERYTHING) for d in writable),
    ]


def _state_dir(spec: dict) -> str:
    """
    The kernel's own writable dir outside its work dir: in its private /tmp
    (a tmpfs of its own) when it has one, else ``state`` in its kernel dir
    (on disk, counted by the disk quota; the host's /tmp would be shared
    and uncounted).
    """
    path = "/tmp/.kernel" if spec.get("private_tmp") else os.path.join(spec["dir"], "state")
    os.makedirs(path, 0o700, exist_ok=True)
    return path


def _become_pid1(ready_fd: int) -> None:
    """
    Fork into the new PID namespace; this process reports the kernel and exits.

    ``unshare(CLONE_NEWPID)`` puts our next child, not us, in the new
    namespace. That child goes on as the kernel (PID 1 there); this process
    tells the fork server the kernel's host pid ("P" on the ready pipe) and
    exits, and the fork server's manager, a child subreaper (the zygote that
    forked us is not), becomes the kernel's parent. No process waits outside
    each kernel (one fork of the master less per kernel: ~2 MiB private
    memory). The kernel goes on only once "P" is written, so the manager
    hears it before anything else from the kernel.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        while os.read(r, 1):  # EOF: the outer process has said "P"
            pass
        os.close(r)
        return
    os.close(r)
    try:
        os.write(ready_fd, b"P%d\n" % pid)
        os.close(w)  # now the kernel may go on: not only once our exit has torn down our memory
    finally:
        os._exit(0)


def _python_paths(hidden: list[str], private: tuple[str, ...] = ()) -> list[tuple[str, str, object]]:
    """
    How to rebuild, inside the hidden dirs, the paths this Python imports from.

    For each of sys.prefix and sys.path under a hidden dir, walk down from
    the hidden dir: a symlink on the way is recreated as it is (its target
    lies elsewhere), else the dir itself is bound back read-only.
    """
    plan: list[tuple[str, str, object]] = []
    done: set[str] = set()
    for entry in (sys.prefix, sys.exec_prefix, *sys.path):
        if not entry or not os.path.isabs(entry):
            continue
        base = next((h for h in hidden if entry.startswith(h + "/")), None)
        if base is None:
            continue
        # Never the dirs hidden on purpose (the run dir, where a spawner
        # started with ``-m`` has its cwd on sys.path), nor any dir above them.
        if any(entry == p or entry.startswith(p + "/") or p.startswith(entry + "/") for p in private):
            continue
        path = base
        for part in entry[len(base) + 1 :].split("/"):
            path = os.path.join(path, part)
            if path in done:
                if plan and any(p == path and k == "symlink" for k, p, _ in plan):
                    break
                continue
            done.add(path)
            if os.path.islink(path):
                plan.append(("symlink", path, os.readlink(path)))
                break
        else:
            if os.path.isdir(path) and not any(k == "bind" and path.startswith(p + "/") for k, p, _ in plan):
                plan.append(("bind", path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    return plan


#: dirs every kernel sees empty (a fresh tmpfs): shared scratch space, where
#: one session could leave something for the next, and people's homes
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/home", "/root", "/run/user")
#: of those, the ones a kernel may write in (each a tmpfs of SCRATCH_SIZE:
#: memory its address-space limit does not count); the others are empty
#: and read-only
SCRATCH = ("/tmp", "/dev/shm")
SCRATCH_SIZE = "16m"
#: the host's devices a kernel sees in its own /dev (as bubblewrap's ``--dev``):
#: no disk, console or other hardware
HOST_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: and the links every /dev has
DEVICE_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)


def _hidden_dirs(spec: dict) -> tuple[str, ...]:
    """``HIDDEN``, the dirs the spec names, and this account's home (the daemon's, when not root)."""
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a uid with no account: no home to hide
        home = ""
    return (*HIDDEN, *spec.get("hide", ()), *([home] if home not in ("", "/") else []))


def _private_filesystem(spec: dict) -> list[str]:
    """
    A /dev of its own; fresh tmpfs over shared dirs, homes and other
    kernels' dirs; our own dir bound back; every other mount read-only; a
    fresh /proc and /sys.

    Read-only everywhere but in its own dir (and its empty /tmp), a kernel
    can leave nothing behind for a later session or another kernel, fill
    no disk but its own (whose quota is watched), and change no file its
    account happens to own: the daemon's code, where the daemon runs as the
    same account.
    """
    missing = []
    kdir = spec["dir"]
    try:
        sandbox.mount("none", "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
        inherited = sandbox.mount_points()
        keep = os.open(kdir, os.O_PATH | os.O_DIRECTORY)
        shared = [(src, dst) for src, dst in spec.get("binds", ()) if os.path.isdir(src)]
        binds = [(os.open(src, os.O_PATH | os.O_DIRECTORY), dst) for src, dst in shared]
        _private_dev(spec)
        hidden: list[str] = []
        for path in _hidden_dirs(spec):
            path = os.path.realpath(path)
            if not os.path.isdir(path) or any(path == h or path.startswith(h + "/") for h in hidden):
                continue
            hidden.append(path)
        # Python itself may live under a dir we hide (a venv in /tmp, reached
        # through a symlink): note how to put it back before hiding anything.
        python = _python_paths(hidden, tuple(os.path.realpath(p) for p in spec.get("hide", ())) + (kdir,))
        scratch = {os.path.realpath(p) for p in SCRATCH}
        for path in hidden:
            size = SCRATCH_SIZE if path in scratch else "1m"
            sandbox.mount("tmpfs", path, "tmpfs", sandbox.MS_NOSUID | sandbox.MS_NODEV, f"size={size},mode=1777")
        spec["private_tmp"] = scratch <= set(hidden)
        _bind_read_only(spec, binds, scratch)
        for kind, path, what in python:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if kind == "symlink":
                os.symlink(what, path)
            else:
                os.makedirs(path, exist_ok=True)
                sandbox.mount(f"/proc/self/fd/{what}", path, None, sandbox.MS_BIND | sandbox.MS_REC)
                sandbox.mount("none", path, None, sandbox.MS_BIND | sandbox.MS_REMOUNT | sandbox.MS_RDONLY | sandbox.MS_NOSUID)
                os.close(what)
        os.makedirs(kdir, exist_ok=True)
        sandbox.mount(f"/proc/self/fd/{keep}", kdir, None, sandbox.MS_BIND | sandbox.MS_REC)
        os.close(keep)
        # Our dir is read-only to us but for its work dir: the log, the
        # records and the ipc sockets (bound already) are the fork server's.
        # This holds even where Landlock's rights on a scratch dir reach
        # our dir (a run dir in /tmp: a Landlock rule covers all beneath).
        work = spec["workdir"]
        sandbox.mount(work, work, None, sandbox.MS_BIND)
        sandbox.remount_read_only(kdir)
        # The path down to our dir exists only in our tmpfs; make it
        # traversable, not listable, like the real one.
        base = next((h for h in hidden if kdir.startswith(h + "/")), None)
        parent = os.path.dirname(kdir)
        while base is not None and parent != base and parent.startswith(base + "/"):
            os.chmod(parent, 0o111)
            parent = os.path.dirname(parent)
        # What we built in the hiding tmpfs and in /dev is done: all but the
        # scratch dirs become read-only.
        for path in ("/dev", *hidden):
            if path not in scratch:
                sandbox.mount("none", path, None, sandbox.MS_REMOUNT | sandbox.MS_RDONLY | sandbox.MS_NOSUID | sandbox.MS_NODEV)
    except OSError as e:
        missing.append(f"a private view of the file system ({e.strerror})")
        return missing + _proc()
    try:
        _read_only(inherited, ["/dev", *hidden, kdir])
    except OSError as e:
        missing.append(f"a read-only view of the system's files ({e.strerror})")
    return missing + _proc() + _sys(spec)


def _bind_read_only(spec: dict, binds: list[tuple[int, str]], scratch: set[str]) -> None:
    """
    What the master shares with every kernel (a Sage master's saved GAP
    workspaces: kernel.sage.gap_binds), each dir (open as an O_PATH fd)
    bound read-only at its place in our fresh scratch tmpfs: read by all,
    written by none, and no part of any kernel's tmpfs size.
    """
    for fd, target in binds:
        try:
            if any(target.startswith(p + "/") for p in scratch):
                os.makedirs(target, 0o700, exist_ok=True)
                sandbox.mount(f"/proc/self/fd/{fd}", target, None, sandbox.MS_BIND | sandbox.MS_REC)
                sandbox.remount_read_only(target)
        except OSError as e:
            spec.setdefault("notes", []).append(f"{target}, shared read-only ({e.strerror})")
        finally:
            os.close(fd)


def _private_dev(spec: dict) -> None:
    """
    A /dev of ``HOST_DEVICES`` bound from the host, the usual links, a pty
    multiplexer of our own (a new devpts instance) and an empty ``shm``
    for the scratch tmpfs: the host's disks, consoles and the like are not
    there to be read, probed or listed.
    """
    held = [(name, os.open(f"/dev/{name}", os.O_PATH)) for name in HOST_DEVICES if os.path.exists(f"/dev/{name}")]
    try:
        sandbox.mount("tmpfs", "/dev", "tmpfs", sandbox.MS_NOSUID | sandbox.MS_NOEXEC, "size=64k,mode=755")
        for name, fd in held:
            _bind_file(fd, f"/dev/{name}")
    finally:
        for _name, fd in held:
            os.close(fd)
    for name, target in DEVICE_LINKS:
        os.symlink(target, f"/dev/{name}")
    for name in ("pts", "shm"):
        os.mkdir(f"/dev/{name}", 0o755)
    try:
        # Its own ptys, numbered from 0, none of the host's.
        sandbox.mount("devpts", "/dev/pts", "devpts", sandbox.MS_NOSUID | sandbox.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    except OSError as e:
        spec.setdefault("notes", []).append(f"ptys (a devpts of its own: {e.strerror}): os.openpty() fails in kernels")


def _bind_file(fd: int, path: str) -> None:
    """Bind the file open as ``fd`` (O_PATH) on a new empty file at ``path``."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    sandbox.mount(f"/proc/self/fd/{fd}", path, None, sandbox.MS_BIND)


def _sys(spec: dict) -> list[str]:
    """
    A fresh sysfs, of our own network namespace: /sys/class/net shows our
    ``lo``, not the host's network devices. Where Linux will not mount one
    (a /sys partly covered by the container we run in), the host's network
    devices are covered by empty dirs instead. Left as it is (the host's,
    read-only) when the kernel shares the host's network anyway.
    """
    if spec.get("network"):
        return []
    try:
        sandbox.mount("sysfs", "/sys", "sysfs", sandbox.MS_RDONLY | sandbox.MS_NOSUID | sandbox.MS_NODEV | sandbox.MS_NOEXEC)
        return []
    except OSError as e:
        why = e.strerror
    try:
        _hide_host_net()
    except OSError as e:
        return [f"a /sys of its own network namespace ({why}; hiding the host's network devices: {e.strerror})"]
    spec.setdefault("notes", []).append(f"a /sys of its own network namespace ({why}): the host's network devices are hidden instead")
    return []


def _hide_host_net() -> None:
    """An empty read-only tmpfs over /sys/class/net and each dir under /sys/devices that holds network devices."""
    dirs = {os.path.dirname(os.path.realpath(os.path.join("/sys/class/net", name))) for name in os.listdir("/sys/class/net")}
    for path in ("/sys/class/net", *sorted(dirs)):
        sandbox.mount("tmpfs", path, "tmpfs", sandbox.MS_RDONLY | sandbox.MS_NOSUID | sandbox.MS_NODEV | sandbox.MS_NOEXEC, "size=4k,mode=755")


def _read_only(inherited: list[str], ours: list[str]) -> None:
    """Remount read-only every mount we inherited, except those our own mounts now cover."""
    for point in inherited:
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in ("/proc", *ours)):
            continue
        try:
            sandbox.remount_read_only(point)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.ENOENT, errno.ENOTDIR):
                raise
            # Out of our reach (under a dir we may not enter): nothing to write there either.


def _proc() -> list[str]:
    """A fresh /proc: our PID namespace's processes only."""
    try:
        sandbox.mount("proc", "/proc", "proc", sandbox.MS_NOSUID | sandbox.MS_NODEV | sandbox.MS_NOEXEC)
    except OSError as e:
        return [f"a private /proc ({e.strerror})"]
    return []


def _reseed() -> None:
    """Each child must not share its random state with its siblings."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _start_kernel(spec: dict, ready_fd: int, missing: list[str]) -> None:
    app = ipython_kernel.kernel_app(spec["state"], spec["ipc_prefix"], spec["key"])
    # Sockets are bound: tell the fork server we can take messages, and
    # which protections we could not have.
    os.write(ready_fd, b"R" + json.dumps(missing).encode())
    os.close(ready_fd)
    app.start()
