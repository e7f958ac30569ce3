# -*- test-case-name: tests.test_sage -*-
"""
Sage kernels: passagemath's Jupyter kernel, made ready once in the master.

passagemath's own kernel (``sage.repl.ipython_kernel.kernel.SageKernel``)
is ipykernel's with a shell that preparses (``2^10`` is 1024, ``1/2`` a
Rational, ``f(x) = x^2`` works), shows results through Sage's rich output
backend for Jupyter (plots as PNG, ``show`` as HTML with LaTeX), and knows
the ``%gp``, ``%gap``, ``%maxima``, ``%singular``... magics; its
``pre_handler_hook`` gives SIGINT to cysignals, so an interrupt stops PARI,
Maxima or GAP in the middle of a computation. That SIGINT comes from the
kernel's spawner (``interrupt_mode`` "signal", kernels.Kernel.interrupt):
PARI computes holding the GIL, so the kernel's control thread could not
take an ``interrupt_request`` before it is done. Here the same shell and
kernel are built on ``ipython_kernel``'s tuned ones.

In the master, once (``prepare`` before anything is imported, ``warm``
once the shell is made): Sage's globals, its magics and transformers, and
a first factorisation, integral, plot and typeset formula, so a session's
first cell does not pay for them (Maxima's start alone is ~1 s). In each
kernel (``in_kernel``): what must be the kernel's own, not the master's.
Nothing here imports the daemon's Twisted side.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile

#: the name passagemath's kernelspec has, which Jupyter clients ask for
KERNEL_NAME = "sagemath"

#: Set before Sage loads its libraries: each would otherwise start threads
#: in the master, and a fork copies a thread's locks but not the thread.
#: OpenBLAS starts a thread per core when loaded; ECL's Boehm GC starts
#: parallel marker threads at its init unless ``GC_MARKERS`` is 1 (then it
#: marks on the allocating thread); OpenMP code starts its pool on first use.
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "GC_MARKERS": "1"}

#: Sage's per-user dir (logs of its interfaces, GAP's workspace), in each
#: kernel's own state dir: its private /tmp (kernel_child._state_dir), out
#: of the work dir, which holds the visitor's files only. Sage modules copy
#: it as they are imported, in the master: it must be this one path for
#: every kernel.
DOT_SAGE = "/tmp/.kernel/sage"

#: GAP's memory (``-s``: what it maps at start; ``-o``: a hint, not a
#: limit: GAP maps more as it needs it), libgap's and each ``gap(...)``
#: program's. GAP's default maps 4 GB at once, which a kernel's
#: address-space limit would not allow. Its saved workspace loads into
#: ~150 MB.
GAP_MEMORY = "160m"

#: the dir, beside the kernel dirs, where the master keeps GAP's saved
#: workspaces (``gap_workspaces``); each kernel sees it read-only as
#: DOT_SAGE/gap, where Sage looks for them (kernel_child's ``binds``)
GAP_DIR = ".sage-gap"

#: What Sage put in the environment as it was imported (where Maxima's
#: images, ECL's libraries and PARI's data are), and the variables above:
#: each kernel starts with a fresh environment (kernel_child), plus these.
SAGE_ENVIRON: dict[str, str] = {}

#: the scratch dir the master imported Sage in (``prepare``), gone since: the
#: pexpect interfaces Sage made there start in each kernel's dir instead
#: (``_interfaces_here``)
SCRATCH: list[str] = []

#: what the master imports: Sage's command-line globals and its Jupyter
#: kernel, and pyplot, whatever else is preloaded: the master's shell sets
#: up inline figures only for a pyplot it has (ipython_kernel._inline_matplotlib)
MODULES = (
    "sage.all_cmdline",
    "sage.repl.ipython_kernel.all_jupyter",
    "sage.repl.ipython_kernel.kernel",
    "matplotlib.pyplot",
)


#: what the daemon's log says of Sage kernels' memory (kernel_child's notes)
MEMORY_NOTE = (
    "a limit on real memory (no memory cgroup of their own): Sage kernels are held by an "
    "address-space limit counted from their master's size"
)


def kernel_limits(limits):
    """
    ``limits`` (sandbox.Limits) for a kernel forked from this Sage master:
    the address-space limit counts from what the kernel starts with.

    Sage maps ~1.8 GB of address space before it computes anything (its
    libraries, PARI's stack, ECL's heap, GAP's workspace), nearly all of it
    never touched: an ``RLIMIT_AS`` of 1 GiB kills its kernels at once.
    So the limit is this master's size plus the configured amount: a Sage
    kernel may map ``address_space`` bytes more than it was born with, as a
    Python kernel may map about that much in all. Even so its own start
    (threads' stacks and malloc arenas) maps ~300 MB of that: where a
    memory cgroup holds the kernel (kernel.cgroup), which counts what it
    uses, not what it maps, see ``cgroup_address_space``.
    """
    import dataclasses

    if not limits.address_space or limits.address_space <= 0:
        return limits
    return dataclasses.replace(limits, address_space=limits.address_space + mapped_bytes())


#: where a memory cgroup holds real memory: the address space a Sage kernel may
#: map beyond its master's, in memory limits
CGROUP_ADDRESS_SPACE = 4


def cgroup_address_space(memory_limit: int) -> int:
    """
    The address-space limit of a kernel of this master that a memory
    cgroup of ``memory_limit`` bytes holds: this master's size plus
    CGROUP_ADDRESS_SPACE times the limit. The cgroup bounds what it uses;
    this only turns one allocation far beyond the limit (``2^(2^36)``, an
    8 GB integer) into a MemoryError at once, where the cgroup would
    end the kernel once its pages fill up.
    """
    return mapped_bytes() + CGROUP_ADDRESS_SPACE * memory_limit


def mapped_bytes() -> int:
    """This process's address space (VmSize), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def prepare() -> None:
    """
    In the master, before anything else is imported: no library may start a
    thread, and the kernel classes must be Sage's before any shell is made.
    """
    os.environ.update(SINGLE_THREADED)
    os.environ["DOT_SAGE"] = DOT_SAGE
    os.environ["SAGE_GAP_MEMORY"] = GAP_MEMORY
    from . import ipython as ipython_kernel

    before = dict(os.environ)
    made = [p for p in (os.path.dirname(DOT_SAGE), DOT_SAGE) if not os.path.exists(p)]
    # Sage's pexpect interfaces remember the dir they were made in: a scratch dir.
    cwd = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="sagecell-sage-master-")
    SCRATCH[:] = [scratch]
    os.chdir(scratch)
    try:
        for name in MODULES:
            importlib.import_module(name)
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)
        if made:  # Sage made DOT_SAGE in the host's /tmp: each kernel has its own
            shutil.rmtree(made[0], ignore_errors=True)
    SAGE_ENVIRON.update({k: v for k, v in os.environ.items() if before.get(k) != v})
    SAGE_ENVIRON.update(SINGLE_THREADED, DOT_SAGE=DOT_SAGE, SAGE_GAP_MEMORY=GAP_MEMORY)
    kernel, shell = kernel_classes()
    ipython_kernel.use_kernel_classes(kernel, shell, in_kernel)
    _contain_subprocesses()


def kernel_classes():
    """
    passagemath's ``SageKernel`` and ``SageZMQInteractiveShell``, made on
    ``ipython_kernel``'s kernel and shell (each tuning of those applies).
    """
    from cysignals import init_cysignals
    from sage.env import SAGE_VERSION
    from sage.repl.interpreter import SageNotebookInteractiveShell
    from sage.repl.ipython_kernel.kernel import SageKernel
    from traitlets import Type

    from . import ipython as ipython_kernel

    base_kernel = ipython_kernel._kernel_class()
    base_shell = ipython_kernel._SHELL_CLASS

    class Shell(SageNotebookInteractiveShell, base_shell):
        """Sage's notebook shell (preparser, rich output) on ours."""

    class Kernel(base_kernel):
        implementation = "sage"
        implementation_version = SAGE_VERSION
        shell_class = Type(Shell)
        banner = SageKernel.banner
        help_links = SageKernel.help_links

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            customize(self.shell)

        def pre_handler_hook(self) -> None:
            """SIGINT goes to cysignals while a request runs: it interrupts PARI, Maxima, GAP."""
            self.saved_sigint_handler = init_cysignals()

    return Kernel, Shell


def customize(shell) -> None:
    """
    Sage's magics, preparser and globals in ``shell``, once: in the master
    for its shell, so each kernel has them ready (the globals are ~2,000
    names), or in a kernel that had to make its own shell.
    """
    if getattr(shell, "_sage_customized", False):
        return
    from sage.repl.ipython_extension import SageJupyterCustomizations

    SageJupyterCustomizations(shell)
    shell._sage_customized = True


#: What a session's first cell most likely touches, each run once in the
#: master: the preparser, PARI, Maxima (its start is ~1 s), FLINT and linear
#: algebra, symbolic calculus, LaTeX, and a plot rendered through the
#: Jupyter backend to PNG (matplotlib, fonts).
WARM_UP = """\
_ = factor(2^64 - 1)
_ = integrate(sin(x)^2, x)
_ = integrate(x^2, x, 0, 1)
_ = diff(x^3 * cos(x), x).simplify_full()
_ = solve(x^2 - 2 == 0, x)
_ = matrix(QQ, [[1, 2], [3, 4]]).det()
_ = latex(sqrt(x) / 2)
_ = is_prime(2^61 - 1)
_ = QQ['y']([1, 2, 1]).factor()
"""

#: a Sage error, whose traceback is formatted once
WARM_UP_ERROR = "factor(0)"
WARM_UP_DISPLAY = ("plot(sin(x), (x, 0, pi))", "sqrt(x) / 2")


def warm(shell) -> list[str]:
    """
    In the master, its shell made: Sage's customizations, then the warm-up.
    Returns what failed (the kernels work without it, only slower).

    The warm-up runs in a scratch namespace, not the visitors', and its
    displays are formatted (rendered) but published nowhere.
    """
    failed = []
    customize(shell)
    ns = dict(shell.user_ns)
    try:
        exec(compile(shell.transform_cell(WARM_UP), "<sagecell warm-up>", "exec"), ns)  # noqa: S102
    except Exception as e:
        failed.append(f"warm-up ({e!r})")
    try:  # the first traceback reads and highlights source files: ~1 s
        eval(shell.transform_cell(WARM_UP_ERROR), ns)  # noqa: S307
    except Exception:
        etype, value, tb = sys.exc_info()
        shell.InteractiveTB.structured_traceback(etype, value, tb)
    for code in WARM_UP_DISPLAY:
        try:
            obj = eval(shell.transform_cell(code), ns)  # noqa: S307
            shell.display_formatter.format(obj)
        except Exception as e:
            failed.append(f"{code} ({e!r})")
    return failed


def prepare_gap() -> list[str]:
    """
    In the master: GAP's two interfaces imported (Sage imports them
    lazily), not started. ``gap(...)`` is set to start from the master's
    saved workspace (``_gap_from_the_masters_workspace``); libgap starts
    in the kernel that first uses it, from its saved workspace (~0.2 s).
    Started here, libgap would add ~100 MB of GAP's heap to the master's
    own pages, and every fork of the master copies the page tables of
    those: forking a kernel took twice as long. Returns what failed.
    """
    try:
        import sage.interfaces.gap  # noqa: F401
        import sage.libs.gap.libgap  # noqa: F401

        _gap_from_the_masters_workspace()
    except Exception as e:
        return [f"GAP's interfaces ({e!r})"]
    return []


def save_gap_workspaces(base_dir: str) -> bytes:
    """
    In a child of the master (it starts libgap and a ``gap`` program,
    which the master must not have): the workspaces each kernel's libgap
    and ``gap(...)`` start from (``-L``: ~0.2 s instead of ~1.5 s), saved
    in ``base_dir``'s GAP_DIR unless those there are up to date. b"ok"
    when both are there.
    """
    import sage.interfaces.gap as gap_interface
    from sage.libs.gap.saved_workspace import timestamp, workspace

    with _gap_workspaces_in(base_dir):
        from sage.interfaces.gap_workspace import gap_workspace_file

        path = gap_workspace_file()
        if not os.path.exists(path) or os.path.getmtime(path) < timestamp():
            gap_interface.WORKSPACE = path
            gap = gap_interface.Gap(use_workspace_cache=False)
            gap.save_workspace()
            gap.quit()
        libgap_path, up_to_date = workspace()
        if not up_to_date:
            from sage.libs.gap.libgap import libgap

            libgap(1)  # starts GAP, which then saves its workspace at libgap_path
    return b"ok" if os.path.exists(path) and os.path.exists(libgap_path) else b""


class _gap_workspaces_in:
    """Sage's GAP workspaces (DOT_SAGE/gap) in ``base_dir``'s GAP_DIR while inside."""

    def __init__(self, base_dir: str) -> None:
        self.dot_sage = os.path.join(base_dir, GAP_DIR)

    def __enter__(self) -> None:
        import sage.interfaces.gap_workspace as workspace

        os.makedirs(self.dot_sage, 0o755, exist_ok=True)
        workspace.DOT_SAGE, self.saved = self.dot_sage, workspace.DOT_SAGE

    def __exit__(self, *exc) -> None:
        import sage.interfaces.gap_workspace as workspace

        workspace.DOT_SAGE = self.saved


def gap_binds(base_dir: str) -> list[tuple[str, str]]:
    """(source, target): the master's GAP workspaces, read-only at the kernel's DOT_SAGE/gap."""
    source = os.path.join(base_dir, GAP_DIR, "gap")
    return [(source, os.path.join(DOT_SAGE, "gap"))] if os.path.isdir(source) else []


def in_kernel() -> None:
    """
    In each kernel, in its working dir, before its app starts: what it must
    not share with the master. Temporary files go to the kernel's own
    ``TMPDIR``, not the dir Python chose in the master; Sage's per-user dir
    (``DOT_SAGE``) and its temp dir are made.
    """
    tempfile.tempdir = None
    os.environ.update(SAGE_ENVIRON)
    _interfaces_here()
    state = os.path.dirname(os.environ.get("IPYTHONDIR", "")) or DOT_SAGE
    if not DOT_SAGE.startswith(state + "/"):
        # No private /tmp (no namespaces here): the state dir is in the
        # kernel dir. Sage's own copies of DOT_SAGE, made in the master,
        # still name /tmp: only what reads sage.env at run time moves.
        env = sys.modules.get("sage.env")
        os.environ["DOT_SAGE"] = os.path.join(state, "sage")
        if env is not None:
            env.DOT_SAGE = os.environ["DOT_SAGE"]
        _gap_workspace_in_dot_sage()
    os.makedirs(os.environ["DOT_SAGE"], mode=0o700, exist_ok=True)  # the pexpect interfaces log there
    _own_temp_dir(state)


#: the master's temp dir of Sage (``_own_temp_dir``), kept referenced in a
#: kernel: dropped, its finalizer would remove it, the master's own
MASTER_TEMP: list = []


def _own_temp_dir(state: str) -> None:
    """
    Sage's temporary files (``tmp_filename``: a 3D scene's page, ...) go
    in a dir Sage made as the master imported it, in the master's /tmp: a
    kernel with a private /tmp has no such dir, and without one kernels
    would share it. Each kernel makes its own, in its state dir: not among
    the visitor's files (the work dir, ``TMPDIR``), gone with the kernel.
    """
    temporary_file = sys.modules.get("sage.misc.temporary_file")
    if temporary_file is None:
        return
    MASTER_TEMP.append(temporary_file.TMP_DIR_FILENAME_BASE)
    where = state if os.path.isdir(state) else None
    temporary_file.TMP_DIR_FILENAME_BASE = tempfile.TemporaryDirectory(prefix="sage_", dir=where)


def _gap_workspace_in_dot_sage() -> None:
    """
    Without a private /tmp (so without the master's workspaces at
    DOT_SAGE/gap): ``gap(...)`` makes and uses its own in this kernel's
    DOT_SAGE, on its disk quota.
    """
    gap_interface = sys.modules.get("sage.interfaces.gap")
    workspace = sys.modules.get("sage.interfaces.gap_workspace")
    if gap_interface is None or workspace is None:
        return
    workspace.DOT_SAGE = os.environ["DOT_SAGE"]
    old, gap_interface.WORKSPACE = gap_interface.WORKSPACE, workspace.gap_workspace_file()
    command = getattr(gap_interface.gap, "_Expect__command", None)
    if isinstance(command, str):
        gap_interface.gap._Expect__command = command.replace(old, gap_interface.WORKSPACE)


def _gap_from_the_masters_workspace() -> None:
    """
    In the master, for its kernels: a kernel's ``gap(...)`` starts from
    the master's saved workspace (read-only there: ``gap_binds``) as it
    is: no check of its age, no touching it, no new one when a start
    fails (Sage's ``Gap._start`` does all three where it may write).
    """
    import sage.interfaces.gap as gap_interface

    Gap = gap_interface.Gap
    start = Gap._start

    def _start(self):
        cached = self._Gap__use_workspace_cache
        if cached and os.path.exists(gap_interface.WORKSPACE):
            self._Gap__use_workspace_cache = False
        try:
            start(self)
        finally:
            self._Gap__use_workspace_cache = cached

    Gap._start = _start


def _interfaces_here() -> None:
    """
    Sage's pexpect interfaces made in the master as Sage was imported
    (``gp``, ``maxima``...) start their program in the dir they were made
    in, the master's scratch dir: here, in the kernel's working dir.
    """
    quit = sys.modules.get("sage.interfaces.quit")
    if quit is None or not SCRATCH:
        return
    here = os.getcwd()
    for ref in quit.expect_objects:
        interface = ref()
        if interface is not None and getattr(interface, "_Expect__path", None) == SCRATCH[0]:
            interface._Expect__path = here


def _contain_subprocesses() -> None:
    """
    Sage's pexpect interfaces (``gp(...)``, ``%maxima``, ``gap(...)``...)
    run programs in a pty, each in a session of its own: outside the
    kernel's process group, so ending the group would miss them. They get
    SIGKILL when the kernel dies (``PR_SET_PDEATHSIG``), and run inside its
    sandbox and rlimits, which they inherit.
    """
    try:
        from sage.interfaces.sagespawn import SageSpawn
    except ImportError:
        return
    from . import sandbox

    spawn = SageSpawn._spawnpty

    def _spawnpty(self, args, **kwargs):
        inner = kwargs.get("preexec_fn")

        def preexec() -> None:
            sandbox.prctl(sandbox.PR_SET_PDEATHSIG, 9)
            if inner is not None:
                inner()

        kwargs["preexec_fn"] = preexec
        return spawn(self, args, **kwargs)

    SageSpawn._spawnpty = _spawnpty
    _end_quit_programs_sooner()


#: seconds between the signals Sage sends a program it quit (CONT, INT, HUP, TERM, KILL)
QUIT_INTERVAL = 0.25


def _end_quit_programs_sooner() -> None:
    """
    A program Sage quits (``gap(...)`` after an interrupt: it quits and
    restarts GAP) is ended in the background by a fork of the kernel that
    signals its process group, 5 s between signals: a GAP busy in a loop
    ignores SIGINT and burned the kernel's CPU for 10 s more. Here it is
    QUIT_INTERVAL between signals.
    """
    try:
        from sage.interfaces.sagespawn import SagePtyProcess
    except ImportError:
        return
    terminate = SagePtyProcess.terminate_async

    def terminate_async(self, interval=QUIT_INTERVAL):
        return terminate(self, interval=min(interval, QUIT_INTERVAL))

    SagePtyProcess.terminate_async = terminate_async
