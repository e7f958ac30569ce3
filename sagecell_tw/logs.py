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

JSON lines: ``log_json = true`` (or ``--log-json=true``) makes the tap hand
twistd ``json_observer`` as its log observer factory, the same as
``twistd --logger sagecell_tw.logs.json_observer sagecell``: one JSON object
per line on standard output, twistd's own events included.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, Logger, jsonFileLogObserver

log = Logger()


def json_observer() -> ILogObserver:
    """A twistd ``--logger`` factory: JSON lines on standard output (no record separator)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


class SessionEvents:
    """Logs the session manager's events that it does not log itself."""

    def __init__(self, sessions):
        self.sessions = sessions

    def attach(self) -> None:
        self.sessions.observers.append(self)

    def __call__(self, event: str, session, detail: str) -> None:
        sid = session.id if session is not None else None
        if event == "limit":
            log.info("limit hit: {kind} (session {session})", event="limit_hit", kind=detail, session=sid)
