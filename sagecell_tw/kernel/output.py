# -*- test-case-name: tests.test_flood -*-
"""
A kernel's stdout and stderr: ipykernel's ``OutStream``, made fast and lossless.

Runs in the forked kernel child only (``kernel.ipython`` names this class as
``IPKernelApp.outstream_class``); imports ipykernel, nothing of the daemon.

Stock ipykernel makes every ``flush()`` a round trip to its IOPub thread and
one message, which caps ``write(); flush()`` loops near 2,000 lines/s. Here:

- *Coalescing.* A flush asked for by user code within ``COALESCE`` seconds of
  the last send, with less than ``FLUSH_BYTES`` waiting, is left to a timer in
  the IOPub thread that fires ``COALESCE`` after that send. Flushes made by
  ipykernel or IPython themselves (before an ``execute_result``, a
  ``display_data``, an error, an ``input_request`` or the reply) stay
  immediate, so output keeps its place among the other messages. Across the
  two streams order holds too: at most one stream has a flush deferred, and
  writing to the other stream first sends it.
- *Nothing to do, nothing done.* A flush with nothing written since the last
  send returns at once (stock ipykernel does a thread round trip anyway,
  six times per execution).
- *Bounded messages.* Once ``CHUNK`` characters wait, the IOPub thread is
  asked to send them without waiting for its 0.2 s timer; and what waits is
  sent as stream messages of at most ``PIECE`` characters each, in order, so
  one large ``print`` never makes one large message (the daemon refuses a
  frame much over its output cap, see ``kernels.message_bound``).
- *Backpressure, not loss.* The kernel's iopub socket does not drop at its
  high-water mark (``kernel.ipython`` sets ``XPUB_NODROP``), so when the daemon
  stops reading (its browser is slow) the IOPub thread blocks in send; a
  writer with more than ``MAX_PENDING`` characters unsent then waits here
  until the IOPub thread catches up. Memory stays bounded everywhere and
  no output is ever silently dropped.
"""

from __future__ import annotations

import sys
import threading
import time

from ipykernel import iostream

#: a user's flush this soon after the last send waits for the timer instead
COALESCE = 0.004
#: ... unless at least this many characters wait
FLUSH_BYTES = 32 << 10
#: past this many unsent characters the IOPub thread is asked to send now
CHUNK = 64 << 10
#: the most characters one stream message carries (at most 6 bytes each as
#: JSON, a control character escaped: 384 KiB; 64 or 128 KiB of text is usual)
PIECE = 64 << 10
#: a writer waits while this many characters are unsent (with the iopub
#: high-water mark this bounds what a stalled kernel holds for its browser)
MAX_PENDING = 1 << 20
#: modules whose flushes keep their place among other messages: never deferred
_INTERNAL = ("ipykernel.", "IPython.")


class _Shared:
    """What the two streams of one kernel share: which one has a flush deferred."""

    def __init__(self):
        self.deferred: OutStream | None = None


_shared = _Shared()


class OutStream(iostream.OutStream):
    """ipykernel's OutStream with coalesced flushes and a bounded backlog."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: characters written, and characters handed to zmq (only ever grow)
        self._written = 0
        self._sent = 0
        self._last_send = 0.0
        self._timer_armed = False
        self._chunk_asked = False
        self._drained = threading.Condition(threading.Lock())
        self._shared = _shared

    # -- writing ---------------------------------------------------------------

    def write(self, string: str) -> int | None:  # type: ignore[override]
        other = self._shared.deferred
        if other is not None and other is not self and self.pub_thread is not None:
            # The other stream's deferred output was written first: send it
            # before any timer of ours can send this.
            other._flush_now()
        n = super().write(string)
        if not self._is_master_process():
            return n  # a forked subprocess of the kernel: stock behaviour
        with self._buffer_lock:
            self._written += len(string)
            pending = self._written - self._sent
        if pending >= CHUNK and not self._chunk_asked:
            self._chunk_asked = True
            self.pub_thread.schedule(self._flush)
        if pending > MAX_PENDING and not self._in_io_thread():
            self._wait_for_room()
        return n

    def _wait_for_room(self) -> None:
        """Hold the writer until the IOPub thread has sent most of the backlog."""
        with self._drained:
            while self._written - self._sent > MAX_PENDING // 2 and self.pub_thread is not None:
                if not self._timer_armed:
                    self.pub_thread.schedule(self._flush)
                self._drained.wait(1.0)

    # -- flushing --------------------------------------------------------------

    def flush(self) -> None:
        if self.pub_thread is None or not self._is_master_process() or self._in_io_thread():
            return super().flush()
        shared = self._shared
        other = shared.deferred
        if other is not None and other is not self:
            other._flush_now()  # what it deferred was written first: it goes first
        pending = self._written - self._sent
        if pending <= 0:
            return
        elapsed = time.monotonic() - self._last_send
        if elapsed < COALESCE and pending < FLUSH_BYTES and not _internal_caller():
            shared.deferred = self
            if not self._timer_armed:
                self._timer_armed = True
                delay = COALESCE - elapsed
                self.pub_thread.schedule(lambda: self._io_loop.call_later(delay, self._timer_flush))
            return
        self._flush_now()

    def _flush_now(self) -> None:
        if self._shared.deferred is self:
            self._shared.deferred = None
        super().flush()

    def _timer_flush(self) -> None:
        """The deferred flush, in the IOPub thread."""
        self._timer_armed = False
        self._flush()
        if self._shared.deferred is self and self._sent >= self._written:
            self._shared.deferred = None

    def _flush(self) -> None:
        """Send what is buffered (IOPub thread); account for it and wake held writers."""
        with self._buffer_lock:
            upto = self._written
        self._chunk_asked = False
        super()._flush()
        self._sent = max(self._sent, upto)
        self._last_send = time.monotonic()
        with self._drained:
            self._drained.notify_all()

    def _flush_buffers(self):
        """What waits, per parent, in pieces of at most ``PIECE`` characters (never splitting a CR LF)."""
        for parent, data in super()._flush_buffers():
            start = 0
            while start < len(data):
                end = start + PIECE
                if data[end - 1 : end + 1] == "\r\n":
                    end += 1
                yield parent, data[start:end]
                start = end

    def _in_io_thread(self) -> bool:
        thread = self.pub_thread.thread if self.pub_thread is not None else None
        return thread is not None and thread.ident == threading.get_ident()


def _internal_caller() -> bool:
    """Whether flush() was called by ipykernel or IPython (two frames up: flush, then its caller)."""
    try:
        name = sys._getframe(2).f_globals.get("__name__", "")
    except ValueError:
        return False
    return name.startswith(_INTERNAL)
