"""
Issue 13: no message from a kernel makes the daemon hold more than a bounded frame.

Against a real daemon with real forked kernels: a kernel's one large
``print`` reaches the browser whole, in order, as stream messages of at most
``kernel_output.PIECE`` characters; a kernel that bypasses kernel_output and
sends one raw frame over the daemon's bound (``kernels.message_bound``) on its
own iopub socket, as a hostile visitor can, is ended with a reason its
session sees, while the daemon stays small and serves another session. The
socket monitor that notices the dropped connection is tested on real zmq
sockets too, with ``task.Clock`` for its grace.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import zmq
from support import Daemon
from twisted.internet import task
from twisted.trial import unittest

from sagecell_tw.control import transport as zmqtransport
from sagecell_tw.core.kernels import MESSAGE_MARGIN, message_bound
from sagecell_tw.core.sessions import DAEMON_SESSION
from sagecell_tw.kernel import output as kernel_output

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from benchlib import RawWS, execute, new_kernel, rss_mib  # noqa: E402

OUTPUT_CAP = 32 << 20
SMALL_CAP = 64 << 10
#: 20 MB of numbered lines: any loss, repeat or reordering shows
BIG_TEXT = "''.join(f'{i:07d}\\n' for i in range(2_500_000))"


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(pool_size=2, max_output_bytes=OUTPUT_CAP, max_kernels_per_client=32).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def small_daemon():
    d = Daemon(pool_size=2, max_output_bytes=SMALL_CAP, max_kernels_per_client=32).start()
    try:
        yield d
    finally:
        d.stop()


def _streams(outputs: list[dict]) -> list[dict]:
    return [m for m in outputs if m["msg_type"] == "stream" and m["header"]["session"] != DAEMON_SESSION]


def test_one_print_of_20_mb_arrives_whole_in_order_as_bounded_messages(daemon):
    ws = RawWS(daemon.port, new_kernel(daemon.port))
    reply, outputs = ws.run(f"s = {BIG_TEXT}\nprint(s, end='')", timeout=120)
    ws.close()
    assert reply["status"] == "ok", reply
    streams = _streams(outputs)
    text = "".join(m["content"]["text"] for m in streams)
    expected = eval(BIG_TEXT)
    assert len(text) == len(expected) and text == expected
    assert max(len(m["content"]["text"]) for m in streams) <= kernel_output.PIECE + 1
    assert len(streams) >= len(expected) // (kernel_output.PIECE + 1)


def test_one_print_over_the_cap_is_cut_at_the_cap_with_the_notice(small_daemon):
    ws = RawWS(small_daemon.port, new_kernel(small_daemon.port))
    reply, outputs = ws.run("print('é' * 10_000_000)", timeout=60)
    ws.close()
    assert reply["status"] == "ok", reply
    streams = _streams(outputs)
    assert set("".join(m["content"]["text"] for m in streams)) == {"é"}
    notices = [m for m in outputs if m["header"]["session"] == DAEMON_SESSION]
    assert len(notices) == 1 and f"Output truncated at {SMALL_CAP} bytes" in notices[0]["content"]["text"]


#: one raw stream message of ``n`` bytes of text on the kernel's own iopub socket
HOSTILE = """
import json
k = get_ipython().kernel
h = json.dumps(k.session.msg_header("stream"), default=str).encode()
parent = json.dumps(k.get_parent()["header"], default=str).encode()
k.session.send_raw(k.iopub_socket, [h, parent, b"{{}}", b'{{"name": "stdout", "text": "' + b"x" * {n} + b'"}}'])
import time
time.sleep(30)
"""


def _notice(ws: RawWS, text: str, timeout: float) -> str:
    """The daemon's notice containing ``text``, waited for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ws.recv(deadline - time.monotonic())
        if m["header"]["session"] == DAEMON_SESSION and text in m["content"].get("text", ""):
            return m["content"]["text"]
    raise TimeoutError(text)


def test_a_raw_oversized_message_ends_its_kernel_with_the_reason(small_daemon):
    bound = message_bound(SMALL_CAP)
    bystander = RawWS(small_daemon.port, new_kernel(small_daemon.port))
    assert bystander.run("1+1")[0]["status"] == "ok"
    before = rss_mib(small_daemon.proc.pid)
    ws = RawWS(small_daemon.port, new_kernel(small_daemon.port))
    payload, _ = execute(HOSTILE.format(n=200 << 20), ws.session)
    ws.send(payload)
    notice = _notice(ws, "The kernel died", 60)
    assert f"the kernel sent a message of over {bound} bytes (on iopub)" in notice, notice
    assert rss_mib(small_daemon.proc.pid) - before < 50
    ws.close()
    reply, outputs = bystander.run("print(6 * 7)")
    bystander.close()
    assert reply["status"] == "ok" and _streams(outputs)[0]["content"]["text"] == "42\n"


def test_a_raw_message_within_the_bound_is_taken(small_daemon):
    ws = RawWS(small_daemon.port, new_kernel(small_daemon.port))
    code = HOSTILE.format(n=SMALL_CAP // 2).replace("time.sleep(30)", "None")
    reply, outputs = ws.run(code)
    assert reply["status"] == "ok", reply
    assert len(_streams(outputs)[0]["content"]["text"]) == SMALL_CAP // 2
    assert ws.run("1+1")[0]["status"] == "ok"
    ws.close()


class _PolledClock(task.Clock):
    """A reactor for sockets read by hand: time is a ``task.Clock``, file descriptors are not watched."""

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass


class WatchTests(unittest.TestCase):
    """A bounded SUB socket of ``ZmqContext`` against a real PUB, the grace on a ``task.Clock``."""

    def setUp(self):
        self.clock = _PolledClock()
        self.zmq = zmqtransport.ZmqContext(self.clock)
        self.zmq.start()
        self.address = f"ipc://{os.path.abspath(self.mktemp())}"
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(self.address)
        self.broken = []
        self.got = []
        self.sub = self.zmq.sub(
            self.address, self.got.append, max_message=1000, on_broken=lambda: self.broken.append(1)
        )

    def tearDown(self):
        self.sub.close()
        self.pub.close(0)
        self.ctx.term()
        self.zmq.shutdown()

    def _until(self, what, seconds: float = 5.0):
        """Let zmq's own threads and the monitor socket work, polling the monitor by hand (bounded)."""
        deadline = time.monotonic() + seconds
        watch = self.sub._sock._watch
        while not what() and time.monotonic() < deadline:
            time.sleep(0.01)
            watch._pair.doRead()
            self.clock.advance(0)

    def test_an_oversized_frame_breaks_the_channel_and_is_told_once(self):
        self._until(lambda: False, 0.3)  # connected
        self.pub.send(b"x" * 2000)
        self._until(lambda: self.clock.getDelayedCalls())
        self.assertEqual(self.broken, [])
        self.clock.advance(zmqtransport.BROKEN_GRACE)
        self.assertEqual(self.broken, [1])
        self.clock.advance(10 * zmqtransport.BROKEN_GRACE)
        self.assertEqual(self.broken, [1])

    def test_a_peer_that_goes_away_is_not_taken_for_broken(self):
        self._until(lambda: False, 0.3)
        self.pub.close(0)
        self._until(lambda: False, 0.3)
        self.clock.advance(zmqtransport.BROKEN_GRACE)
        self.assertEqual(self.broken, [])


def test_the_bound_leaves_room_for_pieces_under_any_cap():
    assert message_bound(1) > 6 * kernel_output.PIECE + 4096
    assert message_bound(16 << 20) == (16 << 20) + MESSAGE_MARGIN
    assert message_bound(0) > 16 << 20
