"""
The ZMTP guard between kernels and their readers (sagecell_tw.worker.guard).

The parser on hand-made ZMTP 3 streams, fed split at every byte boundary;
the guard itself between real zmq sockets (and raw ones, to see that it
holds no more than a chunk per direction); and, against real daemons and
real forked kernels, hostile code sending one message of 300 frames of
1 MiB, or of a million empty frames, on its own iopub or shell socket: the
daemon (or, on a worker host, the spawner) stays small, the kernel is
ended with a notice its visitor reads, and other sessions work on.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest
import zmq
from support import ROOT, Daemon

from sagecell_tw import keys
from sagecell_tw.core.kernels import message_bound
from sagecell_tw.core.sessions import DAEMON_SESSION
from sagecell_tw.worker import guard as guardmod
from sagecell_tw.worker.guard import Breach, Guard, ZmtpCounter

sys.path.insert(0, os.path.join(ROOT, "bench"))

from benchlib import RawWS, execute, new_kernel  # noqa: E402


def greeting(major: int = 3, minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([major, minor]) + mechanism.ljust(20, b"\0") + b"\0" * 32


def frame(body: bytes, more: bool = False, command: bool = False, long: bool | None = None) -> bytes:
    long = len(body) > 255 if long is None else long
    flags = (guardmod.MORE if more else 0) | (guardmod.COMMAND if command else 0) | (guardmod.LONG if long else 0)
    size = struct.pack(">Q", len(body)) if long else bytes([len(body)])
    return bytes([flags]) + size + body


def message(*parts: bytes) -> bytes:
    return b"".join(frame(p, more=i < len(parts) - 1) for i, p in enumerate(parts))


def command(name: bytes, data: bytes = b"") -> bytes:
    return frame(bytes([len(name)]) + name + data, command=True)


#: a greeting, the handshake, and messages of short, long and empty frames, a
#: short frame sent as long, and a PING between two messages
STREAM = (
    greeting()
    + command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x03PUB")
    + message(b"topic", b"<IDS|MSG>", b"x" * 300, b"", b"{}")
    + command(b"PING", b"\x00\x10ctx")
    + frame(b"short but long", long=True)
    + message(b"y" * 1000)
)


def feed_split(counter: ZmtpCounter, data: bytes, at: int) -> int:
    """Feed ``data`` in two reads split at ``at``; the read (1 or 2) that raised Breach, or 0."""
    for n, part in enumerate((data[:at], data[at:]), 1):
        try:
            counter.feed(part)
        except Breach:
            return n
    return 0


def test_a_good_stream_passes_split_at_every_byte_and_byte_by_byte():
    for at in range(len(STREAM) + 1):
        counter = ZmtpCounter(limit=2000)
        assert feed_split(counter, STREAM, at) == 0, at
        assert (counter.bytes, counter.frames) == (0, 0)  # every message ended
    counter = ZmtpCounter(limit=2000)
    for i in range(len(STREAM)):
        counter.feed(STREAM[i : i + 1])
    assert (counter.bytes, counter.frames) == (0, 0)


def test_a_message_over_the_bound_is_caught_at_the_header_that_shows_it():
    # 3 frames of 400 bytes: with 64 bytes charged per frame, the third header crosses 1300.
    bad = greeting() + message(b"a" * 400, b"b" * 400, b"c" * 400)
    third = len(greeting()) + 2 * (9 + 400) + 9  # end of the third frame's (long) header
    for at in range(len(bad) + 1):
        counter = ZmtpCounter(limit=1300)
        assert feed_split(counter, bad, at) == (1 if at >= third else 2), at
    # The same bytes in messages of one frame each are fine.
    ok = greeting() + message(b"a" * 400) + message(b"b" * 400) + message(b"c" * 400)
    assert feed_split(ZmtpCounter(limit=1300), ok, 100) == 0


def test_one_long_frame_over_the_bound_is_caught_before_its_body():
    counter = ZmtpCounter(limit=1 << 20)
    counter.feed(greeting())
    with pytest.raises(Breach, match=f"a message of over {1 << 20} bytes"):
        counter.feed(b"\x02" + struct.pack(">Q", 1 << 40))


def test_empty_frames_count_by_the_overhead_and_by_number():
    counter = ZmtpCounter(limit=1 << 30)
    counter.feed(greeting() + frame(b"", more=True) * guardmod.MAX_FRAMES)
    with pytest.raises(Breach, match=f"a message of over {guardmod.MAX_FRAMES} parts"):
        counter.feed(frame(b""))
    counter = ZmtpCounter(limit=64 * 100, max_frames=10**9)
    counter.feed(greeting() + frame(b"", more=True) * 100)
    with pytest.raises(Breach, match="over 6400 bytes"):
        counter.feed(frame(b""))


def test_commands_count_as_messages_of_their_own():
    counter = ZmtpCounter(limit=1000)
    counter.feed(greeting() + command(b"PING", b"p" * 200) * 20)
    with pytest.raises(Breach):
        counter.feed(command(b"READY", b"r" * 1000))


@pytest.mark.parametrize(
    "bad, why",
    [
        (b"\x00" + greeting()[1:], "not zmq"),
        (greeting()[:9] + b"\x00" + greeting()[10:], "not zmq"),
        (greeting(major=2), "ZMTP version 2, not 3"),
        (greeting(major=4), "ZMTP version 4, not 3"),
        (greeting(mechanism=b"CURVE"), "mechanism"),
        (greeting() + b"\x08\x00", "reserved flags"),
    ],
)
def test_what_is_not_zmtp_3_null_is_refused_split_anywhere(bad, why):
    for at in range(len(bad) + 1):
        with pytest.raises(Breach, match=why):
            counter = ZmtpCounter(limit=1 << 20)
            counter.feed(bad[:at])
            counter.feed(bad[at:])


# -- the guard between real sockets -----------------------------------------------------


class Rig:
    """A guard for one "kernel" whose sockets live in ``tmp``; the test turns the guard's loop by hand."""

    def __init__(self, tmp, limit: int = 1 << 20):
        self.base = str(tmp / "base")
        os.makedirs(os.path.join(self.base, "k1", "ipc"))
        self.kernel_prefix = os.path.join(self.base, "k1", "ipc", "k")
        self.breaches: list[tuple[str, str]] = []
        self.guard = Guard(self.base, lambda kid, why: self.breaches.append((kid, why)), limit=limit)
        self.max_held = 0

    def open(self) -> str:
        info = self.guard.open({"id": "k1", "connection": {"ip": self.kernel_prefix, "key": "k", "shell_port": 1}})
        assert info["connection"]["key"] == "k"
        return info["connection"]["ip"]

    def turn(self, until, seconds: float = 10.0) -> None:
        """Service the guard until ``until()`` (bounded in time); note the most it held."""
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, "timed out"
            if select.select([self.guard.fileno()], [], [], 0.01)[0]:
                self.guard.service()
            self.max_held = max(self.max_held, self.guard.held())


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _recv(sock: zmq.Socket, got: list):
    def ready() -> bool:
        try:
            got.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return False
        return True

    return ready


def test_messages_pass_through_unchanged_both_ways_once_iopub_is_subscribed(tmp_path, ctx):
    rig = Rig(tmp_path)
    kernel_shell = ctx.socket(zmq.ROUTER)
    kernel_shell.bind(f"ipc://{rig.kernel_prefix}-1")
    kernel_iopub = ctx.socket(zmq.PUB)
    kernel_iopub.bind(f"ipc://{rig.kernel_prefix}-2")
    guarded = rig.open()
    assert guarded == os.path.join(rig.base, ".guard", "k1")
    reader = ctx.socket(zmq.DEALER)
    reader.connect(f"ipc://{guarded}-1")
    big = os.urandom(900_000)
    reader.send_multipart([b"request", big])
    got: list = []
    # Nothing reaches the kernel's shell before a subscription reached its iopub.
    wait = time.monotonic() + 0.3
    rig.turn(lambda: _recv(kernel_shell, got)() or time.monotonic() > wait)
    assert got == []
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{guarded}-2")
    rig.turn(_recv(kernel_shell, got))
    ident, *request = got.pop()
    assert request == [b"request", big]
    kernel_shell.send_multipart([ident, b"reply", big[::-1]])
    rig.turn(_recv(reader, got))
    assert got.pop() == [b"reply", big[::-1]]
    # iopub: publish until the subscription has come through the guard
    rig.turn(lambda: kernel_iopub.send_multipart([b"status", b"x" * 300]) or _recv(sub, got)())
    kernel_iopub.send_multipart([b"out", *[b""] * 50, big[:500_000]])
    rig.turn(lambda: _recv(sub, got)() and got[-1][0] == b"out")
    assert got[-1] == [b"out", *[b""] * 50, big[:500_000]]
    assert rig.breaches == [] and rig.max_held <= 2 * guardmod.CHUNK


def test_a_message_over_the_bound_cuts_the_kernel_off(tmp_path, ctx):
    rig = Rig(tmp_path, limit=1 << 20)
    kernel_iopub = ctx.socket(zmq.PUB)
    kernel_iopub.bind(f"ipc://{rig.kernel_prefix}-2")
    guarded = rig.open()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{guarded}-2")
    got: list = []
    rig.turn(lambda: kernel_iopub.send(b"hello") or _recv(sub, got)())
    chunk = b"z" * (64 << 10)
    kernel_iopub.send_multipart([chunk] * 300, copy=False)
    rig.turn(lambda: rig.breaches)
    assert rig.breaches == [("k1", f"the kernel sent a message of over {1 << 20} bytes (on iopub)")]
    assert not os.path.exists(f"{guarded}-2")  # no reconnecting to it
    assert rig.guard.kernels == {} and rig.guard.held() == 0
    time.sleep(0.2)
    with pytest.raises(zmq.Again):
        while True:
            m = sub.recv_multipart(zmq.NOBLOCK)
            assert m[0] != chunk


def test_the_guard_holds_one_chunk_per_direction_and_stops_reading(tmp_path):
    """A kernel writing fast to a reader that reads nothing: the guard holds a chunk, and waits."""
    rig = Rig(tmp_path, limit=1 << 30)
    kernel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    kernel.bind(f"{rig.kernel_prefix}-2")
    kernel.listen(1)
    guarded = rig.open()
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader.connect(f"{guarded}-2")
    reader.sendall(greeting())
    rig.turn(lambda: select.select([kernel], [], [], 0)[0])
    conn, _ = kernel.accept()
    conn.setblocking(False)
    conn.sendall(greeting())
    body = frame(b"w" * 100_000, more=True)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += conn.send(body)
        except BlockingIOError:
            if not select.select([rig.guard.fileno()], [], [], 0.05)[0]:
                break  # the guard has nothing to do: it waits on the reader
            rig.guard.service()
        rig.max_held = max(rig.max_held, rig.guard.held())
    assert sent > 4 * guardmod.CHUNK
    assert 0 < rig.guard.held() <= guardmod.CHUNK and rig.max_held <= 2 * guardmod.CHUNK
    # The reader reads: bytes flow again, unchanged.
    received = b""
    while len(received) < 64 + 2 * len(body):
        rig.turn(lambda: select.select([reader], [], [], 0)[0])
        received += reader.recv(1 << 20)
    assert received[:64] == greeting() and received[64 : 64 + len(body)] == body
    for s in (reader, conn, kernel):
        s.close()


# -- hostile kernels, real daemons ------------------------------------------------------

#: one message on the kernel's own iopub socket: a stream message's four parts,
#: then 300 buffers of 1 MiB (one buffer, sent zero-copy: cheap for the kernel)
HOSTILE_IOPUB = """
import json, time
k = get_ipython().kernel
h = json.dumps(k.session.msg_header("stream"), default=str).encode()
parent = json.dumps(k.get_parent()["header"], default=str).encode()
big = b"x" * (1 << 20)
k.session.send_raw(k.iopub_socket, [h, parent, b"{}", b'{"name": "stdout", "text": "hi"}'] + [big] * 300, copy=False)
time.sleep(30)
"""
#: one execute_reply on the kernel's own shell socket, to the daemon's
#: identity, with a million empty buffers
HOSTILE_SHELL = """
import json, time
k = get_ipython().kernel
h = json.dumps(k.session.msg_header("execute_reply"), default=str).encode()
parent = json.dumps(k.get_parent()["header"], default=str).encode()
k.session.send_raw(k.shell_stream.socket, [h, parent, b"{}", b'{"status": "ok"}'] + [b""] * 1_000_000,
                   ident=k._parent_ident["shell"])
time.sleep(30)
"""
SMALL_CAP = 64 << 10
#: the most the daemon (or a worker's spawner) may grow while a kernel sends
#: one hostile message: a message bound (about 1 MiB here) and zmq's buffers,
#: with room for the allocator; without the guard it grew by 300 MiB
GROWTH_MIB = 40


def peak_reset(pid: int) -> None:
    """Start counting ``pid``'s peak resident memory (VmHWM) from now."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def death_notice(ws: RawWS, pid: int, before: float, timeout: float = 60) -> tuple[str, float]:
    """
    The daemon's notice to ``ws``'s session that its kernel died, and how
    much ``pid`` grew (its peak) from ``before`` meanwhile; fails as soon as
    it grew by ``GROWTH_MIB``, or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        grew = mib(pid, "VmHWM") - before
        assert grew < GROWTH_MIB, f"process {pid} grew by {grew:.0f} MiB; notices so far: {seen}"
        ws.pending.extend(ws.parser.messages())
        for payload in ws.pending:
            m = json.loads(payload) if payload[:1] == b"{" else {}  # (not the binary frames of buffers)
            if m.get("header", {}).get("session") == DAEMON_SESSION and "text" in m["content"]:
                seen.append(m["content"]["text"])
                if "The kernel died" in seen[-1]:
                    time.sleep(0.5)  # whatever was on its way has arrived
                    return seen[-1], mib(pid, "VmHWM") - before
        ws.pending.clear()
        ws.sock.settimeout(0.2)
        try:
            chunk = ws.sock.recv(1 << 18)
        except TimeoutError:
            continue
        assert chunk, "the daemon closed the WebSocket"
        ws.parser.buf += chunk
    raise AssertionError(f"no notice of the kernel's death in {timeout} s; saw {seen}")


def attack(port: int, pid: int, code: str) -> tuple[str, float]:
    """A new session runs ``code``: the daemon's notice of its kernel's death, and how much ``pid`` grew meanwhile."""
    ws = RawWS(port, new_kernel(port))
    try:
        assert ws.run("1+1")[0]["status"] == "ok"
        before = mib(pid, "VmRSS")
        peak_reset(pid)
        payload, _ = execute(code, ws.session)
        ws.send(payload)
        return death_notice(ws, pid, before)
    finally:
        ws.close()


@pytest.fixture(scope="module")
def small_daemon():
    d = Daemon(pool_size=2, max_output_bytes=SMALL_CAP, max_kernels_per_client=32).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize(
    "code, reason",
    [
        (HOSTILE_IOPUB, f"the kernel sent a message of over {message_bound(SMALL_CAP)} bytes (on iopub)"),
        (HOSTILE_SHELL, f"the kernel sent a message of over {guardmod.MAX_FRAMES} parts (on shell)"),
    ],
    ids=["300 frames of 1 MiB on iopub", "a million empty frames on shell"],
)
def test_a_message_of_many_frames_ends_its_kernel_and_the_daemon_stays_small(small_daemon, code, reason):
    d = small_daemon
    bystander = RawWS(d.port, new_kernel(d.port))
    assert bystander.run("1+1")[0]["status"] == "ok"
    text, grew = attack(d.port, d.proc.pid, code)
    print(f"daemon grew by {grew:.1f} MiB")
    assert reason in text, text
    assert grew < GROWTH_MIB, grew
    reply, outputs = bystander.run("print(6 * 7)")
    bystander.close()
    assert reply["status"] == "ok"
    assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["42\n"]


@pytest.fixture(scope="module")
def worker_host():
    """A daemon without a spawner of its own and one worker host's spawner, over CurveZMQ on loopback."""
    tmp = tempfile.mkdtemp(prefix="sagecell-guard-")  # the worker account must reach its base dir
    os.chmod(tmp, 0o711)
    for who in ("daemon", "w1"):
        keys.generate(f"{tmp}/keys", who)
    os.makedirs(f"{tmp}/allowed")
    shutil.copy(f"{tmp}/keys/w1.key", f"{tmp}/allowed/")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = subprocess.Popen(
        [sys.executable, "-m", "sagecell_tw.worker.spawner", "--control", f"tcp://127.0.0.1:{port}",
         "--public-host", "127.0.0.1", "--curve-secret", f"{tmp}/keys/w1.key_secret",
         "--daemon-key", f"{tmp}/keys/daemon.key", "--name", "w1", "--base-dir", f"{tmp}/w1",
         "--pool-size", "2", "--preload", ""],
        stdout=open(f"{tmp}/w1.log", "wb"), stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True,
    )  # fmt: skip
    d = Daemon(
        "--embedded-spawner", "false", "--control", f"tcp://127.0.0.1:{port}",
        "--curve-secret-key", f"{tmp}/keys/daemon.key_secret", "--worker-keys", f"{tmp}/allowed",
        pool_size=2, max_output_bytes=SMALL_CAP, max_kernels_per_client=32,
    )  # fmt: skip
    try:
        d.start()
        yield d, worker
    finally:
        d.stop()
        if worker.poll() is None:
            worker.terminate()  # the front's own pid: it ends its fork server and kernels
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize(
    "code, reason",
    [
        # the daemon's bound, which it told the worker (its default is 17 MiB)
        (HOSTILE_IOPUB, f"the kernel sent a message of over {message_bound(SMALL_CAP)} bytes (on iopub)"),
        (HOSTILE_SHELL, f"the kernel sent a message of over {guardmod.MAX_FRAMES} parts (on shell)"),
    ],
    ids=["300 frames of 1 MiB", "a million empty frames"],
)
def test_on_a_worker_host_the_spawner_stays_small(worker_host, code, reason):
    d, worker = worker_host
    bystander = RawWS(d.port, new_kernel(d.port))
    assert bystander.run("1+1")[0]["status"] == "ok"
    assert "on w1" in d.log()  # the sessions' kernels run on the worker host
    daemon_before = mib(d.proc.pid, "VmRSS")
    peak_reset(d.proc.pid)
    text, grew = attack(d.port, worker.pid, code)
    print(f"worker's spawner grew by {grew:.1f} MiB, the daemon by {mib(d.proc.pid, 'VmHWM') - daemon_before:.1f}")
    assert reason in text, text
    assert grew < GROWTH_MIB, grew
    assert mib(d.proc.pid, "VmHWM") - daemon_before < GROWTH_MIB
    reply, outputs = bystander.run("print(6 * 7)")
    bystander.close()
    assert reply["status"] == "ok"
    assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["42\n"]


#: what a kernel tries against its guard's sockets, knowing where they are
REACH_THE_GUARD = """
import os, socket
kid = os.path.basename(os.path.dirname(os.getcwd()))
guard = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), ".guard")
tries = {
    "list": lambda: os.listdir(guard),
    "connect": lambda: socket.socket(socket.AF_UNIX).connect(f"{guard}/{kid}-2"),
    "remove": lambda: os.unlink(f"{guard}/{kid}-1"),
    "create": lambda: open(f"{guard}/{kid}-9", "w"),
    "bind": lambda: socket.socket(socket.AF_UNIX).bind(f"{guard}/x"),
}
for name, attempt in tries.items():
    try:
        attempt()
        print(name, "WORKED")
    except OSError as e:
        print(name, "refused", type(e).__name__)
"""


def test_a_kernel_cannot_reach_where_its_guard_listens(small_daemon):
    d = small_daemon
    ws = RawWS(d.port, new_kernel(d.port))
    reply, outputs = ws.run(REACH_THE_GUARD)
    ws.close()
    assert reply["status"] == "ok", reply
    text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert "WORKED" not in text and text.count("refused") == 5, text
    # ... and it is there, for the daemon.
    assert any(name.endswith("-2") for name in os.listdir(os.path.join(d.run_dir, "kernels", guardmod.DIR)))
