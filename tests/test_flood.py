"""
Issue 7: fast output that loses nothing, flood control, sessions that start at once.

Timing and flood logic with task.Clock and fakes (no sleeps): the output cap
and its notice, backpressure from a slow browser to the kernel's sockets,
the demand that makes spawners fork ahead, the fork server's pool sizing.
Real zmq where it runs here: pausing a channel, and the kernel's coalescing
OutStream on a real IOPub thread. End to end (marked slow): the cap notice
reaches the browser and the session still works; a browser that stops
reading neither grows the daemon nor loses output.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid

import pytest
import zmq
from fakes import FakeConnection, SessionsCase, wire
from support import Daemon
from twisted.internet import task
from twisted.trial import unittest

from sagecell_tw import messages
from sagecell_tw.control import transport as zmqtransport
from sagecell_tw.core.sessions import DAEMON_SESSION
from sagecell_tw.messages import Message
from sagecell_tw.worker import forkserver
from sagecell_tw.worker.pool import BUSY, MAX_BACKOFF, START_TIMEOUT, Pool


class Base(SessionsCase):
    def execute(self, session, conn) -> dict:
        req = messages.from_dict(
            {
                "channel": "shell",
                "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "session": "browser"},
                "content": {"code": "..."},
            }
        )
        self.sessions.send(session, req, conn)
        return req.header_dict

    def from_kernel(self, session, channel, msg_type, content, parent):
        msg = Message.build(channel, msg_type, content, parent, session="kernel")
        session.kernel.sockets[channel].on_message(wire(msg))

    def output(self, session, parent, text):
        self.from_kernel(session, "iopub", "stream", {"name": "stdout", "text": text}, parent)


# -- the output cap ------------------------------------------------------------------


class OutputCapTests(Base):
    def test_output_past_the_cap_is_cut_with_a_notice_and_the_rest_passes(self):
        session, conn = self.session_with_kernel()
        parent = self.execute(session, conn)
        self.from_kernel(session, "iopub", "status", {"execution_state": "busy"}, parent)
        for _ in range(5):
            self.output(session, parent, "x" * 150)  # ~190 bytes of content each
        shown_before_cap = conn.stdout()
        self.assertEqual(shown_before_cap, "x" * 750)
        self.output(session, parent, "y" * 500)  # crosses the cap: cut
        self.output(session, parent, "z" * 100)  # past the cap: dropped
        self.from_kernel(session, "iopub", "display_data", {"data": {"text/plain": "big"}, "metadata": {}}, parent)
        self.from_kernel(session, "iopub", "error", {"ename": "E", "evalue": "v", "traceback": []}, parent)
        self.from_kernel(session, "shell", "execute_reply", {"status": "ok"}, parent)
        self.from_kernel(session, "iopub", "status", {"execution_state": "idle"}, parent)

        text = conn.stdout()
        self.assertTrue(text.startswith("x" * 750 + "y"), text[:800])
        self.assertNotIn("z", text)
        self.assertLess(len(text), 1000)
        [notice] = conn.notices()
        self.assertIn("Output truncated at 1000 bytes", notice.content_dict()["text"])
        self.assertEqual(notice.parent_dict["msg_id"], parent["msg_id"])
        types = [m.msg_type for m in conn.got]
        self.assertNotIn("display_data", types)
        self.assertNotIn("error", types)  # counted as any output: past the cap, dropped
        self.assertIn("execute_reply", types)
        self.assertEqual(conn.got[-1].content_dict(), {"execution_state": "idle"})
        self.assertFalse(any(m[2:3] and b"interrupt_request" in m[2] for m in session.kernel.sockets["control"].sent))

    def test_every_output_type_counts_and_only_status_passes_past_the_cap(self):
        session, conn = self.session_with_kernel()
        parent = self.execute(session, conn)
        for _ in range(24):  # each well under the cap, together far over it
            self.from_kernel(session, "iopub", "error", {"ename": "E", "evalue": "v" * 200, "traceback": []}, parent)
        for msg_type, content in [
            ("display_data", {"data": {"text/plain": "d" * 200}, "metadata": {}}),
            ("update_display_data", {"data": {"text/plain": "u"}, "metadata": {}, "transient": {"display_id": "x"}}),
            ("execute_result", {"data": {"text/plain": "r"}, "metadata": {}, "execution_count": 1}),
            ("clear_output", {"wait": False}),
            ("execute_input", {"code": "c", "execution_count": 1}),
            ("comm_msg", {"comm_id": "c", "data": {}}),
        ]:
            self.from_kernel(session, "iopub", msg_type, content, parent)
        self.from_kernel(session, "shell", "execute_reply", {"status": "error"}, parent)
        self.from_kernel(session, "iopub", "status", {"execution_state": "idle"}, parent)
        from_kernel = [m for m in conn.got if m.header_dict.get("session") != DAEMON_SESSION]
        errors = [m for m in from_kernel if m.msg_type == "error"]
        self.assertLessEqual(sum(len(m.content) for m in errors), 1000)
        self.assertTrue(0 < len(errors) < 24)
        [notice] = conn.notices()
        self.assertIn("Output truncated at 1000 bytes", notice.content_dict()["text"])
        self.assertEqual([m.msg_type for m in from_kernel[len(errors) :]], ["execute_reply", "status"])

    def test_the_next_execution_has_its_own_budget(self):
        session, conn = self.session_with_kernel()
        first = self.execute(session, conn)
        self.output(session, first, "a" * 2000)
        self.from_kernel(session, "iopub", "status", {"execution_state": "idle"}, first)
        second = self.execute(session, conn)
        self.output(session, second, "b" * 100)
        self.assertIn("b" * 100, conn.stdout())
        self.assertEqual(len(conn.notices()), 1)

    def test_late_output_of_a_capped_execution_stays_dropped(self):
        session, conn = self.session_with_kernel()
        parent = self.execute(session, conn)
        self.output(session, parent, "a" * 2000)
        self.from_kernel(session, "iopub", "status", {"execution_state": "idle"}, parent)
        self.output(session, parent, "late")  # a thread the cell started
        self.assertNotIn("late", conn.stdout())

    def test_output_with_an_unknown_parent_counts_against_the_latest_execution(self):
        session, conn = self.session_with_kernel()
        self.execute(session, conn)
        self.output(session, {"msg_id": "elsewhere"}, "a" * 2000)
        self.output(session, {}, "b" * 10)
        self.assertEqual(len(conn.notices()), 1)
        self.assertNotIn("b", conn.stdout())


class InterruptOnCapTests(Base):
    options = {"interrupt_on_output_cap": "true"}

    def test_capped_execution_is_interrupted(self):
        session, conn = self.session_with_kernel()
        parent = self.execute(session, conn)
        self.output(session, parent, "a" * 2000)
        control = [json.loads(parts[2]) for parts in session.kernel.sockets["control"].sent]
        self.assertIn("interrupt_request", [h["msg_type"] for h in control])
        self.assertIn("interrupted", conn.notices()[0].content_dict()["text"])


class NoCapTests(Base):
    options = {"max_output_bytes": "0"}

    def test_zero_means_no_cap(self):
        session, conn = self.session_with_kernel()
        parent = self.execute(session, conn)
        self.output(session, parent, "a" * 5000)
        self.assertEqual(conn.stdout(), "a" * 5000)
        self.assertEqual(conn.notices(), [])


# -- backpressure ---------------------------------------------------------------------


class BackpressureTests(Base):
    def paused(self, kernel):
        return {c: kernel.sockets[c].paused for c in ("shell", "stdin", "iopub", "control")}

    def test_a_slow_connection_pauses_the_kernel_until_it_catches_up(self):
        session, conn = self.session_with_kernel()
        kernel = session.kernel
        self.sessions.pause(session, conn)
        self.assertEqual(self.paused(kernel), {"shell": True, "stdin": True, "iopub": True, "control": False})
        self.sessions.resume(session, conn)
        self.assertFalse(any(self.paused(kernel).values()))

    def test_kernel_stays_paused_while_any_connection_is_behind(self):
        session, conn = self.session_with_kernel()
        other = FakeConnection()
        self.sessions.connect(session, other)
        self.sessions.pause(session, conn)
        self.sessions.pause(session, other)
        self.sessions.resume(session, conn)
        self.assertTrue(session.kernel.sockets["iopub"].paused)
        self.sessions.resume(session, other)
        self.assertFalse(session.kernel.sockets["iopub"].paused)

    def test_a_slow_connection_that_goes_away_no_longer_holds_the_kernel(self):
        session, conn = self.session_with_kernel()
        self.sessions.pause(session, conn)
        self.sessions.disconnect(session, conn)
        self.assertFalse(session.kernel.sockets["iopub"].paused)

    def test_a_restarted_kernel_starts_paused_if_the_browser_is_still_behind(self):
        session, conn = self.session_with_kernel()
        self.sessions.pause(session, conn)
        self.ready_kernel()
        self.sessions.restart(session)
        self.clock.advance(0)
        self.assertEqual(session.kernel.id, f"k{self.n}")
        self.assertTrue(session.kernel.sockets["iopub"].paused)
        self.sessions.resume(session, conn)
        self.assertFalse(session.kernel.sockets["iopub"].paused)


# -- demand: spawners fork ahead for waiting sessions -----------------------------------


class DemandTests(Base):
    def test_waiting_sessions_are_reported_once_per_turn(self):
        told = []
        self.kernels.on_demand.append(told.append)
        for _ in range(3):
            self.sessions.create(f"client-{len(told)}")
        self.assertEqual(told, [])
        self.clock.advance(0)
        self.assertEqual(told, [{"python3": 3}])
        self.ready_kernel()  # goes to the first waiter
        self.clock.advance(0)
        self.assertEqual(told, [{"python3": 3}, {"python3": 2}])
        self.clock.advance(0)
        self.assertEqual(told, [{"python3": 3}, {"python3": 2}])  # unchanged: nothing sent

    def test_expired_waiters_stop_counting(self):
        told = []
        self.kernels.on_demand.append(told.append)
        self.kernels.take().addErrback(lambda f: None)
        self.clock.advance(0)
        self.clock.advance(self.kernels.wait_timeout)
        self.clock.advance(0)
        self.assertEqual(told, [{"python3": 1}, {}])


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


class ForkServerPoolTests(unittest.TestCase):
    """The fork server's pool sizing, with its fork and clock replaced."""

    def setUp(self):
        self.clock = FakeClock()
        self.patch(forkserver.time, "monotonic", self.clock.monotonic)
        config = forkserver.ForkConfig(base_dir="/nonexistent", pool_size=4, max_kernels=50, parallel_forks=2)
        self.fs = forkserver.ForkServer(None, config)
        self.fs._send = lambda msg: None
        self.forked = 0

        def fork():
            self.forked += 1
            kid = f"c{self.forked}"
            self.fs.children[kid] = forkserver.Child(kid, self.forked, "/x", "", None, self.clock.now)

        self.fs._fork = fork

    def set_ready(self, n):
        for child in [c for c in self.fs.children.values() if c.state == "starting"][:n]:
            child.state = "ready"

    def test_pool_is_filled_a_core_at_a_time(self):
        self.fs._fill_pool()
        self.assertEqual(self.forked, 2)
        self.set_ready(2)
        self.fs._fill_pool()
        self.assertEqual(self.forked, 4)
        self.set_ready(2)
        self.fs._fill_pool()
        self.assertEqual(self.forked, 4)

    def test_demand_grows_the_target_and_busy_refills_go_one_by_one(self):
        self.fs._fill_pool()
        self.set_ready(2)
        self.fs._fill_pool()
        self.set_ready(2)
        for kid in list(self.fs.children)[:4]:  # a burst takes the whole pool
            self.fs._take(kid)
        self.fs._fill_pool()
        self.assertEqual(self.forked, 5, "busy, nobody waiting: one fork for the pool")
        self.fs.pool.demand = 10
        self.fs._fill_pool()
        self.assertEqual(self.forked, 6, "sessions wait: a fork per core")
        self.set_ready(2)
        self.fs._fill_pool()
        self.assertEqual(self.forked, 8)
        self.fs.pool.demand = 0
        self.clock.now += BUSY
        self.set_ready(2)
        self.fs._fill_pool()
        # 4 ready now: the pool is full, nothing more to fork
        self.assertEqual(self.forked, 8)


# -- zmq channels pause for real -------------------------------------------------------


class FakeReactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.readers = set()

    def addReader(self, r):
        self.readers.add(r)

    def removeReader(self, r):
        self.readers.discard(r)


class ChannelPauseTests(unittest.TestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.ctx = zmqtransport.ZmqContext(self.reactor)
        self.ctx.start()
        self.addCleanup(self.ctx.shutdown)
        self.got = []
        address = f"inproc://t-{uuid.uuid4().hex}"
        self.server = self.ctx.router(address, self.got.append)
        self.client = self.ctx.factory.context.socket(zmq.DEALER)
        self.client.connect(address)
        self.addCleanup(self.client.close, 0)

    def pump(self):
        """What the reactor would do: read when told the fd is readable, run what is scheduled."""
        for _ in range(20):
            for r in list(self.reactor.readers):
                r.doRead()
            self.reactor.advance(0)

    def test_paused_channel_reads_nothing_then_everything_in_order(self):
        self.server.pause()
        for i in range(300):
            self.client.send(str(i).encode())
        self.pump()
        self.assertEqual(self.got, [])
        self.server.resume()
        self.pump()
        self.assertEqual([m[-1] for m in self.got], [str(i).encode() for i in range(300)])

    def test_a_read_turn_takes_at_most_a_batch(self):
        for i in range(zmqtransport.READ_BATCH + 10):
            self.client.send(str(i).encode())
        sock = next(iter(self.reactor.readers))
        sock.doRead()
        self.assertEqual(len(self.got), zmqtransport.READ_BATCH)
        self.reactor.advance(0)
        self.assertEqual(len(self.got), zmqtransport.READ_BATCH + 10)


# -- the kernel's OutStream, on a real IOPub thread ------------------------------------


class OutStreamTests(unittest.TestCase):
    def setUp(self):
        from ipykernel.iostream import IOPubThread
        from jupyter_client.session import Session

        from sagecell_tw.kernel import output as kernel_output

        self.ctx = zmq.Context()
        address = f"inproc://out-{uuid.uuid4().hex}"
        pub = self.ctx.socket(zmq.PUB)
        pub.bind(address)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(address)
        time.sleep(0.05)  # let the subscription reach the PUB socket
        self.session = Session(key=b"")
        self.thread = IOPubThread(pub)
        self.thread.start()
        self.out = kernel_output.OutStream(self.session, self.thread, "stdout", watchfd=False)
        self.err = kernel_output.OutStream(self.session, self.thread, "stderr", watchfd=False)

    def tearDown(self):
        # ipykernel leaves its event-pipe GC task pending at stop: end it first
        import threading

        done = threading.Event()
        self.thread.schedule(lambda: (self.thread._event_pipe_gc_task.cancel(), done.set()))
        done.wait(5)
        self.thread.stop()
        self.thread.close()
        self.sub.close(0)
        self.ctx.term()

    def received(self, until: str, timeout: float = 10.0) -> list[tuple[str, str]]:
        """(stream name, text) of each stream message until ``until`` has arrived."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sub.poll(100):
                continue
            frames = self.sub.recv_multipart()
            _idents, msg = self.session.feed_identities(frames)
            content = self.session.deserialize(msg)["content"]
            got.append((content["name"], content["text"]))
            if until in content["text"]:
                return got
        raise AssertionError(f"{until!r} never arrived; got {got[-3:]}")

    def test_write_and_flush_loop_is_complete_in_order_and_coalesced(self):
        for i in range(5000):
            self.out.write(f"{i}\n")
            self.out.flush()
        self.out.write("end\n")
        self.out._flush_now()
        got = self.received("end")
        self.assertEqual("".join(t for _n, t in got), "".join(f"{i}\n" for i in range(5000)) + "end\n")
        self.assertLess(len(got), 1000, "flushes within a few ms share a message")

    def test_flushes_keep_their_order_across_stdout_and_stderr(self):
        for i in range(300):
            stream = self.out if i % 3 else self.err
            stream.write(f"{i}\n")
            stream.flush()
        self.err.write("end\n")
        self.err._flush_now()
        got = self.received("end")
        lines = [(name, line) for name, text in got for line in text.splitlines()]
        self.assertEqual([int(line) for _n, line in lines[:-1]], list(range(300)))
        self.assertTrue(all((name == "stderr") == (int(line) % 3 == 0) for name, line in lines[:-1]))

    def test_a_flush_with_nothing_written_costs_nothing(self):
        self.out.flush()
        t0 = time.perf_counter()
        for _ in range(1000):
            self.out.flush()
        self.assertLess(time.perf_counter() - t0, 0.05)


# -- end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_cap_notice_reaches_the_browser_and_the_session_works_after():
    sys.path.insert(0, _bench_dir())
    from benchlib import RawWS, new_kernel

    d = Daemon(pool_size=1, max_output_bytes="200k").start()
    try:
        ws = RawWS(d.port, new_kernel(d.port))
        reply, outputs = ws.run("for i in range(100000):\n    print(i)")
        assert reply["status"] == "ok"
        notices = [m["content"]["text"] for m in outputs if m["header"].get("session") == DAEMON_SESSION]
        assert len(notices) == 1 and "Output truncated at 204800 bytes" in notices[0], notices
        shown = "".join(
            m["content"]["text"]
            for m in outputs
            if m["msg_type"] == "stream" and m["header"].get("session") != DAEMON_SESSION
        )
        assert "".join(f"{i}\n" for i in range(100000)).startswith(shown) and 150_000 < len(shown) <= 204_800
        assert outputs[-1]["msg_type"] == "status" and outputs[-1]["content"]["execution_state"] == "idle"
        reply, outputs = ws.run("print('still here'); 6*7")
        assert reply["status"] == "ok"
        assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["still here\n"]
        assert [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"] == ["42"]
        ws.close()
    finally:
        d.stop()


@pytest.mark.slow
def test_a_browser_that_stops_reading_pins_little_and_loses_nothing():
    sys.path.insert(0, _bench_dir())
    from benchlib import RawWS, execute, new_kernel, rss_mib

    d = Daemon(pool_size=2, max_output_bytes="1G").start()
    try:
        ws = RawWS(d.port, new_kernel(d.port))
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        ws.run("1+1")
        other = RawWS(d.port, new_kernel(d.port))
        other.run("1+1")
        rss0 = rss_mib(d.proc.pid)
        n = 1_500_000
        payload, mid = execute(f"for i in range({n}):\n    print(i)", ws.session)
        ws.send(payload)
        peak = rss0
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # this browser reads nothing meanwhile
            peak = max(peak, rss_mib(d.proc.pid))
            assert other.run("1+1", timeout=10)[0]["status"] == "ok"
        reply, outputs = ws.wait(mid, timeout=300)
        text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        assert text == "".join(f"{i}\n" for i in range(n))
        assert peak - rss0 < 30, (rss0, peak)
    finally:
        d.stop()


def _bench_dir() -> str:
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


# -- the pool as decisions given now (worker/pool.py) ----------------------------------------


def test_pool_forks_towards_its_target_a_core_at_a_time():
    pool = Pool(pool_size=4, parallel_forks=2, max_kernels=50)
    assert pool.forks(ready=0, starting=0, children=0, now=100.0) == 2
    assert pool.forks(ready=0, starting=2, children=2, now=100.0) == 0  # both cores busy forking
    assert pool.forks(ready=3, starting=0, children=3, now=100.0) == 1
    assert pool.forks(ready=4, starting=0, children=4, now=100.0) == 0
    assert pool.forks(ready=0, starting=0, children=50, now=100.0) == 0  # max_kernels


def test_pool_after_a_take_forks_one_by_one_unless_sessions_wait():
    pool = Pool(pool_size=4, parallel_forks=2, max_kernels=50)
    pool.took(100.0)
    assert pool.forks(ready=0, starting=0, children=4, now=100.0 + BUSY / 2) == 1
    pool.wanted_by(10)
    assert pool.forks(ready=0, starting=0, children=4, now=100.0 + BUSY / 2) == 2
    assert pool.forks(ready=0, starting=0, children=4, now=100.0 + BUSY) == 2
    pool.wanted_by("junk")
    assert pool.demand == 0


def test_pool_backs_off_after_deaths_while_starting():
    pool = Pool(pool_size=1, parallel_forks=1, max_kernels=5)
    pool.died_starting(100.0)
    pool.died_starting(100.0)
    assert pool.forks(0, 0, 0, now=100.0 + 0.39) == 0
    assert pool.forks(0, 0, 0, now=100.0 + 0.4) == 1
    for _ in range(20):
        pool.died_starting(200.0)
    assert pool.next_fork == 200.0 + MAX_BACKOFF
    pool.ready()
    assert pool.failures == 0


def test_pool_says_when_a_start_is_overdue():
    assert not Pool.overdue(10.0, 10.0 + START_TIMEOUT)
    assert Pool.overdue(10.0, 10.0 + START_TIMEOUT + 0.01)
