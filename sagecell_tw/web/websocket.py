# -*- test-case-name: tests.test_bounds,tests.test_e2e_kernel_api,tests.test_comms -*-
"""
The browser's WebSocket to a session: ``/api/kernels/{id}/channels``.

Both Jupyter Server framings: the default one (JSON text frames; binary
frames with u32 big-endian offsets when there are buffers) and the
``v1.kernel.websocket.jupyter.org`` subprotocol (u64 little-endian offsets).
SageMathCell's ``/kernel/{id}/channels`` speaks its own plain framing: JSON
text frames, a missing ``channel`` means shell (its server sends every
browser message to shell). SageMathCell has no comms; here a message with
buffers (a widget's binary data, either way) goes in the default framing's
binary frame, which its page script never gets unless it opens widgets.
Every frame goes to the session manager as a checked ``Message``; anything
we refuse gets a Jupyter error reply, and the connection stays open.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from .. import messages
from ..messages import BadMessage, Message
from .policy import Policy

log = Logger()


class KernelWebSocket(WebSocketServerProtocol):
    """One browser connection to one session."""

    session = None
    framing = "default"
    #: the Jupyter client session (``?session_id=``) and the id of the last message it had (``?last_msg_id=``)
    session_id = ""
    last_msg_id: str | None = None
    #: set by the route (``site.KernelSocketResource``): the kernel id in the path, and
    #: whether it is SageMathCell's path (``/kernel/{id}/channels``) rather than Jupyter's
    kernel_id: str | None = None
    sagecell = False
    #: the client address of the upgrade request, the visitor's behind a trusted proxy (set by the route)
    forwarded_client: str | None = None

    def onConnect(self, request):
        factory = self.factory
        config = factory.config
        policy = factory.policy
        origin = request.headers.get("origin")
        if origin and not policy.origin_ok(origin):
            raise ConnectionDeny(403, f"origin {origin} is not allowed")
        if not policy.token_given(request.headers.get("authorization"), (request.params.get("token") or [""])[0]):
            raise ConnectionDeny(403, "a valid token is required")
        kernel_id = self.kernel_id
        session = policy.session_for(kernel_id)
        if session is None:
            refusal = policy.not_held(kernel_id, f"no kernel {str(kernel_id)[:64]}")
            raise ConnectionDeny(refusal.status, refusal.message)
        if len(session.connections) >= config.max_sockets_per_session:
            raise ConnectionDeny(
                429, f"session {kernel_id} already has {config.max_sockets_per_session} WebSockets open"
            )
        self.session = session
        self.client = self.forwarded_client or getattr(self.transport.getPeer(), "host", None) or "?"
        self.client_sessions: set[str] = set()
        qs = parse_qs(urlsplit(request.path).query)
        sid = (request.params.get("session_id") or qs.get("session_id") or [""])[0]
        if sid:
            self.client_sessions.add(sid)
        # Who comes back after a drop, and what it saw last: what it missed is replayed (core/replay.py).
        self.session_id = sid[:128]
        self.last_msg_id = (request.params.get("last_msg_id") or qs.get("last_msg_id") or [""])[0][:128] or None
        if messages.V1_SUBPROTOCOL in request.protocols:
            self.framing = "v1"
            return messages.V1_SUBPROTOCOL
        if self.sagecell:
            self.framing = "sagecell"
        return None

    def onOpen(self):
        log.info(
            "a browser connected to session {session} ({framing} framing)",
            event="ws_connect",
            session=self.session.id,
            framing=self.framing,
        )
        self._register_backpressure()
        self.factory.sessions.connect(self.session, self)

    def _register_backpressure(self) -> None:
        """
        Be the producer of our transport: when the browser reads too slowly
        and Twisted's write buffer fills, the session stops reading the
        kernel (see ``SessionManager.pause``) until the buffer drains. After
        the WebSocket took over the HTTP connection, twisted.web's HTTPChannel
        is still registered there, and it would only stop reading the
        browser's frames while ours piled up without bound.
        """
        self.transport.unregisterProducer()
        self.transport.registerProducer(_Backpressure(self), True)

    def onMessage(self, payload: bytes, isBinary: bool):
        limit = self.factory.config.max_message_size
        try:
            if len(payload) > limit:
                raise BadMessage(f"the message is {len(payload)} bytes, over the limit of {limit} bytes")
            if self.framing == "v1":
                if not isBinary:
                    raise BadMessage("the v1 subprotocol takes binary frames")
                msg = messages.parse_v1_frame(payload)
            else:
                # SageMathCell's framing is the default one, but for its channel-less messages: shell's
                channel = "shell" if self.framing == "sagecell" else None
                parse = messages.parse_default_binary if isBinary else messages.parse_json_frame
                msg = parse(payload, channel)
        except BadMessage as bad:
            self.deliver(messages.error_reply(bad, messages.DAEMON_SESSION))
            return
        self.factory.sessions.send(self.session, msg, self)

    # -- input held while it arrives ---------------------------------------------

    _held = 0

    def onMessageFrameBegin(self, length: int) -> None:
        """
        A frame's header is in: Autobahn refuses it if it declares more than
        the message limit, and we refuse it (1013, try again later) if its
        client, or all clients together, already have as much unfinished
        input in the daemon as we hold (``InputBudget``). Either way, before
        any of its payload is held.
        """
        super().onMessageFrameBegin(length)
        if self.failedByMe or self.state != self.STATE_OPEN:
            return
        why = self.factory.input_budget.reserve(self.client, self._held, length)
        if why is not None:
            log.info("refused a WebSocket frame from {client}: {why}", event="ws_refused", client=self.client, why=why)
            self._fail_connection(self.CLOSE_STATUS_CODE_TRY_AGAIN_LATER, why)
            return
        self._held += length

    def onMessageEnd(self) -> None:
        try:
            super().onMessageEnd()
        finally:
            self._release()

    def _release(self) -> None:
        if self._held:
            self.factory.input_budget.release(self.client, self._held)
            self._held = 0

    def onClose(self, wasClean, code, reason):
        self._release()
        if self.session is not None:
            self.factory.sessions.disconnect(self.session, self)

    # -- what the session manager calls ---------------------------------------

    def deliver(self, msg: Message) -> None:
        if self.state != self.STATE_OPEN:
            return
        if self.framing == "v1":
            self.sendMessage(msg.to_v1_frame(), isBinary=True)
        else:
            payload, binary = msg.to_default_frame()
            self.sendMessage(payload, isBinary=binary)

    def pause_input(self) -> None:
        """Read no more of this browser's frames (TCP then slows it) until ``resume_input``."""
        reader = _reader(self.transport)
        if reader is not None and self.state == self.STATE_OPEN:
            reader.pauseProducing()

    def resume_input(self) -> None:
        reader = _reader(self.transport)
        if reader is not None and self.state == self.STATE_OPEN:
            reader.resumeProducing()

    def close_for(self, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, reason[:120])


def socket_of(transport):
    """The TCP (or unix) transport under any wrappers (TLS): it lives as long as the connection."""
    for _ in range(8):
        if not isinstance(transport, ProtocolWrapper):
            break
        transport = transport.transport
    return transport


def _reader(transport):
    """The socket's transport under any wrapper (TLS), whose reading can be paused; None if closed."""
    transport = socket_of(transport)
    return transport if hasattr(transport, "pauseProducing") else None


@implementer(IPushProducer)
class _Backpressure:
    """What Twisted pauses when a browser's connection cannot take more."""

    def __init__(self, conn: KernelWebSocket):
        self.conn = conn

    def pauseProducing(self) -> None:
        self.conn.factory.sessions.pause(self.conn.session, self.conn)

    def resumeProducing(self) -> None:
        self.conn.factory.sessions.resume(self.conn.session, self.conn)

    def stopProducing(self) -> None:
        self.resumeProducing()


#: what the binary framings add to a message's parts: counts and offsets (at most 1024 parts)
FRAMING = 16 << 10
#: a frame this small is always taken: open connections bound what such frames can hold
FREE_FRAME = 64 << 10


class InputBudget:
    """
    How many bytes of unfinished WebSocket messages (declared by frames
    whose payload is still arriving) the daemon holds, per client address and
    in all. Each connection may hold one message of up to --max-message-size;
    a client at most two such, everyone together at most eight. Frames up to
    ``FREE_FRAME`` are not refused, so that small messages always go through.
    """

    def __init__(self, max_message_size: int):
        self.per_client = 2 * (max_message_size + FRAMING)
        self.total_limit = 8 * (max_message_size + FRAMING)
        #: client address -> bytes reserved
        self.clients: dict[str, int] = {}
        self.total = 0

    def reserve(self, client: str, held: int, length: int) -> str | None:
        """Reserve ``length`` more bytes for ``client``'s connection holding ``held``; why not, if refused."""
        if held + length > FREE_FRAME:
            if self.clients.get(client, 0) + length > self.per_client:
                return "you are already sending as much as the server holds for one client; try again later"
            if self.total + length > self.total_limit:
                return "the server is holding as much unfinished input as it can; try again later"
        self.clients[client] = self.clients.get(client, 0) + length
        self.total += length
        return None

    def release(self, client: str, length: int) -> None:
        left = self.clients.get(client, 0) - length
        if left > 0:
            self.clients[client] = left
        else:
            self.clients.pop(client, None)
        self.total -= length


class KernelWebSocketFactory(WebSocketServerFactory):
    protocol = KernelWebSocket

    def __init__(self, sessions, config, reactor=None, policy: Policy | None = None):
        super().__init__(reactor=reactor)
        self.sessions = sessions
        self.config = config
        #: decides which kernel a connection may open (the API's own policy)
        self.policy = policy or Policy(config, sessions)
        self.input_budget = InputBudget(config.max_message_size)
        # Refused from a frame's header, before its payload is held.
        hard = config.max_message_size + FRAMING
        self.setProtocolOptions(
            maxMessagePayloadSize=hard,
            maxFramePayloadSize=hard,
            tcpNoDelay=True,
            autoPingInterval=30,
            autoPingTimeout=60,
            # Origins are checked in onConnect against --allow-origin.
        )
