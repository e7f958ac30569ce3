# -*- test-case-name: tests.test_forkserver -*-
"""
Which host process each kernel is, kept where no kernel can write.

The fork server's manager records each kernel's host pid, with the process's
start time (against pid reuse) and the manager that owns it, in
``BASE_DIR/.records``: a 0700 dir of the worker account that every kernel
has hidden (the tmpfs over the base dir, and Landlock). A later manager
adopts a kernel in use, or ends a leftover one, by these records only, and
only once the process really is that kernel: the same start time, our
account's, alive and not a zombie. A kernel's own dir is never trusted for
any of this: the code in it may write there.

Plain functions on paths and pids: the manager, the spawner's keeper and
the tests use them; nothing here forks or imports the kernel side.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
from dataclasses import dataclass

DIR = ".records"
#: a kernel's id: 128 random bits, chosen by the kernel itself (kernel.child)
KERNEL_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Record:
    pid: int
    #: the process's start time (field 22 of /proc/PID/stat)
    start: str
    #: the manager that forked or adopted it: "PID:START" (see ``owner_tag``)
    owner: str


def path(base_dir: str) -> str:
    return os.path.join(base_dir, DIR)


def prepare(base_dir: str) -> None:
    """Make the records dir: ours only (0700), whatever was there before."""
    os.makedirs(path(base_dir), mode=0o700, exist_ok=True)
    os.chmod(path(base_dir), 0o700)


def valid_id(kid: str) -> bool:
    return bool(KERNEL_ID.fullmatch(kid))


def start_time(pid: int) -> str | None:
    """The start time of ``pid``: tells a reused pid from the process we recorded."""
    stat_fields = _stat(pid)
    return stat_fields[19] if stat_fields is not None and len(stat_fields) > 19 else None


def zombie(pid: int) -> bool:
    """True for a zombie, a dead process, or one we cannot see."""
    stat_fields = _stat(pid)
    return stat_fields is None or stat_fields[0] in ("Z", "X")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def real_uid(pid: int) -> int | None:
    """The real uid of ``pid`` as our user namespace sees it (not /proc's owner, which a non-dumpable process changes)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def owner_tag(pid: int | None = None) -> str:
    """This process (or ``pid``) as a record's owner: its pid and start time."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def write(base_dir: str, kid: str, pid: int, owner: str) -> None:
    """Record that kernel ``kid`` is host process ``pid``, owned by manager ``owner``."""
    if not valid_id(kid):
        raise ValueError(f"not a kernel id: {kid!r}")
    target = os.path.join(path(base_dir), kid)
    tmp = target + ".new"
    with open(tmp, "w") as f:
        json.dump({"pid": pid, "start": start_time(pid), "owner": owner}, f)
    os.replace(tmp, target)


def read(base_dir: str, kid: str) -> Record | None:
    if not valid_id(kid):
        return None
    try:
        with open(os.path.join(path(base_dir), kid)) as f:
            data = json.load(f)
        return Record(int(data["pid"]), str(data["start"]), str(data.get("owner", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(base_dir: str, kid: str) -> None:
    if valid_id(kid):
        try:
            os.unlink(os.path.join(path(base_dir), kid))
        except FileNotFoundError:
            pass


def kernel_ids(base_dir: str) -> list[str]:
    """Every kernel id with a record."""
    try:
        return [n for n in os.listdir(path(base_dir)) if valid_id(n)]
    except OSError:
        return []


def is_kernel(record: Record) -> bool:
    """The recorded process still runs, is the one recorded (start time), and is our account's."""
    pid = record.pid
    return pid > 1 and start_time(pid) == record.start and real_uid(pid) == os.getuid() and not zombie(pid)


def killpg(pid: int) -> None:
    """SIGKILL the kernel's process group, and the process itself (a PID namespace's init takes its namespace along)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError as e:  # pragma: no cover
            if e.errno != errno.ESRCH:
                raise


def end(base_dir: str, kid: str) -> None:
    """End the kernel ``kid`` if its record shows it still runs; remove its dir and record."""
    record = read(base_dir, kid)
    if record is not None and is_kernel(record):
        killpg(record.pid)
    if valid_id(kid):
        remove_tree(os.path.join(base_dir, kid))
    remove(base_dir, kid)


def remove_tree(tree: str) -> None:
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

    shutil.rmtree(tree, onerror=fix)
    if os.path.lexists(tree):
        shutil.rmtree(tree, ignore_errors=True)
