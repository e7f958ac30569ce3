# -*- test-case-name: tests.test_workers -*-
"""
A worker host's relay: the daemon reaches kernels on this host through it.

Kernels bind ``ipc://`` in their private directories and have no network. For
each ready kernel the spawner front binds four CURVE-server TCP sockets on the
worker's public address and joins each to the kernel's socket:

    daemon DEALER --tcp/CURVE--> ROUTER | DEALER --ipc--> kernel ROUTER  (shell, control, stdin)
    daemon SUB    --tcp/CURVE--> XPUB   | XSUB   --ipc--> kernel PUB     (iopub)

A ROUTER in front keeps the daemon's identity as the first frame, so replies
find their way back. The kernel sends ``input_request`` on stdin to the
identity that sent the ``execute_request`` on shell, which here is the relay's
DEALER: the shell and stdin DEALERs of one kernel share one identity.

Only the daemon's key is admitted (ZAP, answered in the front's poll loop).
The front polls these sockets with its own; this module does no waiting.
"""

from __future__ import annotations

import os

import zmq

from .. import keys

CHANNELS = ("shell", "control", "stdin", "iopub")


class KernelRelay:
    """The four socket pairs of one kernel."""

    def __init__(self, relay: Relay, info: dict):
        conn = info["connection"]
        self.peers: dict[zmq.Socket, zmq.Socket] = {}
        ports = {}
        identity = os.urandom(8).hex().encode()
        for channel in CHANNELS:
            kind_front, kind_back = (zmq.XPUB, zmq.XSUB) if channel == "iopub" else (zmq.ROUTER, zmq.DEALER)
            front = relay.ctx.socket(kind_front)
            back = relay.ctx.socket(kind_back)
            for s in (front, back):
                s.setsockopt(zmq.LINGER, 0)
            front.curve_server = True
            front.curve_publickey, front.curve_secretkey = relay.public, relay.secret
            ports[channel + "_port"] = relay.bind(front)
            if kind_back == zmq.DEALER:
                back.setsockopt(zmq.IDENTITY, identity)
            back.connect(f"ipc://{conn['ip']}-{conn[channel + '_port']}")
            self.peers[front] = back
            self.peers[back] = front
        self.info = dict(info)
        self.info["connection"] = dict(
            conn,
            transport="tcp",
            ip=relay.host,
            curve_serverkey=relay.public.decode(),
            **ports,
        )

    def close(self) -> None:
        for s in self.peers:
            s.close(0)


class Relay:
    """Every kernel relay of this worker host, and the ZAP handler that guards them."""

    def __init__(self, ctx: zmq.Context, host: str, public: bytes, secret: bytes, daemon_key: bytes, ports=None):
        self.ctx = ctx
        self.host = host
        self.public = public
        self.secret = secret
        self.allowed = {daemon_key}
        self.ports = ports
        self.kernels: dict[str, KernelRelay] = {}
        #: relay socket -> the socket it forwards to
        self.peers: dict[zmq.Socket, zmq.Socket] = {}
        # Bound before any CURVE server socket: libzmq asks it about each handshake.
        self.zap = ctx.socket(zmq.ROUTER)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind("inproc://zeromq.zap.01")

    def bind(self, sock: zmq.Socket) -> int:
        if self.ports:
            return sock.bind_to_random_port(f"tcp://{self.host}", self.ports[0], self.ports[1] + 1, max_tries=200)
        sock.bind(f"tcp://{self.host}:*")
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def open(self, info: dict) -> tuple[dict, list[zmq.Socket]]:
        """The kernel's info as the daemon must see it, and the new sockets to poll."""
        kid = info["id"]
        if kid in self.kernels:  # announced again (after a sync)
            return self.kernels[kid].info, []
        k = KernelRelay(self, info)
        self.kernels[kid] = k
        self.peers.update(k.peers)
        return k.info, list(k.peers)

    def close(self, kid: str) -> list[zmq.Socket]:
        """Tear a kernel's relay down; the sockets to stop polling."""
        k = self.kernels.pop(kid, None)
        if k is None:
            return []
        socks = list(k.peers)
        for s in socks:
            self.peers.pop(s, None)
        k.close()
        return socks

    def close_all(self) -> None:
        for kid in list(self.kernels):
            self.close(kid)
        self.zap.close(0)

    def forward(self, sock: zmq.Socket, budget: int = 1000) -> None:
        """Move what ``sock`` holds to its peer; drop what the peer has no room for (zmq's own rule)."""
        peer = self.peers.get(sock)
        for _ in range(budget):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if peer is None:
                continue
            try:
                peer.send_multipart(parts, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def authenticate(self) -> None:
        """Answer the ZAP requests waiting on the handler socket."""
        while True:
            try:
                frames = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, _ok = keys.zap_answer(frames, self.allowed)
            if reply is not None:
                self.zap.send_multipart(reply)
