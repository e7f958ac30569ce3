"""
A WebSocket that drops and comes back, on a task.Clock: the session waits
--disconnect-timeout for it, and what was delivered meanwhile is replayed to
the same Jupyter client session (``?session_id=``), exactly after its
``?last_msg_id=``, bounded by --replay-bytes with a notice past it.
(End to end, through nginx and in Chromium: tests/test_proxy.py,
tests/browser/test_prefix_embed.py.)
"""

from __future__ import annotations

from fakes import FakeConnection, SessionsCase, publish

from sagecell_tw import messages
from sagecell_tw.core.replay import ENTRY_COST, Journal
from sagecell_tw.messages import Message


class Socket(FakeConnection):
    """A connection of Jupyter client session ``sid``, as websocket.KernelWebSocket names it."""

    def __init__(self, sid: str, last_msg_id: str | None = None):
        super().__init__()
        self.session_id = sid
        self.last_msg_id = last_msg_id
        self.client_sessions = {sid}


def line(i: int, parent: dict, width: int = 0) -> Message:
    return messages.stream(f"{i}".ljust(width) + "\n", "k", parent, name="stdout")


def numbers(conn: FakeConnection) -> list[int]:
    return [int(x) for x in conn.stdout().split()]


class Reconnect(SessionsCase):
    options = {
        "replay_bytes": "64k",
        "disconnect_timeout": "60",
        "exec_timeout": "1000",
        "idle_timeout": "1000",
        "max_output_bytes": "0",
    }

    def setUp(self):
        super().setUp()
        self.kernel = self.ready_kernel()
        self.session = self.sessions.create("client")
        self.first = Socket("tab")
        self.sessions.connect(self.session, self.first)
        req = Message.build("shell", "execute_request", {"code": "loop()"}, session="tab")
        self.sessions.send(self.session, req, self.first)
        self.parent = req.header_dict

    def out(self, lo: int, hi: int, width: int = 0) -> None:
        for i in range(lo, hi):
            publish(self.kernel, line(i, self.parent, width))

    def away(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sessions.sweep()

    def test_output_made_while_away_is_replayed_within_the_disconnect_timeout(self):
        self.out(0, 5)
        self.sessions.disconnect(self.session, self.first)
        self.out(5, 10)
        self.away(59)
        self.assertFalse(self.session.closed)
        back = Socket("tab")
        self.sessions.connect(self.session, back)
        self.assertEqual(numbers(self.first), [0, 1, 2, 3, 4])
        self.assertEqual(numbers(back), [5, 6, 7, 8, 9])
        self.assertEqual(back.states()[-1], self.session.execution_state)  # the present state comes last
        self.assertEqual(back.notices(), [])
        self.out(10, 12)
        self.assertEqual(numbers(back), list(range(5, 12)))

    def test_the_session_ends_when_nobody_comes_back_in_time(self):
        self.sessions.disconnect(self.session, self.first)
        self.away(59.5)
        self.assertFalse(self.session.closed)
        self.away(1)
        self.assertTrue(self.session.closed)

    def test_a_reconnect_resets_the_disconnect_timeout(self):
        self.sessions.disconnect(self.session, self.first)
        self.away(50)
        back = Socket("tab")
        self.sessions.connect(self.session, back)
        self.away(50)
        self.sessions.disconnect(self.session, back)
        self.away(59)
        self.assertFalse(self.session.closed)
        self.away(1)
        self.assertTrue(self.session.closed)

    def test_last_msg_id_replays_exactly_what_came_after_it_even_what_was_lost_in_flight(self):
        self.out(0, 5)
        seen = self.first.got[-1].msg_id
        self.out(5, 8)  # written to a socket whose network had gone: the browser never read these
        self.sessions.disconnect(self.session, self.first)
        self.out(8, 10)
        back = Socket("tab", last_msg_id=seen)
        self.sessions.connect(self.session, back)
        self.assertEqual(numbers(back), [5, 6, 7, 8, 9])

    def test_a_reply_is_replayed_to_the_client_session_it_answers_only(self):
        other = Socket("other-tab")
        self.sessions.connect(self.session, other)
        self.sessions.disconnect(self.session, self.first)
        self.sessions.disconnect(self.session, other)
        reply = Message.build("shell", "execute_reply", {"status": "ok"}, self.parent, "k")
        self.kernel.sockets["shell"].on_message([b"", messages.DELIM, b"", reply.header, reply.parent, b"{}", b"{}"])
        mine, theirs = Socket("tab"), Socket("other-tab")
        self.sessions.connect(self.session, mine)
        self.sessions.connect(self.session, theirs)
        self.assertIn("execute_reply", [m.msg_type for m in mine.got])
        self.assertNotIn("execute_reply", [m.msg_type for m in theirs.got])

    def test_a_new_client_session_is_replayed_nothing(self):
        self.out(0, 3)
        newcomer = Socket("new-tab")
        self.sessions.connect(self.session, newcomer)
        self.assertEqual(numbers(newcomer), [])

    def test_past_the_bound_the_oldest_goes_and_the_client_is_told(self):
        self.sessions.disconnect(self.session, self.first)
        self.out(0, 200, width=1000)  # ~250 kB of output against 64 kB kept
        back = Socket("tab")
        self.sessions.connect(self.session, back)
        got = numbers(back)
        self.assertEqual(got, list(range(200 - len(got), 200)))  # the newest, in order, without a hole
        self.assertGreater(len(got), 20)
        self.assertLess(len(got), 100)
        (notice,) = back.notices()
        text = notice.content_dict()["text"]
        self.assertIn("could not be kept", text)
        self.assertIn(f"{200 - len(got)} messages", text)
        self.assertIn(f"the last {64 << 10} bytes per session", text)
        self.assertLess(back.got.index(notice), [m.msg_type for m in back.got].index("stream", 1) + 1)

    def test_a_new_connection_of_the_same_client_session_replaces_a_stale_one(self):
        back = Socket("tab")
        self.sessions.connect(self.session, back)
        self.assertIsNotNone(self.first.closed_for)
        self.assertEqual(self.session.connections, {back})
        self.sessions.disconnect(self.session, self.first)  # the stale one's close, arriving later
        self.out(0, 3)
        self.assertEqual(numbers(back), [0, 1, 2])
        self.assertEqual(self.session.journal.parked, {})  # not taken for gone: it is connected


class NoReplay(SessionsCase):
    options = {"replay_bytes": "0"}

    def test_replay_bytes_zero_keeps_nothing(self):
        kernel = self.ready_kernel()
        session = self.sessions.create("client")
        first = Socket("tab")
        self.sessions.connect(session, first)
        self.assertIsNone(session.journal)
        self.sessions.disconnect(session, first)
        publish(kernel, line(1, {}))
        back = Socket("tab")
        self.sessions.connect(session, back)
        self.assertEqual(numbers(back), [])


class JournalBound(SessionsCase):
    def test_the_journal_never_holds_more_than_its_limit(self):
        journal = Journal(10_000)
        for i in range(1000):
            journal.record(line(i, {}), 500)
            self.assertLessEqual(journal.bytes, 10_000)
        self.assertEqual(len(journal.entries), 10_000 // (500 + ENTRY_COST))
