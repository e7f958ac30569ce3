# -*- test-case-name: tests.test_spawner -*-
"""
What runs in a forked kernel child, from ``fork()`` to ``os._exit()``.

The fork server has already imported ipykernel and friends but created no
zmq context, thread or event loop; everything of that kind is made here,
after the fork. Nothing here imports the daemon's Twisted side.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
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
    more so the kernel is PID 1 of its own PID namespace (the process that
    forked exits: see ``_become_pid1``), hides every other
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
    if sandbox.landlock_abi() < 1:
        spec.setdefault("notes", []).append("Landlock (not in this Linux): the kernel may read what its account may")
    else:
        try:
            sandbox.landlock(landlock_rules(spec))
        except OSError as e:
            missing.append(f"Landlock ({e.strerror})")
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


#: what every kernel may read (and run): the system's programs, libraries and settings
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")


def landlock_rules(spec: dict) -> list[tuple[str, int]]:
    """
    What a kernel may open: its own dir and private temp dirs in full; the
    system's dirs, Python's and those on ``sys.path`` to read; devices; its
    own /proc. Nothing else, even where its account may: the daemon's files
    when both run as one account, the other accounts' world-readable ones.
    """
    every = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path)
    # Never "/" (a PYTHONPATH of "/" must not open up everything).
    python = {p for p in every if p and os.path.isabs(p) and os.path.normpath(p) != "/"}
    return [
        *((d, sandbox.READ) for d in (*SYSTEM_DIRS, *sorted(python))),
        ("/dev", sandbox.DEVICES),
        ("/proc", sandbox.READ | sandbox.FS_WRITE_FILE),
        *((d, sandbox.EVERYTHING) for d in (spec["dir"], *SCRATCH)),
    ]


def _become_pid1(ready_fd: int) -> None:
    """
    Fork into the new PID namespace; this process reports the kernel and exits.

    ``unshare(CLONE_NEWPID)`` puts our next child, not us, in the new
    namespace. That child goes on as the kernel (PID 1 there); this process
    tells the fork server the kernel's host pid ("P" on the ready pipe) and
    exits, and the fork server, a child subreaper, becomes the kernel's
    parent. No process waits outside each kernel (one fork of the master
    less per kernel: ~2 MiB private memory). The kernel goes on only once
    "P" is written, so the fork server hears it before anything else from
    the kernel.
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
#: mounts left writable: devices (writes reach the device, not a file
#: system) would be harmless read-only too, but a pty needs /dev/pts
WRITABLE = ("/dev/pts",)


def _hidden_dirs(spec: dict) -> tuple[str, ...]:
    """``HIDDEN``, the dirs the spec names, and this account's home (the daemon's, when not root)."""
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a uid with no account: no home to hide
        home = ""
    return (*HIDDEN, *spec.get("hide", ()), *([home] if home not in ("", "/") else []))


def _private_filesystem(spec: dict) -> list[str]:
    """
    Fresh tmpfs over shared dirs, homes and other kernels' dirs; our own dir
    bound back; every other mount read-only; a fresh /proc.

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
        # What we built in the hiding tmpfs is done: all but the scratch
        # dirs become read-only.
        for path in hidden:
            if path not in scratch:
                sandbox.mount("none", path, None, sandbox.MS_REMOUNT | sandbox.MS_RDONLY | sandbox.MS_NOSUID | sandbox.MS_NODEV)
    except OSError as e:
        missing.append(f"a private view of the file system ({e.strerror})")
        return missing + _proc()
    try:
        _read_only(inherited, [*hidden, kdir])
    except OSError as e:
        missing.append(f"a read-only view of the system's files ({e.strerror})")
    return missing + _proc()


def _read_only(inherited: list[str], ours: list[str]) -> None:
    """Remount read-only every mount we inherited, except those our own mounts now cover."""
    for point in inherited:
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in ("/proc", *WRITABLE, *ours)):
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
    app = kernel_app(spec["private"], spec["ipc_prefix"], spec["key"])
    if MASTER_SHELL is None:
        _inline_matplotlib()
        _first_format(app.shell)
    _lossless_iopub(app)
    # Sockets are bound: tell the fork server we can take messages, and
    # which protections we could not have.
    os.write(ready_fd, b"R" + json.dumps(missing).encode())
    os.close(ready_fd)
    app.start()


#: the ``__file__`` of every module the fork server preloaded (``remember_modules``)
MASTER_MODULE_FILES: list[str] = []
#: and their names
MASTER_MODULE_NAMES: frozenset[str] = frozenset()
_APP_CLASS = None
_KERNEL_CLASS = None
_SHELL_CLASS = None
#: the shell the master made for every kernel to adopt (``_make_master_shell``), if any
MASTER_SHELL = None


def prepare_master() -> None:
    """
    In the fork server, once, after preloading: what every kernel would repeat.

    Any page a kernel writes to after the fork becomes its own. Defining the
    app class (traitlets walks every trait of the class), creating the (not
    yet initialized: no socket, thread or loop) app instance and switching
    matplotlib to the inline backend here instead of in each kernel saves
    ~5 MiB and ~12 ms per kernel (bench/bench_output.py); so does making
    the IPython shell here (``_make_master_shell``): ~7 ms and ~2.7 MiB more.
    """
    global MASTER_SHELL
    remember_modules()
    _kernel_class()
    app = _app_class().instance()
    app.update_config(_shared_config())
    if "matplotlib.pyplot" in sys.modules:
        try:
            sys.modules["matplotlib.pyplot"].switch_backend("module://matplotlib_inline.backend_inline")
        except Exception:  # _inline_matplotlib tries again in each kernel
            pass
    MASTER_SHELL = _make_master_shell(app)


def _make_master_shell(app):
    """
    The kernels' IPython shell, made once in the master; None if that failed.

    DESIGN.md had the master make no InteractiveShell, for fear of what it
    starts. With history off (``DummyDB``, no saving thread) it starts
    nothing: no thread, no zmq context or socket, no event loop
    (tests/test_forkserver.py checks this master). Making it was the bulk
    of a kernel's start-up in the kernel (7 to 12 ms of ~40), and it
    copied ~2.7 MiB of the master's pages into each kernel. What it learnt of this process (its dirs, its
    ``__main__``, the environment it set) each kernel puts right in
    ``_adopt_shell``; the zmq parts (display publisher, display hook) get
    their session and sockets from the kernel, as always.
    """
    import atexit

    from ipykernel.compiler import XCachingCompiler
    from IPython.core.application import BaseIPythonApplication

    main = sys.modules.get("__main__")
    hook = sys.excepthook
    threads = _thread_count()
    try:
        # Config files and a profile, as the app would load them in a
        # kernel: the shell takes its settings from them as it is made.
        BaseIPythonApplication.initialize(app, [])
        shell = _SHELL_CLASS.instance(
            parent=app,
            profile_dir=app.profile_dir,
            user_module=None,
            user_ns=None,
            kernel=None,
            compiler_class=XCachingCompiler,
        )
        _inline_matplotlib()
        _first_format(shell)
    except Exception:  # each kernel makes its own, as before
        traceback.print_exc()
        _SHELL_CLASS.clear_instance()  # no half-made shell for a kernel to adopt
        return None
    finally:
        sys.excepthook = hook
        if main is not None:
            sys.modules["__main__"] = main  # the shell made its namespace __main__
    # The master never runs the shell's exit operations (a kernel, if ever,
    # runs its own).
    atexit.unregister(shell.atexit_operations)
    if _thread_count() != threads:  # a config file turned something on
        sys.stderr.write(
            "sagecell fork server: making the IPython shell started a thread; a fork may "
            "copy a lock it holds. Check the IPython config files (HistoryManager is off here).\n"
        )
    return shell


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _adopt_shell(shell, kernel) -> None:
    """
    In a kernel: make the master's shell this kernel's.

    ``IPythonKernel.__init__`` got it from ``instance()`` (the singleton
    the master made) and gave its display hook and publisher this kernel's
    session and sockets; the rest is what the shell took from the master
    when it was made: its parent and kernel, its profile and dirs, the
    working dir in ``_dh``, the environment variables it sets, and the
    module it puts in ``sys.modules`` as ``__main__``.
    """
    from pathlib import Path

    app = kernel.parent
    shell.parent = kernel
    shell.kernel = kernel
    shell.ipython_dir = app.ipython_dir
    shell.profile_dir = app.profile_dir
    shell.home_dir = os.environ.get("HOME", shell.home_dir)
    shell.starting_dir = os.getcwd()
    shell.history_manager.dir_hist[:] = [Path.cwd()]
    shell.init_environment()
    shell.init_sys_modules()
    shell._logger = None  # made on first use, in the home dir it finds then


def _first_format(shell) -> None:
    """
    The display formatter's first call resolves its deferred printers
    (~4 ms): pay it before the visitor's first cell. The daemon's silent
    warm-up cell (kernels.Kernel._warm_up) cannot: silent cells display
    nothing.
    """
    shell.display_formatter.format(2)


def remember_modules() -> None:
    """
    List the loaded modules' files and names once, in the master.

    ``IPythonKernel.__init__`` makes this list (for the debugger's
    just-my-code rules) by touching every loaded module object; with numpy,
    sympy and matplotlib loaded that changes ~3,000 reference counts and
    copies ~7 MiB of the master's pages into each kernel. Each kernel gets
    this copy instead.
    """
    global MASTER_MODULE_NAMES
    MASTER_MODULE_FILES[:] = [f for m in list(sys.modules.values()) if isinstance(f := getattr(m, "__file__", None), str)]
    MASTER_MODULE_NAMES = frozenset(sys.modules)


def _app_class():
    """
    ``IPKernelApp`` for a forked kernel, tuned (each saving measured in bench/):

    - configured through ``self.config``, never argv: traitlets would build
      an argparse parser over every trait of every class (~4 MiB of copied
      pages and ~5 ms per kernel);
    - no kernel subshells: shell requests go straight to the main thread,
      one thread hop less per request, one thread and event loop less.
    """
    global _APP_CLASS
    if _APP_CLASS is None:
        from ipykernel.kernelapp import IPKernelApp

        class KernelApp(IPKernelApp):
            def parse_command_line(self, argv=None) -> None:
                """Everything comes in ``self.config``."""

            def init_heartbeat(self) -> None:
                """
                None: the fork server sees a kernel die (it is its child) and
                no client reaches the hb socket through a WebSocket. A
                heartbeat would cost a thread and a zmq context of its own
                (two more native threads) in every kernel.
                """

            def init_control(self, context) -> None:
                """ipykernel's, but no shell channel thread is made (nor its event loop)."""
                import ipykernel.kernelapp

                made = ipykernel.kernelapp.ShellChannelThread
                ipykernel.kernelapp.ShellChannelThread = lambda *args, **kwargs: _NoShellChannelThread()
                try:
                    super().init_control(context)
                finally:
                    ipykernel.kernelapp.ShellChannelThread = made

            #: the connection info ``kernel_app`` wrote to ``connection_file``
            connection: dict | None = None

            def init_connection_file(self) -> None:
                """From the info we wrote, not by finding and reading the file back."""
                if self.connection is None:
                    super().init_connection_file()
                else:
                    self.load_connection_info(self.connection)

            def write_connection_file(self, **kwargs) -> None:
                """Nothing to add: ipc ports are fixed, so the file we wrote is complete."""
                if self.connection is None:
                    super().write_connection_file(**kwargs)

            def log_connection_info(self) -> None:
                """None: "to connect another client" is for people at a terminal, not the kernel's log."""

            def init_code(self) -> None:
                """
                IPython's, minus what a fresh private profile never has
                (startup files, exec lines, a script to run), and with the
                master's module names: ``set(sys.modules)`` here would touch
                ~3,000 names and copy ~2 MiB of pages.
                """
                self.shell.user_ns_hidden.update(self.shell.user_ns)
                self.shell._sys_modules_keys = MASTER_MODULE_NAMES or frozenset(sys.modules)

        _APP_CLASS = KernelApp
    return _APP_CLASS


class _NoShellChannelThread:
    """
    What ipykernel reads of the shell channel thread we do without.

    Falsy, as None is, where ipykernel asks whether there is one; but its
    path for cells that ``await`` reads ``parent_thread`` (the thread that
    runs cells: this one) without asking, and failed on None: the kernel
    never answered such a cell.
    """

    def __init__(self) -> None:
        import threading

        self.parent_thread = threading.current_thread()

    def __bool__(self) -> bool:
        return False


def _kernel_class():
    """
    The kernel, whose shell does without IPython 9's copy of all printed output.

    ``InteractiveShell.run_cell`` tees stdout and stderr into
    ``history_manager.outputs`` and never lets go of it (even with history
    off): a loop printing 3M lines took a kernel past 1 GiB. Here, printed
    output goes to the browser only. Nor does the shell compile each cell
    twice more to learn that it is not async (``should_run_async``).
    """
    global _KERNEL_CLASS, _SHELL_CLASS
    if _KERNEL_CLASS is None:
        from ipykernel.ipkernel import IPythonKernel
        from ipykernel.zmqshell import ZMQInteractiveShell
        from traitlets import Type

        class Shell(ZMQInteractiveShell):
            @contextlib.contextmanager
            def _tee(self, channel):
                yield

            def should_run_async(self, raw_cell, *, transformed_cell=None, preprocessing_exc_tuple=None) -> bool:
                """
                IPython's answer, without compiling a cell that cannot be async.

                IPython compiles the whole cell to find out, and is asked
                twice per execution: ~5 ms for a 300-line cell, before it
                runs. A cell is a coroutine only through ``await``, ``async
                for``, ``async with`` or an async comprehension: without
                either word in its text, it is not one.
                """
                if transformed_cell is not None and "await" not in transformed_cell and "async" not in transformed_cell:
                    return False
                return super().should_run_async(
                    raw_cell, transformed_cell=transformed_cell, preprocessing_exc_tuple=preprocessing_exc_tuple
                )

        class Kernel(IPythonKernel):
            shell_class = Type(Shell)

            def __init__(self, **kwargs) -> None:
                super().__init__(**kwargs)
                if self.shell.kernel is not self:  # the master's (``_make_master_shell``)
                    _adopt_shell(self.shell, self)

            @contextlib.contextmanager
            def _cancel_on_sigint(self, future):
                """
                ipykernel's: an interrupt (SIGINT) cancels a cell that awaits.

                Its handler scheduled the cancel with tornado's
                ``add_callback``, which from the loop's own thread is a plain
                ``call_soon``: the loop, asleep in its selector, woke only
                when the cell's own timer did (``await asyncio.sleep(30)``
                took 30 s to interrupt). ``call_soon_threadsafe`` wakes it.
                """
                import asyncio

                loop = asyncio.get_running_loop()

                def cancel(*_args) -> None:
                    loop.call_soon_threadsafe(lambda: future.done() or future.cancel())

                saved = signal.signal(signal.SIGINT, cancel)
                try:
                    yield
                finally:
                    signal.signal(signal.SIGINT, saved)

            @property
            def _supports_kernel_subshells(self) -> bool:
                return bool(self.shell_channel_thread)  # not "is not None": see _NoShellChannelThread

        _KERNEL_CLASS, _SHELL_CLASS = Kernel, Shell
    return _KERNEL_CLASS


def _shared_config():
    """The kernel app's settings that are the same for every kernel."""
    from traitlets.config import Config

    config = Config()
    config.IPKernelApp.parent_handle = 0
    config.IPKernelApp.quiet = True
    config.IPKernelApp.outstream_class = "sagecell_tw.kernel_output.OutStream"
    config.HistoryManager.enabled = False
    config.Kernel._execute_sleep = 0.0
    config.IPKernelApp.kernel_class = _kernel_class()
    return config


def kernel_app(private: str, ipc_prefix: str, key: str):
    """
    The initialized kernel app, bound to ipc sockets at ``ipc_prefix``.

    Besides ``_app_class``: no 0.5 ms sleep before each execute_reply
    (``Kernel._execute_sleep``, a mitigation for flushes that did not wait;
    ours do), stdout/stderr are ``kernel_output.OutStream`` (coalesced
    flushes, bounded backlog, no loss), and the kernel is ``_kernel_class``.
    """
    conn_file = os.path.join(private, "kernel.json")
    info = connection_info(ipc_prefix, key)
    fd = os.open(conn_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    config = _shared_config()
    config.IPKernelApp.connection_file = conn_file
    config.Session.key = key.encode()
    app = _app_class().instance()
    app.connection = info
    if app.profile_dir is not None:
        # The master's (``_make_master_shell``): a kernel has a profile of its own.
        master = app.profile_dir.location
        app.config_file_paths = [p for p in app.config_file_paths if p != master]
        app.profile_dir = None
    ipython_dir = os.environ.get("IPYTHONDIR") or os.path.join(private, "ipython")
    os.makedirs(ipython_dir, exist_ok=True)
    app.ipython_dir = ipython_dir
    app.update_config(config)
    with _module_list_from_master():
        app.initialize([])
    # traitlets leaves the logger at DEBUG and filters in the handler: every
    # request then builds four log records for nothing.
    app.log.setLevel(app.log_level)
    if MASTER_MODULE_FILES:
        app.kernel._kernel_modules = MASTER_MODULE_FILES
        debugger = getattr(app.kernel, "debugger", None)
        if debugger is not None:
            debugger.kernel_modules = MASTER_MODULE_FILES
    return app


class _SysWithoutModules:
    """``sys``, but with an empty ``modules``: see ``remember_modules``."""

    modules: dict = {}

    def __getattr__(self, name: str):
        return getattr(sys, name)


@contextlib.contextmanager
def _module_list_from_master():
    if not MASTER_MODULE_FILES:
        yield
        return
    import ipykernel.ipkernel

    ipykernel.ipkernel.sys = _SysWithoutModules()
    try:
        yield
    finally:
        ipykernel.ipkernel.sys = sys


#: iopub messages a kernel queues for a daemon that is not reading: few, as
#: a stream message may be up to kernel_output.MAX_PENDING characters
IOPUB_SNDHWM = 16


def _lossless_iopub(app) -> None:
    """
    Make the iopub socket wait at its high-water mark instead of dropping.

    A PUB socket drops messages silently when its peer is slow; with
    ``XPUB_NODROP`` the IOPub thread blocks instead, and ``OutStream`` holds
    writers back (see ``kernel_output``): a slow browser slows the kernel's
    output, it never loses it. The socket belongs to the IOPub thread, so the
    option is set there.
    """
    import threading

    import zmq

    done = threading.Event()

    def set_option() -> None:
        try:
            app.iopub_thread.socket.setsockopt(zmq.XPUB_NODROP, 1)
            # For pipes made from now on: the daemon connects after "ready".
            app.iopub_thread.socket.setsockopt(zmq.SNDHWM, IOPUB_SNDHWM)
        finally:
            done.set()

    app.iopub_thread.schedule(set_option)
    done.wait(5.0)
