# -*- test-case-name: tests.test_worker_files -*-
"""
A worker host's side of the ``files`` commands (see ``control.files``).

The spawner front hands each ``{"cmd": "files"}`` from the daemon to
``WorkerFiles.handle`` and sends back what it returns. The link is
authenticated, yet every field is checked here as if it were not: types,
sizes, the kernel (only those this host runs), and paths, which go through
``files.store`` exactly as the daemon's own (segment checks, descriptors,
``O_NOFOLLOW``, links only inside, regular files only, owner checks,
temporary dot-file and rename). Every operation is bounded (a chunk, a
bounded scan), so the front's loop is never held for long. Plain blocking
code: no Twisted, no zmq.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import sys
import time

from . import store as filestore
from .store import FileError

#: most bytes of file data in one command or reply
CHUNK = 256 << 10
#: uploads open at once on this host, and how long one may sit idle
MAX_UPLOADS = 16
UPLOAD_IDLE = 60.0
#: the largest size or limit a command may name
MAX_SIZE = 1 << 50
KERNEL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
OPS = frozenset({"list", "read", "open", "write", "commit", "abort", "scan"})


def _int(msg: dict, key: str, high: int = MAX_SIZE) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise FileError(400, f"'{key}' must be an integer from 0 to {high}")
    return value


def _path(msg: dict) -> list[str]:
    value = msg.get("path", [])
    if not isinstance(value, list) or len(value) > filestore.MAX_SEGMENTS + 1:
        raise FileError(400, "'path' must be a list of segments")
    if not all(isinstance(p, str) and p for p in value):
        raise FileError(400, "'path' must be a list of non-empty strings")
    parts, _ = filestore.clean_segments(value)
    return parts


def tag_of(st: os.stat_result) -> str:
    """Which file, in which state: a download's chunks must all come from the same one."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class _Upload:
    def __init__(self, kernel: str, parts: list[str], root: int, upload: filestore.Upload, now: float):
        self.kernel = kernel
        self.parts = parts
        self.root = root
        self.upload = upload
        self.used = now

    def close(self) -> None:
        self.upload.abort()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1


class WorkerFiles:
    """The kernel dirs of this host, served to the daemon one bounded command at a time."""

    def __init__(self, base_dir: str, owner: int, disk_quota: int = 0, clock=time.monotonic):
        self.base_dir = base_dir
        #: the account kernels (and we) run as: work/ and the files we serve are its
        self.owner = owner
        #: this host's own limit for a kernel's files (0: the daemon's alone)
        self.disk_quota = disk_quota
        self.clock = clock
        #: ids of the kernels this host runs (from the fork server's events)
        self.kernels: set[str] = set()
        #: upload token -> upload in progress
        self.uploads: dict[str, _Upload] = {}

    def kernel_ready(self, kernel_id) -> None:
        if isinstance(kernel_id, str) and KERNEL_ID.fullmatch(kernel_id):
            self.kernels.add(kernel_id)

    def kernel_dead(self, kernel_id) -> None:
        self.kernels.discard(kernel_id)
        for token, up in list(self.uploads.items()):
            if up.kernel == kernel_id:
                self._drop(token)

    def workdir(self, kernel_id: str) -> str:
        return os.path.join(self.base_dir, kernel_id, "work")

    def expire(self) -> None:
        """End uploads the daemon left idle (it timed out, or went away)."""
        now = self.clock()
        for token, up in list(self.uploads.items()):
            if now - up.used > UPLOAD_IDLE:
                self._drop(token)

    def close(self) -> None:
        for token in list(self.uploads):
            self._drop(token)

    def _drop(self, token: str) -> None:
        up = self.uploads.pop(token, None)
        if up is not None:
            up.close()

    # -- one command --------------------------------------------------------------

    def handle(self, msg: dict, data: bytes | None) -> tuple[dict, bytes | None]:
        """The reply (and its data frame) to one command; never raises."""
        req = msg.get("req")
        if not isinstance(req, int) or isinstance(req, bool):
            req = None
        try:
            fields, out = self._dispatch(msg, data)
            return {"event": "files", "req": req, "ok": True, **fields}, out
        except FileError as e:
            status, message = e.status, e.message
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                status, message = 507, f"no room for the upload: {e.strerror}"
            else:
                status, message = 500, f"the worker host could not do it: {e.strerror}"
        except Exception as e:  # a bug must not end the front's loop
            sys.stderr.write(f"sagecell spawner: files command failed: {e!r}\n")
            status, message = 500, "internal error on the worker host"
        return {"event": "files", "req": req, "ok": False, "status": status, "message": message}, None

    def _dispatch(self, msg: dict, data: bytes | None) -> tuple[dict, bytes | None]:
        op = msg.get("op")
        if op not in OPS:
            raise FileError(400, "unknown files operation")
        if data is not None and op != "write":
            raise FileError(400, "a data frame comes only with 'write'")
        if op in ("write", "commit", "abort"):
            token = msg.get("upload")
            up = self.uploads.get(token) if isinstance(token, str) else None
            if op == "abort":
                if up is not None:
                    self._drop(token)
                return {}, None
            if up is None:
                raise FileError(404, "no such upload (it ended, or sat idle too long)")
            if up.kernel not in self.kernels:
                self._drop(token)
                raise FileError(404, "the kernel is not running here")
            try:
                return (self._write(up, msg, data) if op == "write" else self._commit(token, up)), None
            except BaseException:
                self._drop(token)  # a refused upload changes nothing
                raise
        kernel = msg.get("kernel")
        if not isinstance(kernel, str) or kernel not in self.kernels:
            raise FileError(404, "no such kernel on this host")
        parts = _path(msg)
        if op == "scan":
            return self._scan(kernel), None
        if op == "list":
            return self._list(kernel, parts), None
        if op == "read":
            return self._read(kernel, parts, msg)
        return self._open(kernel, parts, msg), None

    def _root(self, kernel: str) -> int:
        return filestore.open_workdir(self.workdir(kernel), self.owner)

    def _scan(self, kernel: str) -> dict:
        root = self._root(kernel)
        try:
            found, truncated = filestore.scan(root)
        finally:
            os.close(root)
        return {"files": [[p, st.st_size, st.st_mtime_ns] for p, st in found.items()], "truncated": truncated}

    def _list(self, kernel: str, parts: list[str]) -> dict:
        with filestore.opened(self.workdir(kernel), self.owner, parts) as target:
            if target.is_dir:
                found, truncated = filestore.scan(target.fd)
                files = [[p, st.st_size, st.st_mtime_ns] for p, st in found.items()]
                return {"kind": "dir", "parts": target.parts, "files": files, "truncated": truncated}
            filestore.check_servable(target.st, self.owner, parts)
            st = target.st
            return {
                "kind": "file",
                "parts": target.parts,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "tag": tag_of(st),
            }

    def _read(self, kernel: str, parts: list[str], msg: dict) -> tuple[dict, bytes]:
        offset = _int(msg, "offset")
        length = _int(msg, "length", CHUNK)
        tag = msg.get("tag")
        if not isinstance(tag, str):
            raise FileError(400, "'tag' must be a string")
        with filestore.opened(self.workdir(kernel), self.owner, parts) as target:
            if target.is_dir:
                raise FileError(409, f"{'/'.join(parts)} is a directory now")
            filestore.check_servable(target.st, self.owner, parts)
            if tag_of(target.st) != tag:
                raise FileError(409, f"{'/'.join(parts)} changed during the download")
            length = max(0, min(length, target.st.st_size - offset))
            data = os.pread(target.fd, length, offset) if length else b""
        return {"size": len(data)}, data

    def _open(self, kernel: str, parts: list[str], msg: dict) -> dict:
        if not parts:
            raise FileError(400, "name the file to upload")
        size = _int(msg, "size")
        max_upload = _int(msg, "max_upload")
        quota = _int(msg, "quota")
        if self.disk_quota > 0:
            quota = self.disk_quota if quota == 0 else min(quota, self.disk_quota)
        if len(self.uploads) >= MAX_UPLOADS:
            self.expire()
            if len(self.uploads) >= MAX_UPLOADS:
                raise FileError(503, "too many uploads at once on this worker host; try again in a moment")
        root = self._root(kernel)
        try:
            limit, why = filestore.room_for(root, parts, max_upload, quota)
            if size > limit:
                raise filestore.TooLarge(why.format(size=size))
            upload = filestore.Upload(root, min(limit, size), why)
        except BaseException:
            os.close(root)
            raise
        token = secrets.token_hex(16)
        self.uploads[token] = _Upload(kernel, parts, root, upload, self.clock())
        return {"upload": token}

    def _write(self, up: _Upload, msg: dict, data: bytes | None) -> dict:
        offset = _int(msg, "offset")
        if not data or len(data) > CHUNK:
            raise FileError(400, f"'write' needs a data frame of 1 to {CHUNK} bytes")
        if offset != up.upload.size:
            raise FileError(400, f"the upload is at byte {up.upload.size}, not {offset}")
        up.upload.write(data)
        up.used = self.clock()
        return {"size": up.upload.size}

    def _commit(self, token: str, up: _Upload) -> dict:
        st = up.upload.commit(up.parts)
        self._drop(token)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
