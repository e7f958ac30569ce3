# -*- test-case-name: tests.test_msgsize,tests.test_flood -*-
"""
The daemon's only contact with txzmq: sockets to kernels and to spawners.

Kept small so txzmq can be replaced. Each socket gets a bounded high-water
mark (txzmq's default of 0 is unbounded), and a read turn handles at most
``READ_BATCH`` messages before yielding to the reactor, so one chatty kernel
cannot starve the others. A channel can be paused: the daemon then stops
reading it, zmq queues up to the high-water mark, and the kernel's iopub
socket (``XPUB_NODROP``, see ``kernel.ipython``) makes the kernel wait; that is
how a slow browser slows its kernel down instead of filling our memory.
txzmq reaches for the global reactor in a few places; the reactor handed to
``ZmqContext`` is used everywhere we can.

A socket to a kernel can be given ``max_message``: zmq's ``MAXMSGSIZE``, so no
frame larger than that is ever held in the daemon. libzmq answers a larger
frame by dropping the connection for good (a protocol error: no reconnect),
which would leave that channel silently dead; a socket monitor (``_Watch``)
notices a disconnection that no reconnection attempt follows and says so
through ``on_broken``. The bound is per frame: libzmq (4.3) bounds neither
how many frames one message has nor their total, and hands over a message
only once all of it is in. Whole messages are bounded before they get here,
by the guard on the kernel's host (worker.guard), which the daemon connects
to instead of the kernel; this bound and its monitor are the second line.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import zmq
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.connection import ZmqConnection
from zmq.utils.monitor import parse_monitor_message

READ_BATCH = 256
HWM = 10000
#: a kernel's iopub messages (SUB sockets) queued in the daemon while it is
#: paused (its browser is behind) or busy: stream messages carry at most
#: kernel.output.PIECE (64 Ki) characters, 64 to 384 KiB as JSON, so a slow
#: browser pins at most 1 to 6 MiB per kernel here (the kernel's own queue
#: holds the rest, in the kernel's memory); 16 rather than 64 took the peak of
#: eight concurrent 15.6 MB /service prints from +75..96 to +43..62 MB, with
#: no change in output throughput (bench/bench_abuse.py, bench_output.py).
#: A kernel bypassing kernel.output can queue this many messages of up to
#: ``max_message`` bytes (core.kernels.message_bound; whole messages, see worker.guard)
IOPUB_HWM = 16
#: after a disconnection, how long to wait for libzmq's reconnection attempt
#: (it follows within a millisecond when the peer merely went away) before
#: taking the channel for broken
BROKEN_GRACE = 1.0
_monitors = itertools.count()
#: zmq sockets the daemon's context may have (libzmq's default is 1023): each
#: kernel takes eight, four channels and their four monitors
MAX_SOCKETS = 1 << 16


class _Socket(ZmqConnection):
    highWaterMark = HWM

    def __init__(
        self,
        factory,
        endpoint,
        on_message: Callable[[list[bytes]], None],
        identity=None,
        options=None,
        on_broken: Callable[[], None] | None = None,
    ):
        self._on_message = on_message
        self.paused = False
        self._watch: _Watch | None = None
        # Options such as the CURVE keys must be set before connect or bind.
        super().__init__(factory, None, identity=identity)
        for option, value in (options or {}).items():
            self.socket.setsockopt(option, value)
        if on_broken is not None:
            self._watch = _Watch(factory, self.socket, on_broken)
        self.addEndpoints([endpoint])

    def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.close(self.socket)
            self._watch = None
        super().shutdown()

    def messageReceived(self, message: list[bytes]) -> None:
        self._on_message(message)

    def doRead(self) -> None:
        # txzmq's doRead drains the socket in one go; take a batch, then let
        # the reactor breathe and come back.
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        for _ in range(READ_BATCH):
            if self.factory is None or self.paused:
                return
            try:
                message = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.error.Again:
                return
            self.messageReceived(message)
        self._schedule_read()

    def _schedule_read(self) -> None:
        if self.read_scheduled is None and self.factory is not None and not self.paused:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def send(self, message: list[bytes]) -> None:
        """Send, or raise zmq.Again when the peer is too far behind."""
        self.socket.send_multipart(message, zmq.NOBLOCK)
        # A send may consume the fd's edge while messages wait to be read.
        self._schedule_read()

    def pause(self) -> None:
        """Stop reading: zmq queues up to the high-water mark, then the sender waits."""
        if self.paused or self.factory is None:
            return
        self.paused = True
        self.factory.reactor.removeReader(self)
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None

    def resume(self) -> None:
        if not self.paused or self.factory is None:
            return
        self.paused = False
        self.factory.reactor.addReader(self)
        self._schedule_read()  # the fd is edge-triggered: what queued meanwhile raised no new edge


class _Dealer(_Socket):
    socketType = zmq.DEALER


class _Sub(_Socket):
    # txzmq's ZmqSubConnection expects its own tag framing and breaks on
    # Jupyter's multipart iopub messages: a plain SUB with our handler.
    socketType = zmq.SUB
    highWaterMark = IOPUB_HWM


class _Router(_Socket):
    socketType = zmq.ROUTER


class _Pair(_Socket):
    socketType = zmq.PAIR


class _Watch:
    """
    A socket monitor: calls ``on_broken`` once if the socket loses its
    connection and libzmq does not try to make it again (it does not after a
    protocol error, such as a frame over ``MAXMSGSIZE``).
    """

    EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED

    def __init__(self, factory, socket, on_broken: Callable[[], None]):
        self._reactor = factory.reactor
        self._on_broken = on_broken
        self._call = None
        address = f"inproc://sagecell-monitor-{next(_monitors)}"
        socket.monitor(address, self.EVENTS)
        self._pair = _Pair(factory, ZmqEndpoint(ZmqEndpointType.connect, address), self._event)
        # zmq signals the fd of a pipe's reader only once a read found it
        # empty: read the new pipe once, or the first event raises no edge.
        self._pair.doRead()

    def _event(self, frames: list[bytes]) -> None:
        try:
            event = parse_monitor_message(frames)["event"]
        except Exception:
            return
        if event == zmq.EVENT_DISCONNECTED:
            if self._call is None:
                self._call = self._reactor.callLater(BROKEN_GRACE, self._broken)
        elif self._call is not None:
            self._call.cancel()  # reconnecting (or reconnected): the peer only went away
            self._call = None

    def _broken(self) -> None:
        self._call = None
        self._on_broken()

    def close(self, socket) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        try:
            socket.disable_monitor()
        except zmq.error.ZMQError:
            pass
        if self._pair.socket is not None:
            self._pair.shutdown()


class ZmqContext:
    """One zmq context for the daemon, tied to a reactor."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.factory = None
        #: (public, secret) CURVE keys of the daemon: the control ROUTER is a
        #: CURVE server with them, connections to worker hosts' relays clients
        self.curve: tuple[bytes, bytes] | None = None

    def start(self) -> None:
        """Create the zmq context: only after twistd has forked into the background."""
        if self.factory is None:
            self.factory = ZmqFactory()
            self.factory.context.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
            self.factory.reactor = self.reactor
            self.factory.lingerPeriod = 0

    def shutdown(self) -> None:
        if self.factory is not None and self.factory.connections is not None:
            self.factory.shutdown()

    def router(self, address: str, on_message: Callable[[list[bytes]], None], curve_server: bool = False) -> Channel:
        """A bound ROUTER: the spawners' control channel (a CURVE server when asked)."""
        options = {}
        if curve_server:
            options = {zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: self.curve[0], zmq.CURVE_SECRETKEY: self.curve[1]}
            # A worker host whose link came back reconnects under the same
            # identity before the old connection is noticed dead: let it in.
            options[zmq.ROUTER_HANDOVER] = 1
        sock = _Router(self.factory, ZmqEndpoint(ZmqEndpointType.bind, address), on_message, options=options)
        return Channel(sock)

    def zap(self, on_message: Callable[[list[bytes]], None]) -> Channel:
        """The ZAP handler's socket: libzmq asks it about every CURVE client of this context."""
        return Channel(_Router(self.factory, ZmqEndpoint(ZmqEndpointType.bind, "inproc://zeromq.zap.01"), on_message))

    def _client_options(self, server_key: bytes | None, max_message: int | None = None) -> dict:
        options = {} if max_message is None else {zmq.MAXMSGSIZE: max_message}
        if server_key is None:
            return options
        if self.curve is None:
            raise ValueError("a CURVE server key without the daemon's own CURVE keys (--curve-secret-key)")
        options.update({zmq.CURVE_SERVERKEY: server_key, zmq.CURVE_PUBLICKEY: self.curve[0]})
        options[zmq.CURVE_SECRETKEY] = self.curve[1]
        return options

    def dealer(
        self,
        address: str,
        on_message: Callable[[list[bytes]], None],
        identity: bytes | None = None,
        server_key: bytes | None = None,
        max_message: int | None = None,
        on_broken: Callable[[], None] | None = None,
    ) -> Channel:
        """
        A connected DEALER. ``max_message``: no frame over that many bytes
        is taken; ``on_broken``: called once if the connection is lost for
        good (after such a frame, for one).
        """
        endpoint = ZmqEndpoint(ZmqEndpointType.connect, address)
        options = self._client_options(server_key, max_message)
        if max_message is not None:
            # a kernel's replies, queued while its channel is paused: as
            # few frames of up to max_message as its iopub may queue
            options[zmq.RCVHWM] = IOPUB_HWM
        return Channel(_Dealer(self.factory, endpoint, on_message, identity, options, on_broken))

    def sub(
        self,
        address: str,
        on_message: Callable[[list[bytes]], None],
        server_key: bytes | None = None,
        max_message: int | None = None,
        on_broken: Callable[[], None] | None = None,
    ) -> Channel:
        """A connected SUB taking everything; ``max_message`` and ``on_broken`` as for ``dealer``."""
        endpoint = ZmqEndpoint(ZmqEndpointType.connect, address)
        options = self._client_options(server_key, max_message)
        sock = _Sub(self.factory, endpoint, on_message, options=options, on_broken=on_broken)
        sock.socket.setsockopt(zmq.SUBSCRIBE, b"")
        return Channel(sock)


class Channel:
    """A socket we can send on and close; what the rest of the daemon sees."""

    def __init__(self, sock: _Socket):
        self._sock = sock

    def send(self, parts: list[bytes]) -> bool:
        """Send a multipart message; False if the socket is closed or full."""
        if self._sock.socket is None:
            return False
        try:
            self._sock.send(parts)
        except zmq.error.Again:
            return False
        except zmq.error.ZMQError:
            return False
        return True

    def close(self) -> None:
        if self._sock.socket is not None:
            self._sock.shutdown()

    def pause(self) -> None:
        """Stop reading until ``resume()``."""
        self._sock.pause()

    def resume(self) -> None:
        self._sock.resume()

    @property
    def closed(self) -> bool:
        return self._sock.socket is None
