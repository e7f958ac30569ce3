"""
The wire formats of sagecell_tw.messages, byte by byte.

The two WebSocket framings as jupyter_server documents them
(docs/source/developers/websocket-protocols.md):

- default: a text frame of JSON, or, with buffers, a binary frame
  ``u32 BE count | u32 BE offsets[count] | JSON | buffer ...``
  (the first offset points past the offset table);
- ``v1.kernel.websocket.jupyter.org``: ``u64 LE n | u64 LE offsets[n] |
  channel | header | parent_header | metadata | content | buffer ...``,
  where offsets[0] is where the channel starts and the last offset is the
  end of the message.

And the zmq side: HMAC-SHA256 over the four JSON parts, as jupyter_client's
Session signs them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import pytest

from sagecell_tw import messages
from sagecell_tw.messages import BadMessage, Message, Signer


def sample(buffers=()) -> Message:
    """A kernel's display_data, with non-ASCII text and ``buffers``."""
    msg = Message.build("iopub", "display_data", {"data": {"text/plain": "ünï"}}, {"msg_id": "p1"}, session="s", metadata={"m": 1})
    msg.buffers = list(buffers)
    return msg


def test_default_text_frame_is_the_whole_message_as_json():
    msg = sample()
    payload, binary = msg.to_default_frame()
    assert not binary
    got = json.loads(payload)
    assert got["channel"] == "iopub" and got["msg_type"] == "display_data"
    assert got["header"]["msg_id"] == got["msg_id"] == msg.msg_id
    assert got["parent_header"] == {"msg_id": "p1"} and got["metadata"] == {"m": 1}
    assert got["content"]["data"]["text/plain"] == "ünï" and got["buffers"] == []


def test_default_binary_frame_layout():
    msg = sample([b"abc", b"\x00\x01"])
    payload, binary = msg.to_default_frame()
    assert binary
    (count,) = struct.unpack("!I", payload[:4])
    assert count == 3  # the JSON, then two buffers
    offsets = struct.unpack("!3I", payload[4:16])
    assert offsets[0] == 16
    assert payload[offsets[1] : offsets[2]] == b"abc" and payload[offsets[2] :] == b"\x00\x01"
    assert json.loads(payload[offsets[0] : offsets[1]])["msg_type"] == "display_data"


def test_default_binary_frame_parses_back_with_its_buffers():
    browser = json.dumps(
        {"channel": "shell", "header": {"msg_id": "m1", "msg_type": "comm_msg"}, "parent_header": {}, "metadata": {}, "content": {"data": {}}}
    ).encode()
    bufs = [browser, b"\xff" * 5, b""]
    offsets = [4 * (1 + len(bufs))]
    for b in bufs[:-1]:
        offsets.append(offsets[-1] + len(b))
    frame = struct.pack("!I", len(bufs)) + struct.pack(f"!{len(bufs)}I", *offsets) + b"".join(bufs)
    msg = messages.parse_default_binary(frame)
    assert msg.channel == "shell" and msg.msg_type == "comm_msg" and msg.buffers == [b"\xff" * 5, b""]


def test_v1_frame_layout_and_round_trip():
    msg = sample([b"xyz"])
    frame = msg.to_v1_frame()
    (n,) = struct.unpack("<Q", frame[:8])
    offsets = struct.unpack(f"<{n}Q", frame[8 : 8 * (n + 1)])
    assert offsets[0] == 8 * (n + 1) and offsets[-1] == len(frame)
    parts = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
    assert parts[0] == b"iopub"
    assert parts[1:5] == [msg.header, msg.parent, msg.metadata, msg.content] and parts[5] == b"xyz"
    # What a browser sends in v1 comes back as the same message.
    back = messages.parse_v1_frame(
        Message.build("shell", "execute_request", {"code": "1"}, session="b").to_v1_frame()
    )
    assert back.channel == "shell" and back.msg_type == "execute_request" and back.content_dict() == {"code": "1"}


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01\x00",
        struct.pack("<Q", 5) + b"\x00" * 40,  # too few offsets for a message
        struct.pack("<Q", 6) + struct.pack("<6Q", 8, 0, 0, 0, 0, 0),  # first offset inside the table
        struct.pack("<Q", 6) + struct.pack("<6Q", 56, 60, 58, 58, 58, 58) + b"shellxxxx",  # offsets go back
        struct.pack("<Q", 6) + struct.pack("<6Q", 56, 61, 62, 62, 62, 10**9) + b"shell{",  # past the end
        struct.pack("<Q", 2**40) + b"x",  # absurd count
    ],
)
def test_bad_v1_frames_are_refused(frame):
    with pytest.raises(BadMessage):
        messages.parse_v1_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [b"\x00", struct.pack("!I", 0), struct.pack("!I", 2000) + b"\x00" * 8, struct.pack("!II", 1, 3) + b"{}", struct.pack("!II", 1, 8) + b"nope"],
)
def test_bad_default_binary_frames_are_refused(frame):
    with pytest.raises(BadMessage):
        messages.parse_default_binary(frame)


def test_json_too_deep_is_bad_json_not_a_crash():
    deep = "[" * 50_000 + "]" * 50_000
    with pytest.raises(ValueError):
        messages.loads(deep)
    with pytest.raises(BadMessage, match="not valid JSON"):
        messages.parse_json_frame(deep.encode())
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(ValueError):
        messages.dumps(nested)


def test_browser_message_is_checked_and_re_encoded():
    msg = messages.parse_json_frame(
        json.dumps({"channel": "shell", "header": {"msg_id": "m", "msg_type": "execute_request", "session": "b"}, "content": {"code": "1"}}).encode()
    )
    header = json.loads(msg.header)
    assert header["version"] == messages.PROTOCOL_VERSION and header["date"] and header["username"] == ""
    assert json.loads(msg.parent) == {} and json.loads(msg.metadata) == {}


def test_signature_is_jupyter_clients_hmac_sha256():
    key = b"k" * 32
    msg = sample()
    wire = Signer(key).to_wire(msg)
    assert wire[0] == messages.DELIM
    expected = hmac.new(key, b"".join([msg.header, msg.parent, msg.metadata, msg.content]), hashlib.sha256).hexdigest().encode()
    assert wire[1] == expected
    assert Signer(key).verify(expected, wire[2:6]) and not Signer(b"other").verify(expected, wire[2:6])
    back = messages.from_wire("iopub", [b"id", *wire])
    assert back.content == msg.content and back.msg_type == "display_data"


def test_error_reply_answers_a_request_on_its_channel_and_anything_else_on_iopub():
    bad = BadMessage("nope", {"msg_id": "m", "msg_type": "execute_request"}, "shell")
    reply = messages.error_reply(bad, "d")
    assert reply.channel == "shell" and reply.msg_type == "execute_reply" and reply.parent_dict["msg_id"] == "m"
    assert reply.content_dict() == {"status": "error", "ename": "BadRequest", "evalue": "nope", "traceback": ["BadRequest: nope"]}
    other = messages.error_reply(BadMessage("garbled"), "d")
    assert other.channel == "iopub" and other.msg_type == "error"
