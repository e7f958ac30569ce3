# -*- test-case-name: tests.test_files -*-
"""
Kernel files over HTTP: uploads in, downloads out, and news of what changed.

``/api/kernels/{id}/files/{path}`` (and SageMathCell's ``/kernel/{id}/files/{path}``):

- ``GET``/``HEAD`` a file: streamed by ``twisted.web.static.File`` (ranges,
  ``Content-Type`` from the extension). ``Content-Disposition`` is
  ``attachment`` unless ``?inline=1``, or the file is a raster image
  (png, jpeg, gif, webp, bmp, avif, ico) and not ``?download=1``. Every file
  answer carries ``X-Content-Type-Options: nosniff`` and
  ``Content-Security-Policy: sandbox allow-scripts``: a kernel's HTML, opened
  inline, runs in an opaque origin, not ours.
- ``GET`` a directory (``.../files/`` or ``.../files/sub/``): JSON
  ``{"files": [{"path", "size", "mtime", "url"}], "truncated"}``, regular
  files only, recursive, at most ``MAX_ENTRIES`` entries and ``MAX_DEPTH``
  levels; names starting with a dot are left out (they can still be fetched).
  ``mtime`` is seconds since the epoch.
- ``PUT`` or ``POST`` a file: the raw body becomes the file (201 and its
  model). ``POST`` to a directory as ``multipart/form-data``: field ``file``
  is stored under the field ``path``, or else its own file name, relative to
  that directory. Missing parent directories are made.

After each execution the session's connections get an iopub
``sagecell.files`` message listing the files the code created or modified.

Safety. The path is checked segment by segment (no empty, ``.``, ``..``, or
``/`` inside one after unquoting); then every component is opened relative to
its parent's descriptor with ``O_NOFOLLOW``, so a path never leaves the
kernel's ``work/`` dir whatever the kernel does to it meanwhile. A symbolic
link is followed only while it stays inside (relative target, ``..`` never
above the top, at most ``MAX_LINKS``); anything else is 403. Files are
opened ``O_NONBLOCK`` and checked with ``fstat`` (regular files only: a fifo
cannot hang us), and must belong to the kernel's account (or to the daemon's
own non-root account, singly linked): a hard link to someone else's file is
refused. ``work/`` itself must belong to the kernel account too, so even a
forged kernel record cannot point us elsewhere. Uploads go to a temporary dot-file in ``work/`` and are renamed into
place once complete; any failure removes it, so a refused upload changes
nothing.

Who can read what. Kernels run as the worker account; ``work/`` is theirs.
A root daemon reads anything, and chowns what it uploads to the worker
(mode 0660), so the code may read, overwrite and delete it. A daemon that
dropped to its own account with twistd ``--uid/--gid`` reaches ``work/``
through its group: the spawner makes the kernel dir 0750 and ``work/``
setgid 2770 with that group, and kernels write with umask 007, so their
files are group-readable. Its uploads are 0666 (directories 0777): inside a
dir only the worker and the daemon's group can traverse, "others" is the
worker. Nothing else is gained by the daemon. Everything goes when the
kernel ends: the fork server removes its dir.
"""

from __future__ import annotations

import email.message
import email.utils
import errno
import itertools
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import resource, server, static

from . import messages
from .webbase import HTTPError, JsonResource, Response

log = Logger()

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
#: shown inline unless ?download=1 (scriptless raster formats; not SVG)
INLINE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/bmp",
        "image/avif",
        "image/x-icon",
        "image/vnd.microsoft.icon",
    }
)
TEMP_PREFIX = ".upload-"

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
            raise HTTPError(400, "the file path has an empty segment (absolute paths and '//' are not allowed)")
        if part in (".", ".."):
            raise HTTPError(400, "the file path may not contain '.' or '..'")
        if "/" in part or "\0" in part:
            raise HTTPError(400, "a file path segment may not contain '/' or NUL")
        size = len(os.fsencode(part))
        if size > 255:
            raise HTTPError(400, "a file name is longer than 255 bytes")
        total += size + 1
    if len(parts) > MAX_SEGMENTS or total > MAX_PATH_BYTES:
        raise HTTPError(400, f"the file path is too long (at most {MAX_SEGMENTS} segments, {MAX_PATH_BYTES} bytes)")
    return parts, is_dir


def split_relative(path: str) -> list[str]:
    """A relative path from a form field into parts, checked like a URL's."""
    if path.startswith("/"):
        raise HTTPError(400, "the upload path must be relative")
    parts, is_dir = clean_segments(path.split("/"))
    if is_dir or not parts:
        raise HTTPError(400, "the upload path must name a file")
    return parts


def is_local(kernel) -> bool:
    """
    Whether ``kernel``'s dir is on this machine. A kernel on a worker host
    is reached through that host's relay; its dir, named in its record, is
    a path over there (and here, at most, someone else's).
    """
    return not getattr(kernel.spawner, "remote", False)


def url_for(prefix: str, kernel_id: str, parts: list[str]) -> str:
    return f"{prefix}/{kernel_id}/files/" + quote("/".join(parts), safe="/")


# -- the file system, by descriptors ----------------------------------------------


def kernel_uid(worker_user: str) -> int:
    """
    The account kernels run as: the worker account when we start as root
    (the spawner drops to it), else our own. Called before twistd's --uid.
    """
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        return pwd.getpwnam(worker_user).pw_uid
    except KeyError:
        return -1  # no kernels can run; serve nothing


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
        raise HTTPError(403, "the kernel's directory does not belong to the kernel account")
    return fd


def _open_workdir(workdir: str) -> int:
    kdir = os.path.dirname(workdir.rstrip("/"))
    base, kid = os.path.split(kdir)
    try:
        top = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HTTPError(404, "the kernel's directory is gone") from None
    try:
        kfd = os.open(kid, _DIR_FLAGS, dir_fd=top)
        try:
            return os.open(os.path.basename(workdir.rstrip("/")), _DIR_FLAGS, dir_fd=kfd)
        finally:
            os.close(kfd)
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPError(404, "the kernel's directory is gone") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HTTPError(403, "the kernel's directory was replaced by a link") from None
        raise
    finally:
        os.close(top)


def servable(st: os.stat_result, owner: int) -> bool:
    """Whether a file with this ``fstat`` may be sent: the kernel's own, or our single-linked upload."""
    if st.st_uid == owner:
        return True
    euid = os.geteuid()
    return euid != 0 and st.st_uid == euid and st.st_nlink == 1


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
                    raise HTTPError(403, "a symbolic link on this path leads out of the kernel's directory")
                os.close(stack.pop())
                names.pop()
                continue
            here = stack[-1]
            try:
                st = os.stat(name, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                raise HTTPError(404, f"no file {'/'.join(parts)}") from None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise HTTPError(403, "too many symbolic links on this path")
                target = os.readlink(name, dir_fd=here)
                if target.startswith("/"):
                    raise HTTPError(403, "a symbolic link on this path leads out of the kernel's directory")
                todo[0:0] = target.split("/")
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(os.open(name, _DIR_FLAGS, dir_fd=here))
                names.append(name)
                continue
            if todo:
                raise HTTPError(404, f"no file {'/'.join(parts)}: {name} is not a directory")
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(403, f"{'/'.join(parts)} is not a regular file")
            fd = os.open(name, _FILE_FLAGS, dir_fd=here)
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise HTTPError(403, f"{'/'.join(parts)} changed while it was being opened")
            return Target(fd, fst, names + [name])
        fd = stack.pop()
        return Target(fd, os.fstat(fd), names)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise HTTPError(403, f"{'/'.join(parts)} changed while it was being opened") from None
        if e.errno == errno.EACCES:
            raise HTTPError(403, f"{'/'.join(parts)} may not be read") from None
        if e.errno == errno.ENOENT:
            raise HTTPError(404, f"no file {'/'.join(parts)}") from None
        raise
    finally:
        for fd in stack:
            os.close(fd)


def scan(dir_fd: int, max_entries: int = MAX_ENTRIES, max_depth: int = MAX_DEPTH, hidden: bool = False):
    """
    Regular files below ``dir_fd``: (relative path -> ``lstat``, truncated).
    Sorted walk, no links followed, bounded in entries and depth.
    """
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
            if len(found) >= max_entries:
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


def file_model(prefix: str, kernel_id: str, path: str, st: os.stat_result) -> dict:
    return {"path": path, "size": st.st_size, "mtime": st.st_mtime, "url": url_for(prefix, kernel_id, path.split("/"))}


# -- uploads (these run in a thread) ---------------------------------------------------


class TooLarge(HTTPError):
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
                        raise HTTPError(409, f"{name} on the upload path is not a directory") from None
                    raise
                os.close(parent)
                parent = sub
            st = os.fstat(self.file.fileno())
            self.file.close()
            try:
                os.rename(self.tmp, parts[-1], src_dir_fd=self.root_fd, dst_dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise HTTPError(409, f"{'/'.join(parts)} is a directory") from None
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


def room_for(root_fd: int, parts: list[str], max_upload: int, quota: int, ignore: str = "") -> tuple[int, str]:
    """
    How many bytes this upload may have, and the message for going over: the
    per-file limit, or what is left of the quota once the file it replaces
    (and ``ignore``, our own temporary file) is not counted.
    """
    limit, why = max_upload, f"the file is {{size}} bytes or more, over the upload limit of {max_upload} bytes"
    if quota > 0:
        found, _ = scan(root_fd, QUOTA_SCAN_ENTRIES, 64, hidden=True)
        found.pop("/".join(parts), None)
        found.pop(ignore, None)
        used = sum(st.st_size for st in found.values())
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
        upload = Upload(
            root, max_upload, f"the file is {{size}} bytes or more, over the upload limit of {max_upload} bytes"
        )
        try:
            fields: dict[str, str] = {}
            state = {"file": None}

            def on_part(name: str | None, filename: str | None):
                if name == "file":
                    if state["file"] is not None:
                        raise HTTPError(400, "send one file per upload")
                    state["file"] = filename or ""
                    return upload.write
                if name == "path":
                    chunks: list[bytes] = []

                    def keep(data: bytes) -> None:
                        chunks.append(data)
                        if sum(map(len, chunks)) > MAX_PATH_FIELD:
                            raise HTTPError(400, "the path field is too long")
                        fields["path"] = b"".join(chunks).decode("utf-8", errors="replace")

                    fields.setdefault("path", "")
                    return keep
                return None

            parse_multipart(body, boundary, on_part)
            if state["file"] is None:
                raise HTTPError(400, "the form has no 'file' field")
            path = fields.get("path") or _basename(state["file"])
            if not path:
                raise HTTPError(400, "the file has no name: give one in the 'path' field")
            parts = base + split_relative(path)
            if quota > 0:
                limit, why = room_for(root, parts, max_upload, quota, ignore=upload.tmp)
                if upload.size > limit:
                    raise TooLarge(why.format(size=upload.size))
            return parts, upload.commit(parts)
        finally:
            upload.abort()
    finally:
        os.close(root)


def _basename(filename: str) -> str:
    """A browser's file name, without any directory part (some send ``C:\\fakepath\\x``)."""
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


# -- multipart/form-data, streamed ---------------------------------------------------


def boundary_of(content_type: bytes) -> bytes:
    msg = email.message.Message()
    msg["content-type"] = content_type.decode("latin-1")
    if msg.get_content_type() != "multipart/form-data":
        raise HTTPError(400, "expected multipart/form-data")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise HTTPError(400, "the multipart/form-data content type has no valid boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise HTTPError(400, "the multipart boundary is not ASCII") from None


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
            raise HTTPError(400, "the multipart body has no boundary line")
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
                raise HTTPError(400, "a multipart part has too long a header")
            if eof:
                raise HTTPError(400, "the multipart body ends inside a part's header")
            fill()
            end = buf.find(b"\r\n\r\n")
        block, buf = buf[:end], buf[end + 4 :]
        if block and not block.lstrip(b" \t").startswith(b"\r\n"):
            raise HTTPError(400, "a multipart boundary line is not followed by a line break")
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
                raise HTTPError(400, "the multipart body ends inside a part (no closing boundary)")
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
            raise HTTPError(400, "a multipart part has a malformed header line")
        if key.strip().lower() == b"content-disposition":
            msg["content-disposition"] = value.strip().decode("utf-8", errors="replace")
    if msg.get("content-disposition") is None:
        raise HTTPError(400, "a multipart part has no Content-Disposition header")
    name = msg.get_param("name", header="content-disposition")
    filename = msg.get_param("filename", header="content-disposition")
    return (
        email.utils.collapse_rfc2231_value(name) if name is not None else None,
        email.utils.collapse_rfc2231_value(filename) if filename is not None else None,
    )


# -- HTTP ---------------------------------------------------------------------------


class _Bounded:
    """The file as it was at ``fstat``: a file growing meanwhile must not overrun Content-Length."""

    def __init__(self, f, size: int):
        self.f = f
        self.size = size

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        n = left if n is None or n < 0 else min(n, left)
        return self.f.read(n) if n else b""

    def close(self) -> None:
        self.f.close()


class OpenedFile(static.File):
    """
    ``static.File`` over a file we already opened safely: its ranges and
    streaming, and never a path lookup of its own.
    """

    isLeaf = True
    contentEncodings: dict = {}  # a .gz download stays gzip, not undone by the browser

    def __init__(self, name: str, fd: int, st: os.stat_result):
        super().__init__(os.path.join("/", name), defaultType="application/octet-stream")
        self._file = _Bounded(os.fdopen(fd, "rb"), st.st_size)
        self._stat = st

    def restat(self, reraise: bool = True) -> None:
        self._statinfo = self._stat

    def openForReading(self):
        return self._file

    def close(self) -> None:
        self._file.close()


class FilesResource(JsonResource):
    """One request under ``.../files/``."""

    methods = ("GET", "PUT", "POST")

    def __init__(self, files: KernelFiles, kernel_id: str, segments: list[str], prefix: str):
        super().__init__(files.policy)
        self.files = files
        self.kernel_id = kernel_id
        self.segments = segments
        self.prefix = prefix

    def _session(self):
        session = self.files.sessions.get(self.kernel_id)
        if session is None:
            raise HTTPError(404, f"no kernel {self.kernel_id}")
        return session

    def handle(self, request):
        session = self._session()
        parts, is_dir = clean_segments(self.segments)
        reading = request.method in (b"GET", b"HEAD")
        if session.kernel is None and (session.claiming or not reading):
            # Just created, or restarting: its kernel is on the way. An
            # upload also brings back the kernel of a session whose kernel died.
            def no_kernel(failure):
                raise HTTPError(503, f"the kernel did not start: {failure.getErrorMessage()}")

            d = self.files.sessions.kernel_for(session)
            return d.addCallbacks(lambda _s: self._handle(request, session, parts, is_dir), no_kernel)
        return self._handle(request, session, parts, is_dir)

    def _handle(self, request, session, parts: list[str], is_dir: bool):
        kernel = session.kernel
        if kernel is not None and not is_local(kernel):
            raise HTTPError(501, "files cannot be transferred to or from kernels on worker hosts (yet)")
        if request.method in (b"GET", b"HEAD"):
            if kernel is None:  # it died, and nobody asked for a new one
                if is_dir:
                    return {"files": [], "truncated": False}
                raise HTTPError(404, f"no file {'/'.join(parts)}: the kernel is not running")
            return self._get(request, kernel, parts)
        if kernel is None:
            raise HTTPError(503, "the kernel is not running; try again in a moment")
        ctype = request.getHeader(b"content-type") or b""
        if request.method == b"POST" and ctype.split(b";")[0].strip().lower() == b"multipart/form-data":
            boundary = boundary_of(ctype)
            return self.files.upload(session, kernel, parts, request.content, boundary, self.prefix)
        if is_dir:
            raise HTTPError(400, "name the file in the URL, or POST multipart/form-data with a 'file' field")
        return self.files.upload(session, kernel, parts, request.content, None, self.prefix)

    def _get(self, request, kernel, parts: list[str]):
        owner = self.files.kernel_uid
        root = open_workdir(kernel.workdir, owner)
        try:
            target = resolve(root, parts)
            try:
                if target.is_dir:
                    found, truncated = scan(target.fd)
                    base = "/".join(target.parts)
                    base = base + "/" if base else ""
                    listing = [file_model(self.prefix, self.kernel_id, base + p, st) for p, st in found.items()]
                    return {"files": listing, "truncated": truncated}
                if not servable(target.st, owner):
                    raise HTTPError(403, f"{'/'.join(parts)} does not belong to the kernel")
                fd, target.fd = target.fd, -1
                return OpenedFile(target.parts[-1], fd, target.st)
            finally:
                target.close()
        finally:
            os.close(root)

    def _respond(self, request, result) -> bytes:
        if isinstance(result, OpenedFile):
            return self._send_file(request, result)
        return super()._respond(request, result)

    def _finish(self, result, request) -> None:
        if not isinstance(result, OpenedFile):
            super()._finish(result, request)
            return
        if request._disconnected:
            result.close()
            return
        if self._send_file(request, result) is not server.NOT_DONE_YET:
            request.finish()  # HEAD: the headers were all

    def _send_file(self, request, f: OpenedFile):
        name = f.basename()
        f.type, f.encoding = static.getTypeAndEncoding(name, f.contentTypes, f.contentEncodings, f.defaultType)
        if f.type.startswith("text/") and "charset" not in f.type:
            f.type += "; charset=utf-8"  # what Python writes by default; nosniff forbids guessing
        if (request.args.get(b"inline") or [b""])[0] in (b"1", b"true"):
            inline = True
        elif (request.args.get(b"download") or [b""])[0] in (b"1", b"true"):
            inline = False
        else:
            inline = f.type in INLINE_TYPES
        ascii_name = re.sub(r'[^\x20-\x7e]|["\\]', "_", name)
        disposition = (
            f"{'inline' if inline else 'attachment'}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
        )
        request.setHeader(b"content-disposition", disposition.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", b"sandbox allow-scripts")
        request.setHeader(b"cache-control", b"no-store")
        # A file rewritten within the second it was fetched keeps its
        # Last-Modified: never answer 304 from that.
        request.requestHeaders.removeHeader(b"if-modified-since")
        try:
            result = f.render(request)
        except BaseException:
            f.close()
            raise
        if result != server.NOT_DONE_YET:
            f.close()  # HEAD: no producer took the file
        return result


class KernelFiles:
    """Kernel files over HTTP, and the ``sagecell.files`` news after each execution."""

    def __init__(self, sessions, config, reactor, policy):
        self.sessions = sessions
        self.config = config
        self.reactor = reactor
        self.policy = policy
        self.api_prefix = config.base_url.rstrip("/") + "/api/kernels"
        self.sagecell_prefix = config.base_url.rstrip("/") + "/kernel"
        #: who owns kernel dirs and may own the files we serve
        self.kernel_uid = kernel_uid(config.worker_user)
        #: session id -> (kernel id, path -> (size, mtime_ns)) as last reported
        self.snapshots: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {}
        #: session id -> lock: one upload at a time per kernel, so quotas hold
        self.locks: dict[str, defer.DeferredLock] = {}
        sessions.on_execute_done.append(self.execute_done)
        sessions.observers.append(self._observe)

    def resource_for(
        self, kernel_id: str, segments: list[str], request, prefix: str | None = None
    ) -> resource.Resource:
        """The resource for ``{prefix}/{kernel_id}/files/{segments}``; prefix from the request unless given."""
        if prefix is None:
            prefix = self.sagecell_prefix if request.prepath[:1] == [b"kernel"] else self.api_prefix
        return FilesResource(self, kernel_id, segments, prefix)

    # -- uploads ----------------------------------------------------------------

    def upload(self, session, kernel, parts: list[str], body, boundary: bytes | None, prefix: str) -> defer.Deferred:
        cfg = self.config
        if boundary is None:
            work = (store_body, kernel.workdir, self.kernel_uid, parts, body, cfg.max_upload_size, cfg.disk_quota)
        else:
            work = (
                store_multipart,
                kernel.workdir,
                self.kernel_uid,
                parts,
                body,
                boundary,
                cfg.max_upload_size,
                cfg.disk_quota,
            )
        lock = self.locks.setdefault(session.id, defer.DeferredLock())
        d = lock.run(deferToThreadPool, self.reactor, self.reactor.getThreadPool(), *work)

        def full(failure):
            failure.trap(OSError)
            if failure.value.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise HTTPError(507, f"no room for the upload: {failure.value.strerror}")
            return failure

        def stored(result):
            if boundary is None:
                path, st = parts, result
            else:
                path, st = result
            self._remember(session, kernel, "/".join(path), st)
            log.info(
                "upload of {size} bytes to {path} in session {session}",
                size=st.st_size,
                path="/".join(path),
                session=session.id,
            )
            return Response(201, file_model(prefix, session.id, "/".join(path), st))

        return d.addCallbacks(stored, full)

    def _remember(self, session, kernel, path: str, st: os.stat_result) -> None:
        """An upload is not news to the code's author: keep it out of the next notification."""
        known = self.snapshots.get(session.id)
        if known is None or known[0] != kernel.id:
            known = (kernel.id, {})
            self.snapshots[session.id] = known
        known[1][path] = (st.st_size, st.st_mtime_ns)

    # -- notifications ----------------------------------------------------------

    def execute_done(self, session, parent: dict) -> None:
        """Tell the session's connections which files the execution created or changed."""
        kernel = session.kernel
        if kernel is None or not is_local(kernel):
            return
        try:
            root = open_workdir(kernel.workdir, self.kernel_uid)
        except (HTTPError, OSError):
            return
        try:
            found, _ = scan(root)
        finally:
            os.close(root)
        old_id, old = self.snapshots.get(session.id, (None, {}))
        if old_id != kernel.id:
            old = {}  # a new kernel (restart): a new, empty dir
        now = {path: (st.st_size, st.st_mtime_ns) for path, st in found.items()}
        self.snapshots[session.id] = (kernel.id, now)
        changes = []
        for path, st in found.items():
            before = old.get(path)
            if before is None or before != now[path]:
                model = file_model(self.api_prefix, session.id, path, st)
                model["change"] = "created" if before is None else "modified"
                changes.append(model)
        if changes:
            msg = messages.Message.build(
                "iopub", "sagecell.files", {"files": changes}, parent, session="sagecell-daemon"
            )
            self.sessions.broadcast(session, msg)

    def _observe(self, event: str, session, detail: str) -> None:
        if event == "stop":
            self.snapshots.pop(session.id, None)
            self.locks.pop(session.id, None)
