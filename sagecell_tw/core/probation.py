# -*- test-case-name: tests.test_lifecycle_clock -*-
"""
A session's new kernel is on probation until it starts the session's code.
A kernel may die before that: handed out as its spawner died, or dead in
the pool unseen. Then the session has lost nothing, so it takes a fresh
kernel, and what it sent the dead one that was never answered goes there;
the visitor sees no death. At most MAX_EARLY_DEATHS kernels in a row go so
quietly; the next death is reported as any other.

Plain bookkeeping: the session manager takes the kernel and resends.
"""

from __future__ import annotations

from ..messages import Message

#: how many kernels in a row a session swaps silently for ones that died before running its code
MAX_EARLY_DEATHS = 3


class Probation:
    """Sessions whose kernel has not run their code yet, what that kernel has not answered, and early deaths."""

    def __init__(self, max_unanswered: int):
        #: requests kept to send again, per session; past it, the kernel counts as having state
        self.max_unanswered = max_unanswered
        #: session id -> (its kernel, [(msg, conn)] sent to it and not yet answered)
        self._unproven: dict[str, tuple] = {}
        #: session id -> kernels it lost early in a row
        self._early_deaths: dict[str, int] = {}

    def begin(self, session_id: str, kernel) -> None:
        """``kernel`` was attached to the session: on probation."""
        self._unproven[session_id] = (kernel, [])

    def sent(self, session_id: str, kernel, msg: Message, conn) -> None:
        """``msg`` (from ``conn``) went to ``kernel``: to send again if it dies unproven."""
        unproven = self._unproven.get(session_id)
        if unproven is not None and unproven[0] is kernel:
            if len(unproven[1]) < self.max_unanswered:
                unproven[1].append((msg, conn))
            else:  # too much to send again: it counts as having state
                del self._unproven[session_id]

    def heard(self, session_id: str, kernel, msg: Message, parent: dict) -> None:
        """
        A message from ``kernel``: once it starts an execution (anything with
        an execute_request for parent) the session has state there; before
        that, a reply only crosses its request off the list to send again.
        """
        unproven = self._unproven.get(session_id)
        if unproven is None or unproven[0] is not kernel:
            return
        if parent.get("msg_type") == "execute_request":
            del self._unproven[session_id]
            self._early_deaths.pop(session_id, None)
        elif msg.channel != "iopub":
            answered = parent.get("msg_id")
            unproven[1][:] = [(m, c) for m, c in unproven[1] if m.msg_id != answered]

    def died(self, session_id: str, kernel) -> list | None:
        """
        ``kernel`` died: the [(msg, conn)] it never answered if the session
        takes another quietly, or None if the death is to be reported (it
        had run the session's code, or too many died early in a row).
        """
        unproven = self._unproven.pop(session_id, None)
        if unproven is None or unproven[0] is not kernel:
            return None
        deaths = self._early_deaths.get(session_id, 0) + 1
        if deaths > MAX_EARLY_DEATHS:
            return None
        self._early_deaths[session_id] = deaths
        return unproven[1]

    def end(self, session_id: str) -> None:
        """The session ended."""
        self._unproven.pop(session_id, None)
        self._early_deaths.pop(session_id, None)
