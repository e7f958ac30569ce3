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
        _enter_sandbox(spec)
        _start_kernel(spec, ready_fd)
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


def _enter_sandbox(spec: dict) -> None:
    uid, gid = os.getuid(), os.getgid()
    if spec.get("userns"):
        extra = 0 if spec.get("network") else sandbox.CLONE_NEWNET
        sandbox.enter_user_namespace(uid, gid, extra)
        if not spec.get("network"):
            sandbox.bring_up_loopback()
    sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
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


def _start_kernel(spec: dict, ready_fd: int) -> None:
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
    # Sockets are bound: tell the fork server we can take messages.
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    app.start()
