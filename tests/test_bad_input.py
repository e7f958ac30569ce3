"""
Bad input to a real daemon: a clear error, nothing changed, everyone else served.

What a hostile or broken client may send over the WebSocket (both framings)
and the REST API. Each bad frame gets a Jupyter error message and leaves the
connection usable; each bad request gets a 4xx status with a JSON body; the
daemon logs no traceback and still runs code for the same client afterwards.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
import urllib.request

import pytest
import websocket
from support import Client, Daemon, msg, stdout_of

MAX_MESSAGE = 64 << 10
TOKEN = "s3cret-token"
MAX_SOCKETS = 4
MAX_CONNECTIONS = 24
IDLE = 1.0
DEEP = "[" * 20_000 + "]" * 20_000  # under the size limit, far over Python's recursion limit


@pytest.fixture(scope="module")
def strict():
    """A daemon with a small message limit and a token."""
    d = Daemon(
        pool_size=2,
        max_message_size=MAX_MESSAGE,
        token=TOKEN,
        max_sockets_per_session=MAX_SOCKETS,
        max_connections_per_client=MAX_CONNECTIONS,
        http_idle_timeout=IDLE,
    ).start()
    try:
        yield d
    finally:
        d.stop()


def authed(d: Daemon, method: str, path: str, body=None, raw: bytes | None = None, token: str | None = TOKEN):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"token {token}"
    return d.request(method, path, body=body, headers=headers, raw=raw)


def new_kernel(d: Daemon) -> str:
    status, body, _ = authed(d, "POST", "/api/kernels", {"name": "python3"})
    assert status == 201, (status, body)
    return body["id"]


def client(d: Daemon, kid: str, **kw) -> Client:
    return Client(d, kid, header=[f"Authorization: token {TOKEN}"], **kw)


@contextlib.contextmanager
def session(d: Daemon, **kw):
    """A new kernel and a socket to it; both ended after (a client may hold only a few)."""
    kid = new_kernel(d)
    c = None
    try:
        c = client(d, kid, **kw)
        yield c
    finally:
        if c is not None:
            c.close()
        authed(d, "DELETE", f"/api/kernels/{kid}")


def refusal(c: Client) -> dict:
    """The daemon's answer to a refused frame: an error reply or iopub ``error``."""
    for _ in range(20):
        m = c.recv(10)
        if m["msg_type"] == "error" or m["content"].get("ename") == "BadRequest":
            return m
    raise AssertionError("no error message for a bad frame")


def still_works(c: Client) -> None:
    reply, out = c.execute("print(6 * 7)", timeout=30)
    assert reply["status"] == "ok" and stdout_of(out) == "42\n"


def no_tracebacks(d: Daemon) -> None:
    assert "Traceback" not in d.log(), d.log()[-3000:]


# -- the WebSocket, default framing --------------------------------------------------


GOOD = msg("execute_request", {"code": "1", "silent": False})


def with_header(**changes) -> str:
    m = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key in ("msg_type", "msg_id"):
            if value is None:
                del m["header"][key]
            else:
                m["header"][key] = value
        else:
            m[key] = value
    return json.dumps(m)


@pytest.mark.parametrize(
    "frame, why",
    [
        ("this is not json", "not valid JSON"),
        (DEEP, "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('"just a string"', "JSON object"),
        (json.dumps({"channel": "shell", "content": {}}), "no header"),
        (with_header(msg_type=None), "no msg_type"),
        (with_header(msg_id=None), "no msg_id"),
        (with_header(msg_id=7), "no msg_id"),
        (with_header(channel="hb"), "unknown channel"),
        (with_header(channel=None, header=None), "no header"),
        (with_header(msg_type="shutdown_request"), "not allowed on the shell channel"),
        (with_header(msg_type="nonsense_request"), "not allowed on the shell channel"),
        (with_header(content=[1]), "content must be a JSON object"),
        (with_header(parent_header="x"), "parent_header must be a JSON object"),
        (json.dumps(dict(json.loads(with_header()), content={"code": "x" * MAX_MESSAGE})), "over the limit"),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else None,
)
def test_bad_frame_gets_an_error_and_the_connection_goes_on(strict, frame, why):
    with session(strict) as c:
        c.ws.send(frame)
        m = refusal(c)
        text = json.dumps(m["content"])
        assert "BadRequest" in text and why in text, m
        still_works(c)
    no_tracebacks(strict)


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\x00\x00", "truncated"),
        (struct.pack("!I", 0) + b"{}", "buffer count"),
        (struct.pack("!II", 1, 2) + b"{}", "offsets"),
        (struct.pack("!II", 1, 8) + b"\xff\xfe not json", "not valid JSON"),
    ],
)
def test_bad_binary_frame_in_the_default_framing(strict, payload, why):
    with session(strict) as c:
        c.ws.send_binary(payload)
        assert why in json.dumps(refusal(c)["content"])
        still_works(c)
    no_tracebacks(strict)


def v1_refusal(c: Client) -> bytes:
    """The next v1 frame that refuses something (status messages may come first)."""
    for _ in range(20):
        c.ws.settimeout(10)
        got = c.ws.recv()
        assert isinstance(got, bytes), got[:200]
        if b"BadRequest" in got:
            return got
    raise AssertionError("no error frame for a bad v1 frame")


def test_v1_framing_refuses_text_and_garbage(strict):
    with session(strict, subprotocols=["v1.kernel.websocket.jupyter.org"]) as c:
        assert c.ws.getsubprotocol() == "v1.kernel.websocket.jupyter.org"
        c.ws.send("{}")
        assert b"binary frames" in v1_refusal(c)
        for garbage in (b"", b"\x01" * 7, struct.pack("<Q", 9999) + b"x" * 64, struct.pack("<Q", 6) + struct.pack("<QQQQQQ", 1, 0, 0, 0, 0, 0)):
            c.ws.send_binary(garbage)
            assert b"v1 frame" in v1_refusal(c)
    no_tracebacks(strict)


def test_unknown_kernel_socket_is_refused(strict):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        client(strict, "0123456789abcdef0123456789abcdef")
    assert e.value.status_code == 404


# -- tokens and origins ----------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_wrong_or_missing_token_is_refused(strict, token):
    for method, path, body in (("GET", "/api/kernels", None), ("POST", "/api/kernels", {"name": "python3"}), ("GET", "/api/sessions", None)):
        status, answer, _ = authed(strict, method, path, body, token=token)
        assert status in (401, 403), (method, path, status, answer)
        assert isinstance(answer, dict) and answer.get("message"), answer
    kid = new_kernel(strict)
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(f"{strict.ws_url}/api/kernels/{kid}/channels?token={token or ''}", timeout=10)
        assert e.value.status_code in (401, 403)
    finally:
        authed(strict, "DELETE", f"/api/kernels/{kid}")


def test_token_in_the_query_works(strict):
    with urllib.request.urlopen(f"{strict.url}/api/kernels?token={TOKEN}", timeout=10) as resp:
        assert resp.status == 200 and isinstance(json.loads(resp.read()), list)


# -- REST ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, raw, statuses",
    [
        ("POST", "/api/kernels", b"{not json", (400,)),
        ("POST", "/api/kernels", DEEP.encode(), (400,)),
        ("POST", "/api/kernels", b"[1]", (400,)),
        ("POST", "/api/kernels", json.dumps({"name": "no-such-kernel"}).encode(), (400, 404)),
        ("POST", "/api/kernels", b"x" * (2 * MAX_MESSAGE), (413,)),
        ("POST", "/api/sessions", b"{not json", (400,)),
        ("POST", "/api/sessions", DEEP.encode(), (400,)),
        ("POST", "/api/sessions", json.dumps({"kernel": "x"}).encode(), (400,)),
        ("GET", "/api/kernels/0123456789abcdef0123456789abcdef", None, (404,)),
        ("DELETE", "/api/kernels/0123456789abcdef0123456789abcdef", None, (404,)),
        ("POST", "/api/kernels/0123456789abcdef0123456789abcdef/interrupt", None, (404,)),
        ("POST", "/api/kernels/0123456789abcdef0123456789abcdef/restart", None, (404,)),
        ("GET", "/api/sessions/nope", None, (404,)),
        ("PATCH", "/api/sessions/nope", b"{}", (404,)),
        ("GET", "/api/nothing-here", None, (404,)),
    ],
)
def test_bad_request_gets_a_json_error_and_changes_nothing(strict, method, path, raw, statuses):
    _, before, _ = authed(strict, "GET", "/api/kernels")
    status, body, headers = authed(strict, method, path, raw=raw)
    assert status in statuses, (status, body)
    assert isinstance(body, dict) and body.get("message"), body
    _, after, _ = authed(strict, "GET", "/api/kernels")
    assert {k["id"] for k in after} == {k["id"] for k in before}
    no_tracebacks(strict)


# -- connections -----------------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the daemon closes ``sock`` within ``seconds`` (bounded wait)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_one_session_takes_a_bounded_number_of_websockets(strict):
    with session(strict) as first:
        kid = first.kernel_id
        more = [client(strict, kid) for _ in range(MAX_SOCKETS - 1)]
        try:
            with pytest.raises(websocket.WebSocketBadStatusException) as e:
                client(strict, kid)
            assert e.value.status_code == 429
            more.pop().close()
            deadline = time.monotonic() + 10
            while True:  # the close reaches the daemon a moment later
                try:
                    more.append(client(strict, kid))
                    break
                except websocket.WebSocketBadStatusException:
                    assert time.monotonic() < deadline, "a closed socket's place never came free"
                    time.sleep(0.05)
            still_works(more[-1])
        finally:
            for c in more:
                c.close()
    no_tracebacks(strict)


def test_one_client_takes_a_bounded_number_of_connections(strict):
    with session(strict) as ws:  # a WebSocket counts as one connection too
        held = [ws.ws.sock]
        try:
            for _ in range(MAX_CONNECTIONS - 1):
                held.append(socket.create_connection(("127.0.0.1", strict.port), timeout=10))
            extra = socket.create_connection(("127.0.0.1", strict.port), timeout=10)
            assert closed_within(extra, 10), "a connection over the limit was kept open"
            extra.close()
            still_works(ws)  # the connections it has keep working
        finally:
            for s in held[1:]:
                s.close()
    # Their places come free: the client is served again.
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _, _ = authed(strict, "GET", "/api/kernels")
        except OSError:
            status = None
        if status == 200:
            break
        assert time.monotonic() < deadline, "the closed connections' places never came free"
        time.sleep(0.05)
    assert "limit_hit" in strict.log() or "refused a connection" in strict.log()
    no_tracebacks(strict)


def test_idle_http_connection_is_closed_but_a_websocket_is_not(strict):
    idle = socket.create_connection(("127.0.0.1", strict.port), timeout=10)
    with session(strict) as c:
        assert closed_within(idle, IDLE + 10), "an idle HTTP connection was kept open"
        time.sleep(IDLE + 0.5)  # past the HTTP idle timeout: the WebSocket goes on
        still_works(c)
    idle.close()
    no_tracebacks(strict)


def test_the_daemon_serves_after_all_of_it(strict):
    with session(strict) as c:
        still_works(c)
    no_tracebacks(strict)
