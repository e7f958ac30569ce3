# -*- test-case-name: tests.test_ownership,tests.test_bounds -*-
"""
What every HTTP resource of ours shares: JSON replies, JSON errors, CORS,
the optional token, who may use which kernel, and a body-size limit.

``JsonResource.handle(request)`` returns a value (sent as JSON), a Deferred
of one, or raises ``HTTPError``; anything else unexpected is logged and
becomes a 500 with a JSON body, never a traceback page.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from .. import messages
from ..core import grants
from ..logs import redact_uri

log = Logger()

ALLOWED_HEADERS = "Authorization, Content-Type, X-XSRFToken, X-Requested-With, Range"
#: what a multipart upload may add to the file's own --max-upload-size: boundaries and part headers
UPLOAD_FRAMING = 64 << 10
#: after refusing a body, how long and how much of it we read on (dropping
#: it) before closing: a client still sending a body a little over a limit
#: gets to read the answer; one sending far more gets a reset connection soon
LINGER = 2.0
LINGER_BYTES = 16 << 20
EXPOSED_HEADERS = "Content-Disposition, Content-Range, Content-Length, Accept-Ranges, Location"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or http.RESPONSES.get(status, b"").decode()


def write_json(request, status: int, body) -> None:
    request.setResponseCode(status)
    if status in (204, 304):
        return  # no body, and no Content-Length claiming one
    data = json_bytes(body)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-length", str(len(data)).encode())
    if request.method != b"HEAD":
        request.write(data)


def json_bytes(body) -> bytes:
    """
    ``body`` as UTF-8 JSON: non-ASCII text as itself, not six-byte escapes
    (a third of the size, and quicker to make, for output in other scripts).
    A lone surrogate, which UTF-8 cannot hold, becomes "?".
    """
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")


def error_body(status: int, message: str, reason: str | None = None) -> dict:
    return {"message": message, "reason": reason or http.RESPONSES.get(status, b"").decode(), "status": status}


def read_json(request, limit: int, allow_empty: bool = True):
    """The request body as JSON: 413 if too large, 400 if malformed."""
    request.content.seek(0, 2)
    size = request.content.tell()
    if size > limit:
        raise HTTPError(413, f"the request body is {size} bytes, over the limit of {limit} bytes")
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise HTTPError(400, "a JSON body is required")
    try:
        return messages.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "the request body is not valid JSON") from None


def client_address(request) -> str:
    addr = request.getClientAddress()
    return getattr(addr, "host", None) or str(addr)


#: what every grant (a kernel id, a notebook-session id) looks like: 128
#: random bits as 32 lowercase hex digits, after the name of the daemon that made it, if it has one
GRANT_RE = grants.GRANT_RE


def token_matches(token: str, authorization: str | None, query_token: str | None) -> bool:
    """
    Whether a request carries ``token``, as ``Authorization: token T`` or
    ``?token=T`` (the header wins), for HTTP and WebSocket alike.
    """
    auth = (authorization or "").strip()
    given = auth[6:].strip() if auth.lower().startswith("token ") else ""
    if not given:
        given = query_token or ""
    return hmac.compare_digest(given.encode(), token.encode())


class Policy:
    """
    Who may call us: CORS allow-list, token, and which kernels a caller may
    use. One place decides it for every route.

    Trust model. With ``--token``, whoever holds the token is trusted with
    the whole service, as a Jupyter Server's user is: every kernel, full
    listings. Without one (anonymous), a kernel's id is its capability, as in
    SageMathCell and Kernel Gateway: 128 random bits, given only to the
    caller that created the kernel (who may pass it on), and never listed:
    ``GET /api/kernels`` and ``GET /api/sessions`` answer 403, like Kernel
    Gateway's ``list_kernels = False``. A notebook session's id is a
    capability in the same way.
    """

    def __init__(self, config, sessions=None, notebooks: dict | None = None, credentialed: bool = False):
        self.config = config
        #: SageMathCell's client sends ``withCredentials``, and browsers refuse a
        #: credentialed answer that allows origin ``*``: for its routes we echo the
        #: (allowed) origin and allow credentials, as its server does. We keep no
        #: cookies, so this grants a page nothing more than ``*`` does.
        self.credentialed = credentialed
        #: the session manager whose kernels ``session_for`` hands out
        self.sessions = sessions
        #: notebook-session id -> model (``api.NotebookSessions.models``), for ``notebook_for``
        self.notebooks = notebooks if notebooks is not None else {}

    def apply_cors(self, request) -> bool:
        """Set CORS headers; False if the request's origin is not allowed."""
        origin = request.getHeader("origin")  # str: origin_allowed compares str
        if origin is None:
            return True
        if not self.origin_ok(origin):
            return False
        for name, value in self.cors_headers(origin):
            request.setHeader(name, value)
        return True

    def origin_ok(self, origin: str | None) -> bool:
        """Whether a page from ``origin`` may call us (HTTP and WebSocket alike); no origin: not a browser's page."""
        return origin is None or self.config.origin_allowed(origin)

    def cors_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an answer to an allowed ``origin``."""
        if self.credentialed:
            return [
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
                (b"access-control-expose-headers", (EXPOSED_HEADERS + ", Jupyter-Kernel-ID").encode()),
            ]
        allow = b"*" if "*" in self.config.allow_origin else origin.encode()
        return [
            (b"access-control-allow-origin", allow),
            (b"vary", b"Origin"),
            (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
        ]

    def preflight(self, request, methods: str) -> bytes:
        if not self.apply_cors(request):
            return self.deny(request, 403, "this origin is not allowed")
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", methods.encode())
        request.setHeader(b"access-control-allow-headers", ALLOWED_HEADERS.encode())
        request.setHeader(b"access-control-max-age", b"600")
        return b""

    def token_ok(self, request) -> bool:
        """Whether an HTTP request carries the token (or none is needed)."""
        query = (request.args.get(b"token") or [b""])[0].decode(errors="replace")
        return self.token_given(request.getHeader("authorization"), query)

    def token_given(self, authorization: str | None, query_token: str | None) -> bool:
        """The one token check, for HTTP requests and WebSocket handshakes alike."""
        token = self.config.token
        return not token or token_matches(token, authorization, query_token)

    def may_list(self) -> bool:
        """
        Whether listings that name kernels (``GET /api/kernels``,
        ``GET /api/sessions``) are served: only on a ``--token`` daemon, to
        token holders (checked before any handler runs). Anonymously, a list
        would hand every visitor every other visitor's capability.
        """
        return bool(self.config.token)

    def session_for(self, kernel_id):
        """
        The live session that ``kernel_id`` grants, or None: the one check
        behind every per-kernel route (both WebSocket paths, files,
        interrupt, restart, GET/DELETE, notebook sessions, SageMathCell's
        ``/kernel/{id}``). The token, when there is one, was checked before.
        Unknown, ended and malformed ids are all None: a caller tells them
        apart no more than it can guess a live one.
        """
        session = _granted(kernel_id, self.sessions.get)
        if session is None or session.closed:
            return None
        return session

    def notebook_for(self, session_id):
        """The notebook session ``session_id`` grants, or None: ``session_for``'s check for ``/api/sessions/{id}``."""
        return _granted(session_id, self.notebooks.get)

    def require_session(self, kernel_id):
        """``session_for``, or the 404 every per-kernel route answers for "not yours"."""
        session = self.session_for(kernel_id)
        if session is None:
            raise self.not_held(kernel_id, f"no kernel {str(kernel_id)[:64]}")
        return session

    def not_held(self, grant, message: str) -> HTTPError:
        """
        What a request for a ``grant`` we do not hold gets: the 404 ``message``,
        or a 503 "kernel lost" when the grant names another daemon (a balancer
        sends it here only when it cannot reach that one: core/grants.py).
        """
        lost = grants.lost_elsewhere(grant, self.config.daemon_name)
        return HTTPError(503, lost) if lost else HTTPError(404, message)

    def deny(self, request, status: int, message: str) -> bytes:
        write_json(request, status, error_body(status, message))
        return b""


def _granted(grant, lookup):
    """``lookup(grant)`` if ``grant`` has the shape of one of our grants, else None (junk never reaches a table)."""
    if not isinstance(grant, str) or GRANT_RE.fullmatch(grant) is None:
        return None
    return lookup(grant)


class JsonResource(resource.Resource):
    """A resource answering JSON, with CORS, token and error handling."""

    isLeaf = True
    methods = ("GET",)
    needs_token = True
    #: the body this resource reads (see ``LimitedRequest``): JSON or a form, up to --max-message-size
    takes_body: str | None = "json"

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def render(self, request):
        method = request.method.decode(errors="replace")
        allowed = ", ".join(sorted(set(self.methods) | {"OPTIONS"}))
        if method == "OPTIONS":
            return self.policy.preflight(request, allowed)
        if not self.policy.apply_cors(request):
            return self.policy.deny(request, 403, "this origin is not allowed")
        if self.needs_token and not self.policy.token_ok(request):
            return self.policy.deny(request, 403, "a valid token is required")
        if method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
            request.setHeader(b"allow", allowed.encode())
            return self.policy.deny(request, 405, f"{method} is not allowed here")
        try:
            result = self.handle(request)
        except HTTPError as e:
            return self.policy.deny(request, e.status, e.message)
        except Exception:
            log.failure("error handling {method} {uri}", method=method, uri=redact_uri(request.uri))
            return self.policy.deny(request, 500, "internal error")
        if isinstance(result, defer.Deferred):
            result.addCallbacks(self._finish, self._fail, callbackArgs=(request,), errbackArgs=(request,))
            return server.NOT_DONE_YET
        return self._respond(request, result)

    def _respond(self, request, result) -> bytes:
        if isinstance(result, Response):
            # Before the body: once written, headers are already on the wire.
            for k, v in result.headers.items():
                request.setHeader(k.encode(), v.encode())
            write_json(request, result.status, result.body)
        elif result is not None:
            write_json(request, 200, result)
        else:
            request.setResponseCode(204)
        return b""

    def _finish(self, result, request) -> None:
        if request._disconnected:
            return
        self._respond(request, result)
        request.finish()

    def _fail(self, failure: Failure, request) -> None:
        if request._disconnected:
            return
        if failure.check(HTTPError):
            e = failure.value
            write_json(request, e.status, error_body(e.status, e.message))
        else:
            log.failure("error handling {uri}", failure, uri=redact_uri(request.uri))
            write_json(request, 500, error_body(500, "internal error"))
        request.finish()

    def handle(self, request):  # pragma: no cover - abstract
        raise NotImplementedError


class ReadOnly(resource.Resource):
    """A resource that answers GET and HEAD (its ``read``), and any other method with the JSON 405 every route gives."""

    isLeaf = True

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            write_json(request, 405, error_body(405, "GET only"))
            return b""
        return self.read(request)

    def read(self, request) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError


class Response:
    """A JSON reply with a status other than 200, or extra headers."""

    def __init__(self, status: int, body, headers: dict | None = None):
        self.status = status
        self.body = body
        self.headers = headers or {}


class NotFound(JsonResource):
    methods = ("GET", "POST", "PUT", "PATCH", "DELETE")
    needs_token = False
    takes_body = None

    def handle(self, request):
        raise HTTPError(404, f"{request.path.decode(errors='replace')} is not here")


class LimitedRequest(server.Request):
    """
    A request whose body is judged by its headers, before a byte of it is read.

    Twisted buffers bodies (in a temp file past 100 kB) before any resource
    sees the request. So once the headers are in, we find the resource the
    path leads to and ask it what it takes (``takes_body``: ``"json"``,
    ``"upload"`` or nothing) and, if it wants a token, whether the request
    has one. A body that resource would refuse (none wanted, a wrong or
    missing token, larger than its limit) is answered at once with a JSON
    error, nothing of it is stored, and the connection closes when the body
    has gone by, or ``LINGER`` seconds or ``LINGER_BYTES`` have, whichever
    is first. A client
    that waits for ``100 Continue`` (curl does, for large bodies) or reads
    while it sends sees the answer at once; one that only sends sees it if
    its body goes by within those bounds, else a reset connection.
    """

    #: body kind -> bytes; the site's factory sets these from the config
    body_limits: dict = {"json": 10 << 20, "upload": 100 << 20}
    #: multipart bodies up to this size still fill ``request.args``, as
    #: Twisted would (small forms); bigger ones are left to the resource that
    #: wants them, which streams them from the temp file (web/files.py)
    form_args_limit = 1 << 20
    _multipart: bytes | None = None
    _refused = False
    _dropped = 0
    _linger = None
    _limit = 0
    _received = 0

    def requestReceived(self, command, path, version):
        if self._refused:
            self._close()  # the refused body is all in: nothing more to wait for
            return
        ctype = self._multipart_header()
        if ctype is not None:
            # Twisted would read the whole body into memory to parse it, and
            # answer a malformed one with a bare 400 and a dropped connection.
            self._parsePOSTFormSubmission = False
            self._multipart = ctype
        super().requestReceived(command, path, version)

    def _form_args(self) -> None:
        self.content.seek(0, 2)
        size = self.content.tell()
        if 0 < size <= self.form_args_limit and self.method == b"POST":
            self.content.seek(0)
            try:
                self.args.update(http._getMultiPartArgs(self.content.read(), self._multipart))
            except Exception:
                pass  # malformed: whoever reads the form says so
        self.content.seek(0)

    def gotLength(self, length):
        if length == 0:
            super().gotLength(length)
            return
        resource = self._route()
        refusal = self._judge(resource, length)
        if refusal is not None:
            super().gotLength(0)
            self._refuse(resource, *refusal)
            return
        super().gotLength(length)

    def _route(self):
        """The resource this request's path leads to, found as ``Site`` will find it."""
        channel = self.channel
        site = getattr(channel, "site", None)
        if site is None:
            return None
        self.method = channel._command
        self.uri = channel._path
        path, _, query = self.uri.partition(b"?")
        self.path = path
        self.args = http.parse_qs(query, 1) if query else {}
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in path[1:].split(b"/")]
        try:
            return site.getResourceFor(self)
        except Exception:
            log.failure("finding the resource for {uri}", uri=self.uri)
            return None

    def _judge(self, resource, length: int | None) -> tuple[int, str] | None:
        """(status, message) if the body must not be read, else None (and the limit is set)."""
        kind = getattr(resource, "takes_body", None)
        if kind is None:
            if isinstance(resource, NotFound):
                return 404, f"{self.path.decode(errors='replace')} is not here"
            return 413, "this path takes no request body"
        policy = getattr(resource, "policy", None)
        if getattr(resource, "needs_token", False) and policy is not None and not policy.token_ok(self):
            return 403, "a valid token is required"
        limit = self.body_limits[kind]
        self._limit = limit + (UPLOAD_FRAMING if kind == "upload" and self._multipart_header() else 0)
        if length is not None and length > self._limit:
            return 413, f"the request body is {length} bytes, over the limit of {limit} bytes here"
        return None

    def _multipart_header(self) -> bytes | None:
        ctype = self.requestHeaders.getRawHeaders(b"content-type")
        if ctype and ctype[0].split(b";", 1)[0].strip().lower() == b"multipart/form-data":
            return ctype[0]
        return None

    def _refuse(self, resource, status: int, message: str) -> None:
        """Answer now, from the headers, and close: the body is never read."""
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the answer
        data = json.dumps(error_body(status, message)).encode()
        headers = http.Headers()
        for name, value in (
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"),
            (b"connection", b"close"),
        ):
            headers.setRawHeaders(name, [value])
        origin = self.getHeader("origin")
        policy = getattr(resource, "policy", None)
        if origin is not None and policy is not None and policy.origin_ok(origin):
            for name, value in policy.cors_headers(origin):
                headers.setRawHeaders(name, [value])
        reason = http.RESPONSES.get(status, b"Error")
        channel = self.channel
        channel.writeHeaders(channel._version or b"HTTP/1.1", str(status).encode(), reason, headers)
        channel.write(data)
        # Read on, dropping what comes, for a moment: closing a socket with
        # unread data resets it, and a client still sending would lose the
        # answer. The body ends, or the moment does, and the connection closes.
        self._linger = channel.callLater(LINGER, self._close)
        log.info(
            "refused the body of {method} {uri} from {client}: {why}",
            event="body_refused",
            method=self.method.decode(errors="replace"),
            uri=self.uri.decode(errors="replace")[:200],
            client=client_address(self),
            why=message,
        )

    def _close(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self.channel is not None:
            self.channel.loseConnection()

    def connectionLost(self, reason):
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)

    def handleContentChunk(self, data):
        if self._refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self._close()
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse(None, 413, f"the request body is over the limit of {self._limit} bytes here")
            return
        super().handleContentChunk(data)

    def process(self):
        if self._multipart is not None:
            self._form_args()
        super().process()
