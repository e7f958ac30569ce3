# -*- test-case-name: tests.test_sagecell_compat -*-
"""
SageMathCell's own endpoints, so pages and scripts written for it can switch
servers. The shapes follow its ``handlers.py``:

- ``POST /kernel`` (form, query or JSON: ``accepted_tos``, ``timeout``,
  ``CellSessionID``) answers ``{"id": ID, "ws_url": "ws://host/"}`` with a
  ``Jupyter-Kernel-ID`` header; the client connects to
  ``ws_url + "kernel/" + ID + "/channels"``. ``timeout`` is how long the
  kernel may sit idle after an execution: 0 (the default) ends it once its
  execution is done, ``inf`` is capped by ``--idle-timeout``. A page
  (``CellSessionID``) may hold ``--max-kernels-per-page`` kernels at once,
  on top of the per-client cap; past either the answer is 429.
- ``WS /kernel/{id}/channels``: plain JSON text frames with a ``channel``
  key (see ``websocket.py``).
- ``DELETE /kernel/{id}``, or ``POST /kernel/{id}?method=DELETE`` as its
  older clients send it.
- ``/kernel/{id}/files/{path}``: the kernel's files, when a files service is
  mounted on the API.
- ``POST /service`` (``code``, optional ``timeout`` and ``user_expressions``):
  runs the code in a fresh kernel and answers ``{"success", "stdout",
  "stderr", "execute_reply"}`` (plus ``"error"`` when it did not finish).

Not here: its SockJS transport (``/sockjs``, frames prefixed
``"{id}/channels,"``) and the ``frame`` argument's postMessage answers.
"""

from __future__ import annotations

import math
import re
import uuid
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.web import resource
from zope.interface import implementer

from .. import messages
from ..core.sessions import SessionObserver
from ..messages import DAEMON_SESSION, Message
from .policy import (
    HTTPError,
    JsonResource,
    Policy,
    Response,
    client_address,
    json_bytes,
    read_json,
)

log = Logger()

#: SageMathCell's limit on /service code, in characters.
MAX_SERVICE_CODE = 65000
#: After an execution ends in a kernel asked for with timeout 0, how long
#: before it is shut down: the execute_reply (shell) may trail the idle
#: status (iopub) by a little, and must still reach the browser.
END_GRACE = 0.5
#: /service: how long to wait for the idle status once the reply is in.
REPLY_GRACE = 1.0
#: /service: how often to nudge a kernel whose iopub is not yet heard from.
NUDGE_EVERY = 0.05
MAX_PAGE_ID = 256
#: /service: bytes of output all runs together may hold until their replies
#: are written out (or one run's --max-output-bytes, if more)
SERVICE_OUTPUT_BUDGET = 16 << 20
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def request_params(request, limit: int) -> dict:
    """
    Query string, form body and JSON body, merged (JSON last).

    As in SageMathCell, ``code`` joins its repeated values and any other
    parameter takes its last value.
    """
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    request.content.seek(0)
    head = request.content.read(64).lstrip()
    request.content.seek(0)
    # ``curl -d '{...}'`` and urllib label a JSON body as a form; no form
    # field of ours starts with "{", so such a body is JSON whatever its label.
    is_json = ctype == b"application/json" or (ctype != b"multipart/form-data" and head.startswith(b"{"))
    args = request.args
    if is_json and ctype == b"application/x-www-form-urlencoded":
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        args = parse_qs(query, keep_blank_values=True)  # what Twisted parsed from the body is noise
    params: dict = {}
    for key, values in args.items():
        try:
            name = key.decode()
            texts = [v.decode() for v in values]
        except UnicodeDecodeError:
            raise HTTPError(400, "the request's parameters are not UTF-8") from None
        params[name] = "".join(texts) if name == "code" else texts[-1]
    if is_json:
        body = read_json(request, limit)
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object")
        params.update(body)
    return params


def accepted(value) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def parse_seconds(value, name: str, default: float) -> float:
    """A number of seconds (``inf`` allowed) or a 400 that says what is wrong."""
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HTTPError(400, f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise HTTPError(400, f"{name} must be a number of seconds, not {value!r}") from None
    if math.isnan(seconds) or seconds < 0:
        raise HTTPError(400, f"{name} must be zero or more seconds, not {value!r}")
    return seconds


def ws_base(request, base_url: str = "") -> str:
    """What SageMathCell calls ``ws_url``: ``ws://host/``, the socket's base."""
    secure = request.isSecure()  # or a trusted proxy's X-Forwarded-Proto says so (proxies.ForwardedRequest)
    host = (request.getHeader(b"host") or b"").decode("ascii", errors="replace")
    if not _HOST_RE.fullmatch(host):
        addr = request.getHost()
        host = f"{getattr(addr, 'host', '127.0.0.1')}:{getattr(addr, 'port', 80)}"
    prefix = base_url.strip("/")
    return f"{'wss' if secure else 'ws'}://{host}/" + (prefix + "/" if prefix else "")


class WithCors(resource.Resource):
    """
    CORS (credentialed, preflight included) and the token around a resource
    that has neither, such as /permalink: on a ``--token`` daemon, making
    and reading permalinks both need the token. Such a daemon is private,
    and what its users store is theirs; whoever is sent a link needs the
    token to run the code anyway (the widget sends it on both requests).
    """

    isLeaf = True

    def __init__(self, wrapped: resource.Resource, policy: Policy, methods: str = "GET, POST, OPTIONS"):
        super().__init__()
        self.wrapped = wrapped
        self.policy = policy
        self.methods = methods

    @property
    def takes_body(self):
        return getattr(self.wrapped, "takes_body", None)

    def render(self, request):
        if request.method == b"OPTIONS":
            return self.policy.preflight(request, self.methods)
        if not self.policy.apply_cors(request):
            return self.policy.deny(request, 403, "this origin is not allowed")
        if not self.policy.token_ok(request):
            return self.policy.deny(request, 403, "a valid token is required")
        return self.wrapped.render(request)


class SageCellCompat(SessionObserver):
    """The state SageMathCell's endpoints keep beyond the session manager's."""

    def __init__(self, api, clock):
        self.api = api
        self.sessions = api.sessions
        self.config = api.config
        self.policy = Policy(api.config, api.sessions, credentialed=True)
        self.clock = clock
        #: CellSessionID -> ids of the kernels that page opened with POST /kernel
        self.pages: dict[str, set[str]] = {}
        #: kernel id -> the CellSessionID that opened it
        self.page_of: dict[str, str] = {}
        #: kernel id -> its SageMathCell idle timeout (0: end after each execution)
        self.timeouts: dict[str, float] = {}
        #: kernel id -> the pending call that ends it once idle
        self._enders: dict = {}
        self.sessions.observers.append(self)
        self.sessions.on_execute_done.append(self._execute_done)
        #: output all /service runs hold at once, while they run
        self.service_output = OutputBudget(max(SERVICE_OUTPUT_BUDGET, self.config.max_output_bytes))

    def with_cors(self, wrapped: resource.Resource) -> resource.Resource:
        return WithCors(wrapped, self.policy)

    def check_tos(self, params: dict) -> None:
        if self.config.requires_tos and not accepted(params.get("accepted_tos")):
            raise HTTPError(403, "this server requires you to accept its terms of service: pass accepted_tos=true")

    # -- kernels from POST /kernel ------------------------------------------

    def new_kernel(self, request, page: str | None, timeout: float):
        cap = self.config.max_kernels_per_page
        if page is not None and len(self.pages.get(page, ())) >= cap:
            raise HTTPError(429, f"this page already has {cap} kernels, the most one page may have; end one first")
        session = self.api.new_kernel(request, None)
        if page is not None:
            self.pages.setdefault(page, set()).add(session.id)
            self.page_of[session.id] = page
        self.timeouts[session.id] = min(timeout, self.config.idle_timeout)
        return session

    def session_ended(self, session, reason: str) -> None:
        self.timeouts.pop(session.id, None)
        call = self._enders.pop(session.id, None)
        if call is not None and call.active():
            call.cancel()
        page = self.page_of.pop(session.id, None)
        ids = self.pages.get(page, set())
        ids.discard(session.id)
        if page is not None and not ids:
            del self.pages[page]

    def _execute_done(self, session, parent: dict) -> None:
        timeout = self.timeouts.get(session.id)
        if timeout is None:
            return
        self._arm(session, END_GRACE if timeout == 0 else timeout)

    def _arm(self, session, delay: float) -> None:
        old = self._enders.get(session.id)
        if old is not None and old.active():
            old.cancel()
        self._enders[session.id] = self.clock.callLater(delay, self._end_if_idle, session)

    def _end_if_idle(self, session) -> None:
        self._enders.pop(session.id, None)
        timeout = self.timeouts.get(session.id)
        if session.closed or timeout is None:
            return
        if session.executions:
            # A cell's execution re-arms this when it ends; a control change (a
            # comm message, an execution too) does not: look again a timeout later.
            self._arm(session, max(timeout, END_GRACE))
            return
        if timeout == 0:
            self.sessions.shutdown(session, "shut down")
            return
        idle = self.clock.seconds() - session.last_activity
        if idle < timeout:
            self._arm(session, timeout - idle)
            return
        self.sessions.shutdown(session, f"it was idle for {timeout:g} s")


class KernelCreate(JsonResource):
    methods = ("POST",)

    def __init__(self, compat: SageCellCompat):
        super().__init__(compat.policy)
        self.compat = compat

    def handle(self, request):
        compat = self.compat
        params = request_params(request, compat.config.max_message_size)
        compat.check_tos(params)
        timeout = parse_seconds(params.get("timeout"), "timeout", 0.0)
        page = params.get("CellSessionID")
        if page is not None and (not isinstance(page, str) or not page or len(page) > MAX_PAGE_ID):
            raise HTTPError(400, f"CellSessionID must be a string of 1 to {MAX_PAGE_ID} characters")
        session = compat.new_kernel(request, page, timeout)
        log.info(
            "SageMathCell kernel {session} for page {page}, idle timeout {timeout}",
            session=session.id,
            page=page or "(none)",
            timeout=compat.timeouts[session.id],
        )
        body = {"id": session.id, "ws_url": ws_base(request, compat.config.base_url)}
        return Response(200, body, {"Jupyter-Kernel-ID": session.id})


class KernelOne(JsonResource):
    methods = ("DELETE", "POST")

    def __init__(self, compat: SageCellCompat, kid: str):
        super().__init__(compat.policy)
        self.compat = compat
        self.kid = kid

    def handle(self, request):
        compat = self.compat
        if request.method == b"POST":
            method = request_params(request, compat.config.max_message_size).get("method")
            if not isinstance(method, str) or method.upper() != "DELETE":
                raise HTTPError(405, "POST here takes method=DELETE; start kernels with POST /kernel")
        session = compat.policy.require_session(self.kid)
        return compat.sessions.shutdown(session, "shut down").addCallback(lambda _: Response(204, None))


class Service(JsonResource):
    """``POST /service``: one computation in a fresh kernel, answered in one reply."""

    methods = ("POST",)

    def __init__(self, compat: SageCellCompat):
        super().__init__(compat.policy)
        self.compat = compat

    def handle(self, request):
        compat = self.compat
        config = compat.config
        params = request_params(request, config.max_message_size)
        compat.check_tos(params)
        code = params.get("code")
        if code is None:
            raise HTTPError(400, "code is required")
        if not isinstance(code, str):
            raise HTTPError(400, "code must be a string")
        if len(code) > MAX_SERVICE_CODE:
            raise HTTPError(413, f"the code is {len(code)} characters, over the limit of {MAX_SERVICE_CODE}")
        timeout = parse_seconds(params.get("timeout"), "timeout", config.exec_timeout)
        if timeout == 0:
            raise HTTPError(400, "timeout must be more than zero seconds")
        timeout = min(timeout, config.exec_timeout)
        expressions = params.get("user_expressions") or {}
        if isinstance(expressions, str):
            try:
                expressions = messages.loads(expressions)
            except ValueError:
                raise HTTPError(400, "user_expressions is not valid JSON") from None
        if not isinstance(expressions, dict) or not all(isinstance(v, str) for v in expressions.values()):
            raise HTTPError(400, "user_expressions must be an object of names to expressions (strings)")
        client = client_address(request)
        session = compat.api.new_kernel(request, None)
        if config.log_code:
            log.info("service code from {client}: {code!r}", client=client, code=code)
        run = ServiceRun(compat.sessions, session, compat.clock, config.max_output_bytes, compat.service_output)
        d = run.start(code, expressions, timeout)
        # The output stays held until the reply is written out, or the client gone.
        request.notifyFinish().addErrback(lambda _f: run.abandon()).addBoth(lambda _: run.release())
        return d

    def _finish(self, result, request) -> None:
        if not isinstance(result, ServiceReply):
            super()._finish(result, request)
            return
        if request._disconnected:
            result.run.release()
            return
        data = json_bytes(result.body)
        result.body = None
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(data)).encode())
        request.registerProducer(_Chunks(request, data), False)


class ServiceReply(Response):
    """A /service answer, with the run whose output it holds until it is written out."""

    def __init__(self, body: dict, run):
        super().__init__(200, body)
        self.run = run


@implementer(IPullProducer)
class _Chunks:
    """
    Writes a reply a piece at a time, as the client reads it: the transport
    never holds more than a piece, and the output stays counted against the
    /service budget (``ServiceRun.release``, on finish) until the last piece.
    """

    PIECE = 64 << 10

    def __init__(self, request, data: bytes):
        self.request = request
        self.data = memoryview(data)
        self.sent = 0

    def resumeProducing(self) -> None:
        if self.request._disconnected:
            return
        piece = self.data[self.sent : self.sent + self.PIECE]
        self.sent += len(piece)
        if piece:
            self.request.write(piece.tobytes())
        if self.sent >= len(self.data):
            self.data = memoryview(b"")
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.data = memoryview(b"")


def reply_size(text: str) -> int:
    """The bytes ``text`` takes in a JSON reply (as ``json_bytes`` writes it)."""
    return len(json_bytes(text)) - 2


def fit(text: str, room: float) -> str:
    """The longest start of ``text`` (or near it) that takes at most ``room`` bytes in a reply."""
    k = int(min(len(text), room))
    for _ in range(32):
        size = reply_size(text[:k])
        if size <= room:
            return text[:k]
        k = k * int(room) // size
    return text[: int(room) // 12]  # every character takes at most 12 bytes escaped


class OutputBudget:
    """
    Bytes of output all /service runs hold at once, from the first print
    until their replies are written out. Each run holds up to
    --max-output-bytes; together, at most ``limit``: a run that finds no
    room is answered with what it has.
    """

    def __init__(self, limit: float):
        self.limit = limit
        self.held = 0

    def room(self) -> float:
        return max(0, self.limit - self.held)

    def take(self, n: int) -> None:
        self.held += n

    def give_back(self, n: int) -> None:
        self.held = max(0, self.held - n)


class ServiceRun:
    """
    An in-daemon connection to one session, shaped as the session manager
    expects of a WebSocket (``deliver``, ``close_for``, ``client_sessions``):
    sends one execute_request, gathers the output, and ends the session.

    A kernel whose iopub has not yet delivered to us may not have our
    subscription in place, and zmq drops what it publishes before that (its
    ``iopub_welcome`` arrives after the output). So, as Jupyter Server does,
    we first nudge such a kernel with ``kernel_info_request`` until something
    of its own comes back on iopub, and only then send the code. A kernel
    from the pool has proven its iopub in its warm-up (``Kernel.iopub_live``):
    it gets the code at once, which saves the nudge's round trip.
    """

    def __init__(self, sessions, session, clock, max_output: int, budget: OutputBudget | None = None):
        self.sessions = sessions
        self.session = session
        self.clock = clock
        self.max_output = max_output or float("inf")
        self.budget = budget or OutputBudget(float("inf"))
        self.client_session = uuid.uuid4().hex
        self.client_sessions: set[str] = {self.client_session}
        self.streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.output_size = 0
        self.reply: dict | None = None
        self.idle = False
        self.msg_id = ""
        self.timeout = 0.0
        self.started = clock.seconds()
        self.done: defer.Deferred = defer.Deferred()
        self._timer = None
        self._grace = None
        self._nudge = None
        self._nudges: set[str] = set()
        self._request: Message | None = None

    def pause_input(self) -> None:
        """Nothing to stop reading: what this connection sends, it makes itself."""

    def resume_input(self) -> None:
        pass

    def start(self, code: str, expressions: dict, timeout: float) -> defer.Deferred:
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": expressions,
            "allow_stdin": False,
            "stop_on_error": True,
        }
        self._request = Message.build("shell", "execute_request", content, session=self.client_session)
        self.msg_id = self._request.msg_id
        self.timeout = timeout
        self._timer = self.clock.callLater(timeout, self._expired)
        self.sessions.connect(self.session, self)
        kernel = self.session.kernel
        if kernel is not None and getattr(kernel, "iopub_live", False):
            self._heard_iopub()  # proven by the pool's warm-up: no round trip to wait for
        else:
            self._send_nudge()
        return self.done

    def _send_nudge(self) -> None:
        self._nudge = None
        if self.done.called or self._request is None:
            return
        if self.session.kernel is not None or not self._nudges:  # else one already waits for the kernel
            nudge = Message.build("shell", "kernel_info_request", {}, session=self.client_session)
            self._nudges.add(nudge.msg_id)
            self.sessions.send(self.session, nudge, self)
        if not self.done.called and self._request is not None:
            self._nudge = self.clock.callLater(NUDGE_EVERY, self._send_nudge)

    def _heard_iopub(self) -> None:
        """The kernel's iopub reaches us: everything it publishes from now on will."""
        if self._nudge is not None and self._nudge.active():
            self._nudge.cancel()
        self._nudge = None
        request, self._request = self._request, None
        self.sessions.send(self.session, request, self)

    # -- what the session manager calls ---------------------------------------

    def deliver(self, msg: Message) -> None:
        if self.done.called:
            return
        kind = msg.msg_type
        from_daemon = msg.header_dict.get("session") == DAEMON_SESSION
        if msg.channel == "iopub" and not from_daemon and self._request is not None:
            self._heard_iopub()
            if self.done.called:
                return
        if msg.channel == "iopub":
            if kind == "stream":
                self._stream(msg.content_dict())
            elif kind == "status":
                state = msg.content_dict().get("execution_state")
                if state == "idle" and msg.parent_dict.get("msg_id") == self.msg_id:
                    self.idle = True
                elif state == "dead":
                    self._finish("the kernel died before the code finished")
                    return
        elif msg.channel == "shell" and from_daemon:
            parent = msg.parent_dict.get("msg_id")
            if parent == self.msg_id or parent in self._nudges:
                content = msg.content_dict()  # refused by the daemon: the code never ran
                self._finish(str(content.get("evalue") or "the code could not be run"), status=503)
                return
        elif msg.channel == "shell" and msg.parent_dict.get("msg_id") == self.msg_id:
            if kind == "execute_reply":
                self.reply = msg.content_dict()
                self._grace = self.clock.callLater(REPLY_GRACE, self._finish)
        if self.reply is not None and self.idle:
            self._finish()

    def close_for(self, reason: str) -> None:
        if not self.done.called:
            self._finish(f"the session ended: {reason}")

    # -- ending ---------------------------------------------------------------

    def _stream(self, content: dict) -> None:
        """
        Keep a stream's text, counted as the bytes it will take in the reply
        (JSON-escaped), up to --max-output-bytes and what the budget of all
        runs leaves; at either, keep what fits and answer now, with the notice.
        """
        name, text = content.get("name"), content.get("text")
        if name not in self.streams or not isinstance(text, str):
            return
        size = reply_size(text)
        room = min(self.max_output - self.output_size, self.budget.room())
        if size > room:
            kept = fit(text, room)
            self._hold(name, kept, reply_size(kept))
            if self.max_output - self.output_size <= self.budget.room():
                why = f"the output went over the limit of {self.max_output} bytes and was cut off"
            else:
                why = "the output went over what the server holds for /service runs at once and was cut off"
            self._finish(why)
            return
        self._hold(name, text, size)

    def _hold(self, name: str, text: str, size: int) -> None:
        self.output_size += size
        self.budget.take(size)
        self.streams[name].append(text)

    def _expired(self) -> None:
        self._timer = None
        if self.done.called:
            return
        if self.session.kernel is None and self.reply is None:
            self._finish(f"no kernel became available within {self.timeout:g} s; the server is busy", status=503)
        else:
            self._finish(f"the computation ran for longer than the limit of {self.timeout:g} s and was stopped")

    def release(self) -> None:
        """The reply is out (or never will be): its output no longer counts against the budget."""
        self.budget.give_back(self.output_size)
        self.output_size = 0
        self.streams = {"stdout": [], "stderr": []}

    def abandon(self) -> None:
        """The client went away: stop computing for nobody."""
        if not self.done.called:
            self._finish("the client went away")

    def _finish(self, error: str | None = None, status: int = 200) -> None:
        if self.done.called:
            return
        for call in (self._timer, self._grace, self._nudge):
            if call is not None and call.active():
                call.cancel()
        self.sessions.disconnect(self.session, self)
        if status != 200:
            self.done.errback(HTTPError(status, error or "the code could not be run"))
        else:
            reply = self.reply
            body = {
                "success": error is None and reply is not None and reply.get("status") == "ok",
                "stdout": "".join(self.streams["stdout"]),
                "stderr": "".join(self.streams["stderr"]),
                "execute_reply": reply,
            }
            if error is not None:
                body["stderr"] += f"\n[sagecell] {error[:1].upper()}{error[1:]}.\n"
                body["error"] = error
            self.done.callback(ServiceReply(body, self))
        elapsed = self.clock.seconds() - self.started
        log.debug("service run in {session} took {ms:.1f} ms", session=self.session.id, ms=1000 * elapsed)
        self.sessions.shutdown(self.session, "shut down")
