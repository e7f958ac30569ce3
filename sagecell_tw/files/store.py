# -*- test-case-name: tests.test_worker_files -*-
"""
A kernel's ``work/`` dir, safely, by descriptors: no Twisted, no zmq.

The daemon (``web/files.py``, for kernels on its own host) and a worker host's
spawner front (``files/worker.py``, for kernels there) share this code, so a
path is checked the same way wherever the kernel runs. See ``web/files.py``'s
docstring for the rules. Errors a client can cause are ``FileError``, which
carries the HTTP status the daemon answers with.
"""

from __future__ import annotations

import contextlib
import email.message
import email.utils
import errno
import itertools
import os
import re
import secrets
import stat
import time
from collections.abc import Callable


class FileError(Exception):
    """A refused file operation: an HTTP-ish status and a message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


#: a directory scan (listing, notification) stops after this many files ...
MAX_ENTRIES = 1000
#: ... or this many directory levels below work/
MAX_DEPTH = 8
#: ... having read at most this many times as many entries of any kind
EXAMINE_FACTOR = 10
#: the disk-quota scan counts this many files at most
QUOTA_SCAN_ENTRIES = 10000
#: symbolic links followed while resolving one path
MAX_LINKS = 16
#: a requested path: segments, and bytes in all
MAX_SEGMENTS = 32
MAX_PATH_BYTES = 1024
#: copy and parse uploads this many bytes at a time (in a thread)
CHUNK = 1 << 20
#: multipart: most bytes of one part's header block, and of the ``path`` field
MAX_PART_HEADERS = 16 << 10
MAX_PATH_FIELD = 4096
TEMP_PREFIX = ".upload-"
#: the name of an upload in progress (TEMP_PREFIX + 16 hex digits): while it
#: replaces a file, old and new briefly both exist. The upload checked the
#: quota before writing, so the quota does not count one such file per kernel.
UPLOAD_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{16}")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


# -- paths ----------------------------------------------------------------------


def clean_segments(segments: list[str]) -> tuple[list[str], bool]:
    """
    The URL's path segments (already unquoted) as checked parts, and whether
    it named a directory (empty, or a trailing slash). 400 for anything that
    could climb out or is not a plain name.
    """
    parts = list(segments)
    is_dir = not parts or parts[-1] == ""
    if parts and parts[-1] == "":
        parts.pop()
    total = 0
    for part in parts:
        if part == "":
            raise FileError(400, "the file path has an empty segment (absolute paths and '//' are not allowed)")
        if part in (".", ".."):
            raise FileError(400, "the file path may not contain '.' or '..'")
        if "/" in part or "\0" in part:
            raise FileError(400, "a file path segment may not contain '/' or NUL")
        size = len(os.fsencode(part))
        if size > 255:
            raise FileError(400, "a file name is longer than 255 bytes")
        total += size + 1
    if len(parts) > MAX_SEGMENTS or total > MAX_PATH_BYTES:
        raise FileError(400, f"the file path is too long (at most {MAX_SEGMENTS} segments, {MAX_PATH_BYTES} bytes)")
    return parts, is_dir


def split_relative(path: str) -> list[str]:
    """A relative path from a form field into parts, checked like a URL's."""
    if path.startswith("/"):
        raise FileError(400, "the upload path must be relative")
    parts, is_dir = clean_segments(path.split("/"))
    if is_dir or not parts:
        raise FileError(400, "the upload path must name a file")
    return parts


def open_workdir(workdir: str, owner: int) -> int:
    """
    A descriptor of the kernel's ``work/`` dir, which must belong to ``owner``.

    ``kernels/`` (under the daemon's run dir) is trusted; the kernel's own
    dir and ``work/`` belong to the worker, which could swap either for a
    symbolic link: both are opened without following one. The owner check
    keeps a forged kernel record (the spawner reports ``workdir``) from
    pointing us at a directory the worker could not use itself.
    """
    fd = _open_workdir(workdir)
    if os.fstat(fd).st_uid != owner:
        os.close(fd)
        raise FileError(403, "the kernel's directory does not belong to the kernel account")
    return fd


def _open_workdir(workdir: str) -> int:
    kdir = os.path.dirname(workdir.rstrip("/"))
    base, kid = os.path.split(kdir)
    try:
        top = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileError(404, "the kernel's directory is gone") from None
    try:
        kfd = os.open(kid, _DIR_FLAGS, dir_fd=top)
        try:
            return os.open(os.path.basename(workdir.rstrip("/")), _DIR_FLAGS, dir_fd=kfd)
        finally:
            os.close(kfd)
    except (FileNotFoundError, NotADirectoryError):
        raise FileError(404, "the kernel's directory is gone") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileError(403, "the kernel's directory was replaced by a link") from None
        raise
    finally:
        os.close(top)


def servable(st: os.stat_result, owner: int) -> bool:
    """Whether a file with this ``fstat`` may be sent: the kernel's own, or our single-linked upload."""
    if st.st_uid == owner:
        return True
    euid = os.geteuid()
    return euid != 0 and st.st_uid == euid and st.st_nlink == 1


def check_servable(st: os.stat_result, owner: int, parts: list[str]) -> None:
    """403 unless the file with this ``fstat`` may be sent (``servable``)."""
    if not servable(st, owner):
        raise FileError(403, f"{'/'.join(parts)} does not belong to the kernel")


class Target:
    """An opened file or directory under ``work/``: its descriptor, ``fstat`` and resolved parts."""

    def __init__(self, fd: int, st: os.stat_result, parts: list[str]):
        self.fd = fd
        self.st = st
        self.parts = parts

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def resolve(root_fd: int, parts: list[str]) -> Target:
    """
    Open ``parts`` below ``root_fd``, following symbolic links only while they
    stay inside. Never opens ``..``: a link's ``..`` pops our own stack of
    descriptors, so the walk cannot rise above ``root_fd``.
    """
    path = "/".join(parts)
    stack = [os.dup(root_fd)]
    names: list[str] = []
    todo = list(parts)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if not names:
                    raise FileError(403, "a symbolic link on this path leads out of the kernel's directory")
                os.close(stack.pop())
                names.pop()
                continue
            here = stack[-1]
            try:
                st = os.stat(name, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                raise FileError(404, f"no file {path}") from None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise FileError(403, "too many symbolic links on this path")
                target = os.readlink(name, dir_fd=here)
                if target.startswith("/"):
                    raise FileError(403, "a symbolic link on this path leads out of the kernel's directory")
                todo[0:0] = target.split("/")
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(os.open(name, _DIR_FLAGS, dir_fd=here))
                names.append(name)
                continue
            if todo:
                raise FileError(404, f"no file {path}: {name} is not a directory")
            if not stat.S_ISREG(st.st_mode):
                raise FileError(403, f"{path} is not a regular file")
            fd = os.open(name, _FILE_FLAGS, dir_fd=here)
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise FileError(403, f"{path} changed while it was being opened")
            return Target(fd, fst, names + [name])
        fd = stack.pop()
        return Target(fd, os.fstat(fd), names)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileError(403, f"{path} changed while it was being opened") from None
        if e.errno == errno.EACCES:
            raise FileError(403, f"{path} may not be read") from None
        if e.errno == errno.ENOENT:
            raise FileError(404, f"no file {path}") from None
        raise
    finally:
        for fd in stack:
            os.close(fd)


@contextlib.contextmanager
def opened(workdir: str, owner: int, parts: list[str]):
    """``parts`` in the kernel's ``work/`` (``open_workdir``, ``resolve``): a ``Target``, closed on leaving."""
    root = open_workdir(workdir, owner)
    try:
        target = resolve(root, parts)
    finally:
        os.close(root)
    try:
        yield target
    finally:
        target.close()


def scan(
    dir_fd: int,
    max_entries: int = MAX_ENTRIES,
    max_depth: int = MAX_DEPTH,
    hidden: bool = False,
    seconds: float | None = None,
):
    """
    Regular files below ``dir_fd``: (relative path -> ``lstat``, truncated).
    Sorted walk, no links followed, bounded in entries and depth, and in
    time if ``seconds`` is given (a slow disk).
    """
    deadline = None if seconds is None else time.monotonic() + seconds
    found: dict[str, os.stat_result] = {}
    # Entries of any kind read, so that a dir of a million fifos or dot
    # files costs no more than a bounded pass either.
    budget = EXAMINE_FACTOR * max_entries
    truncated = False

    def walk(fd: int, prefix: str, depth: int) -> None:
        nonlocal budget, truncated
        try:
            with os.scandir(fd) as it:
                entries = list(itertools.islice(it, budget + 1))
        except OSError:
            return
        if len(entries) > budget:
            truncated = True
            entries.pop()
        budget -= len(entries)
        entries.sort(key=lambda e: e.name)
        for entry in entries:
            if len(found) >= max_entries or (deadline is not None and time.monotonic() > deadline):
                truncated = True
                return
            if not hidden and entry.name.startswith("."):
                continue
            try:
                name = entry.name
                name.encode("utf-8")
                st = entry.stat(follow_symlinks=False)
            except (OSError, UnicodeEncodeError):
                continue
            if stat.S_ISREG(st.st_mode):
                found[prefix + name] = st
            elif stat.S_ISDIR(st.st_mode) and budget > 0:
                if depth >= max_depth:
                    truncated = True
                    continue
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    walk(sub, prefix + name + "/", depth + 1)
                finally:
                    os.close(sub)

    walk(dir_fd, "", 1)
    return found, truncated


# -- uploads (these run in a thread) ---------------------------------------------------


class TooLarge(FileError):
    def __init__(self, message: str):
        super().__init__(413, message)


class Upload:
    """
    One upload into one kernel's ``work/``: a temporary dot-file that is
    renamed into place at the end, or removed.
    """

    def __init__(self, root_fd: int, limit: int, why: str):
        self.root_fd = root_fd
        self.limit = limit
        self.why = why
        self.work = os.fstat(root_fd)
        self.tmp = TEMP_PREFIX + secrets.token_hex(8)
        fd = os.open(
            self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root_fd
        )
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.size = 0
        self.done = False
        try:
            self._own(fd, 0o660, 0o666)
        except BaseException:
            self.abort()
            raise

    def _own(self, fd: int, root_mode: int, other_mode: int) -> None:
        """Make what we create the kernel's: its owner when we are root, else open to it."""
        if os.geteuid() == 0:
            os.fchown(fd, self.work.st_uid, self.work.st_gid)
            os.fchmod(fd, root_mode)
        else:
            os.fchmod(fd, other_mode)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(self.why.format(size=self.size))
        view = memoryview(data)
        while view:
            n = self.file.write(view)
            view = view[n:]

    def commit(self, parts: list[str]) -> os.stat_result:
        """Rename into place, making missing parent dirs; the final ``fstat``."""
        created: list[tuple[int, str]] = []
        parent = os.dup(self.root_fd)
        try:
            for name in parts[:-1]:
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=parent)
                    created.append((os.dup(parent), name))
                    sub = os.open(name, _DIR_FLAGS, dir_fd=parent)
                    setgid = os.fstat(parent).st_mode & stat.S_ISGID
                    self._own(sub, 0o770 | setgid, 0o777 | setgid)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise FileError(409, f"{name} on the upload path is not a directory") from None
                    raise
                os.close(parent)
                parent = sub
            st = os.fstat(self.file.fileno())
            self.file.close()
            try:
                os.rename(self.tmp, parts[-1], src_dir_fd=self.root_fd, dst_dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise FileError(409, f"{'/'.join(parts)} is a directory") from None
                raise
            self.done = True
            return st
        except BaseException:
            for dfd, name in reversed(created):
                try:
                    os.rmdir(name, dir_fd=dfd)
                except OSError:
                    pass
            raise
        finally:
            os.close(parent)
            for dfd, _name in created:
                os.close(dfd)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp, dir_fd=self.root_fd)
        except OSError:
            pass


def disk_use(st: os.stat_result) -> int:
    """
    The bytes a file takes on the disk: its blocks. The one measure of the
    quota (``quota.DiskQuota``, the fork server's counts) and of the upload
    check, so that an upload the check lets in is not what then takes its
    kernel over quota: a sparse file counts what it holds, not its length,
    and a small file the blocks it fills.
    """
    return st.st_blocks * 512


def _over_upload_limit(max_upload: int) -> str:
    return f"the file is {{size}} bytes or more, over the upload limit of {max_upload} bytes"


def room_for(root_fd: int, parts: list[str], max_upload: int, quota: int, ignore: str = "") -> tuple[int, str]:
    """
    How many bytes this upload may have, and the message for going over: the
    per-file limit, or what is left of the quota once the file it replaces
    (and ``ignore``, our own temporary file) is not counted.
    """
    limit, why = max_upload, _over_upload_limit(max_upload)
    if quota > 0:
        found, _ = scan(root_fd, QUOTA_SCAN_ENTRIES, 64, hidden=True)
        found.pop("/".join(parts), None)
        found.pop(ignore, None)
        used = sum(disk_use(st) for st in found.values())
        left = quota - used
        if left < limit:
            limit = max(left, 0)
            why = (
                f"the upload ({{size}} bytes or more) would take the kernel's files over their quota of "
                f"{quota} bytes ({used} bytes are in use)"
            )
    return limit, why


def store_body(workdir: str, owner: int, parts: list[str], body, max_upload: int, quota: int) -> os.stat_result:
    """A raw request body (a file object) becomes ``parts``."""
    root = open_workdir(workdir, owner)
    try:
        limit, why = room_for(root, parts, max_upload, quota)
        body.seek(0, 2)
        size = body.tell()
        if size > limit:
            raise TooLarge(why.format(size=size))
        body.seek(0)
        upload = Upload(root, limit, why)
        try:
            while True:
                data = body.read(CHUNK)
                if not data:
                    break
                upload.write(data)
            return upload.commit(parts)
        finally:
            upload.abort()
    finally:
        os.close(root)


def store_multipart(workdir: str, owner: int, base: list[str], body, boundary: bytes, max_upload: int, quota: int):
    """A ``multipart/form-data`` body: its ``file`` field goes to ``path`` (or its filename) under ``base``."""
    root = open_workdir(workdir, owner)
    try:
        # The destination may be named after the data, and the file it
        # replaces does not count: the quota is checked at the end.
        upload = Upload(root, max_upload, _over_upload_limit(max_upload))
        try:
            parts = base + split_relative(read_form(body, boundary, upload.write))
            if quota > 0:
                limit, why = room_for(root, parts, max_upload, quota, ignore=upload.tmp)
                if upload.size > limit:
                    raise TooLarge(why.format(size=upload.size))
            return parts, upload.commit(parts)
        finally:
            upload.abort()
    finally:
        os.close(root)


def read_form(body, boundary: bytes, write: Callable[[bytes], None]) -> str:
    """
    Parse a ``multipart/form-data`` body: its one ``file`` field goes to
    ``write`` piece by piece; the path it is to be stored at (the ``path``
    field, or the file's own name) is returned, not yet checked.
    """
    fields: dict[str, str] = {}
    state = {"file": None}

    def on_part(name: str | None, filename: str | None):
        if name == "file":
            if state["file"] is not None:
                raise FileError(400, "send one file per upload")
            state["file"] = filename or ""
            return write
        if name == "path":
            value = bytearray()

            def keep(data: bytes) -> None:
                value.extend(data)
                if len(value) > MAX_PATH_FIELD:
                    raise FileError(400, "the path field is too long")
                fields["path"] = value.decode("utf-8", errors="replace")

            fields.setdefault("path", "")
            return keep
        return None

    parse_multipart(body, boundary, on_part)
    if state["file"] is None:
        raise FileError(400, "the form has no 'file' field")
    path = fields.get("path") or _basename(state["file"])
    if not path:
        raise FileError(400, "the file has no name: give one in the 'path' field")
    return path


def _basename(filename: str) -> str:
    """A browser's file name, without any directory part (some send ``C:\\fakepath\\x``)."""
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


# -- multipart/form-data, streamed ---------------------------------------------------


def boundary_of(content_type: bytes) -> bytes:
    msg = email.message.Message()
    msg["content-type"] = content_type.decode("latin-1")
    if msg.get_content_type() != "multipart/form-data":
        raise FileError(400, "expected multipart/form-data")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise FileError(400, "the multipart/form-data content type has no valid boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise FileError(400, "the multipart boundary is not ASCII") from None


def parse_multipart(src, boundary: bytes, on_part: Callable[[str | None, str | None], Callable | None]) -> None:
    """
    Read a multipart body from the file object ``src`` in chunks, calling
    ``on_part(name, filename)`` for each part; what it returns gets the part's
    data piece by piece (None: skip the part). 400 if the body is malformed.
    Memory stays within a chunk plus the part headers.
    """
    sep = b"\r\n--" + boundary
    keep = len(sep) + 1
    src.seek(0)
    buf = b"\r\n" + src.read(CHUNK)
    eof = False

    def fill() -> None:
        nonlocal buf, eof
        data = src.read(CHUNK)
        if not data:
            eof = True
        buf += data

    # the preamble, up to the first boundary
    while True:
        i = buf.find(sep)
        if i >= 0:
            buf = buf[i + len(sep) :]
            break
        if eof:
            raise FileError(400, "the multipart body has no boundary line")
        buf = buf[-keep:]
        fill()
    while True:
        while len(buf) < 2 and not eof:
            fill()
        if buf.startswith(b"--"):
            return  # the closing boundary; the epilogue is ignored
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_PART_HEADERS:
                raise FileError(400, "a multipart part has too long a header")
            if eof:
                raise FileError(400, "the multipart body ends inside a part's header")
            fill()
            end = buf.find(b"\r\n\r\n")
        block, buf = buf[:end], buf[end + 4 :]
        if block and not block.lstrip(b" \t").startswith(b"\r\n"):
            raise FileError(400, "a multipart boundary line is not followed by a line break")
        name, filename = _disposition(block)
        sink = on_part(name, filename)
        while True:
            i = buf.find(sep)
            if i >= 0:
                if sink is not None:
                    sink(buf[:i])
                buf = buf[i + len(sep) :]
                break
            if eof:
                raise FileError(400, "the multipart body ends inside a part (no closing boundary)")
            if len(buf) > keep:
                if sink is not None:
                    sink(buf[:-keep])
                buf = buf[-keep:]
            fill()


def _disposition(block: bytes) -> tuple[str | None, str | None]:
    msg = email.message.Message()
    for line in block.split(b"\r\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(b":")
        if not sep:
            raise FileError(400, "a multipart part has a malformed header line")
        if key.strip().lower() == b"content-disposition":
            msg["content-disposition"] = value.strip().decode("utf-8", errors="replace")
    if msg.get("content-disposition") is None:
        raise FileError(400, "a multipart part has no Content-Disposition header")
    name = msg.get_param("name", header="content-disposition")
    filename = msg.get_param("filename", header="content-disposition")
    return (
        email.utils.collapse_rfc2231_value(name) if name is not None else None,
        email.utils.collapse_rfc2231_value(filename) if filename is not None else None,
    )
