# -*- test-case-name: tests.test_lifecycle_clock,tests.test_comms -*-
"""
Web sessions: each gets its own kernel, and its messages go to that kernel.

The router's idea: a message for a session that has no kernel is
"unroutable", so the session takes a kernel from the pool and the message
waits (bounded) until it is attached. Replies on shell/stdin/control go to
the WebSocket connection whose client session sent the request; iopub goes
to every connection of the session, and to nobody else.

Time comes from ``clock``; ``sweep()`` (run every second) applies the
timeouts: no browser connected, idle, lifetime, and per-execution wall clock.

This module keeps the sessions' lifecycle and wires the rooms that each do
one job for them: ``inflow`` (what the browsers may send, and how fast),
``delivery`` (how messages reach the browsers, recorded for replay),
``probation`` (a kernel that dies before running the session's code is
replaced quietly) and ``limits`` (output cap, wall-clock and restart limits).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import messages
from ..messages import DAEMON_SESSION, Message
from . import delivery
from .grants import new_grant
from .inflow import InputGate
from .kernels import KernelManager, NoKernelAvailable
from .limits import RUNS_CODE, Execution, Lifetimes, OutputCap, RateLimit
from .probation import Probation
from .replay import Journal
from .router import Routes, WebSession

log = Logger()

MAX_PENDING = 64
#: a session's kernel replaced (restart, or a new one after its death) at most
#: --max-restarts-per-minute times a minute; a client address's, this many times that
RESTART_WINDOW = 60.0
CLIENT_RESTARTS_FACTOR = 3
#: a kernel whose shell stayed idle this long runs nothing sent before: what is
#: still counted as running then was handled without a status (ipykernel runs
#: comm messages that come during an async cell at once, and says nothing)
STALE_AFTER = 1.0
#: a kernel's control requests: their status says nothing of its shell
CONTROL_TYPES = messages.ALLOWED["control"]


class LimitExceeded(Exception):
    """A client or the whole server is at its kernel limit (HTTP 429/503)."""

    def __init__(self, message: str, status: int = 429):
        super().__init__(message)
        self.status = status


class SessionObserver:
    """
    What the session manager tells those who keep state per session or
    count its events (notebook sessions, files, SageMathCell's pages, logs,
    metrics). Each overrides what it needs; the rest do nothing.
    """

    def session_started(self, session: WebSession) -> None:
        pass

    def session_ended(self, session: WebSession, reason: str) -> None:
        """The session is gone (shut down, culled, timed out): forget what is kept for it."""

    def kernel_assigned(self, session: WebSession, kernel_id: str) -> None:
        pass

    def kernel_died(self, session: WebSession, reason: str) -> None:
        pass

    def limit_hit(self, session: WebSession | None, kind: str) -> None:
        """A limit refused something; ``kind`` names the option (``max_kernels``, ``exec_timeout``, ...)."""


class SessionManager:
    """Creates, routes and ends web sessions."""

    def __init__(self, kernels: KernelManager, config, clock):
        self.kernels = kernels
        self.config = config
        self.clock = clock
        self.routes = Routes()
        self.output_cap = OutputCap(config.max_output_bytes)
        self.lifetimes = Lifetimes(config)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        #: who keeps state per session, or counts: told of each session's start and end, its
        #: kernels, and the limits it hits (``SessionObserver``)
        self.observers: list[SessionObserver] = []
        #: messages and bytes relayed, for metrics: plain ints, cheap on the hot path
        self.msgs_to_kernels = self.bytes_to_kernels = 0
        self.msgs_from_kernels = self.bytes_from_kernels = 0
        #: called with (session, execute_request parent header) when an
        #: execution ends (its kernel went idle): the files watcher uses it.
        #: A hook may return a Deferred of a message to send before "idle"
        #: (news that takes a round trip): iopub is held until it fires.
        self.on_execute_done: list[Callable[[WebSession, dict], None]] = []
        #: kernels that have not run their session's code yet: if one dies, the session takes another quietly
        self.probation = Probation(MAX_PENDING)
        per_session = config.max_restarts_per_minute
        self.restarts = RateLimit(per_session, RESTART_WINDOW, clock)
        self.client_restarts = RateLimit(CLIENT_RESTARTS_FACTOR * per_session, RESTART_WINDOW, clock)
        #: how fast, and how far ahead of their kernel, each session's browsers may send
        self.inflow = InputGate(config.max_messages_per_second, clock, self._slowed)
        #: ids of sessions that have had a kernel: taking another is a restart
        self._had_kernel: set[str] = set()
        #: kernels' messages dropped for claiming the daemon's session, by kernel id
        self.forged: dict[str, int] = {}

    def start(self) -> None:
        self._sweeper.start(1.0, now=False)

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    def _tell(self, call: Callable[[SessionObserver], None]) -> None:
        for observer in list(self.observers):
            call(observer)

    def _slowed(self, session: WebSession) -> None:
        """The input gate slowed one of the session's browsers for its rate."""
        self._tell(lambda o: o.limit_hit(session, "max_messages_per_second"))

    # -- creating and ending ------------------------------------------------

    def create(self, client: str, name: str = "python3") -> WebSession:
        if len(self.routes) >= self.config.max_kernels:
            self._tell(lambda o: o.limit_hit(None, "max_kernels"))
            raise LimitExceeded(f"the server runs its maximum of {self.config.max_kernels} kernels; try again later", 503)
        if self.routes.count_for(client) >= self.config.max_kernels_per_client:
            self._tell(lambda o: o.limit_hit(None, "max_kernels_per_client"))
            raise LimitExceeded(
                f"you already have {self.config.max_kernels_per_client} kernels, the most one client may have; "
                "shut one down first"
            )
        now = self.clock.seconds()
        # The id is the session's capability for anonymous callers (web.policy.Policy): 128 random
        # bits, after this daemon's name for the balancer to route by (core/grants.py).
        session = WebSession(new_grant(self.config.daemon_name), client, name, now, now, disconnected_since=now)
        replay_bytes = self.config.replay_bytes
        session.journal = Journal(replay_bytes) if replay_bytes else None
        self.routes.add(session)
        log.info("session {session} started for {client}", event="session_start", session=session.id, client=client)
        self._tell(lambda o: o.session_started(session))
        self._ensure_kernel(session).addErrback(lambda _f: None)
        return session

    def get(self, session_id: str) -> WebSession | None:
        return self.routes.get(session_id)

    def shutdown(self, session: WebSession, reason: str = "shut down") -> defer.Deferred:
        """End the session and its kernel; tell every connection why."""
        if session.closed:
            return defer.succeed(None)
        session.closed = True
        self.probation.end(session.id)
        self._had_kernel.discard(session.id)
        kernel = self.routes.detach(session)
        self.routes.remove(session)
        session.execution_state = "dead"
        if reason != "shut down":
            delivery.broadcast(session, messages.stream(f"\n[sagecell] This session ended: {reason}.\n", DAEMON_SESSION))
        delivery.broadcast(session, messages.status("dead", DAEMON_SESSION))
        for conn in list(session.connections):
            conn.close_for(reason)
        log.info("session {session} ended: {reason}", event="session_stop", session=session.id, reason=reason)
        self._tell(lambda o: o.session_ended(session, reason))
        if kernel is None:
            return defer.succeed(None)
        kernel.on_message = kernel.on_death = None
        return self.kernels.shutdown(kernel, reason)

    def shutdown_all(self, reason: str) -> defer.Deferred:
        ds = [self.shutdown(s, reason) for s in self.routes]
        return defer.DeferredList(ds, consumeErrors=True)

    # -- kernels behind sessions ----------------------------------------------

    def kernel_for(self, session: WebSession) -> defer.Deferred:
        """Fires with the session once it has a kernel, taking one if needed (uploads wait on this)."""
        return self._ensure_kernel(session)

    def _ensure_kernel(self, session: WebSession, counted: bool = False) -> defer.Deferred:
        """
        Fires with the session once it has a kernel (or fails if none came).
        A session that had one before takes another only within the restart
        limits, unless the caller has ``counted`` this one already.
        """
        if session.kernel is not None:
            return defer.succeed(session)
        if session.closed:
            return defer.fail(NoKernelAvailable("this session has ended"))
        if not session.claiming and not counted and session.id in self._had_kernel:
            try:
                self._count_restart(session, session.client)
            except LimitExceeded as e:
                failure = Failure(NoKernelAvailable(str(e)))
                self._no_kernel(failure, session)  # what waits for the kernel hears why
                return defer.fail(failure)
        waiter: defer.Deferred = defer.Deferred()
        session.claim_waiters.append(waiter)
        if not session.claiming:
            session.claiming = True
            d = self.kernels.take(session.name)
            d.addCallbacks(self._attach, self._no_kernel, callbackArgs=(session,), errbackArgs=(session,))
        return waiter

    def _settle(self, session: WebSession, failure=None) -> None:
        session.claiming = False
        waiters, session.claim_waiters = session.claim_waiters, []
        for w in waiters:
            if failure is None:
                w.callback(session)
            else:
                w.errback(failure)

    def _attach(self, kernel, session: WebSession) -> None:
        if session.closed:
            self.kernels.shutdown(kernel, "its session ended before it started")
            self._settle(session, NoKernelAvailable("this session has ended"))
            return
        self.routes.attach(session, kernel)
        self.probation.begin(session.id, kernel)
        self.inflow.forget(session, None)
        self._had_kernel.add(session.id)
        if session.paused:
            kernel.pause_reading()
        kernel.on_message = lambda msg: self._from_kernel(session, kernel, msg)
        kernel.on_death = lambda reason: self._kernel_died(session, kernel, reason)
        log.info(
            "session {session} got kernel {kernel} (pid {pid})",
            event="session_kernel",
            session=session.id,
            kernel=kernel.id,
            pid=kernel.pid,
        )
        self._tell(lambda o: o.kernel_assigned(session, kernel.id))
        if session.execution_state in ("starting", "restarting", "dead"):
            session.execution_state = "idle"
            delivery.broadcast(session, messages.status("idle", DAEMON_SESSION))
        pending, session.pending = session.pending, []
        for msg, conn in pending:
            self.send(session, msg, conn)
        self._settle(session)

    def _no_kernel(self, failure, session: WebSession) -> None:
        """No kernel came: every waiting request gets an error reply, every connection a notice and status dead."""
        self._settle(session, failure)
        if session.closed:
            return
        why = failure.getErrorMessage() if failure.check(NoKernelAvailable) else "no kernel could be started"
        if not failure.check(NoKernelAvailable):
            log.failure("taking a kernel failed", failure)
        pending, session.pending = session.pending, []
        for msg, conn in pending:
            self._refuse(conn, msg, why)
        delivery.broadcast(session, messages.stream(f"[sagecell] {why}\n", DAEMON_SESSION))
        session.execution_state = "dead"
        delivery.broadcast(session, messages.status("dead", DAEMON_SESSION))

    def _kernel_died(self, session: WebSession, kernel, reason: str) -> None:
        if session.kernel is not kernel:
            return
        unanswered = self.probation.died(session.id, kernel)
        if unanswered is not None:
            self._replace_early(session, kernel, reason, unanswered)
            return
        self.routes.detach(session)
        session.executions.clear()
        self.inflow.forget(session, None)
        session.execution_state = "dead"
        log.info(
            "the kernel of session {session} died: {reason}", event="session_kernel_died", session=session.id, reason=reason
        )
        self._tell(lambda o: o.kernel_died(session, reason))
        delivery.broadcast(session, messages.stream(f"\n[sagecell] The kernel died: {reason}.\n", DAEMON_SESSION))
        delivery.broadcast(session, messages.status("dead", DAEMON_SESSION))

    def _replace_early(self, session: WebSession, kernel, reason: str, unanswered: list) -> None:
        """
        The kernel died before it started any of the session's code
        (``probation``): the session has lost nothing, so it takes a fresh
        kernel, as an unroutable message does, and what the dead one never
        answered goes there.
        """
        self.routes.detach(session)
        session.executions.clear()
        log.info(
            "the kernel of session {session} died before running its code ({reason}): taking another",
            event="session_kernel_replaced",
            session=session.id,
            kernel=kernel.id,
            reason=reason,
        )
        session.pending[:0] = unanswered
        self._ensure_kernel(session).addErrback(lambda _f: None)

    def _count_restart(self, session: WebSession, client: str) -> None:
        """Record a restart of ``session`` asked for by ``client``, or raise LimitExceeded (429)."""
        per_session = self.restarts.count
        wait = self.restarts.wait(session.id)
        what = f"at most {per_session} a minute for one session"
        if not wait:
            wait = self.client_restarts.wait(client)
            what = f"at most {self.client_restarts.count} a minute for one client"
        if wait:
            self._tell(lambda o: o.limit_hit(session, "max_restarts_per_minute"))
            raise LimitExceeded(f"too many kernel restarts ({what}); try again in {max(1, round(wait))} s")
        self.restarts.record(session.id)
        self.client_restarts.record(client)

    def restart(self, session: WebSession, automatic: bool = False, client: str | None = None) -> defer.Deferred:
        """
        Swap in a fresh kernel from the pool; the session id stays.

        A restart someone asked for counts against the restart limits
        (per session, and per ``client`` address: the session's own by
        default) and raises ``LimitExceeded`` beyond them, changing nothing.

        Only a restart the daemon decides on its own (``automatic``) is
        announced with status ``restarting``, as Jupyter Server announces
        only its auto-restarts: @jupyterlab/services takes that status for
        "the kernel died and the server restarted it", and JupyterLab then
        tells the user the kernel "appears to have died". A client that
        asked for the restart over REST knows already; it hears ``starting``.
        """
        if not automatic:
            self._count_restart(session, client or session.client)
        old = self.routes.detach(session)
        session.executions.clear()
        self.inflow.forget(session, None)
        if old is not None:
            old.on_message = old.on_death = None
            self.kernels.shutdown(old, "restarted")
        session.execution_state = "restarting"
        if automatic:
            delivery.broadcast(session, messages.status("restarting", DAEMON_SESSION))
        delivery.broadcast(session, messages.status("starting", DAEMON_SESSION))
        session.execution_state = "starting"
        return self._ensure_kernel(session, counted=True)

    def interrupt(self, session: WebSession) -> bool:
        if session.kernel is None:
            return False
        return session.kernel.interrupt()

    # -- connections ----------------------------------------------------------

    def connect(self, session: WebSession, conn) -> None:
        """
        A WebSocket opened. One that names a client session
        (``conn.session_id``) seen before gets what was delivered for it
        while it was away (``replay.Journal``), and replaces any connection
        of that client session still open here: that one is stale (its
        network went away unnoticed) and would only hold the output back.
        """
        cid = getattr(conn, "session_id", "")
        if cid:
            for stale in [c for c in session.connections if getattr(c, "session_id", "") == cid]:
                stale.close_for("replaced by a new connection of the same client session")
                self.disconnect(session, stale)
        session.connections.add(conn)
        session.disconnected_since = None
        delivery.rejoin(session, conn, lambda: self._tell(lambda o: o.limit_hit(session, "replay_bytes")))
        conn.deliver(messages.status(session.execution_state, DAEMON_SESSION))
        self._ensure_kernel(session).addErrback(lambda _f: None)

    def disconnect(self, session: WebSession, conn) -> None:
        if conn not in session.connections:
            return
        session.connections.discard(conn)
        self.inflow.drop(session, conn)
        self.resume(session, conn)
        delivery.park(session, conn)
        if not session.connections:
            session.disconnected_since = self.clock.seconds()

    # -- backpressure -----------------------------------------------------------

    def pause(self, session: WebSession, conn) -> None:
        """
        ``conn``'s browser is behind (its transport buffer is full): stop
        reading the kernel's output until it catches up. zmq then queues a
        bounded amount and the kernel waits (``kernel.output``); nothing is
        dropped and the daemon's memory stays bounded.
        """
        if conn in session.paused or conn not in session.connections:
            return
        session.paused.add(conn)
        if len(session.paused) == 1 and session.kernel is not None:
            session.kernel.pause_reading()

    def resume(self, session: WebSession, conn) -> None:
        if conn not in session.paused:
            return
        session.paused.discard(conn)
        if not session.paused and session.kernel is not None:
            session.kernel.resume_reading()

    # -- messages -------------------------------------------------------------

    def send(self, session: WebSession, msg: Message, conn) -> None:
        """A message from a browser connection for this session's kernel."""
        if session.closed:
            self._refuse(conn, msg, "this session has ended")
            return
        session.last_activity = self.clock.seconds()
        if conn is not None:
            conn.client_sessions.add(str(msg.header_dict.get("session", "")))
            self.inflow.meter(session, msg, conn)
        kernel = session.kernel
        if kernel is None:
            if len(session.pending) >= MAX_PENDING:
                self._refuse(conn, msg, "too many messages are waiting for a kernel")
                return
            session.pending.append((msg, conn))
            self._ensure_kernel(session).addErrback(lambda _f: None)
            return
        if msg.msg_type == "interrupt_request" and kernel.info.get("interrupt_mode") == "signal":
            # Sage's kernel could not take it before its computation ends
            # (kernels.Kernel.interrupt): the daemon interrupts, and answers.
            kernel.interrupt()
            if conn is not None:
                conn.deliver(Message.build("control", "interrupt_reply", {"status": "ok"}, msg.header_dict, DAEMON_SESSION))
            return
        if msg.msg_type in RUNS_CODE:
            ex = Execution(msg.msg_id, self.clock.seconds(), msg.msg_type)
            session.executions[msg.msg_id] = ex
            self.output_cap.started(session.outputs, ex)
            if self.config.log_code and msg.msg_type == "execute_request":
                log.info("session {session} runs: {code}", event="code", session=session.id, code=msg.content_dict().get("code"))
        self.msgs_to_kernels += 1
        self.bytes_to_kernels += delivery.size(msg)
        if not kernel.send(msg):
            session.executions.pop(msg.msg_id, None)
            self._refuse(conn, msg, "the kernel is not keeping up; message dropped")
            return
        if msg.channel != "stdin" and conn is not None:
            self.inflow.sent(session, msg, conn)
        self.probation.sent(session.id, kernel, msg, conn)

    def _refuse(self, conn, msg: Message, why: str) -> None:
        if conn is None:
            return
        bad = messages.BadMessage(why, msg.header_dict, msg.channel)
        conn.deliver(messages.error_reply(bad, DAEMON_SESSION))

    def _from_kernel(self, session: WebSession, kernel, msg: Message) -> None:
        if session.kernel is not kernel:
            return
        if msg.header_dict.get("session") == DAEMON_SESSION:
            self._forged(session, kernel, msg)
            return
        self.msgs_from_kernels += 1
        self.bytes_from_kernels += delivery.size(msg)
        parent = msg.parent_dict
        self.probation.heard(session.id, kernel, msg, parent)
        if msg.channel == "iopub":
            msg_type = msg.msg_type
            verdict = self.output_cap.judge(session.outputs, msg, parent)
            if not verdict.passes:
                if verdict.crossed:
                    self._capped(session, verdict.kept, parent)
                return
            if msg_type == "status":
                state = msg.content_dict().get("execution_state")
                if isinstance(state, str):
                    session.execution_state = state
                    session.last_activity = self.clock.seconds()
                    if parent.get("msg_type") not in CONTROL_TYPES:
                        session.shell_idle_since = session.last_activity if state == "idle" else None
                    ex = session.executions.pop(parent.get("msg_id"), None) if state == "idle" else None
                    if state == "idle":
                        self.inflow.finished(session, parent.get("msg_id"))
                    if ex is not None and ex.msg_type == "execute_request":
                        # Before "idle", so clients still count it as part of the execution.
                        waits = [hook(session, parent) for hook in list(self.on_execute_done)]
                        waits = [d for d in waits if isinstance(d, defer.Deferred)]
                        if waits:
                            delivery.hold(session, msg, waits)
                            return
            delivery.broadcast(session, msg)
            return
        if parent.get("session") == DAEMON_SESSION:
            return  # a reply to the daemon's own request
        delivery.reply(session, msg, str(parent.get("session", "")))

    def _forged(self, session: WebSession, kernel, msg: Message) -> None:
        """
        A kernel's message claiming to be the daemon's (``header.session``):
        no kernel's own session has that name, so it is a forgery meant to
        pass for our notices. Dropped; the first of each kernel is logged.
        """
        n = self.forged.get(kernel.id, 0) + 1
        self.forged[kernel.id] = n
        if n == 1:
            log.warn(
                "kernel {kernel} of session {session} sent a {msg_type} message as the daemon; "
                "it and any more like it are dropped",
                event="kernel_forgery",
                kernel=kernel.id,
                session=session.id,
                msg_type=msg.msg_type[:64],
            )

    def _capped(self, session: WebSession, kept: Message | None, parent: dict) -> None:
        """An execution's output crossed the cap: what is left of the message, a notice, perhaps an interrupt."""
        if kept is not None:
            delivery.broadcast(session, kept)
        self._tell(lambda o: o.limit_hit(session, "max_output_bytes"))
        cap = self.output_cap.cap
        what = "interrupted" if self.config.interrupt_on_output_cap else "still running; its further output is not shown"
        notice = f"\n[sagecell] Output truncated at {cap} bytes (the limit per computation); the computation is {what}.\n"
        delivery.broadcast(session, messages.stream(notice, DAEMON_SESSION, parent or None))
        if self.config.interrupt_on_output_cap:
            self.interrupt(session)

    def broadcast(self, session: WebSession, msg: Message) -> None:
        """Send a daemon-made message to every connection of the session."""
        delivery.broadcast(session, msg)

    # -- time limits ------------------------------------------------------------

    def sweep(self) -> None:
        now = self.clock.seconds()
        self.restarts.prune()
        self.client_restarts.prune()
        self.inflow.prune()
        for kernel_id in [k for k in self.forged if k not in self.kernels.kernels]:
            del self.forged[kernel_id]
        for session in self.routes:
            if session.closed:
                continue
            reason = self.lifetimes.end_reason(session, now)
            if reason is not None:
                self.shutdown(session, reason)
                continue
            idle_since = session.shell_idle_since
            if idle_since is not None and now - idle_since >= STALE_AFTER and not session.paused:
                self._forget_stale(session, idle_since)
            self._check_executions(session, now)

    def _forget_stale(self, session: WebSession, before: float) -> None:
        """The kernel's shell is idle: what was sent before ``before`` is no longer running."""
        for msg_id in [m for m, ex in session.executions.items() if ex.started <= before]:
            del session.executions[msg_id]
        self.inflow.forget(session, before)

    def _check_executions(self, session: WebSession, now: float) -> None:
        limit = self.config.exec_timeout
        for ex in list(session.executions.values()):
            if self.lifetimes.must_interrupt(ex, now):
                ex.interrupted_at = now
                self._tell(lambda o: o.limit_hit(session, "exec_timeout"))
                parent = {"msg_id": ex.msg_id, "msg_type": ex.msg_type}
                delivery.broadcast(
                    session,
                    messages.stream(
                        f"\n[sagecell] This computation ran for longer than the limit of {limit:g} s and was interrupted.\n",
                        DAEMON_SESSION,
                        parent,
                    ),
                )
                self.interrupt(session)
            elif self.lifetimes.must_restart(ex, now):
                parent = {"msg_id": ex.msg_id, "msg_type": ex.msg_type}
                delivery.broadcast(
                    session,
                    messages.stream(
                        "\n[sagecell] The computation did not stop when interrupted, so its kernel was restarted.\n",
                        DAEMON_SESSION,
                        parent,
                    ),
                )
                self.restart(session, automatic=True).addErrback(lambda _f: None)
                return
