# -*- test-case-name: tests.test_remote_files,tests.test_lifecycle_clock -*-
"""
A session's iopub held back from an execution's "idle" on, while the news of
its files is on its way (a worker host scans its kernel's dir): the news
goes out first, then "idle" and what came after it, so a client counts the
news as part of the execution. Bounded: past MAX_HELD messages or
MAX_HELD_BYTES everything held goes out, and the news comes late.
"""

from __future__ import annotations

from ..messages import Message

#: iopub messages of one session held back at most (count, bytes)
MAX_HELD = 1000
MAX_HELD_BYTES = 16 << 20


class IopubHold:
    """One session's held iopub; the session manager sends what it hands back."""

    def __init__(self):
        #: the messages held, oldest first; None: not holding
        self.held: list[Message] | None = None
        self.bytes = 0

    @property
    def holding(self) -> bool:
        return self.held is not None

    def begin(self, idle: Message, size: int) -> list[Message]:
        """Hold ``idle`` (and what follows): the batch ``release`` later lets go. Holding already: in line behind it."""
        if self.held is None:
            self.held, self.bytes = [], 0
        self.held.append(idle)
        self.bytes += size
        return self.held

    def keep(self, msg: Message, size: int) -> bool:
        """Hold ``msg`` if holding and there is room for it; False: send it (after ``let_go``, if holding)."""
        if self.held is None or len(self.held) >= MAX_HELD or self.bytes + size > MAX_HELD_BYTES:
            return False
        self.held.append(msg)
        self.bytes += size
        return True

    def let_go(self) -> list[Message]:
        """Everything held, to send now; holding ends."""
        held = self.held or []
        self.held, self.bytes = None, 0
        return held

    def release(self, batch: list[Message]) -> list[Message]:
        """``batch`` (from ``begin``) if it is still held, to send now; [] if it already went out."""
        return self.let_go() if self.held is batch else []
