# -*- test-case-name: tests.test_remote_files -*-
"""
Files of kernels on worker hosts: the daemon's side of the ``files`` commands.

The kernel's ``work/`` dir is on the worker, out of our reach; its spawner
front reads and writes it for us (``files/worker.py``), over the control link
that is already CurveZMQ-encrypted and authenticated. One command, one reply:

    daemon -> worker  {"cmd": "files", "req": N, "op", "kernel": id, ...} [+ data frame]
    worker -> daemon  {"event": "files", "req": N, "ok": true, ...}     [+ data frame]
                      {"event": "files", "req": N, "ok": false, "status", "message"}

Data travels as its own zmq frame, at most ``CHUNK`` bytes, never in JSON.
A download asks for one chunk at a time, and asks for the next only while
the HTTP client keeps up (a streaming producer): a slow client stops the
reads, and we never hold more than a chunk of a file. An upload goes the
same way, a chunk per command, into a temporary file the worker renames
into place at ``commit`` (or removes). Every request times out
(``Spawner.request``); a lost worker fails them all at once.
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ..files.model import listing
from ..files.store import MAX_ENTRIES, FileError, TooLarge, clean_segments, read_form, split_relative
from .spawners import RequestFailed

log = Logger()

#: bytes of file data in one command or reply
CHUNK = 256 << 10
#: seconds a worker host has to answer one command ...
TIMEOUT = 10.0
#: ... and the scan after an execution, while the session's output waits for it
SCAN_TIMEOUT = 3.0
#: statuses a worker may answer with; anything else is its fault (502)
STATUSES = frozenset({400, 403, 404, 409, 413, 500, 503, 507})


class RemoteStat(NamedTuple):
    """What we learn of a file on a worker host: enough for a file model and a snapshot."""

    st_size: int
    st_mtime_ns: int

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / 1e9


def _count(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FileError(502, "the worker host gave a malformed answer")
    return value


def _parts(value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise FileError(502, "the worker host gave a malformed answer")
    try:
        parts, _ = clean_segments(value)
    except FileError:
        raise FileError(502, "the worker host gave a malformed path") from None
    return parts


def _entries(reply: dict) -> dict[str, RemoteStat]:
    """A listing or scan from a worker: path -> RemoteStat, checked."""
    files = reply.get("files")
    if not isinstance(files, list) or len(files) > MAX_ENTRIES:
        raise FileError(502, "the worker host gave a malformed listing")
    found: dict[str, RemoteStat] = {}
    for entry in files:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise FileError(502, "the worker host gave a malformed listing")
        _parts(entry[0].split("/"))
        found[entry[0]] = RemoteStat(_count(entry[1]), _count(entry[2]))
    return found


def byte_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The one range ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` asked for, as
    ``(start, end)`` with ``end`` exclusive; None for the whole file (no
    header, several ranges, or one we do not understand: RFC 9110 lets us
    ignore it). ``ValueError`` when it cannot be satisfied (416).
    """
    if not header:
        return None
    unit, _, spec = header.decode("latin-1").partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError("unsatisfiable")
        return max(0, size - n), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise ValueError("unsatisfiable")
    return start, end


def spool_form(body, boundary: bytes, base: list[str], max_upload: int):
    """
    (In a thread.) A ``multipart/form-data`` body's file, parsed out into a
    temporary file here, and the parts it is to be stored at over there.
    """
    out = tempfile.TemporaryFile()
    size = 0

    def write(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > max_upload:
            raise TooLarge(f"the file is {size} bytes or more, over the upload limit of {max_upload} bytes")
        out.write(data)

    try:
        parts = base + split_relative(read_form(body, boundary, write))
    except BaseException:
        out.close()
        raise
    return parts, out


class RemoteFiles:
    """Listings, downloads, uploads and scans of kernels on worker hosts."""

    def __init__(self, reactor, timeout: float = TIMEOUT):
        #: a thread pool (multipart parsing), through the reactor
        self.reactor = reactor
        self.timeout = timeout

    def call(self, kernel, op: str, data: bytes | None = None, timeout: float | None = None, **fields):
        """One command to the kernel's worker; ``(reply, data)``, or a ``FileError``."""
        msg = {"cmd": "files", "op": op, "kernel": kernel.id, **fields}
        d = kernel.spawner.request(msg, data, self.timeout if timeout is None else timeout)

        def answered(result):
            reply, frame = result
            if reply.get("ok") is True:
                return reply, frame
            status, message = reply.get("status"), reply.get("message")
            if status not in STATUSES or not isinstance(message, str):
                raise FileError(502, "the worker host gave a malformed answer")
            raise FileError(status, message[:1000])

        def failed(failure):
            failure.trap(RequestFailed)
            raise FileError(failure.value.status, failure.value.message)

        return d.addCallbacks(answered, failed)

    # -- reading ----------------------------------------------------------------

    def get(self, kernel, parts: list[str], prefix: str, kernel_id: str) -> defer.Deferred:
        """A listing (dict), or a ``RemoteDownload`` for ``FilesResource`` to send."""
        def answered(result):
            reply, _ = result
            found = _parts(reply.get("parts"))
            if reply.get("kind") == "dir":
                return listing(prefix, kernel_id, found, _entries(reply), bool(reply.get("truncated")))
            tag = reply.get("tag")
            if reply.get("kind") != "file" or not found or not isinstance(tag, str) or len(tag) > 200:
                raise FileError(502, "the worker host gave a malformed answer")
            st = RemoteStat(_count(reply.get("size")), _count(reply.get("mtime_ns")))
            return RemoteDownload(self, kernel, parts, found[-1], st, tag)

        return self.call(kernel, "list", path=parts).addCallback(answered)

    def scan(self, kernel, timeout: float = SCAN_TIMEOUT) -> defer.Deferred:
        """Every file in the kernel's ``work/`` (as a listing): path -> RemoteStat."""
        return self.call(kernel, "scan", timeout=timeout).addCallback(lambda result: _entries(result[0]))

    # -- writing ----------------------------------------------------------------

    def upload(self, kernel, parts: list[str], body, boundary: bytes | None, max_upload: int, quota: int):
        """Store a raw body, or a form's file, on the worker: ``(parts, RemoteStat)``."""
        if boundary is None:
            return self._send(kernel, parts, body, max_upload, quota)
        pool = self.reactor.getThreadPool()
        d = deferToThreadPool(self.reactor, pool, spool_form, body, boundary, parts, max_upload)

        def spooled(result):
            form_parts, spool = result
            d2 = self._send(kernel, form_parts, spool, max_upload, quota)
            return d2.addBoth(lambda r: (spool.close(), r)[1])

        return d.addCallback(spooled)

    @defer.inlineCallbacks
    def _send(self, kernel, parts: list[str], body, max_upload: int, quota: int):
        body.seek(0, os.SEEK_END)
        size = body.tell()
        body.seek(0)
        reply, _ = yield self.call(kernel, "open", path=parts, size=size, max_upload=max_upload, quota=quota)
        token = reply.get("upload")
        if not isinstance(token, str) or len(token) > 64:
            raise FileError(502, "the worker host gave a malformed answer")
        try:
            offset = 0
            while offset < size:  # at most size / CHUNK turns
                data = body.read(min(CHUNK, size - offset))
                if not data:
                    break
                yield self.call(kernel, "write", data, upload=token, offset=offset)
                offset += len(data)
            reply, _ = yield self.call(kernel, "commit", upload=token)
        except BaseException:
            # The worker drops an upload that failed there; this is for the
            # failures on our side (and a timeout) and costs nothing otherwise.
            self.call(kernel, "abort", upload=token).addErrback(lambda _f: None)
            raise
        return parts, RemoteStat(_count(reply.get("size")), _count(reply.get("mtime_ns")))


class RemoteDownload:
    """
    A file on a worker host, sent to one HTTP request chunk by chunk: a
    streaming producer that reads the next chunk only while not paused.
    """

    def __init__(self, files: RemoteFiles, kernel, path: list[str], name: str, st: RemoteStat, tag: str):
        self.files = files
        self.kernel = kernel
        self.path = path
        self.name = name
        self.st = st
        #: the worker's identity of the file (device, inode, size, mtime): a
        #: file replaced or changed during the download ends it
        self.tag = tag
        self.request = None
        self.offset = 0
        self.end = 0
        self.paused = False
        self.reading = False
        self.done = False

    def send(self, request, set_headers) -> None:
        """Answer ``request``; ``set_headers(request, name)`` sets the common file headers, returns the type."""
        self.request = request
        size = self.st.st_size
        ftype = set_headers(request, self.name)
        request.setHeader(b"content-type", ftype.encode("latin-1"))
        request.setHeader(b"accept-ranges", b"bytes")
        request.setLastModified(self.st.st_mtime_ns // 10**9)
        try:
            span = byte_range(request.getHeader(b"range"), size)
        except ValueError:
            request.setResponseCode(416)
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            request.setHeader(b"content-length", b"0")
            request.finish()
            return
        start, end = span if span is not None else (0, size)
        if span is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{end - 1}/{size}".encode())
        request.setHeader(b"content-length", str(end - start).encode())
        if request.method == b"HEAD" or start == end:
            request.finish()
            return
        self.offset, self.end = start, end
        request.notifyFinish().addErrback(lambda _f: self.stopProducing())
        request.registerProducer(self, True)
        self._next()

    def _next(self) -> None:
        if self.done or self.paused or self.reading:
            return
        self.reading = True
        n = min(CHUNK, self.end - self.offset)
        d = self.files.call(self.kernel, "read", path=self.path, offset=self.offset, length=n, tag=self.tag)
        d.addCallbacks(self._got, self._failed, callbackArgs=(n,))

    def _got(self, result, asked: int) -> None:
        self.reading = False
        if self.done:
            return
        _, data = result
        if not data or len(data) > asked:
            self._abort("the worker host sent no data or too much")
            return
        self.offset += len(data)
        self.request.write(data)  # may pause us
        if self.offset >= self.end:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        self._next()

    def _failed(self, failure) -> None:
        self.reading = False
        if not self.done:
            why = failure.value.message if failure.check(FileError) else str(failure.value)
            self._abort(why)

    def _abort(self, why: str) -> None:
        """The headers are out: all we can do is cut the connection short of Content-Length."""
        log.warn(
            "download of {path} from {kernel} cut off: {why}",
            event="remote_download_failed",
            path="/".join(self.path),
            kernel=self.kernel.id,
            why=why,
        )
        self.done = True
        self.request.unregisterProducer()
        self.request.loseConnection()

    # -- IPushProducer ------------------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._next()

    def stopProducing(self) -> None:
        self.done = True
