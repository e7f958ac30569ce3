# -*- test-case-name: tests.test_reconnect -*-
"""
What a WebSocket that drops and comes back has missed: a session's recent
deliveries, kept for replay, bounded in bytes (``--replay-bytes``).

A connection names its Jupyter client session (``?session_id=``, as
jupyter_server keys its buffer of messages for a client that is gone). Every
message the session manager delivers is recorded here in delivery order:
iopub for every connection, a reply for the client session it answers.
When a client session's last connection closes, the point it was cut off is
noted (``park``). When it connects again, it gets what was delivered for it
since then; a client that says which message it saw last
(``?last_msg_id=``, the embed widget does) gets exactly what came after
that one, the messages in flight when the connection broke included.

Recording goes on while everyone is connected: the daemon cannot know what
a connection that breaks had read. The bound is on the session's whole
record; when it is full the oldest goes, and a client that comes back to
find part of what it missed gone is told so (``Replay.lost``).

Plain model: no I/O, no Twisted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import NamedTuple

from ..messages import Message

#: what one recorded message costs beyond its bytes (the entry, the object)
ENTRY_COST = 256
#: client sessions of one session whose cut-off points are kept (the oldest go first)
MAX_PARKED = 64


class Entry(NamedTuple):
    seq: int
    msg: Message
    #: the client session it answers; None: every connection's (iopub, daemon notices)
    target: str | None
    #: bytes recorded before this entry (to say how much was lost)
    before: int
    size: int


class Replay(NamedTuple):
    """What a returning client session is sent: missed messages, and what of them is gone."""

    messages: list[Message]
    #: messages it missed that were no longer kept, and their bytes
    lost: int = 0
    lost_bytes: int = 0


NOTHING = Replay([])


class Journal:
    """One session's recent deliveries and the cut-off points of its absent client sessions."""

    def __init__(self, limit: int):
        self.limit = limit
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        #: sequence number of the next entry, and bytes recorded ever
        self.seq = 0
        self.total = 0
        #: client session id -> (seq, total) when its last connection closed
        self.parked: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def record(self, msg: Message, size: int, target: str | None = None) -> None:
        """``msg`` (``size`` bytes) was delivered now: to every connection, or to client session ``target``."""
        cost = size + ENTRY_COST
        self.entries.append(Entry(self.seq, msg, target, self.total, cost))
        self.seq += 1
        self.total += cost
        self.bytes += cost
        while self.bytes > self.limit and self.entries:
            self.bytes -= self.entries.popleft().size

    def park(self, client_session: str) -> None:
        """``client_session``'s last connection closed: what is delivered from now on, it misses."""
        if not client_session:
            return
        self.parked.pop(client_session, None)
        self.parked[client_session] = (self.seq, self.total)
        while len(self.parked) > MAX_PARKED:
            self.parked.popitem(last=False)

    def resume(self, client_session: str, last_msg_id: str | None = None) -> Replay:
        """
        What ``client_session``, connecting again, missed: everything for it
        after its message ``last_msg_id`` if that is still kept, else after
        its cut-off point; nothing for a client session never cut off.
        """
        cut = self.parked.pop(client_session, None) if client_session else None
        start = self._after(last_msg_id) if last_msg_id else None
        if start is None:
            start = cut
        if start is None:
            return NOTHING
        seq, total = start
        missed = [e.msg for e in self.entries if e.seq >= seq and (e.target is None or e.target == client_session)]
        first = self.entries[0] if self.entries else None
        kept_from = first.seq if first is not None else self.seq
        if kept_from <= seq:
            return Replay(missed)
        lost_bytes = (first.before if first is not None else self.total) - total
        return Replay(missed, kept_from - seq, max(0, lost_bytes))

    def _after(self, msg_id: str) -> tuple[int, int] | None:
        """The point just after the kept message ``msg_id`` (the latest of that id), or None."""
        for entry in reversed(self.entries):
            if entry.msg.msg_id == msg_id:
                return entry.seq + 1, entry.before + entry.size
        return None
