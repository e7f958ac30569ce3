# -*- test-case-name: tests.test_reconnect,tests.test_remote_files,tests.test_lifecycle_clock -*-
"""
How messages reach a session's browsers. iopub and the daemon's notices go
to every connection of the session (``broadcast``); a reply goes to the
connections of the client session whose request it answers (``reply``).
Each is recorded in the session's journal as it goes out, so a connection
that drops and comes back gets what it missed (``rejoin``, ``park``; the
journal is ``replay.Journal``). While the news of an execution's files is
on its way, iopub from its "idle" on is held (``hold``; ``hold.IopubHold``).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from .. import messages
from ..messages import DAEMON_SESSION, Message
from .router import WebSession

log = Logger()


def size(msg: Message) -> int:
    """The bytes of ``msg``'s parts, as relayed (for metrics, the journal's and the hold's bounds)."""
    n = len(msg.header) + len(msg.parent) + len(msg.metadata) + len(msg.content)
    if msg.buffers:
        n += sum(map(len, msg.buffers))
    return n


def broadcast(session: WebSession, msg: Message) -> None:
    """``msg`` to every connection of the session, behind what is held."""
    hold = session.hold
    if hold.holding:
        if hold.keep(msg, size(msg)):
            return
        deliver(session, hold.let_go())  # too much to hold: the news will come late
    deliver(session, [msg])


def deliver(session: WebSession, msgs: list[Message]) -> None:
    """``msgs`` to every connection of the session now, recorded for replay."""
    journal = session.journal
    for msg in msgs:
        if journal is not None:
            journal.record(msg, size(msg))
        for conn in list(session.connections):
            conn.deliver(msg)


def reply(session: WebSession, msg: Message, target: str) -> None:
    """A kernel's reply (shell, stdin, control) to the connections of client session ``target``, or to all if none."""
    if session.journal is not None:
        session.journal.record(msg, size(msg), target)
    conns = [c for c in session.connections if target in c.client_sessions]
    for conn in conns or list(session.connections):
        conn.deliver(msg)


def hold(session: WebSession, idle: Message, waits: list[defer.Deferred]) -> None:
    """
    Hold ``idle`` and the iopub after it until ``waits`` fire (each with a
    message or None; the hooks bound their time), then send those first.
    """
    batch = session.hold.begin(idle, size(idle))

    def release(results) -> None:
        news = [m for ok, m in results if ok and isinstance(m, Message)]
        deliver(session, [*news, *session.hold.release(batch)])

    defer.DeferredList(waits, consumeErrors=True).addCallback(release)


def rejoin(session: WebSession, conn, lost: Callable[[], None]) -> None:
    """
    ``conn`` opened for a client session (``conn.session_id``): it gets what
    was delivered for that client session while it was away, after
    ``conn.last_msg_id`` if it names one. If part of that is gone, ``conn``
    is told so, and ``lost`` is called first.
    """
    cid = getattr(conn, "session_id", "")
    if session.journal is None or not cid:
        return
    replay = session.journal.resume(cid, getattr(conn, "last_msg_id", None))
    if replay.lost:
        limit = session.journal.limit
        notice = (
            f"\n[sagecell] The connection was lost for a while: {replay.lost} messages of output "
            f"(about {replay.lost_bytes} bytes) produced meanwhile could not be kept for you "
            f"(this server keeps the last {limit} bytes per session) and are missing here.\n"
        )
        lost()
        conn.deliver(messages.stream(notice, DAEMON_SESSION))
    for msg in replay.messages:
        conn.deliver(msg)
    if replay.messages or replay.lost:
        log.info(
            "replayed {n} messages to a reconnected client of session {session} ({lost} lost)",
            event="ws_replay",
            session=session.id,
            n=len(replay.messages),
            lost=replay.lost,
        )


def park(session: WebSession, conn) -> None:
    """``conn`` closed: if it was its client session's last, what comes from now on, that client session misses."""
    cid = getattr(conn, "session_id", "")
    if session.journal is not None and cid:
        if not any(getattr(c, "session_id", "") == cid for c in session.connections):
            session.journal.park(cid)
