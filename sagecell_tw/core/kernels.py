# -*- test-case-name: tests.test_lifecycle_clock -*-
"""
Kernel lifecycle on the daemon's side: the pool, taking, killing, deaths.

A ``Kernel`` is one forked kernel process as the daemon sees it: its zmq
sockets (connected as soon as the spawner says it is ready, so a session that
takes it finds its iopub subscription already in place), its signing key, and
its state. The ``KernelManager`` keeps the ready pool across all spawners and
hands kernels out; it never knows how a kernel was started.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger

from .. import messages
from ..messages import Message, Signer

log = Logger()

#: channels the daemon opens to each kernel
CHANNELS = ("shell", "control", "stdin", "iopub")


class NoKernelAvailable(Exception):
    """The pool is empty and no kernel became ready in time, or a limit is hit."""


class SpawnerLink(Protocol):
    name: str

    def take(self, kernel_id: str) -> None: ...

    def kill(self, kernel_id: str, reason: str) -> None: ...

    def interrupt(self, kernel_id: str) -> None: ...


#: how often, and how many times, a new kernel is nudged until its iopub answers
NUDGE_INTERVAL = 0.02
NUDGE_TRIES = 250
#: what a new kernel runs, silently, before it is pooled (see ``Kernel._warm_up``)
WARM_UP_CODE = "None"
#: the kernel name of kernels whose spawner names none (a spawner before kernel names)
DEFAULT_NAME = "python3"


#: a frame from a kernel may exceed --max-output-bytes by this much (message
#: headers, and room for kernel.output's stream pieces when the cap is tiny)
MESSAGE_MARGIN = 1 << 20
#: the output a frame may carry when --max-output-bytes is 0 (no cap)
UNCAPPED_MESSAGE = 64 << 20


def message_bound(max_output_bytes: int) -> int:
    """
    The largest frame the daemon takes from a kernel. Output over
    --max-output-bytes is never shown, so a frame past it plus a margin is
    of no use to anyone; kernel.output sends large writes in pieces far
    below this, so only a kernel bypassing it can reach the bound.
    """
    return (max_output_bytes or UNCAPPED_MESSAGE) + MESSAGE_MARGIN


def kernel_address(conn: dict, channel: str) -> str:
    """The zmq address of one channel of a Jupyter connection info (ipc or tcp)."""
    if conn.get("transport") == "tcp":
        return f"tcp://{conn['ip']}:{conn[channel + '_port']}"
    return f"ipc://{conn['ip']}-{conn[channel + '_port']}"


class Kernel:
    """One forked kernel. States: warming -> pooled -> assigned -> dying -> dead."""

    def __init__(
        self,
        info: dict,
        spawner: SpawnerLink,
        zmq,
        clock,
        on_warm: Callable[[Kernel], None] | None = None,
        max_message: int | None = None,
    ):
        self.id: str = info["id"]
        #: its kernelspec name ("python3", "sagemath"): the pool it serves
        self.name: str = info.get("name") or DEFAULT_NAME
        self.info = info
        self.spawner = spawner
        self.clock = clock
        self.signer = Signer(info["connection"]["key"])
        self.state = "warming"
        self._on_warm = on_warm
        self._nudge_call = None
        self._nudges = 0
        #: msg_id of the silent warm-up execution, once iopub is live
        self._warm_up_id: str | None = None
        #: our iopub subscription has delivered: nothing it publishes from now on is lost
        self.iopub_live = False
        self.born = clock.seconds()
        self.death_reason = ""
        #: messages dropped because a part was not a JSON object
        self.malformed = 0
        #: set by the session that owns the kernel
        self.on_message: Callable[[Message], None] | None = None
        self.on_death: Callable[[str], None] | None = None
        self.dead: defer.Deferred = defer.Deferred()
        self._kill_call = None
        conn = info["connection"]
        # The kernel sends input_request on stdin to the zmq identity that
        # sent the execute_request on shell: both sockets must share one.
        identity = os.urandom(8).hex().encode()
        self.sockets = {}
        # A kernel on a worker host is reached through that host's relay:
        # tcp, encrypted and authenticated with CURVE (its key is in the info).
        curve = {}
        if conn.get("curve_serverkey"):
            curve = {"server_key": conn["curve_serverkey"].encode()}
        #: no frame over this many bytes is taken from the kernel (see ``_broken``)
        self.max_message = max_message
        for channel in CHANNELS:
            address = kernel_address(conn, channel)
            handler = self._handler(channel)
            bound = {}
            if max_message is not None:
                bound = {"max_message": max_message, "on_broken": lambda channel=channel: self._broken(channel)}
            if channel == "iopub":
                self.sockets[channel] = zmq.sub(address, handler, **curve, **bound)
            else:
                self.sockets[channel] = zmq.dealer(address, handler, identity, **curve, **bound)
        self._nudge()

    def _nudge(self) -> None:
        """
        Ask for kernel_info until something arrives on iopub.

        A SUB socket drops whatever is published before its subscription
        reaches the kernel ("slow joiner"): a kernel handed out earlier could
        lose its first output. Once iopub has delivered anything, it is live,
        and the kernel warms up (``_warm_up``).
        """
        self._nudge_call = None
        if self.state != "warming":
            return
        if self._nudges >= NUDGE_TRIES:
            log.warn("kernel {kernel} never answered on iopub; using it anyway", kernel=self.id)
            self._warm()
            return
        self._nudges += 1
        req = Message.build("shell", "kernel_info_request", {}, session=messages.DAEMON_SESSION)
        self.sockets["shell"].send(self.signer.to_wire(req))
        self._nudge_call = self.clock.callLater(NUDGE_INTERVAL, self._nudge)

    def _warm_up(self) -> None:
        """
        Run one silent cell, and pool the kernel once iopub says it is idle.

        A forked kernel's first execution walks code paths (and copies pages
        of the master) that no execution has walked in it yet: it took twice
        as long as the second one (bench/bench_output.py, start_warm). Done
        here, that cost is paid before any visitor waits. Silent: no
        execution count, no history, no output, nothing in the namespace.
        """
        if self._nudge_call is not None and self._nudge_call.active():
            self._nudge_call.cancel()
        self._nudge_call = self.clock.callLater(NUDGE_INTERVAL * NUDGE_TRIES, self._warm)
        req = Message.build(
            "shell",
            "execute_request",
            {"code": WARM_UP_CODE, "silent": True, "store_history": False, "user_expressions": {}, "allow_stdin": False},
            session=messages.DAEMON_SESSION,
        )
        self._warm_up_id = req.msg_id
        self.sockets["shell"].send(self.signer.to_wire(req))

    def _warming(self, channel: str, frames: list[bytes]) -> None:
        """A message while warming: iopub is live (warm up), or the warm-up is done (pool)."""
        if channel != "iopub":
            return
        self.iopub_live = True
        if self._warm_up_id is None:
            self._warm_up()
            return
        try:
            msg = messages.from_wire(channel, frames)
        except messages.BadMessage:
            return
        if msg.msg_type == "status" and msg.parent_dict.get("msg_id") == self._warm_up_id:
            if msg.content_dict().get("execution_state") == "idle":
                self._warm()

    def _warm(self) -> None:
        if self.state != "warming":
            return
        self.state = "pooled"
        if self._nudge_call is not None and self._nudge_call.active():
            self._nudge_call.cancel()
        self._nudge_call = None
        if self._on_warm is not None:
            self._on_warm(self)

    def __repr__(self) -> str:
        return f"<Kernel {self.id[:8]} {self.state}>"

    @property
    def workdir(self) -> str:
        return self.info["workdir"]

    @property
    def pid(self) -> int:
        return self.info["pid"]

    def _handler(self, channel: str) -> Callable[[list[bytes]], None]:
        def handle(frames: list[bytes]) -> None:
            if self.state == "warming":
                self._warming(channel, frames)
                return
            if self.on_message is None:
                return  # pooled, or between owners: nobody to tell
            try:
                msg = messages.from_wire(channel, frames)
            except messages.BadMessage as e:
                self.malformed += 1
                if self.malformed in (1, 10, 100) or self.malformed % 1000 == 0:
                    log.warn(
                        "kernel {kernel} sent a malformed message, dropped ({n} so far): {reason}",
                        event="kernel_malformed",
                        kernel=self.id,
                        n=self.malformed,
                        reason=e.reason,
                    )
                return
            self.on_message(msg)

        return handle

    #: what a slow browser pauses: control stays open for interrupts and shutdown
    PAUSABLE = ("shell", "stdin", "iopub")

    def pause_reading(self) -> None:
        """Stop taking the kernel's output (its browser is behind); the kernel waits."""
        for channel in self.PAUSABLE:
            self.sockets[channel].pause()

    def resume_reading(self) -> None:
        for channel in self.PAUSABLE:
            self.sockets[channel].resume()

    def interrupt(self) -> bool:
        """
        Interrupt what the kernel runs: an ``interrupt_request`` on control,
        or, for kernels whose ``interrupt_mode`` is "signal" (Sage's), a
        SIGINT from its spawner.
        """
        if self.info.get("interrupt_mode") != "signal":
            return self.send(Message.build("control", "interrupt_request", {}, session=messages.DAEMON_SESSION))
        if self.state in ("dying", "dead"):
            return False
        self.spawner.interrupt(self.id)
        return True

    def send(self, msg: Message) -> bool:
        """Sign and send a message to the kernel on its channel."""
        sock = self.sockets.get(msg.channel)
        if sock is None or self.state in ("dying", "dead"):
            return False
        return sock.send(self.signer.to_wire(msg))

    def _broken(self, channel: str) -> None:
        """
        A channel lost its connection for good: zmq dropped it because the
        kernel sent a frame over ``max_message`` bytes (or broke the protocol
        otherwise). Nothing more can come through it: end the kernel, saying
        why, rather than leave its session waiting on a dead channel.
        """
        if self.state in ("dying", "dead"):
            return
        reason = f"the kernel sent a message of over {self.max_message} bytes (on {channel}), or broke the zmq protocol"
        log.warn("kernel {kernel}: {reason}", event="kernel_message_too_large", kernel=self.id, reason=reason)
        self.state = "dying"
        self.death_reason = reason
        self.spawner.kill(self.id, reason)

    def shutdown(self, grace: float, reason: str) -> defer.Deferred:
        """Ask nicely on control, then have the spawner SIGKILL the process group."""
        if self.state == "dead":
            return defer.succeed(self.death_reason)
        if self.state != "dying":
            self.state = "dying"
            self.death_reason = reason
            req = Message.build("control", "shutdown_request", {"restart": False}, session=messages.DAEMON_SESSION)
            sock = self.sockets["control"]
            sock.send(self.signer.to_wire(req))
            self._kill_call = self.clock.callLater(grace, self.spawner.kill, self.id, reason)
        return self.dead

    def died(self, reason: str) -> None:
        """The spawner buried the process: close sockets and tell the owner."""
        if self.state == "dead":
            return
        self.state = "dead"
        self.death_reason = self.death_reason or reason
        if self._nudge_call is not None and self._nudge_call.active():
            self._nudge_call.cancel()
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        for sock in self.sockets.values():
            sock.close()
        on_death, self.on_death, self.on_message = self.on_death, None, None
        if on_death is not None:
            on_death(self.death_reason)
        self.dead.callback(self.death_reason)


class KernelManager:
    """The pool of ready kernels across spawners, and every live kernel."""

    def __init__(
        self,
        zmq,
        clock,
        max_kernels: int,
        shutdown_grace: float,
        wait_timeout: float = 30.0,
        max_message: int | None = None,
    ):
        self.zmq = zmq
        #: the largest frame taken from a kernel (``Kernel.max_message``)
        self.max_message = max_message
        self.clock = clock
        self.max_kernels = max_kernels
        self.shutdown_grace = shutdown_grace
        self.wait_timeout = wait_timeout
        #: ready kernels of every name (``Kernel.name``), oldest first
        self.pool: deque[Kernel] = deque()
        #: kernel id -> Kernel, pooled ones included
        self.kernels: dict[str, Kernel] = {}
        #: (kernel name, Deferred) of each session waiting for a kernel, oldest first
        self.waiters: deque[tuple[str, defer.Deferred]] = deque()
        #: called with (event, kernel) for "ready" and "died": logs and metrics
        self.observers: list[Callable[[str, Kernel], None]] = []
        self.spawned = 0
        self._warned: set[tuple[str, ...]] = set()
        #: called with the sessions waiting for a kernel, by kernel name,
        #: whenever that changes (once per reactor turn): spawners fork ahead for them
        self.on_demand: list[Callable[[dict[str, int]], None]] = []
        self._demand_sent: dict[str, int] = {}
        self._demand_call = None

    # -- what spawners report ------------------------------------------------

    def kernel_ready(self, info: dict, spawner: SpawnerLink) -> None:
        if info["id"] in self.kernels:
            return
        kernel = Kernel(info, spawner, self.zmq, self.clock, self._kernel_warm, self.max_message)
        self.kernels[kernel.id] = kernel
        self.spawned += 1
        missing = tuple(info.get("missing_protections") or ())
        if missing and missing not in self._warned:
            self._warned.add(missing)
            log.warn(
                "kernels on {spawner} run WITHOUT these protections: {missing}",
                spawner=spawner.name,
                missing="; ".join(missing),
            )
        log.info(
            "kernel {kernel} ready (pid {pid}) on {spawner}",
            event="kernel_ready",
            kernel=kernel.id,
            pid=kernel.pid,
            spawner=spawner.name,
            spawn_seconds=info.get("spawn_seconds"),
        )
        self._notify("ready", kernel)

    def _kernel_warm(self, kernel: Kernel) -> None:
        """Its iopub is live: pool it, or hand it to whoever waits longest."""
        if self.kernels.get(kernel.id) is not kernel:
            return
        for waiter in list(self.waiters):
            name, d = waiter
            if d.called:
                self.waiters.remove(waiter)
            elif name == kernel.name:
                self.waiters.remove(waiter)
                self._assign(kernel)
                d.callback(kernel)
                break
        else:
            self.pool.append(kernel)
        self._demand_changed()

    def kernel_dead(self, kernel_id: str, reason: str) -> None:
        kernel = self.kernels.pop(kernel_id, None)
        if kernel is None:
            return
        try:
            self.pool.remove(kernel)
        except ValueError:
            pass
        log.info("kernel {kernel} died: {reason}", event="kernel_died", kernel=kernel_id, reason=reason)
        kernel.died(reason)
        self._notify("died", kernel)

    def spawner_lost(self, spawner: SpawnerLink, in_use_reason: str | None = None) -> None:
        """
        A spawner went away: its pooled kernels are no use to anyone now.

        Kernels in use stay for a spawner on this host to adopt, unless
        ``in_use_reason`` says they are gone too (a worker host that went
        away: nothing here can reach them any more).
        """
        states = ("warming", "pooled") if in_use_reason is None else ("warming", "pooled", "assigned", "dying")
        gone = [k for k in self.kernels.values() if k.spawner is spawner and k.state in states]
        for kernel in gone:
            if kernel.state in ("assigned", "dying"):
                self.kernel_dead(kernel.id, in_use_reason)
                continue
            if kernel in self.pool:
                self.pool.remove(kernel)
            self.kernels.pop(kernel.id, None)
            kernel.died("its spawner went away")

    def adopt(self, spawner: SpawnerLink, orphaned: Callable[[SpawnerLink], bool]) -> list[str]:
        """
        The kernels in use that a joining ``spawner`` must keep: its own, and
        those whose spawner is gone (``orphaned``), which are its from now on.
        """
        keep = []
        for kernel in self.kernels.values():
            if kernel.state in ("assigned", "dying") and orphaned(kernel.spawner):
                kernel.spawner = spawner
                keep.append(kernel.id)
        return keep

    # -- what sessions ask for ----------------------------------------------

    def take(self, name: str = DEFAULT_NAME) -> defer.Deferred:
        """A ready kernel named ``name`` now, or as soon as one is ready (bounded wait)."""
        kernel = self._least_loaded(name)
        if kernel is not None:
            self.pool.remove(kernel)
            self._assign(kernel)
            return defer.succeed(kernel)
        if self.live_count() >= self.max_kernels:
            return defer.fail(NoKernelAvailable(f"the server runs its maximum of {self.max_kernels} kernels"))
        d: defer.Deferred = defer.Deferred()
        self.waiters.append((name, d))
        call = self.clock.callLater(self.wait_timeout, self._expire, name, d)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        self._demand_changed()
        return d

    def waiting(self) -> int:
        """Sessions waiting for a kernel."""
        return sum(1 for _name, d in self.waiters if not d.called)

    def waiting_by_name(self) -> dict[str, int]:
        """Sessions waiting for a kernel, by kernel name (names none waits for left out)."""
        counts: dict[str, int] = {}
        for name, d in self.waiters:
            if not d.called:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def _demand_changed(self) -> None:
        if self._demand_call is None and self.on_demand:
            self._demand_call = self.clock.callLater(0, self._tell_demand)

    def _tell_demand(self) -> None:
        self._demand_call = None
        waiting = self.waiting_by_name()
        if waiting != self._demand_sent:
            self._demand_sent = waiting
            for hook in list(self.on_demand):
                hook(waiting)

    def in_use(self, spawner: SpawnerLink) -> int:
        return sum(1 for k in self.kernels.values() if k.spawner is spawner and k.state in ("assigned", "dying"))

    def _least_loaded(self, name: str) -> Kernel | None:
        """
        The pooled kernel named ``name`` whose spawner (worker host) has the
        fewest kernels in use, among those below their own ``max_kernels``;
        the oldest on a tie.
        """
        best, best_load = None, None
        loads: dict[int, int] = {}
        for kernel in self.pool:
            if kernel.state != "pooled" or kernel.name != name:
                continue
            key = id(kernel.spawner)
            if key not in loads:
                loads[key] = self.in_use(kernel.spawner)
            cap = getattr(kernel.spawner, "max_kernels", None)
            if cap is not None and loads[key] >= cap:
                continue
            if best_load is None or loads[key] < best_load:
                best, best_load = kernel, loads[key]
        return best

    def _expire(self, name: str, d: defer.Deferred) -> None:
        try:
            self.waiters.remove((name, d))
        except ValueError:
            return
        self._demand_changed()
        d.errback(NoKernelAvailable("no kernel became ready in time; the server is busy, try again"))

    def _assign(self, kernel: Kernel) -> None:
        kernel.state = "assigned"
        kernel.spawner.take(kernel.id)

    def shutdown(self, kernel: Kernel, reason: str) -> defer.Deferred:
        return kernel.shutdown(self.shutdown_grace, reason)

    def live_count(self) -> int:
        return sum(1 for k in self.kernels.values() if k.state in ("assigned", "dying"))

    def _notify(self, event: str, kernel: Kernel) -> None:
        for observer in list(self.observers):
            observer(event, kernel)

    def kill_all(self, reason: str) -> list[defer.Deferred]:
        """Every kernel, pooled ones too: for daemon shutdown."""
        for _name, d in list(self.waiters):
            if not d.called:
                d.errback(NoKernelAvailable("the server is shutting down"))
        self.waiters.clear()
        return [self.shutdown(k, reason) for k in list(self.kernels.values())]
