# -*- test-case-name: tests.test_e2e_kernel_api,tests.test_comms -*-
"""
The IPython kernel a forked child runs: ipykernel's app, kernel and shell,
adapted, and what the fork server prepares of them before forking.

In the fork server (the master), once: ``prepare_master`` defines the
classes, loads the config and makes the shell (no thread, socket or loop).
In each kernel, after its sandbox is set up (``kernel.child``):
``kernel_app`` binds the sockets, starts ipykernel's threads and adopts the
master's shell. Nothing here imports the daemon's Twisted side.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback

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


#: the kernel's listening ipc sockets by port, bound before its sandbox was
#: closed (``bind_ipc_sockets``); zmq takes them over (``ZMQ_USE_FD``)
PREBOUND: dict[int, int] = {}


def bind_ipc_sockets(ipc_prefix: str) -> None:
    """
    Bind and listen on the kernel's ipc socket files now, for zmq to use later.

    Made before the sandbox is closed, so that the kernel needs no right to
    create anything in its ipc dir (sockets, or the regular files the same
    right would let it make), and that dir can be read-only to it.
    No heartbeat socket: see ``init_heartbeat``.
    """
    import socket

    for name, port in PORTS.items():
        if name == "hb" or port in PREBOUND:
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(f"{ipc_prefix}-{port}")
            s.listen(100)
            s.setblocking(False)  # as zmq makes its own: accept never blocks its I/O thread
        except BaseException:
            s.close()
            raise
        PREBOUND[port] = s.detach()


def _inline_matplotlib() -> None:
    """
    Plots inline, in the shell there is now. The master imported pyplot
    before any shell existed, so matplotlib chose 'agg' and the inline
    backend never hooked into IPython: do what importing it under a live
    shell would have done (in the master once it has made the shell, else
    in each kernel).
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


#: the ``__file__`` of every module the fork server preloaded (``remember_modules``)
MASTER_MODULE_FILES: list[str] = []
#: and their names
MASTER_MODULE_NAMES: frozenset[str] = frozenset()
_APP_CLASS = None
_KERNEL_CLASS = None
_SHELL_CLASS = None
#: the shell the master made for every kernel to adopt (``_make_master_shell``), if any
MASTER_SHELL = None
#: what a kernel flavour (``kernel.sage``) does in each kernel before its app starts
_IN_KERNEL = None


def use_kernel_classes(kernel, shell, in_kernel=None) -> None:
    """
    In the master, before ``prepare_master``: kernels of another flavour
    (``kernel.sage``: subclasses of ``_kernel_class``'s kernel and shell),
    and ``in_kernel``, called in each kernel before its app is made.
    """
    global _KERNEL_CLASS, _SHELL_CLASS, _IN_KERNEL
    _KERNEL_CLASS, _SHELL_CLASS, _IN_KERNEL = kernel, shell, in_kernel


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

    With history off (``DummyDB``, no saving thread) making it starts
    nothing: no thread, no zmq context or socket, no event loop
    (tests/test_forkserver.py checks this master), so the master may make
    it before forking. Made in each kernel, it would be the bulk of the
    kernel's start-up (7 to 12 ms of ~40) and copy ~2.7 MiB of the
    master's pages into each kernel. What it learnt of this process (its
    dirs, its ``__main__``, the environment it set) each kernel puts right
    in ``_adopt_shell``; the zmq parts (display publisher, display hook)
    get their session and sockets from the kernel.
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
    except Exception:  # then each kernel makes its own
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

            def _try_bind_socket(self, s, port):
                """ipykernel's, but on the socket ``bind_ipc_sockets`` made, if it made one."""
                fd = PREBOUND.get(port)
                if self.transport != "ipc" or fd is None:
                    return super()._try_bind_socket(s, port)
                import zmq

                s.setsockopt(zmq.USE_FD, fd)
                s.bind(f"ipc://{self.ip}-{port}")
                return port

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

            @property
            def kernel_info(self) -> dict:
                """ipykernel's, without the "debugger" feature: see ``debug_request``."""
                info = super().kernel_info
                info["supported_features"] = [f for f in info["supported_features"] if f != "debugger"]
                return info

            async def debug_request(self, stream, ident, parent) -> None:
                """
                Refused, with an error reply: no debugger in a visitor's kernel.

                ipykernel's handler starts debugpy in the kernel (threads, an
                adapter process, a listening socket) for any client that asks,
                whatever the kernelspec says (``metadata.debugger: False``).
                """
                content = parent.get("content") or {}
                command = content.get("command") if isinstance(content, dict) else None
                reply = {
                    "status": "error",
                    "ename": "DebuggerDisabled",
                    "evalue": "this kernel has no debugger",
                    "traceback": [],
                    "type": "response",
                    "request_seq": content.get("seq", 0) if isinstance(content, dict) else 0,
                    "success": False,
                    "command": command if isinstance(command, str) else "",
                    "message": "this kernel has no debugger",
                }
                self.session.send(stream, "debug_reply", reply, parent, ident)

            async def do_debug_request(self, msg):
                """Never reached (``debug_request`` answers itself); refused all the same."""
                raise RuntimeError("this kernel has no debugger")

        _KERNEL_CLASS, _SHELL_CLASS = Kernel, Shell
    return _KERNEL_CLASS


def _shared_config():
    """The kernel app's settings that are the same for every kernel."""
    from traitlets.config import Config

    config = Config()
    config.IPKernelApp.parent_handle = 0
    config.IPKernelApp.quiet = True
    config.IPKernelApp.outstream_class = "sagecell_tw.kernel.output.OutStream"
    config.HistoryManager.enabled = False
    config.Kernel._execute_sleep = 0.0
    config.IPKernelApp.kernel_class = _kernel_class()
    return config


def kernel_app(private: str, ipc_prefix: str, key: str):
    """
    The initialized kernel app, bound to ipc sockets at ``ipc_prefix``
    (those ``bind_ipc_sockets`` made, if it was called), with its shell (the
    master's, adopted, or its own), ready to start. ``private``: a dir the
    kernel may write that is not the visitor's (its connection file, and
    IPython's dir unless IPYTHONDIR says otherwise).

    Besides ``_app_class``: no 0.5 ms sleep before each execute_reply
    (``Kernel._execute_sleep``, a mitigation for flushes that did not wait;
    ours do), stdout/stderr are ``output.OutStream`` (coalesced
    flushes, bounded backlog, no loss), and the kernel is ``_kernel_class``.
    """
    if _IN_KERNEL is not None:
        _IN_KERNEL()
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
    if MASTER_SHELL is None:  # this kernel made its own shell
        _inline_matplotlib()
        _first_format(app.shell)
    _lossless_iopub(app)
    _widget_targets()
    return app


def _widget_targets() -> None:
    """
    Register ipywidgets' comm targets with this kernel, where the master
    imported ipywidgets (``worker.zygote.preload``, Sage's own imports).
    ipywidgets registers them as it is imported, but only under a running
    kernel: imported in the master, before any, it registered nothing, and
    a browser opening ``jupyter.widget.control`` (how ipywidgets' page code
    asks for every widget's state, as a second cell of the kernel does)
    would hear "No such comm target registered".
    """
    widgets = sys.modules.get("ipywidgets")
    if widgets is not None:
        try:
            widgets.register_comm_target()
        except Exception:  # a kernel without widgets beats no kernel
            traceback.print_exc()


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
#: a stream message may be up to output.MAX_PENDING characters
IOPUB_SNDHWM = 16


def _lossless_iopub(app) -> None:
    """
    Make the iopub socket wait at its high-water mark instead of dropping.

    A PUB socket drops messages silently when its peer is slow; with
    ``XPUB_NODROP`` the IOPub thread blocks instead, and ``OutStream`` holds
    writers back (see ``kernel.output``): a slow browser slows the kernel's
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
