# -*- test-case-name: tests.test_messages,tests.test_comms -*-
"""
Jupyter messages: the zmq wire format (signed) and the two WebSocket framings.

Plain model: no Twisted, no zmq. Kernel -> browser messages are spliced as
bytes, never re-encoded: each part is checked to be a JSON object
(``from_wire``), and the header and parent header are kept to route them. Browser -> kernel messages are parsed, checked, and signed
with the kernel's key, which never reaches the browser.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"

#: What a browser may send, by channel.
ALLOWED = {
    "shell": {
        "execute_request",
        "inspect_request",
        "complete_request",
        "history_request",
        "is_complete_request",
        "comm_info_request",
        "kernel_info_request",
        "comm_open",
        "comm_msg",
        "comm_close",
    },
    # Not debug_request: the kernelspec says there is no debugger, and
    # debugpy in a kernel would listen and run threads we do not account for.
    "control": {"interrupt_request", "kernel_info_request", "shutdown_request", "usage_request"},
    "stdin": {"input_reply"},
}
CHANNELS = ("shell", "control", "stdin", "iopub")
#: the header session of what the daemon itself says to a kernel or a client
#: (status, notices, kernel_info probes); a kernel's message that claims it is a forgery
DAEMON_SESSION = "sagecell-daemon"


class BadMessage(ValueError):
    """A browser sent something that is not a message we can pass on."""

    def __init__(self, reason: str, header: dict | None = None, channel: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.header = header
        self.channel = channel


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def new_header(msg_type: str, session: str, username: str = "sagecell") -> dict:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "username": username,
        "date": now_iso(),
        "version": PROTOCOL_VERSION,
    }


def loads(data: bytes | str):
    """
    ``json.loads`` for what anyone may send: JSON nested too deeply for
    Python's stack is a ``ValueError``, as any other bad JSON is, not a
    ``RecursionError`` that no caller expects.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def dumps(obj) -> bytes:
    """Compact JSON; a ``ValueError`` for what cannot be encoded, however deeply nested."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


class Signer:
    """HMAC-SHA256 over the four JSON parts, as jupyter_client's Session does."""

    def __init__(self, key: str | bytes):
        self.key = key.encode() if isinstance(key, str) else key

    def sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def verify(self, signature: bytes, parts: list[bytes]) -> bool:
        return hmac.compare_digest(signature, self.sign(parts))

    def to_wire(self, msg: Message) -> list[bytes]:
        parts = [msg.header, msg.parent, msg.metadata, msg.content]
        return [DELIM, self.sign(parts), *parts, *msg.buffers]


@dataclass
class Message:
    """A message with its four JSON parts as bytes; headers and content parsed on demand, once."""

    channel: str
    header: bytes
    parent: bytes
    metadata: bytes
    content: bytes
    buffers: list[bytes] = field(default_factory=list)
    _h: dict | None = None
    _p: dict | None = None
    #: the content, parsed already (a kernel's message is checked as it arrives)
    _c: dict | None = None

    @classmethod
    def build(
        cls,
        channel: str,
        msg_type: str,
        content: dict,
        parent: dict | None = None,
        session: str = "sagecell",
        metadata: dict | None = None,
    ) -> Message:
        header = new_header(msg_type, session)
        return cls(
            channel,
            dumps(header),
            dumps(parent or {}),
            dumps(metadata or {}),
            dumps(content),
            [],
            header,
            parent or {},
        )

    @property
    def header_dict(self) -> dict:
        if self._h is None:
            try:
                h = loads(self.header)
            except ValueError:
                h = {}
            self._h = h if isinstance(h, dict) else {}
        return self._h

    @property
    def parent_dict(self) -> dict:
        if self._p is None:
            try:
                p = loads(self.parent)
            except ValueError:
                p = {}
            self._p = p if isinstance(p, dict) else {}
        return self._p

    @property
    def msg_type(self) -> str:
        return str(self.header_dict.get("msg_type", ""))

    @property
    def msg_id(self) -> str:
        return str(self.header_dict.get("msg_id", ""))

    def content_dict(self) -> dict:
        """The content as a new dict (callers may change its keys)."""
        if self._c is not None:
            return dict(self._c)
        try:
            c = loads(self.content)
        except ValueError:
            return {}
        return c if isinstance(c, dict) else {}

    # -- browser framings ------------------------------------------------

    def to_json_frame(self) -> bytes:
        """The default framing's JSON text, spliced from the raw parts."""
        h = self.header_dict
        return b"".join(
            [
                b'{"channel":"',
                self.channel.encode(),
                b'","msg_id":',
                dumps(str(h.get("msg_id", ""))),
                b',"msg_type":',
                dumps(str(h.get("msg_type", ""))),
                b',"header":',
                self.header,
                b',"parent_header":',
                self.parent,
                b',"metadata":',
                self.metadata,
                b',"content":',
                self.content,
                b',"buffers":[]}',
            ]
        )

    def to_default_frame(self) -> tuple[bytes, bool]:
        """(payload, is_binary) in the default framing: text unless there are buffers."""
        body = self.to_json_frame()
        if not self.buffers:
            return body, False
        bufs = [body, *self.buffers]
        offsets = [4 * (len(bufs) + 1)]
        for b in bufs[:-1]:
            offsets.append(offsets[-1] + len(b))
        return struct.pack("!" + "I" * (len(bufs) + 1), len(bufs), *offsets) + b"".join(bufs), True

    def to_v1_frame(self) -> bytes:
        parts = [self.header, self.parent, self.metadata, self.content, *self.buffers]
        channel = self.channel.encode()
        offsets = [8 * (1 + 1 + len(parts) + 1)]
        offsets.append(offsets[-1] + len(channel))
        for p in parts:
            offsets.append(offsets[-1] + len(p))
        head = struct.pack("<" + "Q" * (len(offsets) + 1), len(offsets), *offsets)
        return b"".join([head, channel, *parts])


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


#: one decoder for every kernel part (``json.loads`` with an option makes a new one per call)
_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)


def _json_object(part: bytes, name: str) -> dict:
    """A kernel's JSON part as a dict, if it is one that a browser's ``JSON.parse`` takes as it is."""
    try:
        value = _STRICT_JSON.decode(part.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadMessage(f"the {name} is not valid UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise BadMessage(f"the {name} is not a JSON object")
    return value


def from_wire(channel: str, frames: list[bytes]) -> Message:
    """
    A kernel's zmq multipart message (identities first) as a Message.

    Its four parts are spliced into browsers' frames as they are, so each
    must be a JSON object in UTF-8 (no NaN or Infinity, which ``JSON.parse``
    refuses): a kernel runs visitors' code, and may send anything.
    """
    try:
        i = frames.index(DELIM)
    except ValueError:
        raise BadMessage("no delimiter in kernel message") from None
    body = frames[i + 2 :]
    if len(body) < 4:
        raise BadMessage("truncated kernel message")
    header = _json_object(body[0], "header")
    parent = _json_object(body[1], "parent header")
    _json_object(body[2], "metadata")
    content = _json_object(body[3], "content")
    return Message(channel, body[0], body[1], body[2], body[3], list(body[4:]), header, parent, content)


# -- browser -> daemon ------------------------------------------------------


def _as_obj(value, name: str, header=None, channel=None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadMessage(f"{name} must be a JSON object", header, channel)
    return value


def from_dict(msg, default_channel: str | None = None, buffers: list[bytes] | None = None) -> Message:
    """Check a parsed browser message and turn it into a Message to sign and send."""
    if not isinstance(msg, dict):
        raise BadMessage("a message must be a JSON object")
    channel = msg.get("channel") or default_channel
    header = msg.get("header")
    if not isinstance(header, dict):
        raise BadMessage("the message has no header object", None, channel)
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str) or not msg_type:
        raise BadMessage("the header has no msg_type", header, channel)
    if not isinstance(header.get("msg_id"), str) or not header.get("msg_id"):
        raise BadMessage("the header has no msg_id", header, channel)
    if channel not in ALLOWED:
        raise BadMessage(f"unknown channel {channel!r}", header, None)
    if msg_type not in ALLOWED[channel]:
        raise BadMessage(f"msg_type {msg_type!r} is not allowed on the {channel} channel", header, channel)
    parent = _as_obj(msg.get("parent_header"), "parent_header", header, channel)
    metadata = _as_obj(msg.get("metadata"), "metadata", header, channel)
    content = _as_obj(msg.get("content"), "content", header, channel)
    header = dict(header)
    header.setdefault("version", PROTOCOL_VERSION)
    header.setdefault("date", now_iso())
    header.setdefault("username", "")
    header.setdefault("session", "")
    try:
        return Message(
            channel, dumps(header), dumps(parent), dumps(metadata), dumps(content), list(buffers or []), header, parent
        )
    except (TypeError, ValueError) as e:
        raise BadMessage(f"cannot encode message: {e}", header, channel) from None


def parse_json_frame(payload: bytes, default_channel: str | None = None) -> Message:
    """
    A text frame: one JSON message. Its buffers (a comm's binary data) can
    only come in a binary frame: in JSON they would be text, which no kernel
    takes for bytes, so a text frame naming any is refused, not cut short.
    """
    try:
        msg = loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise BadMessage("the frame is not valid JSON") from None
    if isinstance(msg, dict) and msg.get("buffers"):
        header = msg.get("header") if isinstance(msg.get("header"), dict) else None
        channel = msg.get("channel") or default_channel
        raise BadMessage("buffers must come in a binary frame (u32 offsets), not in JSON text", header, channel)
    return from_dict(msg, default_channel)


def parse_default_binary(payload: bytes, default_channel: str | None = None) -> Message:
    """The default framing's binary form: u32 BE count and offsets, JSON, buffers."""
    try:
        (n,) = struct.unpack("!I", payload[:4])
        if n < 1 or n > 1024 or 4 * (n + 1) > len(payload):
            raise BadMessage("bad buffer count in binary frame")
        offsets = list(struct.unpack("!" + "I" * n, payload[4 : 4 * (n + 1)]))
    except struct.error:
        raise BadMessage("truncated binary frame") from None
    bounds = offsets + [len(payload)]
    if any(a > b for a, b in zip(bounds, bounds[1:])) or bounds[0] < 4 * (n + 1):
        raise BadMessage("bad offsets in binary frame")
    bufs = [payload[a:b] for a, b in zip(bounds, bounds[1:])]
    try:
        msg = loads(bufs[0])
    except (ValueError, UnicodeDecodeError):
        raise BadMessage("the frame is not valid JSON") from None
    return from_dict(msg, default_channel, buffers=bufs[1:])


def parse_v1_frame(payload: bytes) -> Message:
    """The v1 subprotocol: u64 LE count and offsets, channel, four JSON parts, buffers."""
    try:
        (n,) = struct.unpack("<Q", payload[:8])
        if n < 6 or n > 1024 or 8 * (n + 1) > len(payload):
            raise BadMessage("bad offset count in v1 frame")
        offsets = list(struct.unpack("<" + "Q" * n, payload[8 : 8 * (n + 1)]))
    except struct.error:
        raise BadMessage("truncated v1 frame") from None
    if offsets[0] < 8 * (n + 1) or any(a > b for a, b in zip(offsets, offsets[1:])) or offsets[-1] > len(payload):
        raise BadMessage("bad offsets in v1 frame")
    parts = [payload[a:b] for a, b in zip(offsets, offsets[1:])]
    try:
        channel = parts[0].decode()
        header, parent, metadata, content = (loads(p) if p else {} for p in parts[1:5])
    except (ValueError, UnicodeDecodeError):
        raise BadMessage("a v1 frame part is not valid JSON") from None
    return from_dict(
        {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata, "content": content},
        buffers=parts[5:],
    )


def error_reply(bad: BadMessage, session: str) -> Message:
    """The Jupyter answer to a message we refused: a ``*_reply`` if we can, else iopub ``error``."""
    content = {"status": "error", "ename": "BadRequest", "evalue": bad.reason, "traceback": [f"BadRequest: {bad.reason}"]}
    header = bad.header or {}
    msg_type = header.get("msg_type") if isinstance(header.get("msg_type"), str) else ""
    if bad.channel in ("shell", "control") and msg_type.endswith("_request"):
        return Message.build(bad.channel, msg_type[: -len("_request")] + "_reply", content, header, session)
    return Message.build("iopub", "error", content, header if header else None, session)


def status(state: str, session: str, parent: dict | None = None) -> Message:
    return Message.build("iopub", "status", {"execution_state": state}, parent, session)


def stream(text: str, session: str, parent: dict | None = None, name: str = "stderr") -> Message:
    return Message.build("iopub", "stream", {"name": name, "text": text}, parent, session)
