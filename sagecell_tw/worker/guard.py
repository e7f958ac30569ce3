# -*- test-case-name: tests.test_guard -*-
"""
A byte-level ZMTP guard between each kernel socket and whoever reads it.

zmq's ``MAXMSGSIZE`` (set on the daemon's kernel sockets) bounds each
*frame*, not a multipart *message*: libzmq reassembles a whole message in
the reader's I/O thread before the application sees any part of it, so a
kernel sending one message of 300 frames of 1 MiB, or of a million empty
frames (a libzmq ``msg_t`` each), makes its reader hold all of it. This
guard sits between the two on the kernel's host, outside the sandbox: it
listens where the reader connects, connects to the kernel's own ``ipc://``
socket for each connection it accepts, and passes the bytes through
unchanged both ways. It parses only what the kernel sends, ZMTP 3.x
(``ZmtpCounter``): the greeting, then frames, counting each message's bytes
(``OVERHEAD`` more per frame, so empty frames count) and frames. A message
over ``limit`` bytes or ``MAX_FRAMES`` frames, or anything that is not
ZMTP 3 with the NULL mechanism, cuts every connection of that kernel, stops
listening for it, and calls ``on_breach(kernel_id, reason)``: the spawner
then has the kernel ended, and that reason is what its visitor is told. The
reader never holds more than ``limit`` bytes of one message from a kernel.

The guard holds at most one read chunk per direction of a connection: while
bytes read from one side wait to be written to the other, that side is not
read (the kernel's zmq then queues in the kernel's own memory, up to its
high-water mark, and waits), so the guard's memory is bounded by
``CHUNK`` x 2 x connections. Shell, control and stdin connections are
taken only once a reader's subscription to iopub has reached the kernel
(``_Kernel.open_gate``), so no output of an early request is lost.

Where it runs: in the spawner front's poll loop (``spawner.Front``), which
polls this guard's epoll descriptor beside its zmq sockets. The front is
the one process on every kernel host that is outside the sandbox, outlives
kernels, talks to the fork server (to end a kernel) and to the daemon, and,
on a worker host, holds the relay (relay.py), which must itself read
kernels through the guard; so one place covers both the embedded spawner
(the daemon connects to the guard's sockets) and worker hosts (the relay
does). The fork server's manager is not that place: its loop waits on
forks and disk-quota scans, and every kernel byte would wait with it. A
Twisted protocol in the daemon would cover only the embedded spawner.

The guard listens in ``BASE_DIR/.guard`` (``guarded_prefix``), a dir of the
spawner's account that no kernel can reach, like the records: the tmpfs a
kernel mounts over the base dir hides it, and Landlock grants a kernel its
own dir only. Its sockets take the daemon's group (``group``), as kernel
dirs do. The paths depend only on the kernel's id, so a spawner restarted
under a live daemon listens where the last one did, and the daemon's
sockets reconnect by themselves.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
from collections.abc import Callable

#: the bytes of a ZMTP 3 greeting: signature (10), version (2), mechanism (20), as-server (1), filler (31)
GREETING = 64
#: frame flags (ZMTP 3, RFC 23/37); the other five bits are reserved and must be 0
MORE, LONG, COMMAND = 1, 2, 4
#: what each frame costs its reader beyond its bytes (a libzmq ``msg_t`` is 64
#: bytes), charged to the message so that many empty frames count
OVERHEAD = 64
#: frames one message may have: a Jupyter message is its routing identities,
#: a delimiter, a signature, four JSON parts and its buffers
MAX_FRAMES = 4096
#: the message bound until the daemon says its own (``Front``'s "bound"
#: command): core.kernels.message_bound of the default --max-output-bytes
DEFAULT_LIMIT = (16 << 20) + (1 << 20)
#: bytes read at once from either side of a connection, and so held at most per direction
CHUNK = 1 << 16
#: connections the reader may have open at once to one guarded socket: the
#: oldest is closed past this (a reader that reconnected left it behind)
MAX_PIPES = 4
#: the kernel's channels the guard stands before (no heartbeat: kernels have none)
CHANNELS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4}
DIR = ".guard"


class Breach(Exception):
    """What a kernel sent is not allowed through; ``str()`` says what, as its visitor reads it."""


class ZmtpCounter:
    """
    Follows the bytes one ZMTP 3.x peer sends and counts each message;
    ``feed`` raises ``Breach`` as soon as a frame's header shows its message
    too large, before its body is read. Holds at most a few header bytes.
    """

    def __init__(self, limit: int, max_frames: int = MAX_FRAMES, overhead: int = OVERHEAD):
        self.limit = limit
        self.max_frames = max_frames
        self.overhead = overhead
        #: the greeting's bytes so far; None once it was checked
        self._greeting: bytearray | None = bytearray()
        #: the bytes of a frame header split across reads
        self._head = bytearray()
        #: body bytes of the current frame still to come
        self._skip = 0
        #: of the message in progress: bytes charged, frames
        self.bytes = 0
        self.frames = 0
        #: frames (commands included) seen whole so far
        self.ended = 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                if not self._skip:
                    self.ended += 1
            elif self._greeting is not None:
                take = min(GREETING - len(self._greeting), n - i)
                self._greeting += data[i : i + take]
                i += take
                if len(self._greeting) == GREETING:
                    self._check_greeting(bytes(self._greeting))
                    self._greeting = None
            elif not self._head and n - i >= 2 and (not data[i] & LONG or n - i >= 9):
                flags = data[i]
                if flags & LONG:
                    self._frame(flags, int.from_bytes(data[i + 1 : i + 9], "big"))
                    i += 9
                else:
                    self._frame(flags, data[i + 1])
                    i += 2
            else:
                self._head.append(data[i])
                i += 1
                if len(self._head) == (9 if self._head[0] & LONG else 2):
                    head, self._head = bytes(self._head), bytearray()
                    self._frame(head[0], int.from_bytes(head[1:], "big"))

    @staticmethod
    def _check_greeting(greeting: bytes) -> None:
        if greeting[0] != 0xFF or greeting[9] != 0x7F:
            raise Breach("something that is not zmq (a bad ZMTP signature)")
        if greeting[10] != 3:
            raise Breach(f"ZMTP version {greeting[10]}, not 3")
        if greeting[12:32].rstrip(b"\0") != b"NULL":
            raise Breach("a ZMTP greeting with another mechanism than NULL")

    def _frame(self, flags: int, size: int) -> None:
        if flags & ~(MORE | LONG | COMMAND):
            raise Breach(f"a ZMTP frame with reserved flags ({flags:#04x})")
        self.bytes += size + self.overhead
        self.frames += 1
        if self.bytes > self.limit:
            raise Breach(f"a message of over {self.limit} bytes")
        if self.frames > self.max_frames:
            raise Breach(f"a message of over {self.max_frames} parts")
        if not flags & MORE:
            self.bytes = self.frames = 0
        self._skip = size
        if not size:
            self.ended += 1


def guarded_prefix(base_dir: str, kernel_id: str) -> str:
    """Where the guard of kernel ``kernel_id`` listens: ``PREFIX-PORT`` for each channel."""
    return os.path.join(base_dir, DIR, kernel_id)


class _Pipe:
    """
    One connection through the guard: ``outer`` (accepted from the reader)
    and ``inner`` (to the kernel's socket), and the bytes read from each that
    wait to be written to the other.
    """

    def __init__(self, kernel: _Kernel, channel: str, outer: socket.socket, inner: socket.socket):
        self.kernel = kernel
        self.channel = channel
        self.outer = outer
        self.inner = inner
        self.counter = ZmtpCounter(kernel.guard.limit)
        #: what the reader sends on iopub, followed until its subscription has gone through (``_Kernel.open_gate``)
        self.subscribing = ZmtpCounter(1 << 62) if channel == "iopub" and not kernel.subscribed else None
        #: read from the kernel, for the reader
        self.up = b""
        #: read from the reader, for the kernel
        self.down = b""
        self.masks = {outer.fileno(): select.EPOLLIN, inner.fileno(): select.EPOLLIN}
        self.closed = False

    def held(self) -> int:
        return len(self.up) + len(self.down)

    def event(self, fd: int, events: int) -> None:
        if events & select.EPOLLOUT:
            if fd == self.outer.fileno():
                self.up = self._write(self.outer, self.up)
            else:
                self.down = self._write(self.inner, self.down)
        inner = fd == self.inner.fileno()
        # Read a side only once what was read from it has gone on (this
        # event may have been polled before the last one made bytes wait).
        if events & select.EPOLLIN and not (self.up if inner else self.down):
            if inner:
                data = self._read(self.inner)
                if data:
                    self.counter.limit = self.kernel.guard.limit
                    self.counter.feed(data)  # a Breach goes up before the bytes go on
                    self.up = self._write(self.outer, data)
            else:
                data = self._read(self.outer)
                if data:
                    self._follow_subscription(data)
                    self.down = self._write(self.inner, data)
        elif events & (select.EPOLLHUP | select.EPOLLERR):
            self.close()  # gone while we did not read it (with bytes for it held)
        if not self.closed:
            if self.subscribing is not None and self.subscribing.ended >= 2 and not self.down:
                self.subscribing = None
                self.kernel.open_gate()
            self._watch()

    def _follow_subscription(self, data: bytes) -> None:
        """A reader's READY then its subscription: the second frame it sends on iopub."""
        if self.subscribing is not None:
            try:
                self.subscribing.feed(data)
            except Breach:  # the reader is trusted: whatever it speaks, let it on
                self.subscribing.ended = 2

    def _read(self, sock: socket.socket) -> bytes:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            self.close()
        return data

    def _write(self, sock: socket.socket, data: bytes) -> bytes:
        """Write what the socket takes now; what is left."""
        if self.closed or not data:
            return data
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return data
        except OSError:
            self.close()
            return b""
        return data[sent:]

    def _watch(self) -> None:
        """Read a side only while nothing read from it waits; write a side while something waits for it."""
        want = {
            self.outer.fileno(): (0 if self.down else select.EPOLLIN) | (select.EPOLLOUT if self.up else 0),
            self.inner.fileno(): (0 if self.up else select.EPOLLIN) | (select.EPOLLOUT if self.down else 0),
        }
        for fd, mask in want.items():
            if self.masks[fd] != mask:
                self.masks[fd] = mask
                self.kernel.guard.epoll.modify(fd, mask)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up = self.down = b""
        guard = self.kernel.guard
        for sock in (self.outer, self.inner):
            guard.forget(sock.fileno())
            sock.close()
        pipes = self.kernel.pipes.get(self.channel)
        if pipes and self in pipes:
            pipes.remove(self)


class _Kernel:
    """The four listening sockets of one kernel's guard, and the connections through them."""

    def __init__(self, guard: Guard, kernel_id: str, kernel_prefix: str):
        self.guard = guard
        self.id = kernel_id
        self.kernel_prefix = kernel_prefix
        self.prefix = guarded_prefix(guard.base_dir, kernel_id)
        self.listeners: dict[str, socket.socket] = {}
        self.pipes: dict[str, list[_Pipe]] = {channel: [] for channel in CHANNELS}
        #: a reader's subscription to iopub has reached the kernel (``open_gate``)
        self.subscribed = False
        try:
            for channel, port in CHANNELS.items():
                self.listeners[channel] = self._listen(f"{self.prefix}-{port}")
        except BaseException:
            self.close()
            raise
        for channel, sock in self.listeners.items():
            mask = select.EPOLLIN if channel == "iopub" else 0
            guard.watch(sock.fileno(), mask, lambda _fd, _events, channel=channel: self._accept(channel))

    def open_gate(self) -> None:
        """
        Accept on shell, control and stdin only once a reader's subscription
        to iopub has gone through to the kernel: a kernel publishes to no
        one before that, so the output of a request that came earlier would
        be lost. This matters when all connections come at once: a reader
        (the daemon) reconnecting to a restarted spawner's guard, whose
        requests were queued meanwhile. The reader's connections wait in
        the listeners' backlogs.
        """
        if self.subscribed:
            return
        self.subscribed = True
        for channel, sock in self.listeners.items():
            if channel != "iopub":
                self.guard.epoll.modify(sock.fileno(), select.EPOLLIN)

    def _listen(self, path: str) -> socket.socket:
        try:
            os.unlink(path)  # a socket left by a spawner before us
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            group = self.guard.group
            os.chmod(path, 0o600 if group is None else 0o660)
            if group is not None:
                os.chown(path, -1, group)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock

    def _accept(self, channel: str) -> None:
        listener = self.listeners.get(channel)
        for _ in range(MAX_PIPES):
            if listener is None or listener.fileno() < 0:
                return
            try:
                outer, _ = listener.accept()
            except OSError:  # none waiting (EAGAIN) among them
                return
            outer.setblocking(False)
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                # Never waits: a kernel that stopped accepting (a full
                # backlog) gets EAGAIN, and the reader tries again later.
                inner.connect(f"{self.kernel_prefix}-{CHANNELS[channel]}")
            except OSError:
                inner.close()
                outer.close()
                continue
            pipes = self.pipes[channel]
            while len(pipes) >= MAX_PIPES:
                pipes[0].close()
            pipe = _Pipe(self, channel, outer, inner)
            pipes.append(pipe)
            for sock in (outer, inner):
                self.guard.watch(sock.fileno(), select.EPOLLIN, pipe.event)

    def close(self) -> None:
        """Cut every connection, stop listening, remove the socket files."""
        for pipes in self.pipes.values():
            for pipe in list(pipes):
                pipe.close()
        for channel, sock in self.listeners.items():
            self.guard.forget(sock.fileno())
            sock.close()
            try:
                os.unlink(f"{self.prefix}-{CHANNELS[channel]}")
            except OSError:
                pass
        self.listeners = {}


class Guard:
    """
    Every guarded kernel of one spawner. ``fileno()`` is an epoll descriptor
    that is readable while any of the guard's sockets needs attention:
    poll it, and call ``service()``.
    """

    def __init__(
        self,
        base_dir: str,
        on_breach: Callable[[str, str], None],
        group: int | None = None,
        limit: int = DEFAULT_LIMIT,
    ):
        self.base_dir = base_dir
        self.on_breach = on_breach
        #: the group that may connect (the daemon's), or None: our account only
        self.group = group
        #: the most bytes one message from a kernel may have (frames' ``OVERHEAD`` included)
        self.limit = limit
        self.epoll = select.epoll()
        self.kernels: dict[str, _Kernel] = {}
        #: fd -> what handles its events
        self._handlers: dict[int, Callable[[int, int], None]] = {}
        path = os.path.join(base_dir, DIR)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{path} is not a dir of ours")
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o700 if group is None else 0o710)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def open(self, info: dict) -> dict:
        """
        Guard the kernel of ``info`` (a fork server's "ready" kernel): its
        info as a reader must see it, pointing at the guard. The same again
        for a kernel already guarded. Raises OSError if it cannot listen.
        """
        kid = info["id"]
        conn = info["connection"]
        kernel = self.kernels.get(kid)
        if kernel is None:
            kernel = _Kernel(self, kid, conn["ip"])
            self.kernels[kid] = kernel
        return dict(info, connection=dict(conn, ip=kernel.prefix))

    def close(self, kernel_id: str) -> None:
        kernel = self.kernels.pop(kernel_id, None)
        if kernel is not None:
            kernel.close()

    def close_all(self) -> None:
        for kid in list(self.kernels):
            self.close(kid)
        self.epoll.close()

    def held(self) -> int:
        """Bytes the guard holds for its connections now."""
        return sum(p.held() for k in self.kernels.values() for pipes in k.pipes.values() for p in pipes)

    def service(self, max_events: int = 256) -> None:
        """Handle what is ready now (never waits): at most one read per socket."""
        for fd, events in self.epoll.poll(0, max_events):
            handler = self._handlers.get(fd)
            if handler is None:
                continue
            try:
                handler(fd, events)
            except Breach as e:
                pipe = getattr(handler, "__self__", None)
                if isinstance(pipe, _Pipe):
                    self._breach(pipe.kernel, f"the kernel sent {e} (on {pipe.channel})")

    def _breach(self, kernel: _Kernel, reason: str) -> None:
        if self.kernels.get(kernel.id) is not kernel:
            return
        self.close(kernel.id)
        self.on_breach(kernel.id, reason)

    def watch(self, fd: int, mask: int, handler: Callable[[int, int], None]) -> None:
        self._handlers[fd] = handler
        self.epoll.register(fd, mask)

    def forget(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass
