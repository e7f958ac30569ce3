# -*- test-case-name: tests.test_spawner -*-
"""
What runs in a forked kernel child, from ``fork()`` to ``os._exit()``.

The fork server has already imported ipykernel and friends but created no
zmq context, thread or event loop; everything of that kind is made here,
after the fork. Nothing here imports the daemon's Twisted side.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from . import sandbox

#: ipykernel's ipc transport names each socket ``{ip}-{port}``.
PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}


def connection_info(ipc_prefix: str, key: str) -> dict:
    """The Jupyter connection info of a kernel binding ipc sockets at ``ipc_prefix``."""
    info = {
        "transport": "ipc",
        "ip": ipc_prefix,
        "key": key,
        "signature_scheme": "hmac-sha256",
    }
    info.update({f"{name}_port": port for name, port in PORTS.items()})
    return info


def run(spec: dict, ready_fd: int, keep_fds: tuple[int, ...] = ()) -> None:
    """Turn this freshly forked process into a sandboxed kernel; never returns."""
    code = 1
    try:
        _prepare_process(ready_fd, keep_fds, spec["log"])
        missing = _enter_sandbox(spec, ready_fd)
        if missing and spec.get("userns"):
            # Namespaces work here, yet part of the box failed: run nothing
            # unconfined. Say why; the fork server logs it.
            os.write(ready_fd, b"E" + "; ".join(missing).encode()[:3000])
            return
        _start_kernel(spec, ready_fd, missing)
        code = 0
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _prepare_process(ready_fd: int, keep_fds: tuple[int, ...], log_path: str) -> None:
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    # Forget everything the fork server had open: other kernels' pipes, the
    # link to the spawner front, listening sockets.
    keep = {0, 1, 2, ready_fd, *keep_fds}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
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
    more so the kernel is PID 1 of its own PID namespace, hides every other
    kernel's dir, the control socket and the shared temp dirs behind fresh
    tmpfs mounts, and mounts a fresh /proc that shows only its own processes.
    """
    missing: list[str] = []
    uid, gid = os.getuid(), os.getgid()
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
    sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
    try:
        sandbox.drop_capabilities()
    except OSError as e:
        missing.append(f"dropping capabilities ({e.strerror})")
    sandbox.apply_rlimits(sandbox.Limits(**spec["limits"]))
    os.umask(0o007)
    work = spec["workdir"]
    os.chdir(work)
    private = spec["private"]
    os.environ.clear()
    os.environ.update(
        {
            "HOME": work,
            "IPYTHONDIR": os.path.join(private, "ipython"),
            "MPLCONFIGDIR": os.path.join(private, "matplotlib"),
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


def _become_pid1(ready_fd: int) -> None:
    """
    Fork into the new PID namespace; this process stays outside and waits.

    The fork server knows the outer process; it exits with the kernel, and
    SIGKILL of the process group (which both share) ends both.
    """
    pid = os.fork()
    if pid == 0:
        sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    os.close(ready_fd)
    # ipykernel interrupts by signalling its process group, which we share.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 0
            break
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


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


def _private_filesystem(spec: dict) -> list[str]:
    """Fresh tmpfs over shared and other kernels' dirs; our own dir bound back; a fresh /proc."""
    missing = []
    kdir = spec["dir"]
    try:
        sandbox.mount("none", "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
        keep = os.open(kdir, os.O_PATH | os.O_DIRECTORY)
        hidden: list[str] = []
        for path in ("/tmp", "/var/tmp", "/dev/shm", *spec.get("hide", ())):
            path = os.path.realpath(path)
            if not os.path.isdir(path) or any(path == h or path.startswith(h + "/") for h in hidden):
                continue
            hidden.append(path)
        # Python itself may live under a dir we hide (a venv in /tmp, reached
        # through a symlink): note how to put it back before hiding anything.
        python = _python_paths(hidden, tuple(os.path.realpath(p) for p in spec.get("hide", ())) + (kdir,))
        for path in hidden:
            sandbox.mount("tmpfs", path, "tmpfs", sandbox.MS_NOSUID | sandbox.MS_NODEV, "size=16m,mode=1777")
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
        # The path down to our dir exists only in our tmpfs; make it
        # traversable, not listable, like the real one.
        base = next((h for h in hidden if kdir.startswith(h + "/")), None)
        parent = os.path.dirname(kdir)
        while base is not None and parent != base and parent.startswith(base + "/"):
            os.chmod(parent, 0o111)
            parent = os.path.dirname(parent)
    except OSError as e:
        missing.append(f"a private view of the file system ({e.strerror})")
    try:
        sandbox.mount("proc", "/proc", "proc", sandbox.MS_NOSUID | sandbox.MS_NODEV | sandbox.MS_NOEXEC)
    except OSError as e:
        missing.append(f"a private /proc ({e.strerror})")
    return missing


def _reseed() -> None:
    """Each child must not share its random state with its siblings."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _inline_matplotlib() -> None:
    """
    Plots inline. The master imported pyplot before any shell existed, so
    matplotlib chose 'agg' and the inline backend never hooked into IPython:
    do now what importing it under a live shell would have done.
    """
    if "matplotlib" not in sys.modules:
        return
    try:
        import matplotlib
        from matplotlib_inline import backend_inline

        matplotlib.rcParams["backend"] = "module://matplotlib_inline.backend_inline"
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].switch_backend("module://matplotlib_inline.backend_inline")
        backend_inline._enable_matplotlib_integration()
    except Exception:  # a kernel without plots beats no kernel
        traceback.print_exc()


def _start_kernel(spec: dict, ready_fd: int, missing: list[str]) -> None:
    from ipykernel.kernelapp import IPKernelApp

    conn_file = os.path.join(spec["private"], "kernel.json")
    fd = os.open(conn_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(connection_info(spec["ipc_prefix"], spec["key"]), f)
    app = IPKernelApp.instance()
    app.initialize(
        [
            "-f",
            conn_file,
            "--HistoryManager.enabled=False",
            "--IPKernelApp.parent_handle=0",
            "--IPKernelApp.quiet=True",
            "--Session.key=" + spec["key"],
        ]
    )
    _inline_matplotlib()
    # Sockets are bound: tell the fork server we can take messages, and
    # which protections we could not have.
    os.write(ready_fd, b"R" + json.dumps(missing).encode())
    os.close(ready_fd)
    app.start()
