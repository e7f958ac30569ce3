# -*- test-case-name: tests.test_lifecycle_clock,tests.test_bounds,tests.test_comms -*-
"""
A session's limits as plain decisions: what output of an execution passes
under ``max_output_bytes``, which wall-clock limit (disconnection, idle,
lifetime, execution time) ends a session or an execution at a given ``now``,
and how often a key may do something (``RateLimit``: restarts). How fast a
session's browsers may send is the input gate's (``inflow``).

The session manager acts on them (notices, interrupts, restarts, ends); these
only count and compare, so a test drives them with plain numbers for time.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from ..messages import Message, dumps

#: how many recent executions keep counting output against the cap
OUTPUT_ACCOUNTS = 16
#: iopub messages of a kernel that the output cap does not count: they say
#: what state it is in, nothing more. Everything else a kernel publishes
#: (stream, error, display_data, execute_result, clear_output, comm_msg, ...)
#: is counted, whatever its type; the daemon's own notices are not the kernel's.
UNCAPPED = frozenset({"status"})
#: after an interrupt for the time limit, how long before the kernel is killed
KILL_AFTER_INTERRUPT = 5.0
#: a browser's messages whose handling runs the visitor's code in the kernel: a
#: comm message runs the comm's handlers (moving an interact's slider re-runs
#: its function). Each is an execution: the wall-clock limit, and an output
#: account of its own, so an interact moved a thousand times never exhausts
#: the budget of the cell that made it.
RUNS_CODE = frozenset({"execute_request", "comm_open", "comm_msg", "comm_close"})


class Execution:
    """One execution (an execute_request, a comm message), for its wall-clock limit and output cap."""

    def __init__(self, msg_id: str, started: float, msg_type: str = "execute_request"):
        self.msg_id = msg_id
        self.started = started
        self.msg_type = msg_type
        self.interrupted_at: float | None = None
        #: output bytes passed on, and dropped once over the cap
        self.output_bytes = 0
        self.dropped_bytes = 0
        self.capped = False


class Verdict(NamedTuple):
    """What the output cap makes of one message."""

    #: pass the message on as it is
    passes: bool
    #: this message crossed the cap: the session says so (once per execution)
    crossed: bool = False
    #: what is left of a stream message that crossed it, to pass on instead
    kept: Message | None = None


PASS = Verdict(True)
DROP = Verdict(False)


class OutputCap:
    """
    ``max_output_bytes`` per execution. The message that crosses the cap is
    cut (a stream) or dropped; later output of that execution is dropped,
    while its status, error and reply still pass. Output with no known
    parent counts against the latest execution.
    """

    def __init__(self, cap: int):
        self.cap = cap

    def started(self, outputs: dict, ex: Execution) -> None:
        """Count ``ex``'s output from now on; the oldest of more than OUTPUT_ACCOUNTS stop counting."""
        outputs[ex.msg_id] = ex
        while len(outputs) > OUTPUT_ACCOUNTS:
            del outputs[next(iter(outputs))]

    def judge(self, outputs: dict, msg: Message, parent: dict) -> Verdict:
        if not self.cap or msg.msg_type in UNCAPPED:
            return PASS
        ex = outputs.get(parent.get("msg_id"))
        if ex is None:
            if not outputs:
                return PASS
            ex = outputs[next(reversed(outputs))]
        size = len(msg.content) + (sum(map(len, msg.buffers)) if msg.buffers else 0)
        if ex.capped:
            ex.dropped_bytes += size
            return DROP
        if ex.output_bytes + size <= self.cap:
            ex.output_bytes += size
            return PASS
        ex.capped = True
        kept = cut_stream(msg, self.cap - ex.output_bytes)
        ex.dropped_bytes += size - (len(kept.content) if kept is not None else 0)
        ex.output_bytes = self.cap
        return Verdict(False, True, kept)


def cut_stream(msg: Message, room: int) -> Message | None:
    """The first ``room`` bytes (or so) of a stream message's text, or None if not a stream."""
    if msg.msg_type != "stream" or room <= 0:
        return None
    content = msg.content_dict()
    text = content.get("text")
    if not isinstance(text, str):
        return None
    content["text"] = text.encode()[: max(0, room - 40)].decode(errors="ignore")
    return Message(msg.channel, msg.header, msg.parent, msg.metadata, dumps(content), [], msg._h, msg._p)


class Lifetimes:
    """The wall-clock limits of the config, judged at a ``now`` the caller gives."""

    def __init__(self, config):
        self.config = config

    def end_reason(self, session, now: float) -> str | None:
        """Why ``session`` must end now, or None: no browser for too long, too old, or idle too long."""
        cfg = self.config
        if session.disconnected_since is not None and now - session.disconnected_since >= cfg.disconnect_timeout:
            return f"no browser was connected for {cfg.disconnect_timeout:g} s"
        if now - session.created >= cfg.max_lifetime:
            return f"it reached the maximum session lifetime of {cfg.max_lifetime:g} s"
        if not session.executions and now - session.last_activity >= cfg.idle_timeout:
            return f"it was idle for {cfg.idle_timeout:g} s"
        return None

    def must_interrupt(self, ex: Execution, now: float) -> bool:
        """The execution ran past ``exec_timeout`` and was not interrupted yet."""
        return ex.interrupted_at is None and now - ex.started >= self.config.exec_timeout

    def must_restart(self, ex: Execution, now: float) -> bool:
        """The execution did not stop within KILL_AFTER_INTERRUPT of its interrupt."""
        return ex.interrupted_at is not None and now - ex.interrupted_at >= KILL_AFTER_INTERRUPT


class RateLimit:
    """
    At most ``count`` events in any ``window`` seconds for each key; time from ``clock``.
    Keys with nothing in their window are forgotten (``prune``), so the
    table holds only keys active in the last window.
    """

    def __init__(self, count: int, window: float, clock):
        self.count = count
        self.window = window
        self.clock = clock
        #: key -> times of its recent events, oldest first
        self.events: dict[str, deque] = {}

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may have another event (0: now)."""
        times = self.events.get(key)
        if times is None:
            return 0.0
        now = self.clock.seconds()
        while times and now - times[0] >= self.window:
            times.popleft()
        if len(times) < self.count:
            return 0.0
        return times[0] + self.window - now

    def record(self, key: str) -> None:
        self.events.setdefault(key, deque()).append(self.clock.seconds())

    def prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, times in self.events.items() if not times or now - times[-1] >= self.window]:
            del self.events[key]
