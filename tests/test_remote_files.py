"""
The daemon's side of files on worker hosts: requests over the control
channel (replies with data frames, timeouts, a lost host), and downloads
and uploads driven against the real worker-side handler, in memory, with
task.Clock. No processes, no sockets.
"""

from __future__ import annotations

import io
import json
import os

import pytest
from fakes import FakeZmq
from twisted.internet import defer, task
from twisted.web.test.requesthelper import DummyRequest

from sagecell_tw.control import files as remote_files
from sagecell_tw.control import spawners
from sagecell_tw.control.files import CHUNK, RemoteFiles, byte_range
from sagecell_tw.core import kernels
from sagecell_tw.files.store import FileError
from sagecell_tw.files.worker import WorkerFiles
from sagecell_tw.web.files import content_type, file_headers

KID = "feedbeef"


class Kernel:
    def __init__(self, spawner):
        self.id = KID
        self.spawner = spawner


class Link:
    """A control channel with one worker host joined, fed by hand."""

    def __init__(self):
        self.clock = task.Clock()
        self.zmq = FakeZmq()
        manager = kernels.KernelManager(self.zmq, self.clock, max_kernels=5, shutdown_grace=1.0)
        self.channel = spawners.ControlChannel(self.zmq, "tcp://10.0.0.1:5555", manager, self.clock)
        self.channel.listen()
        self.router = self.zmq.routers[0]
        hello = {"event": "hello", "name": "w1", "host": "w1", "public_host": "10.0.0.2", "pid": 1, "relay": True}
        self.router.on_message([b"w1", json.dumps(hello).encode()])
        self.spawner = self.channel.spawners[b"w1"]
        self.kernel = Kernel(self.spawner)

    def commands(self) -> list[tuple[dict, bytes | None]]:
        """The files commands sent to the worker so far."""
        out = []
        for frames in self.router.sent:
            msg = json.loads(frames[1])
            if msg.get("cmd") == "files":
                out.append((msg, frames[2] if len(frames) == 3 else None))
        return out

    def answer(self, msg: dict, data: bytes | None = None) -> None:
        frames = [b"w1", json.dumps(dict(msg, event="files")).encode()]
        if data is not None:
            frames.append(data)
        self.router.on_message(frames)


def result_of(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the deferred has not fired"
    return out[0]


def http_error(d: defer.Deferred, status: int) -> str:
    failure = result_of(d)
    assert hasattr(failure, "check") and failure.check(FileError), failure
    assert failure.value.status == status, (failure.value.status, failure.value.message)
    return failure.value.message


# -- requests over the control channel -------------------------------------------------


def test_a_reply_with_its_data_frame_reaches_the_request():
    link = Link()
    d = RemoteFiles(None).call(link.kernel, "read", path=["x"], offset=0, length=3, tag="t")
    [(msg, data)] = link.commands()
    assert msg["op"] == "read" and msg["kernel"] == KID and msg["path"] == ["x"] and data is None
    assert not d.called
    link.answer({"req": msg["req"] + 1, "ok": True}, b"nope")  # not ours
    assert not d.called
    link.answer({"req": msg["req"], "ok": True, "size": 3}, b"abc")
    reply, data = result_of(d)
    assert reply["size"] == 3 and data == b"abc"
    assert link.spawner.pending == {}


def test_data_goes_as_a_frame_not_json():
    link = Link()
    RemoteFiles(None).call(link.kernel, "write", b"\x00\xff" * 10, upload="u", offset=0)
    [(msg, data)] = link.commands()
    assert data == b"\x00\xff" * 10 and "data" not in msg


def test_no_answer_is_a_504_and_a_late_one_is_dropped():
    link = Link()
    d = RemoteFiles(None, timeout=3.0).call(link.kernel, "scan")
    [(msg, _)] = link.commands()
    link.clock.advance(2.9)
    assert not d.called
    link.clock.advance(0.2)
    assert "did not answer" in http_error(d, 504)
    link.answer({"req": msg["req"], "ok": True})  # too late: nothing happens
    assert link.spawner.pending == {}


def test_a_lost_host_fails_every_waiting_request_at_once():
    link = Link()
    files = RemoteFiles(None, timeout=60.0)
    waiting = [files.call(link.kernel, "scan") for _ in range(3)]
    for _ in range(int(spawners.SILENCE / spawners.PING_INTERVAL) + 2):
        link.clock.advance(spawners.PING_INTERVAL)
    for d in waiting:
        assert "went away" in http_error(d, 503)
    assert link.spawner.pending == {} and link.clock.getDelayedCalls() == [link.channel._pinger.call]


def test_too_many_waiting_requests_are_503():
    link = Link()
    files = RemoteFiles(None)
    waiting = [files.call(link.kernel, "scan") for _ in range(spawners.MAX_PENDING)]
    assert "busy" in http_error(files.call(link.kernel, "scan"), 503)
    for d in waiting:
        d.addErrback(lambda _f: None)


def test_worker_errors_become_http_errors_and_nonsense_is_502():
    link = Link()
    files = RemoteFiles(None)
    d1, d2, d3 = (files.call(link.kernel, "list", path=[]) for _ in range(3))
    reqs = [m["req"] for m, _ in link.commands()]
    link.answer({"req": reqs[0], "ok": False, "status": 403, "message": "a symbolic link leads out"})
    link.answer({"req": reqs[1], "ok": False, "status": 302, "message": "elsewhere"})
    link.answer({"req": reqs[2], "ok": True, "kind": "dir", "parts": [".."], "files": []})
    assert http_error(d1, 403) == "a symbolic link leads out"
    http_error(d2, 502)
    assert result_of(d3)[0]["ok"]  # call() passes it on; get() checks the fields (below)


def test_malformed_listings_are_502():
    link = Link()
    files = RemoteFiles(None)
    bad = [
        {"kind": "dir", "parts": [".."], "files": []},
        {"kind": "dir", "parts": [], "files": [["../x", 1, 1]]},
        {"kind": "dir", "parts": [], "files": [["x", -1, 1]]},
        {"kind": "dir", "parts": [], "files": "x"},
        {"kind": "file", "parts": ["x"], "size": "1", "mtime_ns": 1, "tag": "t"},
        {"kind": "what", "parts": ["x"]},
    ]
    ds = [files.get(link.kernel, [], "/api/kernels", "s") for _ in bad]
    for (msg, _), answer in zip(link.commands(), bad):
        link.answer(dict(answer, req=msg["req"], ok=True))
    for d in ds:
        http_error(d, 502)


# -- against the real worker handler, in memory ------------------------------------------


class Loopback:
    """A spawner whose requests the worker-side handler answers, when ``flush`` is called."""

    host = "loopback"

    def __init__(self, worker: WorkerFiles):
        self.worker = worker
        self.queue: list[tuple[defer.Deferred, dict, bytes | None]] = []
        self.seen: list[dict] = []

    def request(self, msg, data=None, timeout=None):
        d = defer.Deferred()
        self.seen.append(msg)
        self.queue.append((d, dict(msg, req=len(self.seen)), data))
        return d

    def flush(self, limit: int = 10000) -> int:
        n = 0
        while self.queue and n < limit:
            d, msg, data = self.queue.pop(0)
            d.callback(self.worker.handle(msg, data))
            n += 1
        return n


class StreamingRequest(DummyRequest):
    """A DummyRequest that takes a push producer as a transport would, and can be paused."""

    def __init__(self, method=b"GET", headers=None):
        super().__init__([b""])
        self.method = method
        for k, v in (headers or {}).items():
            self.requestHeaders.setRawHeaders(k, [v])
        self.producer = None
        self.lost = False
        self.full_after: int | None = None

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        super().write(data)
        if self.full_after is not None and len(self.written) >= self.full_after and self.producer:
            self.producer.pauseProducing()

    def loseConnection(self):
        self.lost = True

    def header(self, name: bytes):
        return self.responseHeaders.getRawHeaders(name, [None])[0]


@pytest.fixture
def loop(tmp_path):
    work = tmp_path / KID / "work"
    work.mkdir(parents=True)
    worker = WorkerFiles(str(tmp_path), os.geteuid())
    worker.kernel_ready(KID)
    lb = Loopback(worker)
    lb.work = work
    lb.kernel = Kernel(lb)
    return lb


def download(loop, name: str, request: StreamingRequest):
    d = RemoteFiles(None).get(loop.kernel, [name], "/api/kernels", "s")
    loop.flush(1)
    dl = result_of(d)
    assert isinstance(dl, remote_files.RemoteDownload), dl
    dl.send(request, lambda r, n: file_headers(r, n, content_type(n)))
    return dl


def test_download_streams_a_chunk_at_a_time_and_stops_while_paused(loop):
    payload = os.urandom(3 * CHUNK + 123)
    (loop.work / "data.bin").write_bytes(payload)
    request = StreamingRequest()
    request.full_after = 2  # the client's socket is full after two chunks
    download(loop, "data.bin", request)
    assert request.header(b"content-length") == str(len(payload)).encode()
    assert request.header(b"content-type") == b"application/octet-stream"
    assert request.header(b"x-content-type-options") == b"nosniff"
    assert request.header(b"content-security-policy") == b"sandbox allow-scripts"
    assert request.header(b"content-disposition").startswith(b"attachment;")
    loop.flush()
    assert len(request.written) == 2 and loop.queue == []  # paused: no read asked for
    reads = sum(1 for m in loop.seen if m["op"] == "read")
    assert reads == 2
    request.full_after = None
    request.producer.resumeProducing()
    loop.flush()
    assert b"".join(request.written) == payload and request.finished and not request.lost
    assert max(len(w) for w in request.written) <= CHUNK


def test_download_ranges_head_and_416(loop):
    payload = bytes(range(256)) * 3000
    (loop.work / "page.html").write_bytes(payload)
    request = StreamingRequest(headers={b"range": b"bytes=1000-300999"})
    download(loop, "page.html", request)
    loop.flush()
    assert request.responseCode == 206
    assert request.header(b"content-range") == f"bytes 1000-300999/{len(payload)}".encode()
    assert b"".join(request.written) == payload[1000:301000]
    assert request.header(b"content-type") == b"text/html; charset=utf-8"

    request = StreamingRequest(headers={b"range": b"bytes=-10"})
    download(loop, "page.html", request)
    loop.flush()
    assert b"".join(request.written) == payload[-10:]

    request = StreamingRequest(method=b"HEAD")
    download(loop, "page.html", request)
    assert request.finished and request.written == [] and loop.queue == []
    assert request.header(b"content-length") == str(len(payload)).encode()

    request = StreamingRequest(headers={b"range": f"bytes={len(payload)}-".encode()})
    download(loop, "page.html", request)
    assert request.responseCode == 416 and request.header(b"content-range") == f"bytes */{len(payload)}".encode()


def test_a_file_changed_mid_download_cuts_the_connection(loop):
    (loop.work / "f").write_bytes(b"x" * (2 * CHUNK))
    request = StreamingRequest()
    download(loop, "f", request)
    loop.flush(1)
    (loop.work / "f").write_bytes(b"y" * (3 * CHUNK))
    loop.flush()
    assert request.lost and not request.finished and len(request.written) == 1


def test_a_client_gone_stops_the_reads(loop):
    (loop.work / "f").write_bytes(b"x" * (4 * CHUNK))
    request = StreamingRequest()
    dl = download(loop, "f", request)
    dl.stopProducing()
    loop.flush()
    assert len(request.written) <= 1 and loop.queue == []


def test_upload_in_chunks_then_the_file_is_there(loop):
    payload = os.urandom(2 * CHUNK + 5)
    d = RemoteFiles(None).upload(loop.kernel, ["in", "up.bin"], io.BytesIO(payload), None, 1 << 30, 0)
    for _ in range(10):
        loop.flush()
    parts, st = result_of(d)
    assert parts == ["in", "up.bin"] and st.st_size == len(payload)
    assert (loop.work / "in" / "up.bin").read_bytes() == payload
    writes = [m for m in loop.seen if m["op"] == "write"]
    assert [m["offset"] for m in writes] == [0, CHUNK, 2 * CHUNK]


def test_a_refused_upload_changes_nothing_and_is_aborted(loop):
    (loop.work / "keep").write_bytes(b"old")
    d = RemoteFiles(None).upload(loop.kernel, ["keep"], io.BytesIO(b"x" * 100), None, 10, 0)
    loop.flush()
    assert "upload limit" in http_error(d, 413)
    assert (loop.work / "keep").read_bytes() == b"old"
    assert [n for n in os.listdir(loop.work) if n.startswith(".")] == []


def test_an_upload_that_times_out_is_aborted_on_the_worker():
    link = Link()
    d = RemoteFiles(None, timeout=3.0).upload(link.kernel, ["f"], io.BytesIO(b"abc"), None, 100, 0)
    [(msg, _)] = link.commands()
    link.answer({"req": msg["req"], "ok": True, "upload": "tok"})
    link.clock.advance(4)
    http_error(d, 504)
    assert [(m["op"], m.get("upload")) for m, _ in link.commands()] == [
        ("open", None),
        ("write", "tok"),
        ("abort", "tok"),
    ]


def test_a_form_is_spooled_with_the_upload_limit():
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="path"\r\n\r\nsub/n.bin\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        + bytes(range(256))
        + b"\r\n--XX--\r\n"
    )
    parts, spool = remote_files.spool_form(io.BytesIO(body), b"XX", ["d"], 1000)
    spool.seek(0)
    assert parts == ["d", "sub", "n.bin"] and spool.read() == bytes(range(256))
    with pytest.raises(remote_files.TooLarge):
        remote_files.spool_form(io.BytesIO(body), b"XX", ["d"], 100)


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        (b"bytes=0-9", (0, 10)),
        (b"bytes=5-", (5, 100)),
        (b"bytes=-10", (90, 100)),
        (b"bytes=-1000", (0, 100)),
        (b"bytes=90-1000", (90, 100)),
        (b"bytes=0-1,5-6", None),
        (b"bytes=9-3", None),
        (b"items=0-1", None),
        (b"bytes=a-b", None),
        (b"bytes=100-", ValueError),
        (b"bytes=-0", ValueError),
    ],
)
def test_byte_range(header, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            byte_range(header, 100)
    else:
        assert byte_range(header, 100) == expected


# -- the news after an execution, before its "idle" ------------------------------------------


def _session_with_a_kernel():
    from fakes import FakeConnection, FakeSpawner, iopub_welcome, kernel_info

    from sagecell_tw import config as configmod
    from sagecell_tw.core.sessions import SessionManager

    clock = task.Clock()
    config = configmod.build({}, {"pool_size": "1"})
    manager = kernels.KernelManager(FakeZmq(), clock, 5, shutdown_grace=1.0)
    sessions = SessionManager(manager, config, clock)
    manager.kernel_ready(kernel_info("k1", key="secret"), FakeSpawner())
    kernel = manager.kernels["k1"]
    iopub_welcome(kernel)
    session = sessions.create("1.2.3.4")
    conn = FakeConnection()
    sessions.connect(session, conn)
    return sessions, session, kernel, conn


def test_iopub_waits_for_the_news_from_a_worker_then_gets_it_first():
    from fakes import publish

    from sagecell_tw import messages

    sessions, session, kernel, conn = _session_with_a_kernel()
    news: list[defer.Deferred] = []
    sessions.on_execute_done.append(lambda s, parent: news.append(defer.Deferred()) or news[-1])
    req = messages.Message.build("shell", "execute_request", {"code": "x"}, session="browser")
    sessions.send(session, req, conn)
    parent = {"msg_id": req.msg_id, "session": "browser"}
    publish(kernel, messages.status("busy", "k", parent))
    publish(kernel, messages.status("idle", "k", parent))
    publish(kernel, messages.stream("later\n", "k", parent))
    assert conn.states()[-1] == "busy" and len(news) == 1  # idle and what follows wait
    note = messages.Message.build("iopub", "sagecell.files", {"files": []}, parent, session="sagecell-daemon")
    news[0].callback(note)
    assert [m.msg_type for m in conn.got[-3:]] == ["sagecell.files", "status", "stream"]
    assert not session.hold.holding
    # a failed scan (a timeout) lets it all go, without news
    sessions.send(session, req, conn)
    publish(kernel, messages.status("idle", "k", parent))
    news[1].errback(RuntimeError("no answer"))
    assert conn.got[-1].msg_type == "status" and not session.hold.holding
