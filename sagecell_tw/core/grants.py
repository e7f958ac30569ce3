# -*- test-case-name: tests.test_haproxy -*-
"""
Grants: the ids that give access to a session (kernel ids, notebook-session
ids), and the daemon each names.

A grant is 128 random bits as 32 lowercase hex digits; a daemon started
with ``--daemon-name d1`` puts its name in front, ``d1-<32 hex>``, so that
a load balancer in front of several daemons sends every request for that
kernel to the daemon that holds it (``etc/haproxy.cfg`` reads the name from
the path). The name only routes: the random part is as long either way, and
it alone grants access, checked by the daemon that holds it. A visitor who
writes another daemon's name into an id reaches that daemon and nothing
more.

Plain model: no Twisted, no I/O.
"""

from __future__ import annotations

import re
import secrets

from ..config import DAEMON_NAME

#: every grant we accept, with or without a daemon's name (config.DAEMON_NAME)
GRANT_RE = re.compile(rf"(?:({DAEMON_NAME})-)?[0-9a-f]{{32}}")


def new_grant(daemon: str = "") -> str:
    """128 random bits, named ``daemon-`` when the daemon has a name."""
    random = secrets.token_hex(16)
    return f"{daemon}-{random}" if daemon else random


def daemon_of(grant) -> str | None:
    """The daemon named in ``grant``; None when it names none or is no grant at all."""
    if not isinstance(grant, str):
        return None
    m = GRANT_RE.fullmatch(grant)
    return m.group(1) if m else None


def lost_elsewhere(grant, daemon: str) -> str | None:
    """
    Why a ``grant`` this daemon (named ``daemon``) does not hold is lost, when
    it names another daemon: the balancer sends a request there unless that
    daemon is down, so its kernel went with it. None for any other id (a
    plain "no such kernel").
    """
    other = daemon_of(grant)
    if other is None or other == daemon:
        return None
    return f"kernel lost: the server {other} that ran it cannot be reached (it stopped or crashed); start a new session"
