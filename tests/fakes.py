"""
Fakes shared by the task.Clock tests: the daemon's zmq side, a spawner, a browser connection.

The daemon's kernel-side code is driven here without processes or sockets:
a test plays the kernel (or a spawner) by calling the handlers the daemon
registered, and reads what the daemon sent from the fakes' records.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import task
from twisted.trial import unittest

from sagecell_tw import config as configmod
from sagecell_tw import messages
from sagecell_tw.core import kernels
from sagecell_tw.core.kernels import KernelManager
from sagecell_tw.core.sessions import DAEMON_SESSION, SessionManager
from sagecell_tw.messages import Message

# -- the daemon's zmq side ------------------------------------------------------------


class FakeChannel:
    """One zmq socket of the daemon: records what is sent; ``on_message`` is what the daemon would hear."""

    def __init__(self, address: str = "", on_message: Callable[[list[bytes]], None] | None = None):
        self.address = address
        self.on_message = on_message
        self.sent: list[list[bytes]] = []
        self.closed = False
        self.paused = False

    def send(self, parts: list[bytes]) -> bool:
        self.sent.append(parts)
        return True

    def close(self) -> None:
        self.closed = True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


class FakeZmq:
    """Stands in for ``control.transport.ZmqContext``: hands out FakeChannels and keeps them."""

    def __init__(self):
        #: every channel made, in order
        self.channels: list[FakeChannel] = []
        #: the bound ROUTERs (the spawners' control channel)
        self.routers: list[FakeChannel] = []
        #: (address, CURVE options) of each connecting socket (a kernel's dealers and sub)
        self.connects: list[tuple[str, dict]] = []

    def _channel(self, address: str, on_message) -> FakeChannel:
        ch = FakeChannel(address, on_message)
        self.channels.append(ch)
        return ch

    def router(self, address: str, on_message, curve_server: bool = False) -> FakeChannel:
        ch = self._channel(address, on_message)
        self.routers.append(ch)
        return ch

    def dealer(self, address: str, on_message, identity: bytes | None = None, **curve) -> FakeChannel:
        self.connects.append((address, curve))
        return self._channel(address, on_message)

    def sub(self, address: str, on_message, **curve) -> FakeChannel:
        self.connects.append((address, curve))
        return self._channel(address, on_message)


# -- kernels and spawners -------------------------------------------------------------


def kernel_info(kid: str, *, pid: int = 4242, key: str = "k" * 64, relay: str | None = None) -> dict:
    """
    What a spawner reports of a ready kernel (its "ready" event).

    The kernel is reached over ipc, or over tcp with CURVE through the relay
    of the worker host ``relay``. Ports follow ``kernels.CHANNELS``: shell is 1.
    ``spawn_seconds`` (fork to ready) is there as a spawner always reports it.
    """
    conn = {"ip": f"/tmp/{kid}/k", "key": key, **{f"{c}_port": i for i, c in enumerate(kernels.CHANNELS, 1)}}
    if relay:
        conn.update(transport="tcp", ip=relay, curve_serverkey="S" * 40)
    return {
        "id": kid,
        "pid": pid,
        "dir": f"/tmp/{kid}",
        "workdir": f"/tmp/{kid}/work",
        "connection": conn,
        "spawn_seconds": 0.04,
    }


class FakeSpawner:
    """A spawner link: records the kernels taken from its pool and those it was told to kill."""

    name = "fake"

    def __init__(self):
        self.taken: list[str] = []
        self.killed: list[tuple[str, str]] = []
        self.interrupted: list[str] = []

    def take(self, kid: str) -> None:
        self.taken.append(kid)

    def kill(self, kid: str, reason: str = "killed") -> None:
        self.killed.append((kid, reason))

    def interrupt(self, kid: str) -> None:
        self.interrupted.append(kid)


# -- a browser's connection -------------------------------------------------------------


class FakeConnection:
    """A browser's WebSocket as the session manager sees it: records what it was given."""

    def __init__(self):
        self.got: list[Message] = []
        self.closed_for: str | None = None
        self.client_sessions = {"browser"}
        #: whether the session manager lets this connection's browser be read
        self.reading = True

    def deliver(self, msg: Message) -> None:
        self.got.append(msg)

    def pause_input(self) -> None:
        self.reading = False

    def resume_input(self) -> None:
        self.reading = True

    def close_for(self, reason: str) -> None:
        self.closed_for = reason

    def texts(self) -> str:
        """All stream text shown, the daemon's notices included."""
        return "".join(m.content_dict().get("text", "") for m in self.got if m.msg_type == "stream")

    def stdout(self) -> str:
        return "".join(
            m.content_dict()["text"]
            for m in self.got
            if m.msg_type == "stream" and m.content_dict()["name"] == "stdout"
        )

    def states(self) -> list[str]:
        return [m.content_dict()["execution_state"] for m in self.got if m.msg_type == "status"]

    def notices(self) -> list[Message]:
        """The daemon's own stream messages (limits, truncation), not the kernel's."""
        return [m for m in self.got if m.msg_type == "stream" and m.header_dict.get("session") == DAEMON_SESSION]


# -- playing the kernel -------------------------------------------------------------------


def wire(msg: Message) -> list[bytes]:
    """``msg`` as a kernel's zmq multipart message (an identity, then the delimiter)."""
    return [b"", messages.DELIM, b"", msg.header, msg.parent, msg.metadata, msg.content, *msg.buffers]


def publish(kernel, msg: Message) -> None:
    """The kernel publishes ``msg`` on iopub, and the daemon's subscription gets it."""
    kernel.sockets["iopub"].on_message(wire(msg))


def warm_up_request(kernel) -> Message:
    """The silent execute_request the daemon sent to warm ``kernel`` up (its last on shell)."""
    msg = messages.from_wire("shell", kernel.sockets["shell"].sent[-1])
    assert msg.msg_type == "execute_request", msg.msg_type
    return msg


def iopub_welcome(kernel) -> None:
    """Make the kernel's iopub answer, as a live subscription would, and finish its warm-up."""
    publish(kernel, messages.status("idle", "k"))
    publish(kernel, messages.status("idle", "k", {"msg_id": warm_up_request(kernel).msg_id}))


class SessionsCase(unittest.TestCase):
    """A SessionManager over fake kernels on a task.Clock: ``options`` are config options, as strings."""

    options: dict = {}
    max_kernels = 10

    def setUp(self):
        self.clock = task.Clock()
        self.config = configmod.build({}, {"max_output_bytes": "1000", **self.options})
        self.kernels = KernelManager(FakeZmq(), self.clock, self.max_kernels, shutdown_grace=1.0)
        self.sessions = SessionManager(self.kernels, self.config, self.clock)
        self.spawner = FakeSpawner()
        self.n = 0

    def ready_kernel(self):
        self.n += 1
        self.kernels.kernel_ready(kernel_info(f"k{self.n}", pid=1000 + self.n), self.spawner)
        kernel = self.kernels.kernels[f"k{self.n}"]
        iopub_welcome(kernel)
        return kernel

    def session_with_kernel(self, client: str = "client"):
        self.ready_kernel()
        session = self.sessions.create(client)
        conn = FakeConnection()
        self.sessions.connect(session, conn)
        return session, conn
