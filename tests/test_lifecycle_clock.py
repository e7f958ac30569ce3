"""
Timing logic of kernels and sessions, driven by task.Clock: no sleeps, no processes.

The zmq side is a fake that records what would have been sent; the spawner a
fake that records takes and kills.
"""

import json

from fakes import FakeConnection, FakeSpawner, FakeZmq, iopub_welcome, kernel_info, publish, warm_up_request, wire
from twisted.internet import task
from twisted.trial import unittest

from sagecell_tw import config as configmod
from sagecell_tw import messages
from sagecell_tw.core.hold import MAX_HELD_BYTES, IopubHold
from sagecell_tw.core.kernels import NUDGE_INTERVAL, NUDGE_TRIES, KernelManager, NoKernelAvailable
from sagecell_tw.core.limits import KILL_AFTER_INTERRUPT, Execution, Lifetimes, OutputCap
from sagecell_tw.core.probation import MAX_EARLY_DEATHS
from sagecell_tw.core.sessions import LimitExceeded, SessionManager
from sagecell_tw.messages import Message


def info(n):
    """Kernel ``k{n}``; its key, "secret", is what the daemon must sign with."""
    return kernel_info(f"k{n}", pid=1000 + n, key="secret")


class Base(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.zmq = FakeZmq()
        self.spawner = FakeSpawner()
        self.config = configmod.build(
            {},
            {
                "exec_timeout": "10",
                "idle_timeout": "100",
                "disconnect_timeout": "30",
                "max_lifetime": "1000",
                "max_kernels_per_client": "2",
                "max_kernels": "3",
                "pool_size": "1",
            },
        )
        self.kernels = KernelManager(
            self.zmq, self.clock, self.config.max_kernels, shutdown_grace=1.0, wait_timeout=5.0
        )
        self.sessions = SessionManager(self.kernels, self.config, self.clock)

    def ready(self, n):
        self.kernels.kernel_ready(info(n), self.spawner)
        kernel = self.kernels.kernels[f"k{n}"]
        iopub_welcome(kernel)
        return kernel


class KernelManagerTests(Base):
    def test_new_kernel_is_nudged_until_iopub_answers(self):
        self.kernels.kernel_ready(info(1), self.spawner)
        kernel = self.kernels.kernels["k1"]
        self.assertEqual(kernel.state, "warming")
        self.assertEqual(len(self.kernels.pool), 0)
        shell = kernel.sockets["shell"]
        self.assertEqual(len(shell.sent), 1)
        self.clock.pump([NUDGE_INTERVAL] * 3)
        self.assertEqual(len(shell.sent), 4)
        self.assertIn(b"kernel_info_request", shell.sent[-1][2])
        iopub_welcome(kernel)
        self.assertEqual(kernel.state, "pooled")
        self.assertEqual(list(self.kernels.pool), [kernel])
        self.clock.advance(1)
        self.assertEqual(len(shell.sent), 5)  # four nudges and the warm-up, then nothing

    def test_new_kernel_warms_up_silently_before_it_is_pooled(self):
        self.kernels.kernel_ready(info(1), self.spawner)
        kernel = self.kernels.kernels["k1"]
        publish(kernel, messages.status("busy", "k"))  # iopub is live
        req = warm_up_request(kernel)
        content = req.content_dict()
        self.assertTrue(content["silent"])
        self.assertFalse(content["store_history"])
        # Its busy status, and the idle of something else, do not pool it.
        publish(kernel, messages.status("busy", "k", {"msg_id": req.msg_id}))
        publish(kernel, messages.status("idle", "k", {"msg_id": "other"}))
        self.assertEqual(kernel.state, "warming")
        self.clock.advance(NUDGE_INTERVAL * 10)
        self.assertEqual(len(kernel.sockets["shell"].sent), 2)  # no nudges once iopub answered
        publish(kernel, messages.status("idle", "k", {"msg_id": req.msg_id}))
        self.assertEqual(kernel.state, "pooled")
        self.assertEqual(list(self.kernels.pool), [kernel])

    def test_a_kernel_knows_its_iopub_is_live_once_it_delivered(self):
        self.kernels.kernel_ready(info(1), self.spawner)
        kernel = self.kernels.kernels["k1"]
        self.clock.pump([NUDGE_INTERVAL] * 3)
        self.assertFalse(kernel.iopub_live)
        iopub_welcome(kernel)
        self.assertTrue(kernel.iopub_live)

    def test_kernel_whose_warm_up_never_ends_is_pooled_anyway(self):
        self.kernels.kernel_ready(info(1), self.spawner)
        kernel = self.kernels.kernels["k1"]
        publish(kernel, messages.status("idle", "k"))
        self.clock.advance(NUDGE_INTERVAL * NUDGE_TRIES - 0.01)
        self.assertEqual(kernel.state, "warming")
        self.clock.advance(0.02)
        self.assertEqual(kernel.state, "pooled")

    def test_take_waits_for_a_kernel_then_times_out(self):
        d = self.kernels.take()
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, NoKernelAvailable)

    def test_waiter_gets_the_next_warm_kernel(self):
        d = self.kernels.take()
        kernel = self.ready(1)
        self.assertIs(self.successResultOf(d), kernel)
        self.assertEqual(self.spawner.taken, ["k1"])
        self.assertEqual(kernel.state, "assigned")

    def test_shutdown_asks_then_kills_after_grace(self):
        kernel = self.ready(1)
        self.successResultOf(self.kernels.take())
        d = self.kernels.shutdown(kernel, "bye")
        control = kernel.sockets["control"].sent
        self.assertIn(b"shutdown_request", control[-1][2])
        self.clock.advance(0.9)
        self.assertEqual(self.spawner.killed, [])
        self.clock.advance(0.2)
        self.assertEqual(self.spawner.killed, [("k1", "bye")])
        self.assertNoResult(d)
        self.kernels.kernel_dead("k1", "killed")
        self.assertEqual(self.successResultOf(d), "bye")
        self.assertTrue(all(s.closed for s in kernel.sockets.values()))

    def test_kernel_that_exits_in_grace_is_not_killed(self):
        kernel = self.ready(1)
        self.successResultOf(self.kernels.take())
        self.kernels.shutdown(kernel, "bye")
        self.kernels.kernel_dead("k1", "exited")
        self.clock.advance(5)
        self.assertEqual(self.spawner.killed, [])


class SessionTimingTests(Base):
    def connect(self):
        self.ready(1)
        session = self.sessions.create("1.2.3.4")
        conn = FakeConnection()
        self.sessions.connect(session, conn)
        return session, conn

    def test_disconnected_session_ends_after_timeout(self):
        session, conn = self.connect()
        self.sessions.start()
        self.sessions.disconnect(session, conn)
        self.clock.advance(29)
        self.assertIs(self.sessions.get(session.id), session)
        self.clock.advance(2)
        self.assertIsNone(self.sessions.get(session.id))

    def test_idle_session_ends_and_says_why(self):
        session, conn = self.connect()
        self.sessions.start()
        self.clock.pump([1] * 101)
        self.assertIsNone(self.sessions.get(session.id))
        self.assertIn("idle for 100 s", conn.texts())
        self.assertEqual(conn.states()[-1], "dead")
        self.assertIsNotNone(conn.closed_for)

    def test_long_execution_is_interrupted_then_restarted(self):
        session, conn = self.connect()
        kernel = session.kernel
        self.sessions.start()
        req = messages.Message.build("shell", "execute_request", {"code": "while True: pass"}, session="browser")
        self.sessions.send(session, req, conn)
        self.clock.pump([1] * 10)
        control = kernel.sockets["control"].sent
        self.assertTrue(any(b"interrupt_request" in parts[2] for parts in control))
        self.assertIn("longer than the limit of 10 s", conn.texts())
        self.ready(2)
        self.clock.pump([1] * int(KILL_AFTER_INTERRUPT + 1))
        self.assertIn("did not stop when interrupted", conn.texts())
        self.assertIsNot(session.kernel, kernel)
        self.assertEqual(kernel.state, "dying")
        # The daemon restarted it on its own: Jupyter clients hear an auto-restart.
        self.assertEqual(conn.states()[-3:], ["restarting", "starting", "idle"])

    def test_by_default_an_execution_is_interrupted_after_30_s_as_on_sagemathcell(self):
        self.sessions = SessionManager(self.kernels, configmod.build({}, {}), self.clock)
        session, conn = self.connect()
        self.sessions.start()
        req = messages.Message.build("shell", "execute_request", {"code": "while True: pass"}, session="browser")
        self.sessions.send(session, req, conn)
        self.clock.pump([1] * 29)
        self.assertNotIn("longer than the limit", conn.texts())
        self.clock.pump([1])
        self.assertIn("longer than the limit of 30 s", conn.texts())

    def test_requested_restart_is_not_announced_as_an_auto_restart(self):
        # @jupyterlab/services takes status "restarting" for "the kernel died
        # and the server restarted it" (JupyterLab: "appears to have died").
        session, conn = self.connect()
        kernel = session.kernel
        d = self.sessions.restart(session)
        self.ready(2)
        self.assertIs(self.successResultOf(d), session)
        self.assertIsNot(session.kernel, kernel)
        self.assertEqual(conn.states()[-2:], ["starting", "idle"])
        self.assertNotIn("restarting", conn.states())

    def test_per_client_and_overall_limits(self):
        self.sessions.create("a")
        self.sessions.create("a")
        with self.assertRaises(LimitExceeded) as e:
            self.sessions.create("a")
        self.assertEqual(e.exception.status, 429)
        self.sessions.create("b")
        with self.assertRaises(LimitExceeded) as e:
            self.sessions.create("c")
        self.assertEqual(e.exception.status, 503)

    def test_message_without_kernel_waits_and_is_delivered(self):
        session = self.sessions.create("1.2.3.4")
        conn = FakeConnection()
        self.sessions.connect(session, conn)
        req = messages.Message.build("shell", "execute_request", {"code": "1"}, session="browser")
        self.sessions.send(session, req, conn)
        self.assertEqual(len(session.pending), 1)
        kernel = self.ready(1)
        self.assertIs(session.kernel, kernel)
        shell = kernel.sockets["shell"].sent
        self.assertIn(b"execute_request", shell[-1][2])
        # signed with the kernel's key, never the browser's
        header, parent, meta, content = shell[-1][2:6]
        self.assertEqual(shell[-1][1], messages.Signer("secret").sign([header, parent, meta, content]))
        self.assertEqual(json.loads(content)["code"], "1")

    def execute(self, session, conn, code="1"):
        """The browser asks for an execution, and the kernel starts it (busy, with it for parent)."""
        req = messages.Message.build("shell", "execute_request", {"code": code}, session="browser")
        self.sessions.send(session, req, conn)
        publish(session.kernel, messages.status("busy", "k", req.header_dict))
        return req

    def sent_to(self, kernel, msg_type):
        """The msg_ids of ``msg_type`` requests the daemon sent ``kernel`` on shell."""
        return [
            m.msg_id
            for m in (messages.from_wire("shell", parts) for parts in kernel.sockets["shell"].sent)
            if m.msg_type == msg_type and m.header_dict.get("session") == "browser"
        ]

    def test_dead_kernel_is_reported(self):
        session, conn = self.connect()
        self.execute(session, conn, "x = 1")
        self.kernels.kernel_dead("k1", "the kernel was killed by SIGKILL")
        self.assertEqual(conn.states()[-1], "dead")
        self.assertIn("SIGKILL", conn.texts())
        self.assertIsNone(session.kernel)

    def test_kernel_dead_before_running_anything_is_replaced_and_asked_again(self):
        # A kernel handed out as its spawner died: it never answers.
        session, conn = self.connect()
        first = session.kernel
        info_req = messages.Message.build("shell", "kernel_info_request", {}, session="browser")
        self.sessions.send(session, info_req, conn)
        exec_req = messages.Message.build("shell", "execute_request", {"code": "print(1)"}, session="browser")
        self.sessions.send(session, exec_req, conn)
        self.kernels.kernel_dead("k1", "the kernel ended while no spawner watched it")
        # Nothing is reported: the session lost nothing, and waits for the next kernel.
        self.assertEqual(conn.notices(), [])
        self.assertNotIn("dead", conn.states())
        self.assertEqual([m.msg_id for m, _ in session.pending], [info_req.msg_id, exec_req.msg_id])
        second = self.ready(2)
        self.assertIs(session.kernel, second)
        self.assertIsNot(second, first)
        self.assertEqual(self.sent_to(second, "kernel_info_request"), [info_req.msg_id])
        self.assertEqual(self.sent_to(second, "execute_request"), [exec_req.msg_id])

    def test_only_unanswered_requests_go_to_the_fresh_kernel(self):
        session, conn = self.connect()
        info_req = messages.Message.build("shell", "kernel_info_request", {}, session="browser")
        self.sessions.send(session, info_req, conn)
        reply = messages.Message.build("shell", "kernel_info_reply", {"status": "ok"}, info_req.header_dict)
        session.kernel.sockets["shell"].on_message(wire(reply))
        self.assertEqual(conn.got[-1].msg_type, "kernel_info_reply")
        self.kernels.kernel_dead("k1", "gone")
        self.assertNotIn("dead", conn.states())
        second = self.ready(2)
        self.assertIs(session.kernel, second)
        self.assertEqual(self.sent_to(second, "kernel_info_request"), [])

    def test_early_deaths_in_a_row_are_reported_after_a_few(self):
        session, conn = self.connect()
        for n in range(2, 2 + MAX_EARLY_DEATHS):
            self.kernels.kernel_dead(session.kernel.id, "died at once")
            self.assertNotIn("dead", conn.states())
            self.ready(n)
        self.kernels.kernel_dead(session.kernel.id, "died at once")
        self.assertEqual(conn.states()[-1], "dead")
        self.assertIn("died at once", conn.texts())

    def test_kernel_dead_early_with_none_to_be_had_says_so(self):
        session, conn = self.connect()
        info_req = messages.Message.build("shell", "kernel_info_request", {}, session="browser")
        self.sessions.send(session, info_req, conn)
        self.kernels.kernel_dead("k1", "gone")
        self.clock.advance(5.1)  # the kernel manager's wait_timeout
        refusal = conn.got[-3]
        self.assertEqual((refusal.msg_type, refusal.parent_dict["msg_id"]), ("kernel_info_reply", info_req.msg_id))
        self.assertEqual(refusal.content_dict()["status"], "error")
        self.assertIn("no kernel became ready", conn.notices()[-1].content_dict()["text"])
        self.assertEqual(conn.states()[-1], "dead")
        # The next request is unroutable again: it takes a kernel as soon as there is one.
        self.sessions.send(session, messages.Message.build("shell", "kernel_info_request", {}, session="browser"), conn)
        kernel = self.ready(2)
        self.assertIs(session.kernel, kernel)
        self.assertEqual(conn.states()[-1], "idle")


# -- the limits as plain decisions (core/limits.py) ------------------------------------------------


def _stream(text: str, parent_id: str) -> Message:
    return Message.build("iopub", "stream", {"name": "stdout", "text": text}, {"msg_id": parent_id})


def test_output_cap_passes_cuts_then_drops():
    cap, outputs = OutputCap(100), {}
    cap.started(outputs, Execution("e1", 0.0))
    assert cap.judge(outputs, _stream("x" * 10, "e1"), {"msg_id": "e1"}).passes
    crossing = cap.judge(outputs, _stream("y" * 200, "e1"), {"msg_id": "e1"})
    assert not crossing.passes and crossing.crossed and crossing.kept is not None
    assert len(crossing.kept.content) <= 100
    after = cap.judge(outputs, _stream("z", "e1"), {"msg_id": "e1"})
    assert not after.passes and not after.crossed
    status = Message.build("iopub", "status", {"execution_state": "idle"}, {"msg_id": "e1"})
    assert cap.judge(outputs, status, {"msg_id": "e1"}).passes  # its state still reaches the browser
    assert outputs["e1"].dropped_bytes > 0


def test_output_with_no_known_parent_counts_against_the_latest_execution():
    cap, outputs = OutputCap(50), {}
    cap.started(outputs, Execution("old", 0.0))
    cap.started(outputs, Execution("new", 1.0))
    assert not cap.judge(outputs, _stream("q" * 80, "?"), {}).passes
    assert outputs["new"].capped and not outputs["old"].capped


def test_lifetimes_at_a_given_now():
    config = configmod.build(
        options={"idle-timeout": 10, "max-lifetime": 100, "disconnect-timeout": 5, "exec-timeout": 3}
    )
    lifetimes = Lifetimes(config)
    session = type("S", (), {"created": 0.0, "last_activity": 0.0, "disconnected_since": None, "executions": {}})()
    assert lifetimes.end_reason(session, 9.9) is None
    assert "idle" in lifetimes.end_reason(session, 10.0)
    session.executions = {"e": Execution("e", 0.0)}
    assert lifetimes.end_reason(session, 50.0) is None  # running code is not idle
    assert "lifetime" in lifetimes.end_reason(session, 100.0)
    session.disconnected_since = 1.0
    assert "browser" in lifetimes.end_reason(session, 6.0)
    ex = session.executions["e"]
    assert not lifetimes.must_interrupt(ex, 2.9) and lifetimes.must_interrupt(ex, 3.0)
    ex.interrupted_at = 3.0
    assert not lifetimes.must_interrupt(ex, 4.0)
    assert not lifetimes.must_restart(ex, 3.0 + KILL_AFTER_INTERRUPT - 0.1)
    assert lifetimes.must_restart(ex, 3.0 + KILL_AFTER_INTERRUPT)


def test_iopub_hold_keeps_order_and_lets_a_late_batch_go_once():
    hold = IopubHold()
    idle = _stream("idle", "e1")
    assert not hold.keep(idle, 10)  # not holding: send it
    batch = hold.begin(idle, 10)
    after = _stream("after", "e2")
    assert hold.keep(after, 10) and hold.holding
    assert hold.release(batch) == [idle, after] and not hold.holding
    assert hold.release(batch) == []  # already out: nothing twice


def test_iopub_hold_lets_everything_go_past_its_bound():
    hold = IopubHold()
    batch = hold.begin(_stream("idle", "e1"), 10)
    assert not hold.keep(_stream("big", "e1"), MAX_HELD_BYTES)
    assert len(hold.let_go()) == 1 and hold.release(batch) == []
