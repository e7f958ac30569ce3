# -*- test-case-name: tests.test_ops -*-
"""
Structured logs: what the daemon tells its operator, and in which shape.

Every operational event is a ``twisted.logger`` event with a format string
for people and keyword fields for machines, and a stable ``event`` field
naming it (a log shipper keys on that, never on the text):

=================  ==============================================================
event              fields
=================  ==============================================================
session_start      session, client
session_stop       session, reason
session_kernel     session, kernel, pid       (a session got its kernel; pid on the host)
session_kernel_died session, reason
ws_connect         session, framing           (default, v1 or sagecell: the WebSocket framing)
kernel_ready       kernel, pid, spawner, spawn_seconds (fork to ready, or None)
kernel_died        kernel, reason
limit_hit          kind (exec_timeout, max_kernels, max_kernels_per_client, ...), session
spawner_started    pid
spawner_died       reason, delay, restarts
spawner_joined     name, pid, pool
spawner_lost       name, why
code               session, code              (only with log_code = true)
=================  ==============================================================

Errors are ``log.failure``/``log.error`` events as Twisted makes them.
Users' code and output are never logged unless ``log_code`` is set.

Secrets: the access log (twisted.web's combined format, ``access_log_line``)
and our own events show ``?token=`` values as ``REDACTED``, in the request
line and the Referer alike, however the name is spelled (``%74oken``).

JSON lines: ``log_json = true`` (or ``--log-json=true``) makes the tap hand
twistd ``json_observer`` as its log observer factory, the same as
``twistd --logger sagecell_tw.logs.json_observer sagecell``: one JSON object
per line on standard output, twistd's own events included.
"""

from __future__ import annotations

import sys
from urllib.parse import unquote_plus

from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.web import http
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

#: query parameters whose values never reach a log
SECRET_PARAMS = frozenset({"token"})
REDACTED = "REDACTED"


def json_observer() -> ILogObserver:
    """A twistd ``--logger`` factory: JSON lines on standard output (no record separator)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def redact_uri(uri) -> str:
    """
    ``uri`` (bytes or str) with the value of every secret query parameter
    replaced by ``REDACTED``. Names are compared as Twisted parses them
    (percent- and plus-decoded), so no spelling of ``token`` slips by.
    """
    text = uri.decode("utf-8", errors="replace") if isinstance(uri, bytes) else str(uri)
    path, sep, query = text.partition("?")
    if not sep:
        return text
    fragment = ""
    if "#" in query:
        query, hashmark, rest = query.partition("#")
        fragment = hashmark + rest
    pairs = []
    for pair in query.split("&"):
        name, eq, _value = pair.partition("=")
        if eq and unquote_plus(name).strip().lower() in SECRET_PARAMS:
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return f"{path}?{'&'.join(pairs)}{fragment}"


class _Redacted:
    """The parts of a request the combined log format reads, secrets redacted."""

    def __init__(self, request):
        self._request = request
        self.method = request.method
        self.uri = redact_uri(request.uri).encode()
        self.clientproto = request.clientproto
        self.code = request.code
        self.sentLength = request.sentLength

    def getClientAddress(self):
        return self._request.getClientAddress()

    def getHeader(self, name):
        value = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            return redact_uri(value).encode()
        return value


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request) -> str:
    """twisted.web's combined log line, with ``?token=`` values redacted (the Site's ``logFormatter``)."""
    return http.combinedLogFormatter(timestamp, _Redacted(request))
