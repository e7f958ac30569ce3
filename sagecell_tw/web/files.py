# -*- test-case-name: tests.test_files,tests.test_bounds -*-
"""
Kernel files over HTTP: uploads in, downloads out, and news of what changed.

``/api/kernels/{id}/files/{path}`` (and SageMathCell's ``/kernel/{id}/files/{path}``):

- ``GET``/``HEAD`` a file: streamed by ``twisted.web.static.File`` (ranges,
  ``Content-Type`` from the extension; ``control.files.RemoteDownload`` for a
  kernel on a worker host). ``Content-Disposition`` is
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

Kernels on worker hosts: the same requests and answers, but the worker's
spawner does the file system work (with the same ``files.store`` code) and
``control.files`` carries it over the control link, chunk by chunk.

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

import errno
import os
import pwd
import re
from collections.abc import Callable
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server, static

from .. import messages
from ..control import files as remote_files
from ..core.sessions import SessionObserver
from ..files.model import KernelDirs, file_model, listing
from ..files.store import (
    FileError,
    boundary_of,
    check_servable,
    clean_segments,
    open_workdir,
    opened,
    scan,
    store_body,
    store_multipart,
)
from .policy import HTTPError, JsonResource, Response

log = Logger()

#: the scan after an execution: threads for it, and how long one may walk,
#: and wait in line, before the session's output goes on without its news
SCAN_THREADS = 2
SCAN_SECONDS = 0.5
SCAN_QUEUE_SECONDS = 2.0
#: a kernel dir of at most this many files is scanned on the reactor, at once
#: (reading at most ``EXAMINE_FACTOR`` times as many entries, for at most
#: GLANCE_SECONDS): the hand-off to a thread and back cost every tiny round
#: trip about a millisecond, and the idle status waits for the news
GLANCE_ENTRIES = 32
GLANCE_SECONDS = 0.002

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


def is_local(kernel) -> bool:
    """
    Whether ``kernel``'s dir is on this machine. A kernel on a worker host
    is reached through that host's relay; its dir, named in its record, is
    a path over there (and here, at most, someone else's).
    """
    return not getattr(kernel.spawner, "remote", False)


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


def as_http(failure):
    """A ``FileError`` (from files.store, here or on a worker host) as the HTTP error it stands for."""
    if failure.check(FileError):
        raise HTTPError(failure.value.status, failure.value.message)
    return failure


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


def content_type(name: str) -> str:
    """The Content-Type of a download, from its name as ``static.File`` would say it."""
    ftype, _ = static.getTypeAndEncoding(name, static.File.contentTypes, {}, "application/octet-stream")
    return ftype


def file_headers(request, name: str, ftype: str) -> str:
    """
    The headers every file answer carries, local or remote (disposition,
    nosniff, sandbox CSP, no-store); the Content-Type to send, returned.
    """
    if ftype.startswith("text/") and "charset" not in ftype:
        ftype += "; charset=utf-8"  # what Python writes by default; nosniff forbids guessing
    if (request.args.get(b"inline") or [b""])[0] in (b"1", b"true"):
        inline = True
    elif (request.args.get(b"download") or [b""])[0] in (b"1", b"true"):
        inline = False
    else:
        inline = ftype in INLINE_TYPES
    ascii_name = re.sub(r'[^\x20-\x7e]|["\\]', "_", name)
    disposition = f"{'inline' if inline else 'attachment'}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
    request.setHeader(b"content-disposition", disposition.encode("ascii"))
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-security-policy", b"sandbox allow-scripts")
    request.setHeader(b"cache-control", b"no-store")
    # A file rewritten within the second it was fetched keeps its
    # Last-Modified: never answer 304 from that.
    request.requestHeaders.removeHeader(b"if-modified-since")
    return ftype


class FilesResource(JsonResource):
    """One request under ``.../files/``."""

    methods = ("GET", "PUT", "POST")
    takes_body = "upload"

    def __init__(self, files: KernelFiles, kernel_id: str, segments: list[str], prefix: str):
        super().__init__(files.policy)
        self.files = files
        self.kernel_id = kernel_id
        self.segments = segments
        self.prefix = prefix

    def _session(self):
        return self.files.policy.require_session(self.kernel_id)

    def handle(self, request):
        try:
            result = self._handle_checked(request)
        except FileError as e:
            raise HTTPError(e.status, e.message) from None
        if isinstance(result, defer.Deferred):
            result.addErrback(as_http)
        return result

    def _handle_checked(self, request):
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
        if request.method in (b"GET", b"HEAD"):
            if kernel is None:  # it died, and nobody asked for a new one
                if is_dir:
                    return {"files": [], "truncated": False}
                raise HTTPError(404, f"no file {'/'.join(parts)}: the kernel is not running")
            return self.files.side(kernel).get(kernel, parts, self.prefix, self.kernel_id)
        if kernel is None:
            raise HTTPError(503, "the kernel is not running; try again in a moment")
        ctype = request.getHeader(b"content-type") or b""
        if request.method == b"POST" and ctype.split(b";")[0].strip().lower() == b"multipart/form-data":
            boundary = boundary_of(ctype)
            return self.files.upload(session, kernel, parts, request.content, boundary, self.prefix)
        if is_dir:
            raise HTTPError(400, "name the file in the URL, or POST multipart/form-data with a 'file' field")
        return self.files.upload(session, kernel, parts, request.content, None, self.prefix)

    def _respond(self, request, result) -> bytes:
        if isinstance(result, OpenedFile):
            return self._send_file(request, result)
        return super()._respond(request, result)

    def _finish(self, result, request) -> None:
        if isinstance(result, remote_files.RemoteDownload):
            if not request._disconnected:
                result.send(request, lambda r, name: file_headers(r, name, content_type(name)))
            return
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
        f.type = file_headers(request, name, f.type)
        try:
            result = f.render(request)
        except BaseException:
            f.close()
            raise
        if result != server.NOT_DONE_YET:
            f.close()  # HEAD: no producer took the file
        return result


def glance_workdir(workdir: str, owner: int) -> tuple[dict | None, bool]:
    """
    A small kernel dir's scan, made at once on the reactor: (path -> lstat or
    None, whole). ``whole`` is False when the dir has more than the glance
    reads; then ``scan_workdir`` walks it in a thread.
    """
    try:
        root = open_workdir(workdir, owner)
    except (FileError, OSError):
        return None, True
    try:
        found, truncated = scan(root, max_entries=GLANCE_ENTRIES, seconds=GLANCE_SECONDS)
    finally:
        os.close(root)
    return found, not truncated


def scan_workdir(workdir: str, owner: int) -> dict | None:
    """A kernel dir's files (path -> lstat), or None if it cannot be opened. Runs in a thread."""
    try:
        root = open_workdir(workdir, owner)
    except (FileError, OSError):
        return None
    try:
        found, _ = scan(root, seconds=SCAN_SECONDS)
    finally:
        os.close(root)
    return found


class LocalFiles:
    """
    Files of kernels on this host, read and written here by descriptors
    (``files.store``): the same calls as ``control.files.RemoteFiles``
    makes for kernels on worker hosts (``files.model.KernelDirs``).
    """

    def __init__(self, reactor, owner: int, scan_pool: Callable[[], ThreadPool]):
        self.reactor = reactor
        #: who owns kernel dirs and may own the files we serve
        self.owner = owner
        self._scan_pool = scan_pool

    def get(self, kernel, parts: list[str], prefix: str, kernel_id: str):
        """A listing (dict), or an ``OpenedFile`` for ``FilesResource`` to send."""
        with opened(kernel.workdir, self.owner, parts) as target:
            if target.is_dir:
                found, truncated = scan(target.fd)
                return listing(prefix, kernel_id, target.parts, found, truncated)
            check_servable(target.st, self.owner, parts)
            fd, target.fd = target.fd, -1
            return OpenedFile(target.parts[-1], fd, target.st)

    def upload(self, kernel, parts: list[str], body, boundary: bytes | None, max_upload: int, quota: int):
        """Store a raw body, or a form's file, in a thread of the reactor's pool: ``(parts, stat)``."""
        pool = self.reactor.getThreadPool()
        if boundary is None:
            d = deferToThreadPool(
                self.reactor, pool, store_body, kernel.workdir, self.owner, parts, body, max_upload, quota
            )
            return d.addCallback(lambda st: (parts, st))
        work = (store_multipart, kernel.workdir, self.owner, parts, body, boundary, max_upload, quota)
        return deferToThreadPool(self.reactor, pool, *work)

    def scan(self, kernel) -> defer.Deferred:
        """
        Every file in the kernel's ``work/``: path -> stat, or None if the dir
        cannot be opened. A small dir at once (``glance_workdir``); a larger
        one in a thread of a small pool, as a worker host scans on its own:
        ten thousand files take the reactor long enough to slow every other
        session's round trip. Bounded in entries and time.
        """
        found, whole = glance_workdir(kernel.workdir, self.owner)
        if whole:
            return defer.succeed(found)
        d = deferToThreadPool(self.reactor, self._scan_pool(), scan_workdir, kernel.workdir, self.owner)
        return d.addTimeout(SCAN_SECONDS + SCAN_QUEUE_SECONDS, self.reactor)


class KernelFiles(SessionObserver):
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
        #: files of kernels on this host, and on worker hosts over their spawners' control links
        self.local = LocalFiles(reactor, self.kernel_uid, self._scan_pool)
        self.remote = remote_files.RemoteFiles(reactor)
        #: threads for the scans after executions, started when first needed
        self._pool: ThreadPool | None = None
        sessions.on_execute_done.append(self.execute_done)
        sessions.observers.append(self)

    def side(self, kernel) -> KernelDirs:
        """Where ``kernel``'s files are reached: here, or through its worker host."""
        return self.local if is_local(kernel) else self.remote

    def resource_for(self, kernel_id: str, segments: list[str], prefix: str) -> resource.Resource:
        """The resource for ``{prefix}/{kernel_id}/files/{segments}``."""
        return FilesResource(self, kernel_id, segments, prefix)

    # -- uploads ----------------------------------------------------------------

    def upload(self, session, kernel, parts: list[str], body, boundary: bytes | None, prefix: str) -> defer.Deferred:
        cfg = self.config
        lock = self.locks.setdefault(session.id, defer.DeferredLock())
        d = lock.run(self.side(kernel).upload, kernel, parts, body, boundary, cfg.max_upload_size, cfg.disk_quota)

        def full(failure):
            failure.trap(OSError)
            if failure.value.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise HTTPError(507, f"no room for the upload: {failure.value.strerror}")
            return failure

        def stored(result):
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

    def execute_done(self, session, parent: dict) -> defer.Deferred | None:
        """
        Tell the session's connections which files the execution created or
        changed. The scan is made where the kernel's dir is (in a thread
        here, or on its worker host): a Deferred of the message, which the
        session sends before "idle".
        """
        kernel = session.kernel
        if kernel is None:
            return None
        d = self.side(kernel).scan(kernel)

        def scanned(found):
            if found is None or session.kernel is not kernel:
                return None
            return self._report(session, kernel, parent, found)

        def failed(failure):
            log.info("no file news from kernel {kernel}: {why}", kernel=kernel.id, why=failure.getErrorMessage())

        return d.addCallbacks(scanned, failed)

    def _scan_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(0, SCAN_THREADS, name="sagecell-file-scan")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return self._pool

    def _report(self, session, kernel, parent: dict, found: dict) -> messages.Message | None:
        """Compare a scan (path -> stat) with the last one: the news message, if anything changed."""
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
        if not changes:
            return None
        return messages.Message.build(
            "iopub", "sagecell.files", {"files": changes}, parent, session=messages.DAEMON_SESSION
        )

    def session_ended(self, session, reason: str) -> None:
        self.snapshots.pop(session.id, None)
        self.locks.pop(session.id, None)
