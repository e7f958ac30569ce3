# -*- test-case-name: tests.test_sandbox -*-
"""
The operating-system walls around one kernel: namespaces, rlimits, identity.

Plain functions over the Linux system calls, used by the fork server (to drop
to the worker account) and by each forked kernel child (to box itself in).
Nothing here imports Twisted or zmq: it runs on both sides of ``fork()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import grp
import os
import re
import resource
import stat
from dataclasses import dataclass

from ..accounts import Account

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2); Python 3.11 has no os.unshare."""
    _check(_libc.unshare(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


#: statvfs flags of a mount, and the mount flags that keep them on a remount
_KEPT_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


def mount_points() -> list[str]:
    """This process's mount points, in the order they were mounted (``/proc/self/mountinfo``)."""
    with open("/proc/self/mountinfo") as f:
        points = [fields[4] for fields in map(str.split, f) if len(fields) > 4]
    # Octal escapes for space, tab, newline and backslash.
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]


def remount_read_only(path: str) -> None:
    """
    Make the mount at ``path`` read-only in this mount namespace.

    Its other flags are kept: in a user namespace the mounts inherited from
    the host are locked, and a remount that would clear nosuid, nodev,
    noexec or the atime mode is refused.
    """
    have = os.statvfs(path).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for st, ms in _KEPT_FLAGS:
        if have & st:
            flags |= ms
    try:
        mount("none", path, None, flags)
    except OSError as e:
        if e.errno != errno.EPERM or flags & (MS_NOATIME | MS_RELATIME):
            raise
        mount("none", path, None, flags | MS_STRICTATIME)  # statvfs does not say "strictatime"


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), "prctl")


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every kernel (bytes, seconds, counts)."""

    address_space: int = 1 << 30
    cpu_seconds: int = 600
    processes: int = 64
    file_size: int = 100 << 20
    open_files: int = 256

    def as_json(self) -> dict:
        return dict(self.__dict__)


def close_fds_except(keep) -> None:
    """Close every file descriptor of this process that is not in ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def apply_rlimits(limits: Limits) -> None:
    """Set the kernel's rlimits; soft and hard alike so code cannot raise them."""
    pairs = [
        (resource.RLIMIT_AS, limits.address_space),
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.file_size),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in pairs:
        if value is None or value <= 0 and which != resource.RLIMIT_CORE:
            continue
        resource.setrlimit(which, (value, value))
    if limits.processes and limits.processes > 0:
        # RLIMIT_NPROC counts every process of the uid, pool included: the
        # caller adds the pool's share before passing it in.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def group_id(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def drop_privileges(account: Account) -> None:
    """Become ``account`` for good: no supplementary groups, real=effective=saved."""
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - defensive
        raise OSError(errno.EPERM, "still root after dropping privileges")


def enter_user_namespace(outer_uid: int, outer_gid: int, extra: int = 0) -> None:
    """
    Unshare a user namespace (plus ``extra`` namespaces) mapping our own ids.

    Inside, the process keeps its uid but gains the capabilities it needs to
    set up the other namespaces, which it can never use outside.
    """
    # A process that changed uid is not dumpable, and then its /proc files
    # belong to root: it could not write its own id maps.
    prctl(PR_SET_DUMPABLE, 1)
    unshare(CLONE_NEWUSER | extra)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{outer_uid} {outer_uid} 1\n")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{outer_gid} {outer_gid} 1\n")


def bring_up_loopback() -> None:
    """Set ``lo`` up in a fresh network namespace (kernels' own 127.0.0.1 only)."""
    import fcntl
    import socket
    import struct

    SIOCGIFFLAGS = 0x8913
    SIOCSIFFLAGS = 0x8914
    IFF_UP = 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """
    Give up every capability, for good: bounding, ambient, and the three sets.

    Entering a user namespace grants a full set inside it; with them the
    code could unmount the tmpfs that hides the host's /tmp, or mount a new
    /proc over ours. After this, the mounts we set up are the kernel's world.
    """
    last = 63
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        pass
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def user_namespaces_available() -> bool:
    """True where an unprivileged process may create a user namespace."""
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
            if f.read().strip() == "0":
                return False
    except OSError:
        pass
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return True


# -- Landlock: what a kernel may open, whatever its uid may ------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_IOCTL_DEV = 1 << 15
#: every file system right of Landlock ABI 1, then what later ABIs add
_FS_BY_ABI = {1: (1 << 13) - 1, 2: 1 << 13, 3: 1 << 14, 5: 1 << 15}
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
#: to read, not to run: a kernel's own dir, whose log and records are not programs
LOOK = FS_READ_FILE | FS_READ_DIR
DEVICES = FS_READ_FILE | FS_READ_DIR | FS_WRITE_FILE | FS_IOCTL_DEV
EVERYTHING = ~0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc.syscall.restype = ctypes.c_long


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel; 0 where there is none (too old, or not enabled)."""
    version = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(version))


def landlock(rules: list[tuple[str, int]]) -> int:
    """
    Allow this process (and all it starts) to open files only as ``rules``
    say: (path, rights) for everything beneath path, rights from ``READ``,
    ``LOOK``, ``DEVICES``, ``EVERYTHING`` (beneath several
    rules, a path has the rights of them all). From Landlock ABI 6 on it may
    also signal no process outside, nor reach another's abstract unix sockets.

    Unlike a uid, this holds where the kernel runs as the daemon's own
    account: the daemon's files outside these paths cannot be read. Needs
    no_new_privs. Returns the ABI used; raises OSError where there is none.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not available in this kernel")
    handled = 0
    for since, bits in _FS_BY_ABI.items():
        if abi >= since:
            handled |= bits
    attr = _RulesetAttr(handled_access_fs=handled)
    size = 8
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = ctypes.sizeof(_RulesetAttr)
    ruleset = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        _check(-1, "landlock_create_ruleset")
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                allowed = rights & handled
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    allowed &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | _FS_BY_ABI.get(3, 0) | FS_IOCTL_DEV
                beneath = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
                result = _libc.syscall(
                    _SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(beneath), ctypes.c_uint32(0)
                )
                _check(0 if result == 0 else -1, f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(0 if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0 else -1, "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi
