# -*- test-case-name: tests.test_comms -*-
"""
What a session's browsers may send, and how fast: their sockets are read
no faster than ``--max-messages-per-second`` (``InputRate``), and not while
MAX_IN_FLIGHT of their messages are unfinished in the kernel. Past either,
a connection is not read (``pause_input``) until it may send again, so what
a browser pushes faster than that waits in TCP, is never lost, and leaves
the daemon's time to other sessions.

The gate's state is the session's (``WebSession.in_flight``, ``held_input``,
``slowed_input``); the session manager tells the gate what was sent and
what the kernel finished.
"""

from __future__ import annotations

from collections.abc import Callable

from ..messages import Message
from .delivery import size
from .router import WebSession

#: browser messages on shell and control that a kernel has not finished (its
#: "idle" for them not seen) before the session's sockets stop being read, and
#: how few let them be read again
MAX_IN_FLIGHT = 64
RESUME_IN_FLIGHT = MAX_IN_FLIGHT // 2
#: what a browser's message costs ``InputRate``: one, and one more per this many bytes
RATE_UNIT_BYTES = 64 << 10


def input_cost(msg: Message) -> float:
    """What ``msg`` costs ``InputRate``: one, and one more per ``RATE_UNIT_BYTES`` of it."""
    return 1 + size(msg) // RATE_UNIT_BYTES


class InputRate:
    """
    How fast each key (a session) may send: ``rate`` units a second, in
    bursts of as many (a token bucket). A message already read is never
    refused: it may take the bucket below zero, and ``charge`` says how long
    the sender must wait until it is paid back. The gate stops reading the
    sender's socket that long, so a client pushing controls (or anything) as
    fast as it can is slowed by TCP to ``rate``, loses nothing, and cannot
    take the daemon's time from other sessions.
    """

    def __init__(self, rate: float, clock):
        self.rate = float(rate)
        self.clock = clock
        #: key -> (units left, when last charged); a key with a full bucket is forgotten (``prune``)
        self.levels: dict[str, tuple[float, float]] = {}

    def charge(self, key: str, cost: float) -> float:
        """Take ``cost`` units from ``key``; the seconds its sender must now wait (0: none)."""
        now = self.clock.seconds()
        level = self._level(key, now) - cost
        self.levels[key] = (level, now)
        return 0.0 if level >= 0 else -level / self.rate

    def wait(self, key: str) -> float:
        """The seconds ``key``'s sender must still wait (0: none)."""
        level = self._level(key, self.clock.seconds())
        return 0.0 if level >= 0 else -level / self.rate

    def _level(self, key: str, now: float) -> float:
        level, then = self.levels.get(key, (self.rate, now))
        return min(self.rate, level + (now - then) * self.rate)

    def prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, (level, then) in self.levels.items() if level + (now - then) * self.rate >= self.rate]:
            del self.levels[key]


class InputGate:
    """
    Pauses and resumes reading the browsers' sockets. A connection is read
    again only once neither holds it: its rate (``slowed_input``) and its
    kernel's backlog (``held_input``).
    """

    def __init__(self, rate: float, clock, slowed: Callable[[WebSession], None]):
        self.clock = clock
        #: how fast each session's browsers may send (their sockets are read no faster)
        self.rate = InputRate(rate, clock)
        #: called when a session's browser is slowed for its rate (observers count the limit hit)
        self._slowed = slowed

    def meter(self, session: WebSession, msg: Message, conn) -> None:
        """
        Charge ``msg`` to its session's rate: past it, ``conn`` is not read
        until the rate allows.
        """
        wait = self.rate.charge(session.id, input_cost(msg))
        if wait > 0 and conn not in session.slowed_input:
            session.slowed_input.add(conn)
            conn.pause_input()
            self._slowed(session)
            self.clock.callLater(wait, self._unslow, session, conn)

    def _unslow(self, session: WebSession, conn) -> None:
        """
        The wait is over, unless what ``conn`` sent meanwhile (the rest of a
        read, already taken) made it longer: Twisted reads up to 64 KiB at a
        time, and every frame in it is charged.
        """
        wait = self.rate.wait(session.id)
        if wait > 0 and conn in session.slowed_input and conn in session.connections:
            self.clock.callLater(wait, self._unslow, session, conn)
            return
        if conn in session.slowed_input:
            session.slowed_input.discard(conn)
            if conn not in session.held_input:
                conn.resume_input()

    def sent(self, session: WebSession, msg: Message, conn) -> None:
        """
        ``msg`` went to the kernel: it counts until the kernel is idle for it.
        With MAX_IN_FLIGHT unfinished, ``conn`` is not read until the kernel
        catches up (``finished``).
        """
        session.in_flight[msg.msg_id] = self.clock.seconds()
        if len(session.in_flight) >= MAX_IN_FLIGHT and conn not in session.held_input:
            session.held_input.add(conn)
            if conn not in session.slowed_input:
                conn.pause_input()

    def finished(self, session: WebSession, msg_id) -> None:
        """The kernel went idle for ``msg_id``."""
        if session.in_flight.pop(msg_id, None) is not None and len(session.in_flight) <= RESUME_IN_FLIGHT:
            self._release_held(session)

    def forget(self, session: WebSession, before: float | None) -> None:
        """Forget what was sent before ``before`` (None: everything) as running, and read the browsers again."""
        if before is None:
            session.in_flight.clear()
        else:
            for msg_id in [m for m, sent in session.in_flight.items() if sent <= before]:
                del session.in_flight[msg_id]
        if len(session.in_flight) <= RESUME_IN_FLIGHT:
            self._release_held(session)

    def _release_held(self, session: WebSession) -> None:
        held, session.held_input = session.held_input, set()
        for conn in held:
            if conn not in session.slowed_input:
                conn.resume_input()

    def drop(self, session: WebSession, conn) -> None:
        """``conn`` closed: nothing holds it any more."""
        session.held_input.discard(conn)
        session.slowed_input.discard(conn)

    def prune(self) -> None:
        self.rate.prune()
