# -*- test-case-name: tests.test_cgroup -*-
"""
A memory cgroup per kernel: a limit on the real memory a kernel and every
process it starts (Sage's gp, maxima, gap, singular) hold together.

An address-space rlimit counts what a process maps, not what it uses, and
each process on its own: Sage maps ~1.8 GB it never touches, and each of
its pexpect programs would get its own limit. A memory cgroup counts the
pages the kernel's processes make their own (copy-on-write copies of the
master's, heap, its private /tmp's tmpfs); the master's pages it only
reads are charged to the master, not to it. Over the limit, Linux reclaims,
then kills the largest process in the cgroup: a kernel's gp, or the kernel
(its session sees the kernel die, and the reason: ``oom_kills``).

Three steps, three processes: the spawner, as root, makes one parent
cgroup inside its own and gives it to the worker account (``prepare``);
each kernel child, before it enters its namespaces, makes its own cgroup
under that parent, sets the limit and moves itself in (``join``), so all
it forks is inside; the fork server's manager removes it once the kernel
is dead (``remove``). No kernel can reach the cgroup file system after
that: its /sys is a fresh sysfs of its own, and Landlock covers the rest.

cgroup v1's memory controller is used where it is mounted (the kernel
writes ``memory.limit_in_bytes``). cgroup v2 needs more: the memory
controller enabled below the spawner's own cgroup (refused while that
cgroup holds processes, as the daemon's does unless it is a container's
root) and, for a kernel to move itself, the spawner's cgroup delegated to
the worker account. Where a step is refused, ``prepare`` or ``join`` says
why, and the daemon's log says it once.
Plain functions on paths: no Twisted, no zmq.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
CGROUPS = "/proc/self/cgroup"


@dataclass(frozen=True)
class Parent:
    """The cgroup kernels make theirs in: its path and cgroup version (1 or 2)."""

    path: str
    version: int

    def as_json(self) -> dict:
        return {"path": self.path, "version": self.version}


class Unavailable(Exception):
    """No memory cgroup for kernels here; the message says why, for the log."""


def own_memory_cgroup(mountinfo: str = MOUNTINFO, cgroups: str = CGROUPS) -> tuple[str, int]:
    """
    The dir of this process's own memory cgroup, and its version: v1's
    memory hierarchy if one is mounted, else v2's if it has the memory
    controller. Raises Unavailable.
    """
    with open(mountinfo) as f:
        mounts = [line.split() for line in f]
    with open(cgroups) as f:
        own = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = v2 = None
    for fields in mounts:
        try:
            dash = fields.index("-")
        except ValueError:
            continue
        fstype, options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
        if fstype == "cgroup" and "memory" in options.split(",") and v1 is None:
            v1 = (fields[3], fields[4])
        elif fstype == "cgroup2" and v2 is None:
            v2 = (fields[3], fields[4])
    if v1 is not None:
        path = next((p for _n, ctl, p in own if "memory" in ctl.split(",")), None)
        if path is not None:
            return _inside(v1, path), 1
    if v2 is not None:
        path = next((p for n, ctl, p in own if n == "0" and ctl == ""), None)
        if path is not None:
            root = _inside(v2, path)
            if "memory" in _read(os.path.join(v2[1], "cgroup.controllers")).split():
                return root, 2
            raise Unavailable(f"cgroup v2 at {v2[1]} has no memory controller")
    raise Unavailable("no memory cgroup hierarchy is mounted")


def _inside(mount: tuple[str, str], path: str) -> str:
    """Where cgroup ``path`` is, in a hierarchy whose ``root`` is mounted at ``point``."""
    root, point = mount
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return os.path.normpath(os.path.join(point, "" if rel == "." else rel))


def prepare(uid: int | None, gid: int | None, **where) -> Parent:
    """
    As root (or an account a cgroup was delegated to), before the drop:
    the parent cgroup of the kernels of the worker account ``uid``, inside
    our own, made (or found again: after a restart, or made by another
    daemon of the same account, whose kernels' cgroups sit beside ours,
    each named by its kernel's random id) and given to that account. One
    per account, kept: nothing left to remove once a daemon is gone.
    Raises Unavailable with the reason.
    """
    own, version = own_memory_cgroup(**where)
    path = os.path.join(own, f"sagecell-{os.getuid() if uid is None else uid}")
    try:
        if version == 2:
            _enable_memory(own)
        os.makedirs(path, exist_ok=True)
        if version == 2:
            _enable_memory(path)
        if uid is not None:
            os.chown(path, uid, gid if gid is not None else -1)
            for entry in ("cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"):
                if os.path.exists(os.path.join(path, entry)):
                    os.chown(os.path.join(path, entry), uid, gid if gid is not None else -1)
    except OSError as e:
        raise Unavailable(f"cgroup v{version} at {own}: {e.strerror}") from e
    return Parent(path, version)


def _enable_memory(path: str) -> None:
    """cgroup v2: the memory controller for the children of ``path`` (EBUSY where it holds processes itself)."""
    if "memory" not in _read(os.path.join(path, "cgroup.subtree_control")).split():
        with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")


def join(parent: dict, name: str, limit: int) -> str:
    """
    In a kernel child, before anything of the visitor's runs: make cgroup
    ``name`` under ``parent`` (``Parent.as_json``), limit it to ``limit``
    bytes of memory (swap included where it is counted), and move this
    process in; whatever it starts from now on is in it too. Its path.
    """
    path = os.path.join(parent["path"], name)
    os.mkdir(path, 0o755)
    if parent["version"] == 1:
        _write(path, "memory.limit_in_bytes", str(limit))
        if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
            _write(path, "memory.memsw.limit_in_bytes", str(limit))
    else:
        _write(path, "memory.max", str(limit))
        if os.path.exists(os.path.join(path, "memory.swap.max")):
            _write(path, "memory.swap.max", "0")
    _write(path, "cgroup.procs", str(os.getpid()))
    return path


def oom_kills(parent: dict, name: str) -> int:
    """How many processes of kernel ``name`` Linux killed for its memory limit (0 if unknown)."""
    path = os.path.join(parent["path"], name)
    text = _read(os.path.join(path, "memory.oom_control" if parent["version"] == 1 else "memory.events"))
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def remove(parent: dict, name: str) -> bool:
    """Remove kernel ``name``'s cgroup once its processes are gone; False while some still are (retry later)."""
    try:
        os.rmdir(os.path.join(parent["path"], name))
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    return True


def _write(path: str, entry: str, value: str) -> None:
    with open(os.path.join(path, entry), "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
