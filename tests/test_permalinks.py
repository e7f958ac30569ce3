# -*- test-case-name: tests.test_permalinks -*-
"""
Tests for ``sagecell_tw.core.permalinks`` (and its two back ends,
``permalink_sqlite`` and ``permalink_postgres``) and ``sagecell_tw.web.permalinks``.

The store's contract (``StoreContract``) runs against both back ends: real
SQLite files in a temporary directory, and a real PostgreSQL server (one per
test session, the ``postgres`` fixture; a fresh schema per test). The HTTP
tests run a real ``Site`` on ``tcp:0`` and talk to it with ``Agent``, so form
parsing, status codes and headers are what a browser would see.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import string
import tempfile
import tracemalloc
import uuid
import zlib
from io import BytesIO
from typing import Any
from urllib.parse import urlencode

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from sagecell_tw.core.permalinks import (
    MIGRATIONS,
    RETRY_AFTER,
    SCHEMA_VERSION,
    PermalinkStore,
    PermalinkStoreClosed,
    PermalinkStoreError,
    PermalinkStoreFull,
    PermalinkStoreUnavailable,
    SchemaVersionError,
    open_store,
)
from sagecell_tw.web.permalinks import (
    PermalinkResource,
    RateLimit,
    decode_zip,
    encode_zip,
)

URLSAFE = set(string.ascii_letters + string.digits + "-_")

#: A file made by sagecell_tw before the schema version table (schema 1, the
#: version in PRAGMA user_version only), through its own PermalinkStore with a
#: Clock at 1_700_000_000: three permalinks stored 60 s apart, the first then
#: fetched once. Its ids and contents:
V1_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "permalinks-v1.sqlite3")
V1_ROWS = {
    "4SwivvFFmRO6lXuwAvO9Hg": ['print("héllo")\n\x00# NUL and non-ASCII survive\n', "python", "[]"],
    "XuRNlhI8jCdxBVmIEnEZNg": ["plot(sin(x), (x, 0, pi))", "sage", '[{"state": {"n": 3}}]'],
    "AHDjhkgGj4EMeu74ev7DGg": ["1+1", "python", "[]"],
}


def _random_text(n: int) -> str:
    """Text no database compresses: what the size cap counts is then what was stored."""
    return base64.b64encode(os.urandom(n)).decode()[:n]


class LogEvents:
    """Collect the log events of a test (the store's sentences about its database)."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def matching(self, words: str) -> list[dict]:
        return [e for e in self.events if words in e.get("log_format", "")]


class SQLiteStores:
    """Stores on fresh SQLite files; ``query`` reads a file straight, bypassing the store."""

    dialect = "sqlite"

    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that litters the working directory.
        self.dir = tempfile.mkdtemp(prefix="sagecell-permalinks-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.path = self.where = os.path.join(self.dir, "permalinks.sqlite")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def other_where(self) -> str:
        return os.path.join(self.dir, f"other-{uuid.uuid4().hex}.sqlite")

    def query(self, sql: str, params: tuple = (), where: str | None = None) -> list:
        conn = sqlite3.connect(where or self.where, isolation_level=None)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def table_exists(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)))

    def make_store(self, where: str | None = None, **kw: Any) -> PermalinkStore:
        store = open_store(where or self.where, reactor, self.clock, **kw)
        self.addCleanup(store.close)
        return store


@pytest.fixture(scope="class")
def _postgres_for_class(request, postgres):
    request.cls.pg = postgres


@pytest.mark.usefixtures("_postgres_for_class")
class PostgresStores(SQLiteStores):
    """Stores in fresh schemas of the session's PostgreSQL server; ``query`` goes straight to it."""

    dialect = "postgresql"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.where = self.pg.new_schema()

    def other_where(self) -> str:
        return self.pg.new_schema()

    def query(self, sql: str, params: tuple = (), where: str | None = None) -> list:
        import psycopg

        with psycopg.connect(where or self.where, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description else []

    def table_exists(self, name: str) -> bool:
        return self.query("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0]


class StoreContract:
    """What every back end does the same: round trips, restarts, clocks, ids, dedup, caps and schema."""

    @defer.inlineCallbacks
    def test_round_trip(self):
        store = self.make_store()
        code = 'print("héllo")\n\x00# NUL and non-ASCII survive\n'
        ident = yield store.store(code, "python", '[{"state": {}}]')
        row = yield store.fetch(ident)
        self.assertEqual(row["id"], ident)
        self.assertEqual(row["code"], code)
        self.assertEqual(row["language"], "python")
        self.assertEqual(row["interacts"], '[{"state": {}}]')
        self.assertEqual(row["created"], 1_700_000_000)

    @defer.inlineCallbacks
    def test_survives_restart(self):
        store = self.make_store()
        ident = yield store.store("x = 1", "sage", "[]")
        yield store.close()

        reopened = self.make_store()
        row = yield reopened.fetch(ident)
        self.assertEqual((row["code"], row["language"], row["interacts"]), ("x = 1", "sage", "[]"))

    @defer.inlineCallbacks
    def test_last_access_follows_injected_clock(self):
        store = self.make_store()
        ident = yield store.store("1+1", "python", "[]")
        self.clock.advance(60)
        first = yield store.fetch(ident)
        self.clock.advance(3600)
        second = yield store.fetch(ident)
        self.assertEqual(first["created"], 1_700_000_000)
        self.assertEqual(first["last_access"], 1_700_000_060)
        self.assertEqual(second["created"], 1_700_000_000)
        self.assertEqual(second["last_access"], 1_700_003_660)
        self.assertEqual((first["requested"], second["requested"]), (1, 2))
        yield store.close()
        # The access was committed, not just reported.
        self.assertEqual(
            self.query("SELECT last_access, requested FROM permalinks WHERE id = ?", (ident,)),
            [(1_700_003_660, 2)],
        )

    @defer.inlineCallbacks
    def test_identical_content_shares_an_id(self):
        store = self.make_store()
        a = yield store.store("1+1", "python", "[]")
        self.clock.advance(10)
        b = yield store.store("1+1", "python", "[]")
        self.assertEqual(a, b)
        row = yield store.fetch(a)
        self.assertEqual(row["created"], 1_700_000_000)
        self.assertEqual(row["last_access"], 1_700_000_010)
        others = yield defer.gatherResults(
            [
                store.store("1+1", "sage", "[]"),
                store.store("1+1", "python", "[{}]"),
                store.store("1+2", "python", "[]"),
            ]
        )
        self.assertEqual(len({a, *others}), 4)
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(4,)])

    @defer.inlineCallbacks
    def test_ids_are_unguessable(self):
        store = self.make_store()
        ids = yield defer.gatherResults([store.store(f"print({i})", "python", "[]") for i in range(200)])
        self.assertEqual(len(set(ids)), 200)
        for ident in ids:
            # 128 random bits: 21 full base64 characters and 2 bits of a 22nd.
            self.assertGreaterEqual(len(ident), 22)
            self.assertLessEqual(set(ident), URLSAFE)
        # Random, not a counter or a timestamp: every position varies and
        # nearly the whole alphabet turns up.
        for position in range(21):
            self.assertGreater(len({ident[position] for ident in ids}), 20)
        self.assertGreater(len(set("".join(ids))), 60)
        # Not derived from the content: the same code gets another id elsewhere.
        other = self.make_store(self.other_where())
        again = yield other.store("print(0)", "python", "[]")
        self.assertNotEqual(again, ids[0])

    @defer.inlineCallbacks
    def test_unknown_and_malformed_ids(self):
        store = self.make_store()
        yield store.store("1+1", "python", "[]")
        for ident in ["AAAAAAAAAAAAAAAAAAAAAA", "", "a" * 65, "../etc", "x' OR 1=1 --"]:
            row = yield store.fetch(ident)
            self.assertIsNone(row, ident)

    @defer.inlineCallbacks
    def test_schema_version_recorded_in_its_table(self):
        store = self.make_store()
        same = yield store.ready()
        self.assertIs(same, store)
        yield store.close()
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(SCHEMA_VERSION,)])
        self.assertEqual(SCHEMA_VERSION, len(MIGRATIONS))

    @defer.inlineCallbacks
    def test_open_fires_with_a_usable_store(self):
        store = yield PermalinkStore.open(self.where, reactor, self.clock)
        self.addCleanup(store.close)
        ident = yield store.store("1", "python", "[]")
        self.assertIsNotNone((yield store.fetch(ident)))

    @defer.inlineCallbacks
    def test_newer_schema_refused(self):
        yield self.make_store().close()
        self.query("UPDATE permalink_schema SET version = ?", (SCHEMA_VERSION + 1,))

        store = self.make_store()
        error = yield self.assertFailure(store.ready(), SchemaVersionError)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}", str(error))
        self.assertIn("newer", str(error))
        # Operations fail the same clear way instead of touching the database.
        yield self.assertFailure(store.store("1", "python", "[]"), SchemaVersionError)
        yield self.assertFailure(store.fetch("AAAAAAAAAAAAAAAAAAAAAA"), SchemaVersionError)
        yield store.close()
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(SCHEMA_VERSION + 1,)])

    @defer.inlineCallbacks
    def test_foreign_database_refused(self):
        self.query("CREATE TABLE permalinks (x INTEGER)")
        store = self.make_store()
        error = yield self.assertFailure(store.ready(), SchemaVersionError)
        self.assertIn("no sagecell_tw schema version", str(error))
        self.assertFalse(self.table_exists("permalink_schema"))

    @defer.inlineCallbacks
    def test_upgrades_older_schema_keeping_rows(self):
        store = self.make_store()
        ident = yield store.store("kept", "python", "[]")
        yield store.close()

        def add_tags(cursor: Any) -> None:
            cursor.execute("ALTER TABLE permalinks ADD COLUMN tags TEXT")

        logged = LogEvents(self)
        upgraded = self.make_store(migrations=(*MIGRATIONS, add_tags))
        yield upgraded.ready()
        row = yield upgraded.fetch(ident)
        self.assertEqual(row["code"], "kept")
        yield upgraded.close()
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(SCHEMA_VERSION + 1,)])
        self.assertEqual(self.query("SELECT tags FROM permalinks"), [(None,)])
        self.assertEqual(len(logged.matching("upgraded from schema")), 1)

    @defer.inlineCallbacks
    def test_failed_migration_changes_nothing(self):
        yield self.make_store().close()

        def half_done(cursor: Any) -> None:
            cursor.execute("CREATE TABLE new_things (x INTEGER)")
            raise RuntimeError("step failed")

        store = self.make_store(migrations=(*MIGRATIONS, half_done))
        error = yield self.assertFailure(store.ready(), PermalinkStoreError)
        self.assertIn("step failed", str(error))
        yield store.close()
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(SCHEMA_VERSION,)])
        self.assertFalse(self.table_exists("new_things"))

    @defer.inlineCallbacks
    def test_close_lets_queued_work_finish_then_refuses(self):
        store = open_store(self.where, reactor, self.clock)
        stored = store.store("queued", "python", "[]")
        closed = store.close()
        ident = yield stored
        yield closed
        self.assertTrue(ident)
        yield self.assertFailure(store.store("late", "python", "[]"), PermalinkStoreClosed)
        yield self.assertFailure(store.fetch(ident), PermalinkStoreClosed)

    @defer.inlineCallbacks
    def test_second_close_waits_for_the_first(self):
        store = open_store(self.where, reactor, self.clock)
        stored = store.store("queued", "python", "[]")
        first, second = store.close(), store.close()
        self.assertFalse(second.called)
        yield defer.gatherResults([stored, first, second])
        self.assertFalse(store._pool.running)
        yield store.close()

    def test_store_rejects_non_text(self):
        store = self.make_store()
        return self.assertFailure(store.store(b"bytes", "python", "[]"), TypeError)

    @defer.inlineCallbacks
    def test_store_refuses_past_its_size(self):
        store = self.make_store()
        yield store.store("1", "python", "[]")
        empty = yield store.used_bytes()
        # Room for 100 kB and then some, not for 200 kB more (each back end fills whole pages).
        store.max_bytes = empty + 256 * 1024
        yield store.store(_random_text(100_000), "python", "[]")
        yield self.assertFailure(store.store(_random_text(200_000), "python", "[]"), PermalinkStoreFull)
        ident = yield store.store(_random_text(1000), "python", "[]")  # a small one still fits
        self.assertTrue(ident)
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(3,)])


class SQLiteStoreTests(SQLiteStores, StoreContract, TestCase):
    """The contract on SQLite, and what only a SQLite file has."""

    @defer.inlineCallbacks
    def test_version_mirrored_for_older_sagecell_tw(self):
        # sagecell_tw of before the table read only PRAGMA user_version: it
        # must see there a version too new for it, not an empty file.
        yield self.make_store().close()
        self.assertEqual(self.query("PRAGMA user_version"), [(SCHEMA_VERSION,)])

    @defer.inlineCallbacks
    def test_newer_schema_in_user_version_refused(self):
        self.query(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        store = self.make_store()
        error = yield self.assertFailure(store.ready(), SchemaVersionError)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}", str(error))
        yield store.close()
        self.assertFalse(self.table_exists("permalink_schema"))

    @defer.inlineCallbacks
    def test_not_a_database(self):
        with open(self.path, "wb") as f:
            f.write(b"this is not sqlite\n" * 100)
        store = self.make_store()
        error = yield self.assertFailure(store.ready(), PermalinkStoreError)
        self.assertIn(self.path, str(error))

    @defer.inlineCallbacks
    def test_file_of_schema_1_migrates_in_place_keeping_its_permalinks(self):
        shutil.copy(V1_FILE, self.path)
        self.assertFalse(self.table_exists("permalink_schema"))
        store = self.make_store()
        yield store.ready()
        for ident, content in V1_ROWS.items():
            row = yield store.fetch(ident)
            self.assertEqual([row["code"], row["language"], row["interacts"]], content)
        first = yield store.fetch("4SwivvFFmRO6lXuwAvO9Hg")
        self.assertEqual((first["created"], first["requested"]), (1_700_000_060, 3))  # one fetch before, two now
        # Deduplication still knows the old content; new permalinks go beside it.
        again = yield store.store("1+1", "python", "[]")
        self.assertEqual(again, "AHDjhkgGj4EMeu74ev7DGg")
        new = yield store.store("2+2", "python", "[]")
        yield store.close()
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(1,)])
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(4,)])

        # A later schema step upgrades such a file in place too, every row kept.
        def add_tags(cursor: Any) -> None:
            cursor.execute("ALTER TABLE permalinks ADD COLUMN tags TEXT")

        shutil.copy(V1_FILE, self.path)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)
        upgraded = self.make_store(migrations=(*MIGRATIONS, add_tags))
        rows = yield defer.gatherResults([upgraded.fetch(ident) for ident in V1_ROWS])
        self.assertEqual([[r["code"], r["language"], r["interacts"]] for r in rows], list(V1_ROWS.values()))
        yield upgraded.close()
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(2,)])
        self.assertEqual(self.query("PRAGMA user_version"), [(2,)])
        self.assertNotIn(new, V1_ROWS)


class PostgresStoreTests(PostgresStores, StoreContract, TestCase):
    """The contract on PostgreSQL, and what several daemons on one database need."""

    @defer.inlineCallbacks
    def test_two_stores_share_one_database(self):
        # Two daemons' stores: what one writes, the other reads; the same
        # content stored through both at once still gets one id.
        one, two = self.make_store(), self.make_store()
        ident = yield one.store("shared", "python", "[]")
        row = yield two.fetch(ident)
        self.assertEqual(row["code"], "shared")
        self.assertEqual((yield two.store("shared", "python", "[]")), ident)
        raced = yield defer.gatherResults(
            [s.store(f"raced {i}", "python", "[]") for i in range(20) for s in (one, two)]
        )
        self.assertEqual(len(set(raced)), 20)
        self.assertEqual(raced[0::2], raced[1::2])
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(21,)])

    @defer.inlineCallbacks
    def test_daemons_starting_at_once_migrate_once(self):
        stores = [self.make_store() for _ in range(4)]
        yield defer.gatherResults([s.ready() for s in stores])
        self.assertEqual(self.query("SELECT version FROM permalink_schema"), [(SCHEMA_VERSION,)])

    @defer.inlineCallbacks
    def test_a_dropped_connection_costs_no_request(self):
        store = self.make_store()
        ident = yield store.store("kept", "python", "[]")
        # The server ends the store's connection (a restart, a failover, an operator's kill).
        ended = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'sagecell_tw'"
            " AND pid <> pg_backend_pid() AND query NOT LIKE '%pg_terminate_backend%'"
        )
        self.assertGreaterEqual(len(ended), 1)
        logged = LogEvents(self)
        row = yield store.fetch(ident)
        self.assertEqual(row["code"], "kept")
        self.assertEqual(logged.matching("cannot be used"), [])

    @defer.inlineCallbacks
    def test_unreachable_at_start_then_used_once_it_is_there(self):
        # The database does not exist yet: every connection is refused, as
        # when the server is down; once it exists, the same store uses it.
        name = "late_" + uuid.uuid4().hex[:12]
        logged = LogEvents(self)
        store = self.make_store(self.pg.url(name))
        error = yield self.assertFailure(store.ready(), PermalinkStoreUnavailable)
        self.assertIn(f'database "{name}" does not exist', str(error))
        yield self.assertFailure(store.store("1", "python", "[]"), PermalinkStoreUnavailable)
        yield self.assertFailure(store.fetch("AAAAAAAAAAAAAAAAAAAAAA"), PermalinkStoreUnavailable)
        said = logged.matching("cannot be used")
        self.assertEqual(len(said), 1, "one sentence, not one per request")
        self.assertIn(name, said[0]["where"])

        self.pg.execute(f"CREATE DATABASE {name}")
        # For RETRY_AFTER seconds after a failure it answers at once, without
        # trying (a server dropping packets would hold each try for seconds).
        yield self.assertFailure(store.store("now", "python", "[]"), PermalinkStoreUnavailable)
        self.clock.advance(RETRY_AFTER)
        ident = yield store.store("now", "python", "[]")
        self.assertEqual((yield store.fetch(ident))["code"], "now")
        self.assertEqual(len(logged.matching("can be used again")), 1)
        yield store.close()
        self.pg.execute(f"DROP DATABASE {name}")

    @defer.inlineCallbacks
    def test_closed_after_a_failed_check_answers_at_once(self):
        store = self.make_store(self.pg.url("missing_" + uuid.uuid4().hex[:12]))
        yield self.assertFailure(store.ready(), PermalinkStoreUnavailable)
        yield store.close()
        yield self.assertFailure(store.ready().addTimeout(5, reactor), PermalinkStoreClosed)

    def test_password_never_in_messages(self):
        from sagecell_tw.core.permalink_postgres import redact

        self.assertEqual(redact("postgresql://u:s3cret@db.example/cell"), "postgresql://u:***@db.example/cell")
        self.assertEqual(
            redact("postgres://db/cell?password=s3cret&sslmode=require"),
            "postgres://db/cell?password=***&sslmode=require",
        )
        store = self.make_store("postgresql://u:s3cret@127.0.0.1:1/cell?connect_timeout=2")
        self.assertNotIn("s3cret", store.where)
        return self.assertFailure(store.ready(), PermalinkStoreUnavailable)


class ZipTests(TestCase):
    """The ``?z=`` format: SageMathCell's, and safe to decode."""

    def test_matches_sagemathcell(self):
        # base64.urlsafe_b64encode(zlib.compress(b"1+1")), padding kept.
        self.assertEqual(encode_zip("1+1"), "eJwz1DYEAAEdAI4=")

    def test_round_trip_with_and_without_padding(self):
        code = 'print("héllo")\n' * 20
        z = encode_zip(code)
        self.assertLessEqual(set(z.rstrip("=")), URLSAFE)
        self.assertEqual(decode_zip(z), code)
        self.assertEqual(decode_zip(z.rstrip("=")), code)
        self.assertEqual(decode_zip(encode_zip("")), "")

    def test_rejects_bad_base64(self):
        good = encode_zip("1+1")
        for bad in ["a+b/", "ab cd", "abc!", "=abc", "a=bc", "abcde", good + "==="]:
            self.assertRaises(ValueError, decode_zip, bad)

    def test_rejects_bad_zlib(self):
        raw = zlib.compress(b"print(1)")
        cases = {
            "not zlib": base64.urlsafe_b64encode(b"hello world").decode(),
            "empty": "",
            "truncated": base64.urlsafe_b64encode(raw[:-3]).decode(),
            "trailing": base64.urlsafe_b64encode(raw + b"junk").decode(),
            "raw deflate": base64.urlsafe_b64encode(raw[2:-4]).decode(),
            "not utf-8": base64.urlsafe_b64encode(zlib.compress(b"\xff\xfe")).decode(),
        }
        for name, z in cases.items():
            with self.subTest(name):
                self.assertRaises(ValueError, decode_zip, z)

    def test_size_limit_is_exact(self):
        self.assertEqual(decode_zip(encode_zip("a" * 100), max_bytes=100), "a" * 100)
        error = self.assertRaises(ValueError, decode_zip, encode_zip("a" * 101), max_bytes=100)
        self.assertIn("100-byte limit", str(error))
        # The limit counts UTF-8 bytes, not characters.
        self.assertRaises(ValueError, decode_zip, encode_zip("é" * 51), max_bytes=100)

    def test_zip_bomb_refused(self):
        # 64 MiB of zeros compresses to ~64 KiB: well within the encoded-size
        # bound, so only bounded inflation stops it.
        bomb = base64.urlsafe_b64encode(zlib.compress(bytes(64 << 20), 9)).decode()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        error = self.assertRaises(ValueError, decode_zip, bomb)
        _, peak = tracemalloc.get_traced_memory()
        self.assertIn("inflates past", str(error))
        # It never inflated the whole bomb: memory stays near the limit.
        self.assertLess(peak, 4 << 20)

    def test_oversized_input_refused_before_decoding(self):
        error = self.assertRaises(ValueError, decode_zip, "A" * 100_000, max_bytes=1000)
        self.assertIn("larger than", str(error))


class _BodyCollector(Protocol):
    """Collect a response body (readBody warns about Agent's own transports)."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def _read_body(response: Any) -> defer.Deferred[bytes]:
    done: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_BodyCollector(done))
    return done


class RecordingBackend:
    """A backend that remembers calls and answers with a chosen Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.result: defer.Deferred[Any] | None = None

    def store(self, code: str, language: str, interacts: str) -> defer.Deferred[str]:
        self.calls.append(("store", code, language, interacts))
        return self.result if self.result is not None else defer.succeed("ID")

    def fetch(self, ident: str) -> defer.Deferred[dict[str, Any] | None]:
        self.calls.append(("fetch", ident))
        return self.result if self.result is not None else defer.succeed(None)


class WebTestsMixin:
    """Serve a resource on a real port and talk to it over HTTP."""

    @defer.inlineCallbacks
    def serve(self, resource: Resource):
        root = Resource()
        root.putChild(b"permalink", resource)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port = yield endpoint.listen(Site(root))
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}".encode()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    @defer.inlineCallbacks
    def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes | None = None,
        content_type: bytes | None = None,
    ):
        """Fire with (status, headers, parsed JSON body)."""
        headers = Headers()
        if content_type is not None:
            headers.addRawHeader(b"Content-Type", content_type)
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method, self.base + path, headers, producer)
        raw = yield _read_body(response)
        return response.code, response.headers, json.loads(raw) if raw else None

    def post_form(self, fields: dict[str, Any]):
        body = urlencode(fields).encode("ascii")
        return self.request(b"POST", b"/permalink", body, b"application/x-www-form-urlencoded")

    def post_json(self, obj: Any):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return self.request(b"POST", b"/permalink", body, b"application/json")

    def assertJSONError(self, result, status: int, *words: str) -> None:
        code, headers, body = result
        self.assertEqual(code, status, body)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(list(body), ["error"])
        for word in words:
            self.assertIn(word, body["error"])


class PermalinkResourceTests(SQLiteStores, WebTestsMixin, TestCase):
    """The HTTP API against a real store, shaped like SageMathCell's."""

    @defer.inlineCallbacks
    def setUp(self):
        SQLiteStores.setUp(self)
        self.store = self.make_store()
        yield self.serve(PermalinkResource(self.store, max_code_bytes=1000))

    @defer.inlineCallbacks
    def test_form_post_then_get(self):
        code = 'print("héllo")'
        interacts = '[{"state": {"x": 1}, "bookmarks": []}]'
        status, headers, body = yield self.post_form(
            {"code": code, "language": "sage", "interacts": interacts, "n": "3"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(set(body), {"zip", "query", "interacts", "n"})
        self.assertEqual(body["n"], 3)  # the client compares with ===
        self.assertEqual(body["zip"], encode_zip(code))
        self.assertEqual(decode_zip(body["interacts"]), interacts)

        status, headers, got = yield self.request(b"GET", b"/permalink?q=" + body["query"].encode())
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(got, [code, "sage", interacts])

    @defer.inlineCallbacks
    def test_json_post_with_defaults(self):
        status, _, body = yield self.post_json({"code": "1+1"})
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"zip", "query", "interacts"})
        self.assertEqual(body["zip"], "eJwz1DYEAAEdAI4=")
        self.assertEqual(decode_zip(body["interacts"]), "[]")
        row = yield self.store.fetch(body["query"])
        self.assertEqual((row["code"], row["language"], row["interacts"]), ("1+1", "python", "[]"))

    @defer.inlineCallbacks
    def test_json_post_accepts_interacts_as_array(self):
        status, _, body = yield self.post_json({"code": "x", "interacts": [{"state": {}}], "n": 7})
        self.assertEqual(status, 200)
        self.assertEqual(body["n"], 7)
        row = yield self.store.fetch(body["query"])
        self.assertEqual(json.loads(row["interacts"]), [{"state": {}}])

    @defer.inlineCallbacks
    def test_multipart_post(self):
        boundary = b"XyZzY"
        body = b'--XyZzY\r\nContent-Disposition: form-data; name="code"\r\n\r\nprint(2)\r\n--XyZzY--\r\n'
        status, _, answer = yield self.request(
            b"POST", b"/permalink", body, b"multipart/form-data; boundary=" + boundary
        )
        self.assertEqual(status, 200, answer)
        self.assertEqual(decode_zip(answer["zip"]), "print(2)")

    @defer.inlineCallbacks
    def test_repeated_post_gives_same_query(self):
        first = yield self.post_form({"code": "same", "language": "python"})
        second = yield self.post_form({"code": "same", "language": "python"})
        self.assertEqual(first[2]["query"], second[2]["query"])

    @defer.inlineCallbacks
    def test_get_unknown_id_is_404(self):
        result = yield self.request(b"GET", b"/permalink?q=AAAAAAAAAAAAAAAAAAAAAA")
        self.assertJSONError(result, 404, "ID not found")
        result = yield self.request(b"GET", b"/permalink?q=%2E%2E%2Fetc")
        self.assertJSONError(result, 404, "ID not found")

    @defer.inlineCallbacks
    def test_get_without_q_is_400(self):
        self.assertJSONError((yield self.request(b"GET", b"/permalink")), 400, "q")
        self.assertJSONError((yield self.request(b"GET", b"/permalink?q=")), 400, "q")
        self.assertJSONError((yield self.request(b"GET", b"/permalink?q=%FF")), 400, "UTF-8")

    @defer.inlineCallbacks
    def test_post_errors_are_json_and_store_nothing(self):
        cases = [
            (self.post_form({"language": "python"}), 400, "missing field code"),
            (self.post_json(b"{not json"), 400, "malformed JSON"),
            (self.post_json(b"\xff\xfe"), 400, "UTF-8"),
            (self.post_json(["code", "1"]), 400, "object"),
            (self.post_json({"code": 1}), 400, "code"),
            (self.post_form({"code": "1", "language": "py thon"}), 400, "language"),
            (self.post_form({"code": "1", "language": "x" * 40}), 400, "language"),
            (self.post_form({"code": "1", "interacts": "{}"}), 400, "interacts"),
            (self.post_form({"code": "1", "interacts": "[oops"}), 400, "interacts"),
            (self.post_form({"code": "1", "n": "one"}), 400, "n must"),
            (self.post_json({"code": "1", "n": True}), 400, "n must"),
            (self.post_json({"code": "\ud800"}), 400, "code"),
            (
                self.request(
                    b"POST",
                    b"/permalink",
                    b"code=%FF",
                    b"application/x-www-form-urlencoded",
                ),
                400,
                "UTF-8",
            ),
        ]
        for d, status, words in cases:
            self.assertJSONError((yield d), status, words)
        yield self.store.close()
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(0,)])

    @defer.inlineCallbacks
    def test_oversize_is_413(self):
        self.assertJSONError((yield self.post_form({"code": "x" * 1001})), 413, "code", "1000-byte limit")
        # UTF-8 bytes count, not characters.
        self.assertJSONError((yield self.post_json({"code": "é" * 501})), 413, "code")
        self.assertJSONError(
            (yield self.post_form({"code": "1", "interacts": "[" + "0," * 600 + "0]"})),
            413,
            "interacts",
        )
        # A body too big to hold any acceptable request is refused unread.
        self.assertJSONError(
            (yield self.post_json({"code": "1", "padding": "x" * 20_000})),
            413,
            "request body",
        )
        status, _, _ = yield self.post_form({"code": "x" * 1000})
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_other_methods_and_paths(self):
        code, headers, body = yield self.request(b"PUT", b"/permalink", b"{}")
        self.assertJSONError((code, headers, body), 405, "method")
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD, POST"])
        self.assertJSONError((yield self.request(b"GET", b"/permalink/x?q=a")), 404)
        status, _, _ = yield self.request(b"GET", b"/permalink/?q=nope")
        self.assertEqual(status, 404)


class PermalinkResourceFailureTests(WebTestsMixin, TestCase):
    """What a client sees when storage, not the request, is at fault."""

    @defer.inlineCallbacks
    def setUp(self):
        self.backend = RecordingBackend()
        yield self.serve(PermalinkResource(self.backend))

    @defer.inlineCallbacks
    def test_database_unavailable_is_503(self):
        self.backend.result = defer.fail(SchemaVersionError("schema too new"))
        result = yield self.post_form({"code": "1"})
        self.assertJSONError(result, 503, "database unavailable")
        self.assertNotIn("schema", result[2]["error"])
        self.assertEqual(len(self.flushLoggedErrors(SchemaVersionError)), 1)

    @defer.inlineCallbacks
    def test_unexpected_error_is_500_and_logged(self):
        self.backend.result = defer.fail(ZeroDivisionError("boom"))
        result = yield self.request(b"GET", b"/permalink?q=abcdef")
        self.assertJSONError(result, 500, "internal error")
        self.assertNotIn("boom", result[2]["error"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @defer.inlineCallbacks
    def test_backend_gets_validated_fields(self):
        yield self.post_form({"code": "c", "language": "r", "interacts": "[1]"})
        yield self.request(b"GET", b"/permalink?q=legacy")
        self.assertEqual(self.backend.calls, [("store", "c", "r", "[1]"), ("fetch", "legacy")])


class DisconnectTests(TestCase):
    """A client that leaves before the database answers gets nothing written."""

    def test_no_write_after_disconnect(self):
        backend = RecordingBackend()
        backend.result = defer.Deferred()
        resource = PermalinkResource(backend)
        request = DummyRequest([])
        request.method = b"POST"
        request.args = {b"code": [b"1+1"]}
        request.content = BytesIO(b"code=1%2B1")
        request.requestHeaders.addRawHeader(b"content-type", b"application/x-www-form-urlencoded")
        self.assertIs(resource.render(request), NOT_DONE_YET)
        request.processingFailed(Failure(ConnectionError("client went away")))
        backend.result.callback("ID")
        self.assertEqual(request.written, [])
        self.assertEqual(backend.calls, [("store", "1+1", "python", "[]")])

    def test_dummy_request_answer(self):
        backend = RecordingBackend()
        backend.result = defer.succeed({"id": "abc", "code": "c", "language": "python", "interacts": "[]"})
        request = DummyRequest([])
        request.args = {b"q": [b"abc"]}
        resource = PermalinkResource(backend)
        self.assertIs(resource.render(request), NOT_DONE_YET)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written)), ["c", "python", "[]"])
        self.assertTrue(request.finished)


class RateLimitTests(TestCase):
    """The token bucket per client address, on a ``Clock``."""

    def test_burst_then_one_every_interval(self):
        clock = Clock()
        rate = RateLimit(clock, per_minute=6)
        self.assertEqual([rate.take("a") for _ in range(6)], [0.0] * 6)
        self.assertAlmostEqual(rate.take("a"), 10.0)  # one more every 60/6 s
        self.assertEqual(rate.take("b"), 0.0)  # others are not held back
        clock.advance(9.9)
        self.assertAlmostEqual(rate.take("a"), 0.1)
        clock.advance(0.1)
        self.assertEqual(rate.take("a"), 0.0)
        self.assertGreater(rate.take("a"), 0.0)
        clock.advance(3600)  # refills to the burst, never beyond
        self.assertEqual([rate.take("a") for _ in range(6)], [0.0] * 6)
        self.assertGreater(rate.take("a"), 0.0)

    def test_refilled_buckets_are_forgotten(self):
        clock = Clock()
        rate = RateLimit(clock, per_minute=2, max_clients=10)
        for i in range(10):
            rate.take(f"old{i}")
        clock.advance(60)
        for i in range(5):
            rate.take(f"new{i}")
        self.assertEqual(sorted(rate.buckets), [f"new{i}" for i in range(5)])
        for i in range(40):  # all busy at once: kept, and pruned no more often than they double
            rate.take(f"busy{i}")
        self.assertEqual(len(rate.buckets), 45)


class PermalinkLimitsContract(WebTestsMixin):
    """429 past the rate, 507 once the store is full; neither stores anything. On both back ends."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.store = self.make_store(max_bytes=256 * 1024)
        self.rate = RateLimit(self.clock, per_minute=3)
        yield self.serve(PermalinkResource(self.store, max_code_bytes=64 * 1024, rate=self.rate))

    @defer.inlineCallbacks
    def test_too_many_is_429_until_time_passes(self):
        for i in range(3):
            status, _, _ = yield self.post_form({"code": f"print({i})"})
            self.assertEqual(status, 200)
        result = yield self.post_form({"code": "print(3)"})
        self.assertJSONError(result, 429, "3 a minute")
        self.assertEqual(result[1].getRawHeaders(b"retry-after"), [b"20"])
        self.clock.advance(20)
        status, _, _ = yield self.post_form({"code": "print(3)"})
        self.assertEqual(status, 200)
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(4,)])

    @defer.inlineCallbacks
    def test_a_full_store_is_507_and_keeps_what_it_has(self):
        stored = []
        for i in range(40):
            self.clock.advance(60)
            status, _, body = yield self.post_form({"code": f"# {i}\n" + _random_text(40 * 1024)})
            if status != 200:
                break
            stored.append(body["query"])
        self.assertJSONError((status, _, body), 507, "full")
        self.assertTrue(3 <= len(stored) < 10, len(stored))
        self.assertLessEqual((yield self.store.used_bytes()), 256 * 1024 + 64 * 1024)
        self.assertEqual(self.query("SELECT count(*) FROM permalinks"), [(len(stored),)])
        # What is stored still answers, and so does a repeat of it.
        status, _, row = yield self.request(b"GET", b"/permalink?q=" + stored[0].encode())
        self.assertEqual(status, 200)
        again = yield self.post_form({"code": row[0]})
        self.assertEqual((again[0], again[2]["query"]), (200, stored[0]))


class SQLiteLimitsTests(PermalinkLimitsContract, SQLiteStores, TestCase):
    """The limits on SQLite."""


class PostgresLimitsTests(PermalinkLimitsContract, PostgresStores, TestCase):
    """The limits on PostgreSQL."""
