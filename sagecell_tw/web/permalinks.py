# -*- test-case-name: tests.test_permalinks -*-
"""
SageMathCell's permalink endpoints, so pages and clients written for it work
against us unchanged:

- ``POST /permalink`` with ``code``, ``language``, ``interacts`` and ``n``
  (form-encoded, as SageMathCell's own client sends them, or a JSON object)
  answers ``{"zip": Z, "query": ID, "interacts": I}`` (plus ``"n"`` when given,
  which the client checks before using the answer). ``Z`` and ``I`` are the
  ``?z=`` and ``&interacts=`` forms: URL-safe base64, with padding, of the
  zlib-compressed UTF-8 text.
- ``GET /permalink?q=ID`` answers ``[code, language, interacts]``: SageMathCell
  JSON-dumps the tuple its database returns, and its web-database adapter
  unpacks exactly that.

Every error is a JSON ``{"error": "..."}`` with a status a client can act on;
a bad request stores nothing. A client address may make at most so many
permalinks a minute (``RateLimit``; beyond that 429 with ``Retry-After``), and
a full store answers 507, a database that cannot be used (down, refusing
connections) 503: only permalinks wait for it, never the kernels. CORS and
the token are left to whoever mounts this resource (``sagecell.WithCors``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .. import messages
from ..core.permalinks import PermalinkStoreError, PermalinkStoreFull, PermalinkStoreUnavailable, is_valid_id
from .policy import client_address, write_json

__all__ = [
    "DEFAULT_LANGUAGE",
    "DEFAULT_MAX_CODE_BYTES",
    "PermalinkBackend",
    "PermalinkResource",
    "RateLimit",
    "decode_zip",
    "encode_zip",
]

log = Logger()

#: Largest code (UTF-8 bytes) a permalink may hold, unless told otherwise.
DEFAULT_MAX_CODE_BYTES = 64 * 1024

#: Language stored when a request names none (SageMathCell's default is
#: "sage"; we only run Python).
DEFAULT_LANGUAGE = "python"

NOT_FOUND_MESSAGE = "ID not found in permalink database"

# URL-safe base64 alphabet; padding optional so that ?z= needs no escaping.
_ZIP_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_LANGUAGE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]{0,31}")
_N_RE = re.compile(r"-?[0-9]{1,15}")
# JSON escapes (\u00XX) make a field at most 6 times its UTF-8 size, and
# percent-encoding 3 times; room for field names and the other fields on top.
_BODY_EXPANSION = 6
_BODY_SLACK = 4096


class PermalinkBackend(Protocol):
    """What the resource needs from storage (``PermalinkStore`` provides it)."""

    def store(self, code: str, language: str, interacts: str) -> defer.Deferred[str]:
        """Save and fire with the id."""

    def fetch(self, ident: str) -> defer.Deferred[dict[str, Any] | None]:
        """Fire with the stored fields, or None when there is no such id."""


def encode_zip(code: str) -> str:
    """
    Encode text the way SageMathCell's ``?z=`` links carry it: URL-safe base64
    (with ``=`` padding, as SageMathCell emits it) of zlib-compressed UTF-8.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, not {type(code).__name__}")
    return base64.urlsafe_b64encode(zlib.compress(code.encode("utf-8"))).decode("ascii")


def _max_encoded_chars(max_bytes: int) -> int:
    """A generous bound on the base64 size of a stream inflating to ``max_bytes``."""
    compressed = 2 * max_bytes + 1024
    return 4 * (compressed // 3 + 1)


def decode_zip(z: str, max_bytes: int = DEFAULT_MAX_CODE_BYTES) -> str:
    """
    Decode a ``?z=``/``&interacts=`` value back to text, refusing anything
    malformed or inflating past ``max_bytes`` (a zip bomb never gets further
    than ``max_bytes + 1`` bytes of output).

    Padding may be missing, as SageMathCell allows. Raises ``ValueError`` with
    a message fit for a user.
    """
    if not isinstance(z, str):
        raise TypeError(f"z must be str, not {type(z).__name__}")
    if max_bytes < 0:
        raise ValueError("max_bytes must not be negative")
    if _ZIP_RE.fullmatch(z) is None:
        raise ValueError("zipped code is not URL-safe base64")
    body = z.rstrip("=")
    if len(body) % 4 == 1:
        raise ValueError("zipped code has an impossible base64 length")
    if len(body) > _max_encoded_chars(max_bytes):
        raise ValueError(f"zipped code is larger than the {max_bytes}-byte limit")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), b"-_", validate=True)
    except binascii.Error as e:
        raise ValueError(f"zipped code is not valid base64: {e}") from None
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, max_bytes + 1)
        if len(out) <= max_bytes and not inflater.unconsumed_tail:
            out += inflater.flush(max_bytes + 1 - len(out))
    except zlib.error as e:
        raise ValueError(f"zipped code is not valid zlib data: {e}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise ValueError(f"zipped code inflates past the {max_bytes}-byte limit")
    if not inflater.eof:
        raise ValueError("zipped code is truncated")
    if inflater.unused_data:
        raise ValueError("zipped code has trailing data after the zlib stream")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("zipped code is not UTF-8 text") from None


class RateLimit:
    """
    A token bucket per client address: ``per_minute`` a minute, in bursts of at
    most as many. Time comes from ``clock`` (``task.Clock`` in tests). A bucket
    that has filled up again is as good as none, and is forgotten when the
    table grows past ``max_clients``: it holds only the recently busy.
    """

    def __init__(self, clock: Any, per_minute: int, max_clients: int = 10_000) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be more than zero")
        self.clock = clock
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        #: client address -> (requests it may still make, when that was counted)
        self.buckets: dict[str, tuple[float, float]] = {}
        self._prune_at = max_clients

    def take(self, client: str) -> float:
        """0 if ``client`` may go ahead now (counted), else the seconds until it may."""
        now = self.clock.seconds()
        left, then = self.buckets.get(client, (self.capacity, now))
        left = min(self.capacity, left + max(0.0, now - then) * self.rate)
        if left < 1:
            self.buckets[client] = (left, now)
            return (1 - left) / self.rate
        self.buckets[client] = (left - 1, now)
        if len(self.buckets) > self._prune_at:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        for client, (left, then) in list(self.buckets.items()):
            if left + (now - then) * self.rate >= self.capacity:
                del self.buckets[client]
        self._prune_at = max(self.max_clients, 2 * len(self.buckets))


class _BadRequest(Exception):
    """A request a client can fix; carries the status and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Reply:
    """Writes one JSON answer, unless the client has already gone away."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _: Failure) -> None:
        self.gone = True

    def send(self, status: int, body: object) -> None:
        if self.gone:
            return
        write_json(self.request, status, body)
        self.request.finish()


def _error(request: Any, status: int, message: str) -> bytes:
    """An error in SageMathCell's shape, ``{"error": message}``, written as every JSON answer of ours is."""
    write_json(request, status, {"error": message})
    return b""


class PermalinkResource(Resource):
    """
    ``/permalink``: POST stores, GET ``?q=`` looks up (see the module doc).

    The site serves it as ``/permalink`` (``site.routes``), inside SageMathCell's CORS.
    """

    isLeaf = True
    allowed_methods = (b"GET", b"HEAD", b"POST")
    #: what sagecell_tw's request reads before rendering (web.policy.LimitedRequest)
    takes_body = "json"

    def __init__(
        self,
        store: PermalinkBackend,
        *,
        max_code_bytes: int = DEFAULT_MAX_CODE_BYTES,
        max_interacts_bytes: int | None = None,
        default_language: str = DEFAULT_LANGUAGE,
        rate: RateLimit | None = None,
    ) -> None:
        """
        :param store: where permalinks live.
        :param max_code_bytes: largest code (UTF-8 bytes) accepted; more is 413.
        :param max_interacts_bytes: largest interact state; defaults to
            ``max_code_bytes``.
        :param default_language: stored when a request names no language.
        :param rate: how many permalinks a client address may make; None for
            no limit.
        """
        super().__init__()
        if _LANGUAGE_RE.fullmatch(default_language) is None:
            raise ValueError(f"default_language {default_language!r} is not a language name")
        self.store = store
        self.max_code_bytes = max_code_bytes
        self.max_interacts_bytes = max_code_bytes if max_interacts_bytes is None else max_interacts_bytes
        self.default_language = default_language
        self.rate = rate
        self.max_body_bytes = _BODY_EXPANSION * (self.max_code_bytes + self.max_interacts_bytes) + _BODY_SLACK

    def render(self, request: Any) -> bytes | int:
        """Answer every method and stray sub-path in JSON, not Twisted's HTML."""
        if request.postpath not in ([], [b""]):
            return _error(request, http.NOT_FOUND, "no such resource")
        if request.method not in self.allowed_methods:
            request.setHeader(b"Allow", b", ".join(self.allowed_methods))
            return _error(request, http.NOT_ALLOWED, "method not allowed")
        return super().render(request)

    # -- GET ---------------------------------------------------------------

    def render_GET(self, request: Any) -> bytes | int:
        """Look up ``?q=ID``; answer ``[code, language, interacts]`` or 404."""
        values = request.args.get(b"q")
        if not values or not values[-1]:
            return _error(request, http.BAD_REQUEST, "missing query parameter q")
        try:
            ident = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, http.BAD_REQUEST, "q is not valid UTF-8")
        if not is_valid_id(ident):
            return _error(request, http.NOT_FOUND, NOT_FOUND_MESSAGE)
        reply = _Reply(request)
        d = self.store.fetch(ident)
        d.addCallbacks(
            self._fetched,
            self._store_failed,
            callbackArgs=(reply,),
            errbackArgs=(reply, "fetch"),
        )
        d.addErrback(_log_unexpected)
        return NOT_DONE_YET

    @staticmethod
    def _fetched(row: dict[str, Any] | None, reply: _Reply) -> None:
        if row is None:
            reply.send(http.NOT_FOUND, {"error": NOT_FOUND_MESSAGE})
        else:
            reply.send(http.OK, [row["code"], row["language"], row["interacts"]])

    # -- POST --------------------------------------------------------------

    def render_POST(self, request: Any) -> bytes | int:
        """Store the posted code; answer SageMathCell's ``{zip, query, ...}``."""
        try:
            fields = self._parse_post(request)
            code, language, interacts, n = self._validate(fields)
        except _BadRequest as e:
            return _error(request, e.status, e.message)
        wait = self.rate.take(client_address(request)) if self.rate is not None else 0.0
        if wait:
            request.setHeader(b"Retry-After", str(max(1, round(wait))).encode())
            limit = round(self.rate.capacity)
            return _error(
                request,
                429,
                f"too many new permalinks from your address (at most {limit} a minute); try again in {wait:.0f} s",
            )
        reply = _Reply(request)
        d = self.store.store(code, language, interacts)
        d.addCallbacks(
            self._stored,
            self._store_failed,
            callbackArgs=(reply, code, interacts, n),
            errbackArgs=(reply, "store"),
        )
        d.addErrback(_log_unexpected)
        return NOT_DONE_YET

    @staticmethod
    def _stored(ident: str, reply: _Reply, code: str, interacts: str, n: int | None) -> None:
        answer: dict[str, object] = {
            "zip": encode_zip(code),
            "query": ident,
            "interacts": encode_zip(interacts),
        }
        if n is not None:
            answer["n"] = n
        reply.send(http.OK, answer)

    def _parse_post(self, request: Any) -> dict[str, object]:
        """Read the body as JSON or take the form fields Twisted parsed."""
        content = request.content
        if content is None:
            body = b""
        else:
            content.seek(0, 2)
            if content.tell() > self.max_body_bytes:
                raise _BadRequest(
                    http.REQUEST_ENTITY_TOO_LARGE,
                    f"request body is larger than the {self.max_body_bytes}-byte limit",
                )
            content.seek(0)
            body = content.read()
        ctype = request.getHeader(b"content-type") or b""
        media = ctype.split(b";", 1)[0].strip().lower()
        if media == b"application/json":
            try:
                parsed = messages.loads(body.decode("utf-8"))
            except UnicodeDecodeError:
                raise _BadRequest(http.BAD_REQUEST, "JSON body is not UTF-8") from None
            except ValueError as e:
                raise _BadRequest(http.BAD_REQUEST, f"malformed JSON body: {e}") from None
            if not isinstance(parsed, dict):
                raise _BadRequest(http.BAD_REQUEST, "JSON body must be an object")
            return parsed
        fields: dict[str, object] = {}
        for key in (b"code", b"language", b"interacts", b"n"):
            values = request.args.get(key)
            if values:
                # The last value wins, as with Tornado's get_argument.
                try:
                    fields[key.decode("ascii")] = values[-1].decode("utf-8")
                except UnicodeDecodeError:
                    raise _BadRequest(
                        http.BAD_REQUEST,
                        f"field {key.decode('ascii')} is not valid UTF-8",
                    ) from None
        return fields

    def _validate(self, fields: dict[str, object]) -> tuple[str, str, str, int | None]:
        """Check every field, so that nothing bad is ever stored."""
        code = fields.get("code")
        if code is None:
            raise _BadRequest(http.BAD_REQUEST, "missing field code")
        if not isinstance(code, str):
            raise _BadRequest(http.BAD_REQUEST, "field code must be a string")
        _check_size("code", code, self.max_code_bytes)

        language = fields.get("language", self.default_language)
        if not isinstance(language, str) or _LANGUAGE_RE.fullmatch(language) is None:
            raise _BadRequest(
                http.BAD_REQUEST,
                "field language must be a short name such as 'python'",
            )

        interacts = fields.get("interacts", "[]")
        if isinstance(interacts, list):
            interacts = json.dumps(interacts, separators=(",", ":"))
        if not isinstance(interacts, str):
            raise _BadRequest(http.BAD_REQUEST, "field interacts must be a JSON array")
        _check_size("interacts", interacts, self.max_interacts_bytes)
        try:
            parsed = messages.loads(interacts)
        except ValueError:
            parsed = None
        if not isinstance(parsed, list):
            raise _BadRequest(http.BAD_REQUEST, "field interacts must be a JSON array")

        n = fields.get("n")
        if n is not None:
            if isinstance(n, str) and _N_RE.fullmatch(n):
                n = int(n)
            elif not (isinstance(n, int) and not isinstance(n, bool)):
                raise _BadRequest(http.BAD_REQUEST, "field n must be an integer")
        return code, language, interacts, n

    # -- failures ----------------------------------------------------------

    @staticmethod
    def _store_failed(failure: Failure, reply: _Reply, what: str) -> None:
        """The database, not the client, failed: log it and say so briefly."""
        if failure.check(PermalinkStoreFull):
            log.warn("Permalink refused: {why}", why=failure.getErrorMessage())
            reply.send(
                507,
                {"error": "the permalink store is full: no new permalinks can be made for now"},
            )
        elif failure.check(PermalinkStoreError):
            if not failure.check(PermalinkStoreUnavailable):
                log.failure("Permalink {what} failed: database unavailable", failure, what=what)
            # else the store has said once in the log that the database cannot be used, and why
            reply.send(
                http.SERVICE_UNAVAILABLE,
                {"error": "permalink database unavailable; try again later (running code is not affected)"},
            )
        else:
            log.failure("Permalink {what} failed", failure, what=what)
            reply.send(
                http.INTERNAL_SERVER_ERROR,
                {"error": "internal error in permalink " + what},
            )


def _log_unexpected(failure: Failure) -> None:
    """Last stop for a bug in answering, so it is logged, not lost."""
    log.failure("Unexpected error answering a permalink request", failure)


def _check_size(name: str, value: str, limit: int) -> None:
    """413 for text over ``limit`` UTF-8 bytes, 400 for text UTF-8 cannot hold."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _BadRequest(
            http.BAD_REQUEST,
            f"field {name} contains invalid characters (lone surrogates)",
        ) from None
    if size > limit:
        raise _BadRequest(
            http.REQUEST_ENTITY_TOO_LARGE,
            f"field {name} is larger than the {limit}-byte limit",
        )
