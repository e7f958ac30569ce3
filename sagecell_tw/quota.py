# -*- test-case-name: tests.test_quota -*-
"""
Per-kernel disk quota, kept up to date by inotify.

RLIMIT_FSIZE bounds one file; a kernel writing many files just under it
would fill the disk between two periodic scans. Here every write, create,
move and delete in a kernel's dir (its work dir, its log, its state) updates
a running total at once, so the fork server can end a kernel within one file
of its quota. (Writes through mmap raise no inotify event, and a file deleted
while open leaves the tree: the fork server's periodic full count backs this
up.) Bytes are allocated blocks, as in that count. Plain blocking code for
the fork server: no Twisted, no zmq.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import struct

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

WATCH_MASK = (
    IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
) | IN_ONLYDIR | IN_DONT_FOLLOW
_EVENT = struct.Struct("iIII")

#: the daemon's upload in progress (files.TEMP_PREFIX + 16 hex digits): while it
#: replaces a file, old and new briefly both exist. The daemon checked the
#: quota before writing it, so one such file per kernel is not counted here.
UPLOAD_TEMP = re.compile(r"\.upload-[0-9a-f]{16}")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Tree:
    """What one kernel's dir holds: bytes allocated per path, and its watched dirs."""

    def __init__(self, kid: str, root: str):
        self.kid = kid
        self.root = root
        self.sizes: dict[str, int] = {}
        self.total = 0
        self.wds: set[int] = set()
        self.too_many_dirs = False
        self.upload: str | None = None

    def set(self, path: str, size: int) -> None:
        if self.upload in (None, path) and UPLOAD_TEMP.fullmatch(os.path.basename(path)):
            self.upload = path
            return
        self.total += size - self.sizes.get(path, 0)
        self.sizes[path] = size

    def forget(self, path: str) -> None:
        if path == self.upload:
            self.upload = None
        prefix = path + "/"
        for p in [p for p in self.sizes if p == path or p.startswith(prefix)]:
            self.total -= self.sizes.pop(p)


class DiskQuota:
    """Watches kernels' dirs; ``read()`` names the kernels over quota."""

    def __init__(self, quota: int, max_dirs: int = 256):
        self.quota = quota
        self.max_dirs = max_dirs
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.trees: dict[str, _Tree] = {}
        #: watch descriptor -> (tree, directory path)
        self.watches: dict[int, tuple[_Tree, str]] = {}

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)

    def watch(self, kid: str, root: str) -> None:
        tree = _Tree(kid, root)
        self.trees[kid] = tree
        self._add_dir(tree, root)

    def unwatch(self, kid: str) -> None:
        tree = self.trees.pop(kid, None)
        if tree is None:
            return
        for wd in tree.wds:
            self.watches.pop(wd, None)
            _libc.inotify_rm_watch(self.fd, wd)

    def usage(self, kid: str) -> int:
        tree = self.trees.get(kid)
        return tree.total if tree else 0

    def _add_dir(self, tree: _Tree, path: str) -> None:
        if len(tree.wds) >= self.max_dirs:
            tree.too_many_dirs = True
            return
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            return  # gone already, or not a directory
        tree.wds.add(wd)
        self.watches[wd] = (tree, path)
        # What was made before the watch existed.
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    self._update(tree, entry.path, is_dir=entry.is_dir(follow_symlinks=False))
        except OSError:
            pass

    def _update(self, tree: _Tree, path: str, is_dir: bool) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            tree.forget(path)
            return
        tree.set(path, st.st_blocks * 512)
        if is_dir:
            self._add_dir(tree, path)

    def read(self) -> list[str]:
        """Take the pending events; return the kernels now over quota."""
        touched: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
            if not data:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    touched.update(self._rescan_all())
                    continue
                watched = self.watches.get(wd)
                if watched is None:
                    continue
                tree, directory = watched
                if mask & IN_IGNORED:
                    self.watches.pop(wd, None)
                    tree.wds.discard(wd)
                    continue
                if not name:
                    continue
                path = os.path.join(directory, os.fsdecode(name))
                if mask & (IN_DELETE | IN_MOVED_FROM):
                    tree.forget(path)
                else:
                    self._update(tree, path, is_dir=bool(mask & IN_ISDIR) and bool(mask & (IN_CREATE | IN_MOVED_TO)))
                touched.add(tree.kid)
        return [kid for kid in touched if self.over(kid)]

    def over(self, kid: str) -> bool:
        tree = self.trees.get(kid)
        return tree is not None and (tree.total > self.quota or tree.too_many_dirs)

    def _rescan_all(self) -> list[str]:
        """The kernel's event queue overflowed: count every tree again."""
        for kid, tree in list(self.trees.items()):
            self.unwatch(kid)
            self.watch(kid, tree.root)
        return list(self.trees)
