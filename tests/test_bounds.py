"""
Issue 13: every resource a visitor can make the daemon hold is bounded before it is held.

As a hostile visitor would try it, against a real daemon on loopback: a
large request body to a path that takes none, or without the token, or over
the route's limit, is answered from its headers, before the body is sent; a
WebSocket frame declaring more than --max-message-size is refused from its
header and the connection closed; /service output stops at the cap; every
output type counts against the cap; restarts are rate-limited; a kernel
cannot pass for the daemon nor send a browser malformed JSON; the debugger
cannot be started; the file scan after an execution does not stall the
reactor. Timing logic is tested with ``task.Clock``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time

import pytest
from fakes import SessionsCase, wire
from support import Daemon, stored_bytes
from twisted.internet import task

from sagecell_tw import config as configmod
from sagecell_tw import messages
from sagecell_tw.core.limits import RateLimit
from sagecell_tw.core.sessions import DAEMON_SESSION, LimitExceeded
from sagecell_tw.messages import BadMessage, Message
from sagecell_tw.web import files, websocket
from sagecell_tw.web.sagecell import OutputBudget, ServiceRun, fit, reply_size

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from benchlib import Closed, RawWS, execute, http, new_kernel, request, rss_mib  # noqa: E402

TOKEN = "bounds-token"
MAX_MESSAGE = 256 << 10
BIG = 95 << 20
OUTPUT_CAP = 64 << 10


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(pool_size=2, token=TOKEN, max_message_size=MAX_MESSAGE, max_upload_size="1M").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def open_daemon():
    """No token; small limits, so that going over them is cheap."""
    d = Daemon(
        pool_size=2,
        max_message_size=MAX_MESSAGE,
        max_output_bytes=OUTPUT_CAP,
        max_restarts_per_minute=3,
        max_kernels_per_client=32,
    ).start()
    try:
        yield d
    finally:
        d.stop()


def _answer(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict]:
    """Status and JSON body of an HTTP answer (Content-Length framed), read within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    while len(body) < length and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, json.loads(body[:length])


def _headers_only(d: Daemon, method: str, path: str, length: int, extra: str = "") -> socket.socket:
    """A request that declares a ``length``-byte body and sends none of it (yet)."""
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    sock.sendall(head.encode())
    return sock


@pytest.mark.parametrize(
    "method, path, extra, status, why",
    [
        ("POST", "/no/such/path", "", 404, "is not here"),
        ("POST", "/no/such/path", f"Authorization: token {TOKEN}\r\n", 404, "is not here"),
        ("POST", "/api/kernels", "", 403, "token"),
        ("POST", "/service", "Authorization: token wrong\r\n", 403, "token"),
        ("POST", "/api/kernels", f"Authorization: token {TOKEN}\r\n", 413, f"limit of {MAX_MESSAGE} bytes"),
        ("PUT", "/api/kernels/nope/files/a.bin", f"Authorization: token {TOKEN}\r\n", 413, f"limit of {1 << 20} bytes"),
        ("POST", "/static/embed.js", "", 413, "takes no request body"),
    ],
)
def test_a_large_body_is_answered_from_its_headers_before_it_is_sent(daemon, method, path, extra, status, why):
    sock = _headers_only(daemon, method, path, BIG, extra)
    try:
        got, body = _answer(sock)  # nothing of the body sent: the answer comes all the same
    finally:
        sock.close()
    assert got == status and why in body["message"], (got, body)


def test_a_refused_body_sent_anyway_is_not_stored_and_the_daemon_serves_on(daemon):
    rss0 = rss_mib(daemon.proc.pid)
    socks = [_headers_only(daemon, "POST", "/no/such/path", BIG) for _ in range(4)]
    chunk = b"x" * (1 << 20)
    try:
        for sock in socks:
            assert _answer(sock)[0] == 404
        for sock in socks:  # what a client that never reads would send: up to the daemon's close
            sock.settimeout(5)
            try:
                for _ in range(40):
                    sock.sendall(chunk)
            except OSError:
                pass
        stored = stored_bytes(daemon.proc.pid)  # Twisted spools bodies to unlinked temp files
    finally:
        for sock in socks:
            sock.close()
    assert stored < (10 << 20), stored
    assert rss_mib(daemon.proc.pid) - rss0 < 20
    status, body, _ = daemon.request("GET", "/api/kernels", headers={"Authorization": f"token {TOKEN}"})
    assert status == 200


def test_a_body_within_the_limit_still_works(daemon):
    status, body, _ = daemon.request(
        "POST", "/api/kernels", {"name": "python3", "pad": "x" * 1000}, headers={"Authorization": f"token {TOKEN}"}
    )
    assert status == 201, body
    daemon.request("DELETE", f"/api/kernels/{body['id']}", headers={"Authorization": f"token {TOKEN}"})


def test_a_chunked_body_over_the_limit_is_cut_off_as_it_comes(daemon):
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        head = f"POST /api/kernels HTTP/1.1\r\nHost: x\r\nAuthorization: token {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode())
        piece = b"x" * (64 << 10)
        for _ in range(MAX_MESSAGE // len(piece) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, body = _answer(sock)
    finally:
        sock.close()
    assert status == 413 and f"limit of {MAX_MESSAGE}" in body["message"]


# -- the session manager's bounds, on a task.Clock ---------------------------------------


class Base(SessionsCase):
    max_kernels = 20

    def setUp(self):
        self.options = {"max_restarts_per_minute": "3", **self.options}
        super().setUp()

    def browser(self, msg_type: str, channel: str = "shell", content: dict | None = None) -> Message:
        return messages.from_dict(
            {
                "channel": channel,
                "header": {"msg_id": os.urandom(8).hex(), "msg_type": msg_type, "session": "browser"},
                "content": content or {},
            }
        )


class RestartLimitTests(Base):
    def test_rate_limit_counts_a_sliding_window(self):
        limit = RateLimit(2, 60.0, self.clock)
        for _ in range(2):
            self.assertEqual(limit.wait("a"), 0)
            limit.record("a")
        self.assertEqual(limit.wait("a"), 60.0)
        self.assertEqual(limit.wait("b"), 0)
        self.clock.advance(30)
        self.assertEqual(limit.wait("a"), 30.0)
        self.clock.advance(30)
        self.assertEqual(limit.wait("a"), 0)
        limit.prune()
        self.assertEqual(limit.events, {})

    def test_restarts_past_the_limit_are_refused_and_change_nothing(self):
        session, conn = self.session_with_kernel()
        for _ in range(3):
            self.ready_kernel()
            self.sessions.restart(session)
        kernel = session.kernel
        self.ready_kernel()
        with self.assertRaises(LimitExceeded) as e:
            self.sessions.restart(session)
        self.assertEqual(e.exception.status, 429)
        self.assertIn("too many kernel restarts", str(e.exception))
        self.assertIs(session.kernel, kernel)  # the refused restart left the kernel alone
        self.clock.advance(60)
        self.sessions.restart(session)
        self.assertIsNot(session.kernel, kernel)

    def test_one_client_is_limited_across_its_sessions(self):
        sessions = [self.session_with_kernel("visitor")[0] for _ in range(4)]
        done = 0
        with self.assertRaises(LimitExceeded):
            for session in sessions:
                for _ in range(3):
                    self.ready_kernel()
                    self.sessions.restart(session)
                    done += 1
        self.assertEqual(done, 9)  # three times the per-session limit
        other, _ = self.session_with_kernel("someone else")
        self.ready_kernel()
        self.sessions.restart(other)

    def test_a_new_kernel_after_each_death_counts_as_a_restart(self):
        session, conn = self.session_with_kernel()
        for _ in range(3):
            self.kernels.kernel_dead(session.kernel.id, "os._exit")
            self.ready_kernel()
            self.sessions.send(
                session, self.browser("execute_request", content={"code": "import os; os._exit(0)"}), conn
            )
            self.assertIsNotNone(session.kernel)
        self.kernels.kernel_dead(session.kernel.id, "os._exit")
        self.ready_kernel()
        req = self.browser("execute_request", content={"code": "1"})
        self.sessions.send(session, req, conn)
        self.assertIsNone(session.kernel)
        [reply] = [m for m in conn.got if m.parent_dict.get("msg_id") == req.msg_id]
        self.assertEqual((reply.msg_type, reply.content_dict()["status"]), ("execute_reply", "error"))
        self.assertIn("too many kernel restarts", reply.content_dict()["evalue"])


class KernelForgeryTests(Base):
    def test_a_kernel_cannot_pass_for_the_daemon(self):
        session, conn = self.session_with_kernel()
        before = len(conn.got)
        forged = messages.stream("[sagecell] This session ended: pay here.", DAEMON_SESSION, name="stderr")
        session.kernel.sockets["iopub"].on_message(wire(forged))
        reply = Message.build("shell", "execute_reply", {"status": "error"}, {"msg_id": "x"}, session=DAEMON_SESSION)
        session.kernel.sockets["shell"].on_message(wire(reply))
        self.assertEqual(conn.got[before:], [])
        self.assertEqual(self.sessions.forged, {session.kernel.id: 2})
        honest = messages.stream("hello", "kernel-session", name="stdout")
        session.kernel.sockets["iopub"].on_message(wire(honest))
        self.assertEqual(conn.stdout(), "hello")

    def test_malformed_json_parts_never_reach_the_browser(self):
        session, conn = self.session_with_kernel()
        before = len(conn.got)
        good = Message.build("iopub", "stream", {"name": "stdout", "text": "ok"}, session="kernel")
        for part, bad in [
            (3, b'{"name":"stdout","text":NaN}'),
            (3, b'{"name":"stdout","text":"\xff\xfe"}'),
            (3, '{"name":"stdout","text":"utf-16"}'.encode("utf-16")),
            (3, b'"not an object"'),
            (0, b'{"msg_type":"stream","session":"k"} trailing'),
            (1, b"[1, 2]"),
            (2, b"{"),
        ]:
            frames = wire(good)
            frames[3 + part] = bad
            with self.assertRaises(BadMessage):
                messages.from_wire("iopub", frames)
            session.kernel.sockets["iopub"].on_message(frames)
        self.assertEqual(conn.got[before:], [])
        self.assertEqual(session.kernel.malformed, 7)
        session.kernel.sockets["iopub"].on_message(wire(good))
        json.loads(conn.got[-1].to_json_frame().decode())  # what a browser parses
        self.assertEqual(conn.stdout(), "ok")


def test_debug_request_is_refused_with_a_jupyter_error():
    frame = json.dumps(
        {
            "channel": "control",
            "header": {"msg_id": "d1", "msg_type": "debug_request"},
            "content": {"command": "initialize"},
        }
    )
    with pytest.raises(BadMessage) as e:
        messages.parse_json_frame(frame.encode())
    reply = messages.error_reply(e.value, DAEMON_SESSION)
    assert (reply.channel, reply.msg_type, reply.parent_dict["msg_id"]) == ("control", "debug_reply", "d1")
    assert reply.content_dict()["status"] == "error"


def test_input_budget_per_client_and_in_all():
    budget = websocket.InputBudget(1 << 20)
    per = budget.per_client
    assert budget.total_limit == 4 * per
    assert budget.reserve("a", 0, per // 2) is None
    assert budget.reserve("a", 0, per // 2) is None
    assert "one client" in budget.reserve("a", 0, 1 << 20)
    assert budget.reserve("a", 0, 100) is None  # a small frame always goes through
    for client in "bc":
        assert budget.reserve(client, 0, per) is None
    assert "as much unfinished input" in budget.reserve("d", 0, per)
    budget.release("b", per)
    assert budget.reserve("d", 0, per) is None
    for client, n in [("a", per // 2), ("a", per // 2), ("a", 100), ("c", per), ("d", per)]:
        budget.release(client, n)
    assert budget.total == 0 and budget.clients == {}


def test_service_output_fits_its_reply_bytes():
    assert reply_size("abc") == 3 and reply_size("é") == 2 and reply_size("😀\ud800") == 5 and reply_size("\x00\n") == 8
    for text in ["x" * 5000, "é" * 5000, "\x00" * 5000, "😀" * 5000, "a\u00e9\x01" * 2000]:
        kept = fit(text, 1000)
        assert text.startswith(kept) and reply_size(kept) <= 1000 and len(kept) > 1000 // 13


# -- the scan after an execution ---------------------------------------------------------


class _ThreadedClock(task.Clock):
    """A clock that takes results from threads as the reactor would, when ``drain`` is called."""

    def __init__(self):
        super().__init__()
        self.from_threads: list = []
        self.triggers: list = []

    def callFromThread(self, f, *args, **kw):
        self.from_threads.append((f, args, kw))

    def addSystemEventTrigger(self, *args):
        self.triggers.append(args)

    def drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.from_threads and time.monotonic() < deadline:
            time.sleep(0.01)
        for f, args, kw in self.from_threads:
            f(*args, **kw)
        self.from_threads.clear()


class _Sessions:
    def __init__(self):
        self.on_execute_done: list = []
        self.observers: list = []
        self.broadcasts: list = []

    def broadcast(self, session, msg):
        self.broadcasts.append(msg)


def test_the_scan_of_ten_thousand_files_is_not_made_on_the_reactor(tmp_path, monkeypatch):
    workdir = tmp_path / "kernel"
    workdir.mkdir()
    for i in range(10_000):
        (workdir / f"f{i:05d}.txt").write_bytes(b"x")
    clock = _ThreadedClock()
    config = configmod.build({}, {"worker_user": "root" if os.geteuid() == 0 else os.environ.get("USER", "root")})
    sessions = _Sessions()
    kf = files.KernelFiles(sessions, config, clock, policy=None)
    kf.kernel_uid = os.geteuid()
    scanned_on: list = []
    real_scan = files.scan

    def scan(*args, **kw):
        scanned_on.append((threading.current_thread(), kw.get("max_entries")))
        return real_scan(*args, **kw)

    monkeypatch.setattr(files, "scan", scan)
    kernel = type("K", (), {"id": "k1", "workdir": str(workdir), "spawner": None})()
    session = type("S", (), {"id": "s1", "kernel": kernel})()
    try:
        d = kf.execute_done(session, {"msg_id": "m1"})
        assert d is not None and not d.called  # the walk goes on elsewhere: the reactor is free
        clock.drain()
        news = []
        d.addCallback(news.append)
        # on the reactor, only the glance, which stops at GLANCE_ENTRIES files
        main = [n for thread, n in scanned_on if thread is threading.main_thread()]
        assert main == [files.GLANCE_ENTRIES]
        assert [t for t, _ in scanned_on if t is not threading.main_thread()]
        [msg] = news
        listed = msg.content_dict()["files"]
        assert msg.msg_type == "sagecell.files" and 0 < len(listed) <= 1000
    finally:
        kf._pool.stop()


def test_a_small_kernel_dir_is_scanned_at_once_without_a_thread(tmp_path):
    """
    The news of a few files is ready when the execution ends, with no hand-off
    to the scan threads and back (which cost each tiny round trip about a
    millisecond and a dozen futex calls in the daemon, the idle status held
    meanwhile).
    """
    workdir = tmp_path / "kernel"
    (workdir / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.png", "sub/c.csv"):
        (workdir / name).write_bytes(b"x")
    clock = _ThreadedClock()
    config = configmod.build({}, {"worker_user": "root" if os.geteuid() == 0 else os.environ.get("USER", "root")})
    kf = files.KernelFiles(_Sessions(), config, clock, policy=None)
    kf.kernel_uid = os.geteuid()
    kernel = type("K", (), {"id": "k1", "workdir": str(workdir), "spawner": None})()
    session = type("S", (), {"id": "s1", "kernel": kernel})()
    news = []
    d = kf.execute_done(session, {"msg_id": "m1"})
    d.addCallback(news.append)
    assert kf._pool is None and not clock.from_threads  # no thread started, nothing to take back
    [msg] = news
    assert msg.msg_type == "sagecell.files"
    assert sorted(f["path"] for f in msg.content_dict()["files"]) == ["a.txt", "b.png", "sub/c.csv"]


# -- end to end, as a hostile visitor ------------------------------------------------------


def _frame_head(length: int, opcode: int = 2) -> bytes:
    """A masked (zero key) WebSocket frame header declaring ``length`` payload bytes."""
    return struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length) + b"\0\0\0\0"


def _closed_within(ws: RawWS, seconds: float) -> bool:
    """Whether the daemon closes ``ws`` within ``seconds`` (messages on the way are skipped)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ws.recv_raw(max(0.05, deadline - time.monotonic()))
        except (Closed, ConnectionError):
            return True
        except TimeoutError:
            return False
    return False


def test_a_frame_declaring_more_than_the_limit_is_refused_from_its_header(open_daemon):
    ws = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    try:
        ws.sock.sendall(_frame_head(MAX_MESSAGE + (512 << 10)))  # and not one byte of its payload
        assert _closed_within(ws, 5)
    finally:
        ws.sock.close()
    other = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    assert other.run("6*7")[0]["status"] == "ok"
    other.close()


def test_unfinished_messages_a_client_may_have_the_daemon_hold_are_bounded(open_daemon):
    kid = new_kernel(open_daemon.port)
    socks = [RawWS(open_daemon.port, kid) for _ in range(6)]
    try:
        for ws in socks:  # each within the limit, together more than one client may have held
            ws.sock.sendall(_frame_head(MAX_MESSAGE) + b"x" * (128 << 10))
        closed = [_closed_within(ws, 3) for ws in socks]
        assert closed.count(True) == 4, closed
    finally:
        for ws in socks:
            ws.sock.close()
    other = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    assert other.run("6*7")[0]["status"] == "ok"
    other.close()


def test_service_output_far_over_the_cap_is_answered_with_at_most_the_cap_and_the_notice(open_daemon):
    # 'é' is 2 bytes in the kernel's message and 6 in a JSON reply (\u00e9).
    with socket.create_connection(("127.0.0.1", open_daemon.port), 60) as sock:
        body = json.dumps({"code": "print('é' * 400_000)"}).encode()
        head = f"POST /service HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + body)
        raw = b""
        while len(raw) < (8 << 20):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            raw += chunk
    assert len(raw) < OUTPUT_CAP + 4096, len(raw)
    reply = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert reply["success"] is False and f"limit of {OUTPUT_CAP} bytes" in reply["error"]
    assert reply["stdout"] and set(reply["stdout"]) == {"é"}
    assert "[sagecell]" in reply["stderr"]


def test_error_messages_count_against_the_cap(open_daemon):
    ws = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    code = "for i in range(24):\n    try:\n        raise ValueError('e' * 20000)\n    except ValueError:\n        get_ipython().showtraceback()\n"
    reply, outputs = ws.run(code)
    ws.close()
    errors = [m for m in outputs if m["msg_type"] == "error"]
    assert 0 < len(errors) < 24
    assert sum(len(json.dumps(m["content"], ensure_ascii=False).encode()) for m in errors) <= OUTPUT_CAP
    notices = [m for m in outputs if m["header"]["session"] == DAEMON_SESSION and m["msg_type"] == "stream"]
    assert len(notices) == 1 and f"Output truncated at {OUTPUT_CAP} bytes" in notices[0]["content"]["text"]
    assert reply["status"] == "ok"  # the reply still arrives


def test_a_restart_flood_gets_429(open_daemon):
    kid = new_kernel(open_daemon.port)
    statuses = [http(open_daemon.port, "POST", f"/api/kernels/{kid}/restart", {}) for _ in range(4)]
    assert [s for s, _ in statuses] == [200, 200, 200, 429], statuses
    assert "too many kernel restarts" in statuses[-1][1]["message"]


FORGE = """
k = get_ipython().kernel
m = k.session.msg("stream", {"name": "stderr", "text": "[sagecell] FORGED: this session ended.\\n"}, parent=k.get_parent())
m["header"]["session"] = "sagecell-daemon"
k.session.send(k.iopub_socket, m)
None
"""


def test_a_kernel_cannot_pass_for_the_daemon_end_to_end(open_daemon):
    ws = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    reply, outputs = ws.run(FORGE)
    ws.close()
    assert reply["status"] == "ok", reply
    assert not [
        m for m in outputs if m["header"]["session"] == DAEMON_SESSION or "FORGED:" in m["content"].get("text", "")
    ]


MALFORMED = """
import json
k = get_ipython().kernel
parent = json.dumps(k.get_parent()["header"], default=str).encode()
raw = b"RAW" + b"-"  # not in the code, which the kernel echoes
for bad in [b'{"name": "stdout", "text": "' + raw + b'", "n": NaN}', b'{"name": "stdout", "text": "' + raw + b'\\xff"}', b'["' + raw + b'"]']:
    h = k.session.msg_header("stream")
    k.session.send_raw(k.iopub_socket, [json.dumps(h, default=str).encode(), parent, b"{}", bad])
print("sent")
"""


def _strict(payload: bytes):
    def refuse(name):
        raise ValueError(name)

    return json.loads(payload.decode("utf-8"), parse_constant=refuse)


def test_malformed_json_from_a_kernel_never_reaches_the_browser(open_daemon):
    ws = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    payload, mid = execute(MALFORMED, ws.session)
    ws.send(payload)
    raws, reply, idle = [], None, False
    deadline = time.monotonic() + 30
    while (reply is None or not idle) and time.monotonic() < deadline:
        raw = ws.recv_raw(deadline - time.monotonic())
        raws.append(raw)
        m = json.loads(raw)
        if m.get("parent_header", {}).get("msg_id") == mid:
            reply = m if m["channel"] == "shell" else reply
            idle = idle or (m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
    ws.close()
    assert reply is not None and reply["content"]["status"] == "ok"
    for raw in raws:
        _strict(raw)  # what a browser's JSON.parse takes
        assert b"RAW-" not in raw
    assert "sent" in json.dumps([json.loads(r) for r in raws])


def test_debug_request_is_refused_end_to_end(open_daemon):
    ws = RawWS(open_daemon.port, new_kernel(open_daemon.port))
    payload, mid = request("debug_request", {"command": "initialize", "arguments": {}}, ws.session, channel="control")
    ws.send(payload)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = ws.recv(deadline - time.monotonic())
        if m.get("parent_header", {}).get("msg_id") == mid and m["channel"] == "control":
            break
    assert m["msg_type"] == "debug_reply" and m["content"]["status"] == "error", m
    assert "not allowed" in m["content"]["evalue"]
    assert ws.run("import sys; 'debugpy' in sys.modules")[0]["status"] == "ok"
    ws.close()


class _ServiceSessions:
    def disconnect(self, session, conn):
        pass

    def shutdown(self, session, reason):
        pass


def test_service_runs_share_one_output_budget():
    budget = OutputBudget(100)
    clock = task.Clock()
    session = type("S", (), {"id": "s", "kernel": None})()
    first = ServiceRun(_ServiceSessions(), session, clock, 1000, budget)
    second = ServiceRun(_ServiceSessions(), session, clock, 1000, budget)
    first._stream({"name": "stdout", "text": "a" * 80})
    second._stream({"name": "stdout", "text": "b" * 80})
    replies = []
    second.done.addCallback(replies.append)
    [reply] = replies
    assert reply.body["stdout"] == "b" * 20 and "holds for /service runs at once" in reply.body["error"]
    assert "[sagecell]" in reply.body["stderr"]
    assert budget.held == 100
    second.release()  # its reply is written out
    assert budget.held == 80
    first._stream({"name": "stdout", "text": "c" * 1000})
    first.done.addCallback(replies.append)
    assert replies[-1].body["stdout"] == "a" * 80 + "c" * 20
    first.release()
    assert budget.held == 0
    alone = ServiceRun(_ServiceSessions(), session, clock, 1000, OutputBudget(1 << 20))
    alone._stream({"name": "stderr", "text": "é" * 1000})  # 2,000 bytes in the reply: over its own cap
    alone.done.addCallback(replies.append)
    assert (
        replies[-1].body["stderr"].startswith("é" * 500 + "\n[sagecell] The output went over the limit of 1000 bytes")
    )
