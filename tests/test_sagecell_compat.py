"""
SageMathCell's endpoints: POST /kernel, WS /kernel/{id}/channels, DELETE
/kernel/{id}, POST /service, and the permalink round trip through the daemon.

The shapes checked here are those of SageMathCell's handlers.py: /kernel
answers {"id", "ws_url"} with ws_url the socket's base ("ws://host/"), its
socket carries JSON text frames with a "channel" key and sends a browser
message without one to shell; /service answers {"success", "stdout",
"stderr", "execute_reply"}, 413 for code over 65000 characters, 403 without
accepted_tos=true when the server requires it.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
import uuid
import zlib
from io import BytesIO

import pytest
import websocket
from support import Daemon, msg
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from sagecell_tw import config as configmod
from sagecell_tw.core.sessions import SessionManager
from sagecell_tw.messages import Message
from sagecell_tw.web import sagecell as sagecell_compat
from sagecell_tw.web import site
from sagecell_tw.web.api import Api
from sagecell_tw.web.policy import JsonResource, NotFound

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -- in memory: the resources over a real SessionManager and fake kernels -----


class FakeKernel:
    """
    Answers requests the way ipykernel does, a tick later (execute_request:
    never, unless ``answer``). Until ``deaf_until`` its iopub messages are
    lost, as zmq loses them before a new subscriber's subscription arrives.
    """

    def __init__(self, clock, answer=True, deaf_until=0.0):
        self.id = uuid.uuid4().hex
        self.pid = 0
        self.clock = clock
        self.answer = answer
        self.deaf_until = deaf_until
        self.sent: list[Message] = []
        self.on_message = None
        self.on_death = None
        self.state = "assigned"

    def send(self, msg: Message) -> bool:
        self.sent.append(msg)
        if msg.msg_type == "kernel_info_request" or (msg.msg_type == "execute_request" and self.answer):
            self.clock.callLater(0.001, self._run, msg)
        return True

    def _run(self, req: Message) -> None:
        parent = req.header_dict
        reply = req.msg_type.replace("_request", "_reply")
        out = [Message.build("iopub", "status", {"execution_state": "busy"}, parent, "k")]
        if req.msg_type == "execute_request":
            text = f"ran {req.content_dict()['code']}\n"
            out.append(Message.build("iopub", "stream", {"name": "stdout", "text": text}, parent, "k"))
        out.append(Message.build("shell", reply, {"status": "ok", "execution_count": 1}, parent, "k"))
        out.append(Message.build("iopub", "status", {"execution_state": "idle"}, parent, "k"))
        for m in out:
            if m.channel == "iopub" and self.clock.seconds() < self.deaf_until:
                continue
            if self.on_message is not None:
                self.on_message(m)


class FakeKernels:
    def __init__(self, clock):
        self.clock = clock
        self.answer = True
        self.deaf_for = 0.0
        self.shut: list[FakeKernel] = []

    def take(self, name="python3"):
        return defer.succeed(FakeKernel(self.clock, self.answer, self.clock.seconds() + self.deaf_for))

    def shutdown(self, kernel, reason):
        self.shut.append(kernel)
        return defer.succeed(None)


class Request(DummyRequest):
    _disconnected = False

    def __init__(self, method: bytes, path: str, args=None, body: bytes = b"", headers=None):
        super().__init__([p.encode() for p in path.strip("/").split("/")])
        self.client = IPv4Address("TCP", "10.0.0.1", 4321)
        self.method = method
        self.uri = path.encode()
        self.path = path.encode()
        self.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
        self.content = BytesIO(body)
        for k, v in (headers or {}).items():
            self.requestHeaders.setRawHeaders(k, [v])

    def isSecure(self):
        return False


class Files404:
    """The files service's face, answering 404 unless a test puts another behind it."""

    api_prefix, sagecell_prefix = "/api/kernels", "/kernel"

    def __init__(self, policy):
        self.policy = policy
        self.inner = None

    def resource_for(self, kid, rest, prefix):
        if self.inner is not None:
            return self.inner.resource_for(kid, rest, prefix)
        return NotFound(self.policy)


class World:
    def __init__(self, **options):
        self.clock = task.Clock()
        self.config = configmod.build(options={k.replace("_", "-"): v for k, v in options.items()})
        self.kernels = FakeKernels(self.clock)
        self.sessions = SessionManager(self.kernels, self.config, self.clock)
        self.api = Api(self.sessions, self.config, self.clock)
        self.compat = sagecell_compat.SageCellCompat(self.api, clock=self.clock)
        self.files = Files404(self.api.policy)
        table = site.routes(self.api, self.compat, object(), self.files, None, None, None, None)
        self.root = site.Root(table, self.api.policy)

    def call(self, method: str, path: str, args=None, body=None, headers=None):
        """(status, parsed JSON or None, response headers) after settling the clock."""
        raw = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
        hdrs = dict(headers or {})
        if isinstance(body, (dict, list)):
            hdrs.setdefault("Content-Type", "application/json")
        req = Request(method.encode(), path, args, raw, hdrs)
        res = getChildForRequest(self.root, req)
        out = res.render(req)
        if out is NOT_DONE_YET:
            for _ in range(200):
                if req.finished:
                    break
                self.clock.advance(0.05)
            assert req.finished, "no answer"
        data = b"".join(req.written)
        headers = {k.decode().lower(): v[0].decode() for k, v in req.responseHeaders.getAllRawHeaders()}
        return req.responseCode or 200, (json.loads(data) if data else None), headers


def test_post_kernel_answers_id_and_ws_base():
    w = World()
    status, body, headers = w.call("POST", "/kernel", {"CellSessionID": "page1", "timeout": "inf"})
    assert status == 200
    assert set(body) == {"id", "ws_url"}
    assert body["ws_url"] == "ws://127.0.0.1:80/" or body["ws_url"].startswith("ws://")
    assert headers["jupyter-kernel-id"] == body["id"]
    assert w.sessions.get(body["id"]) is not None
    status, body, _ = w.call(
        "POST", "/kernel", headers={"Host": "cells.example.org:8443", "X-Forwarded-Proto": "https"}
    )
    # X-Forwarded-Proto counts only from a --trusted-proxies address (tests/test_proxy.py), and 10.0.0.1 is none
    assert status == 200 and body["ws_url"] == "ws://cells.example.org:8443/"


def test_post_kernel_takes_a_json_body():
    w = World()
    status, body, _ = w.call("POST", "/kernel", body={"accepted_tos": True, "timeout": 5, "CellSessionID": "p"})
    assert status == 200 and w.compat.timeouts[body["id"]] == 5
    assert w.compat.pages == {"p": {body["id"]}}


def test_cors_echoes_the_origin_with_credentials():
    """SageMathCell's client sends withCredentials: "*" would be refused by the browser."""
    w = World(allow_origin="https://good.example")
    origin = {"Origin": "https://good.example"}
    status, _, headers = w.call("POST", "/kernel", headers=origin)
    assert status == 200 and headers["access-control-allow-origin"] == "https://good.example"
    assert headers["access-control-allow-credentials"] == "true"
    assert "Jupyter-Kernel-ID" in headers["access-control-expose-headers"]
    status, _, headers = w.call("OPTIONS", "/service", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert status == 204 and "POST" in headers["access-control-allow-methods"]
    status, body, _ = w.call("POST", "/kernel", headers={"Origin": "https://evil.example"})
    assert status == 403 and "origin" in body["message"]
    assert len(w.sessions.routes) == 1


def test_listed_origin_and_token_header_on_both_apis():
    """Headers read as str: a listed --allow-origin or an Authorization header must not be a 500."""
    w = World(allow_origin="https://good.example", token="s3cret")
    headers = {"Origin": "https://good.example", "Authorization": "token s3cret"}
    status, _, got = w.call("GET", "/api/kernels", headers=headers)
    assert status == 200 and got["access-control-allow-origin"] == "https://good.example"
    assert w.call("POST", "/kernel", headers=headers)[0] == 200
    assert w.call("POST", "/kernel", headers={**headers, "Authorization": "token nope"})[0] == 403


def test_tos_required_refuses_without_accepting():
    w = World(requires_tos=True)
    for args in ({}, {"accepted_tos": "false"}, {"accepted_tos": "yes"}):
        status, body, _ = w.call("POST", "/kernel", args)
        assert status == 403 and "accepted_tos=true" in body["message"]
        status, body, _ = w.call("POST", "/service", {"code": "1", **args})
        assert status == 403 and "terms of service" in body["message"]
    assert len(w.sessions.routes) == 0
    status, _, _ = w.call("POST", "/kernel", {"accepted_tos": "true"})
    assert status == 200


@pytest.mark.parametrize(
    "args,body",
    [({"timeout": "soon"}, None), ({"timeout": "-1"}, None), ({"timeout": "nan"}, None), (None, [1]), (None, b"{x")],
)
def test_bad_input_is_400_and_creates_nothing(args, body):
    w = World()
    status, answer, _ = w.call("POST", "/kernel", args, body=body)
    assert status == 400 and answer["status"] == 400 and answer["message"]
    assert len(w.sessions.routes) == 0


def test_page_cap_is_429_then_frees_on_delete():
    w = World(max_kernels_per_page=2)
    ids = [w.call("POST", "/kernel", {"CellSessionID": "A"})[1]["id"] for _ in range(2)]
    status, body, _ = w.call("POST", "/kernel", {"CellSessionID": "A"})
    assert status == 429 and "page" in body["message"]
    assert w.call("POST", "/kernel", {"CellSessionID": "B"})[0] == 200
    assert len(w.sessions.routes) == 3
    assert w.call("DELETE", f"/kernel/{ids[0]}")[0] == 204
    assert w.call("POST", "/kernel", {"CellSessionID": "A"})[0] == 200
    status, body, _ = w.call("POST", "/kernel", {"CellSessionID": "x" * 300})
    assert status == 400


def test_client_cap_applies_too():
    w = World(max_kernels_per_client=2)
    assert w.call("POST", "/kernel", {"CellSessionID": "A"})[0] == 200
    assert w.call("POST", "/kernel", {"CellSessionID": "B"})[0] == 200
    status, body, _ = w.call("POST", "/kernel", {"CellSessionID": "C"})
    assert status == 429 and body["message"]


def _execute(w: World, kid: str) -> None:
    """Run one execution through the session, as a browser would."""

    class Conn:
        client_sessions: set = set()
        got: list = []

        def deliver(self, m):
            self.got.append(m)

        def close_for(self, reason):
            pass

    session = w.sessions.get(kid)
    w.sessions.send(session, Message.build("shell", "execute_request", {"code": "1"}, session="c"), Conn())
    w.clock.advance(0.01)


def test_timeout_zero_ends_the_kernel_after_its_execution():
    w = World()
    kid = w.call("POST", "/kernel", {"CellSessionID": "A"})[1]["id"]
    w.clock.advance(100)
    assert w.sessions.get(kid) is not None  # no execution yet: general limits only
    _execute(w, kid)
    w.clock.advance(sagecell_compat.END_GRACE)
    assert w.sessions.get(kid) is None
    assert w.compat.pages == {} and w.compat.timeouts == {} and w.compat.page_of == {}


def test_timeout_is_idle_time_after_an_execution():
    w = World()
    kid = w.call("POST", "/kernel", {"timeout": "30"})[1]["id"]
    _execute(w, kid)
    w.clock.advance(20)
    _execute(w, kid)  # activity re-arms the idle deadline
    w.clock.advance(29)
    assert w.sessions.get(kid) is not None
    w.clock.advance(1.5)
    assert w.sessions.get(kid) is None


def test_timeout_counts_from_the_end_of_a_control_change_too():
    """An interact moved near the timeout: the kernel ends a timeout after the change, not never."""
    w = World()
    kid = w.call("POST", "/kernel", {"timeout": "30"})[1]["id"]
    _execute(w, kid)
    session = w.sessions.get(kid)
    w.clock.advance(25)
    change = Message.build("shell", "comm_msg", {"comm_id": "slider", "data": {}}, session="c")
    w.sessions.send(session, change, None)
    w.clock.advance(10)  # the timeout's check comes while the change runs
    session.kernel.on_message(Message.build("iopub", "status", {"execution_state": "idle"}, change.header_dict, "k"))
    w.clock.advance(25)
    assert w.sessions.get(kid) is not None
    w.clock.advance(10)
    assert w.sessions.get(kid) is None


def test_delete_and_method_override():
    w = World()
    kid = w.call("POST", "/kernel")[1]["id"]
    status, body, _ = w.call("POST", f"/kernel/{kid}")
    assert status == 405 and "method=DELETE" in body["message"]
    assert w.call("POST", f"/kernel/{kid}", {"method": "DELETE"})[0] == 204
    status, body, _ = w.call("DELETE", f"/kernel/{kid}")
    assert status == 404 and kid in body["message"]


def test_files_route_to_the_files_service_or_404():
    w = World()
    kid = w.call("POST", "/kernel", {"timeout": "inf"})[1]["id"]
    status, body, _ = w.call("GET", f"/kernel/{kid}/files/a.txt")
    assert status == 404 and body["message"]
    seen = []

    class File(JsonResource):
        def handle(self, request):
            return {"file": True}

    class Files:
        sagecell_prefix = "/kernel"

        def resource_for(self, kid, rest, prefix):
            seen.append((kid, rest, prefix))
            return File(w.api.policy)

    w.files.inner = Files()
    assert w.call("GET", f"/kernel/{kid}/files/sub/a.txt")[1] == {"file": True}
    assert seen == [(kid, ["sub", "a.txt"], "/kernel")]


def test_channels_without_upgrade_for_unknown_kernel_is_404():
    w = World()
    status, body, _ = w.call("GET", "/kernel/nope/channels")
    assert status == 404 and body["status"] == 404


def test_service_collects_output_and_ends_its_session():
    w = World()
    status, body, _ = w.call("POST", "/service", {"code": "print(2)"})
    assert status == 200
    assert body == {
        "success": True,
        "stdout": "ran print(2)\n",
        "stderr": "",
        "execute_reply": {"status": "ok", "execution_count": 1},
    }
    assert len(w.sessions.routes) == 0 and len(w.kernels.shut) == 1


def test_service_waits_for_iopub_before_running_the_code():
    w = World()
    w.kernels.deaf_for = 0.12  # a kernel handed out before our subscription took
    status, body, _ = w.call("POST", "/service", {"code": "print(2)"})
    assert body["success"] is True and body["stdout"] == "ran print(2)\n"
    kernel = w.kernels.shut[0]
    kinds = [m.msg_type for m in kernel.sent]
    assert kinds[-1] == "execute_request" and kinds.count("kernel_info_request") >= 3


def test_service_runs_the_code_at_once_on_a_kernel_whose_iopub_is_live():
    # A kernel from the pool proved its iopub in its warm-up: no kernel_info round trip first.
    w = World()
    take = w.kernels.take

    def live_kernel(name="python3"):
        kernel = take(name).result
        kernel.iopub_live = True
        return defer.succeed(kernel)

    w.kernels.take = live_kernel
    status, body, _ = w.call("POST", "/service", {"code": "print(2)"})
    assert status == 200 and body["stdout"] == "ran print(2)\n"
    assert [m.msg_type for m in w.kernels.shut[0].sent] == ["execute_request"]


@pytest.mark.parametrize(
    "args,status,words",
    [
        ({}, 400, "code is required"),
        ({"code": "x" * 65001}, 413, "65000"),
        ({"code": "1", "timeout": "0"}, 400, "timeout"),
        ({"code": "1", "timeout": "abc"}, 400, "timeout"),
        ({"code": "1", "user_expressions": "{"}, 400, "user_expressions"),
        ({"code": "1", "user_expressions": '{"a": 1}'}, 400, "user_expressions"),
    ],
)
def test_service_bad_input(args, status, words):
    w = World()
    got, body, _ = w.call("POST", "/service", args)
    assert got == status and words in body["message"]
    assert len(w.sessions.routes) == 0


def test_service_timeout_stops_the_kernel_and_says_so():
    w = World(exec_timeout=60)
    w.kernels.answer = False
    status, body, _ = w.call("POST", "/service", {"code": "while 1: pass", "timeout": "2"})
    assert status == 200 and body["success"] is False and body["execute_reply"] is None
    assert "limit of 2 s" in body["error"] and "limit of 2 s" in body["stderr"]
    assert w.clock.seconds() < 3
    assert len(w.sessions.routes) == 0 and len(w.kernels.shut) == 1


def test_service_timeout_is_capped_by_exec_timeout():
    w = World(exec_timeout=3)
    w.kernels.answer = False
    status, body, _ = w.call("POST", "/service", {"code": "1", "timeout": "inf"})
    assert "limit of 3 s" in body["error"]


# -- end to end: a real daemon --------------------------------------------------


def form(d: Daemon, path: str, fields: dict):
    return d.request("POST", path, raw=urllib.parse.urlencode(fields).encode(), headers=FORM)


def test_service_runs_code(daemon):
    status, body, _ = form(daemon, "/service", {"code": "print(1+1)"})
    assert status == 200, body
    assert body["success"] is True and body["stdout"] == "2\n" and body["stderr"] == ""
    assert body["execute_reply"]["status"] == "ok"
    status, body, _ = daemon.request("POST", "/service", {"code": "import sys; print('e', file=sys.stderr); 1/0"})
    assert status == 200 and body["success"] is False and body["stderr"] == "e\n"
    assert body["execute_reply"]["ename"] == "ZeroDivisionError"


def test_service_takes_multipart_as_sagemathcells_client_sends(daemon):
    boundary = uuid.uuid4().hex
    parts = [("code", "print('from a FormData')"), ("accepted_tos", "true")]
    raw = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in parts)
    raw += f"--{boundary}--\r\n"
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, body, _ = daemon.request("POST", "/service", raw=raw.encode(), headers=ctype)
    assert status == 200 and body["stdout"] == "from a FormData\n"


def test_service_wall_clock_limit(daemon):
    t0 = time.monotonic()
    status, body, _ = form(
        daemon, "/service", {"code": "import time\nprint('start', flush=True)\ntime.sleep(60)", "timeout": "1"}
    )
    assert status == 200 and body["success"] is False
    assert body["stdout"] == "start\n" and "limit of 1 s" in body["error"]
    assert time.monotonic() - t0 < 4
    status, body, _ = form(daemon, "/service", {"code": "print('still here')"})
    assert body["stdout"] == "still here\n"


def test_service_errors(daemon):
    status, body, _ = form(daemon, "/service", {"code": "x" * 65001})
    assert status == 413 and "65000" in body["message"]
    status, body, _ = form(daemon, "/service", {})
    assert status == 400 and body["message"] == "code is required"
    status, body, _ = daemon.request("POST", "/service", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "JSON" in body["message"]
    status, body, _ = daemon.request("GET", "/service")
    assert status == 405


class SageCellSocket:
    """A client written the SageMathCell way: POST /kernel, then ws_url + kernel/ID/channels."""

    def __init__(self, d: Daemon, **fields):
        status, body, _ = form(d, "/kernel", fields)
        assert status == 200, body
        self.id, self.ws_url = body["id"], body["ws_url"]
        assert self.ws_url == f"ws://127.0.0.1:{d.port}/"
        self.ws = websocket.create_connection(f"{self.ws_url}kernel/{self.id}/channels", timeout=30)

    def execute(self, code: str) -> tuple[dict, list[dict]]:
        m = msg("execute_request", {"code": code, "silent": False, "user_expressions": {}, "allow_stdin": False})
        del m["channel"]  # SageMathCell's server sends everything to shell
        self.ws.send(json.dumps(m))
        reply, seen = None, []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = json.loads(self.ws.recv())
            assert "channel" in got and "header" in got and "content" in got
            if got["parent_header"].get("msg_id") != m["header"]["msg_id"]:
                continue
            seen.append(got)
            if got["channel"] == "shell" and got["msg_type"] == "execute_reply":
                reply = got
            if reply and any(s["msg_type"] == "status" and s["content"]["execution_state"] == "idle" for s in seen):
                return reply, seen
        raise AssertionError(f"no reply in time: {seen}")

    def until_dead(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                got = self.ws.recv()
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                return  # closed by the server (reset, if we kept it waiting over its close timeout)
            if not got:
                return
            got = json.loads(got)
            if got["msg_type"] == "status" and got["content"]["execution_state"] == "dead":
                return
        raise AssertionError("the kernel did not end")


def test_kernel_socket_default_timeout_ends_after_one_execution(daemon):
    c = SageCellSocket(daemon, CellSessionID=uuid.uuid4().hex, accepted_tos="true")
    reply, seen = c.execute("print('hi')")
    assert reply["content"]["status"] == "ok"
    streams = [s for s in seen if s["msg_type"] == "stream"]
    assert streams[0]["channel"] == "iopub" and streams[0]["content"]["text"] == "hi\n"
    c.until_dead()
    status, body, _ = daemon.request("DELETE", f"/kernel/{c.id}")
    assert status == 404


def test_kernel_socket_with_timeout_keeps_state_until_deleted(daemon):
    c = SageCellSocket(daemon, timeout="inf")
    c.execute("x = 6 * 7")
    _, seen = c.execute("print(x)")
    assert "".join(s["content"]["text"] for s in seen if s["msg_type"] == "stream") == "42\n"
    status, _, _ = daemon.request("DELETE", f"/kernel/{c.id}")
    assert status == 204
    c.until_dead()
    assert daemon.request("DELETE", f"/kernel/{c.id}")[0] == 404


def test_kernel_page_cap_is_429(daemon):
    page = uuid.uuid4().hex
    ids = []
    for _ in range(4):
        status, body, _ = form(daemon, "/kernel", {"CellSessionID": page, "timeout": "inf"})
        assert status == 200
        ids.append(body["id"])
    status, body, headers = form(daemon, "/kernel", {"CellSessionID": page})
    assert status == 429 and "page" in body["message"] and headers["Content-Type"] == "application/json"
    for kid in ids:
        assert daemon.request("DELETE", f"/kernel/{kid}")[0] == 204
    status, body, _ = form(daemon, "/kernel", {"CellSessionID": page, "timeout": "inf"})
    assert status == 200
    assert daemon.request("DELETE", f"/kernel/{body['id']}")[0] == 204


def get_page(d: Daemon, query: str) -> tuple[int, str]:
    status, body, headers = d.request("GET", "/?" + query)
    assert headers["Content-Type"].startswith("text/html")
    return status, body.decode() if isinstance(body, bytes) else body


def test_permalinks_through_the_daemon_and_demo_page(daemon):
    code = "print('permalink ✓')\n"
    status, body, _ = form(daemon, "/permalink", {"code": code, "language": "python", "n": "3"})
    assert status == 200 and body["n"] == 3
    assert zlib.decompress(base64.urlsafe_b64decode(body["zip"])).decode() == code
    status, stored, _ = daemon.request("GET", f"/permalink?q={body['query']}")
    assert status == 200 and stored[0] == code and stored[1] == "python"
    for query in (f"q={body['query']}", f"z={body['zip'].rstrip('=')}", "c=" + urllib.parse.quote(code)):
        status, page = get_page(daemon, query)
        assert status == 200 and "makeSagecell" in page
    status, body, _ = daemon.request("GET", "/permalink?q=" + "0" * 32)
    assert status == 404 and "error" in body


def test_permalink_answers_other_origins(daemon):
    origin = {"Origin": "https://a-textbook.example"}
    status, _, headers = daemon.request(
        "OPTIONS", "/permalink", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == origin["Origin"]
    status, body, headers = daemon.request(
        "POST", "/permalink", raw=b"code=1%2B1&language=python", headers={**origin, **FORM}
    )
    assert status == 200 and body["query"]
    assert headers["Access-Control-Allow-Origin"] == origin["Origin"]
    assert headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.slow
def test_permalinks_survive_a_daemon_restart():
    first = Daemon(pool_size=1).start()
    db = os.path.join(first.tmp, "permalinks.sqlite3")
    try:
        status, body, _ = form(first, "/permalink", {"code": "print('kept')", "language": "python"})
        assert status == 200
    finally:
        first.stop()
    second = Daemon("--permalink-db", db, pool_size=1).start()
    try:
        status, stored, _ = second.request("GET", f"/permalink?q={body['query']}")
        assert status == 200 and stored[0] == "print('kept')"
    finally:
        second.stop()
