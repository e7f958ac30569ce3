# -*- test-case-name: tests.test_permalinks -*-
"""
Permalink storage: code, language and interact state kept under an
unguessable id, so a shared link (``/?q=ID``) outlives the kernel that ran it.

Two back ends behave the same: a SQLite file, the embedded default for one
daemon (``permalink_sqlite``), and a PostgreSQL database that several daemons
share (``permalink_postgres``). ``open_store`` picks one from the
``--permalink-db`` value, a ``postgresql://`` URL or a file path. A back end
says only what differs: how to connect, how to lock and where to read the
schema version, how full the database is. Ids, deduplication, the size cap,
migrations and what a failure means are written here, once.

All database access happens on the threads of a
``twisted.enterprise.adbapi.ConnectionPool``, so the reactor never waits for the
database. Time comes from an injected ``IReactorTime``, so tests drive it with
``twisted.internet.task.Clock``.

Identical (code, language, interacts) triples share one id: the JS client asks
for a permalink every time the permalink box opens, and deduplication keeps
those repeats from growing the database. Because ids are random (not derived
from the content), knowing the content gives no more than the id of that same
content. Several daemons storing the same content at once get one id too: the
content hash is unique in the table, and the loser of the race reads the
winner's row.

The database has a size cap (``max_bytes``), in bytes the database fills as
its back end counts them: a new permalink that would take it past the cap
fails with ``PermalinkStoreFull``; repeats of stored content still answer, and
nothing already stored is touched.

The schema carries a version, in a table of its own (``permalink_schema``);
``MIGRATIONS`` take a database from any older version to ``SCHEMA_VERSION`` in
one transaction, so a failed step changes nothing.

A database that cannot be used (down, refusing connections, a dropped
connection, a disk error) fails an operation with
``PermalinkStoreUnavailable``, which the web answers 503. The store says so in
the log once when the database goes away and once when it is back. It tries
the database again at the first operation ``RETRY_AFTER`` seconds later (those
between fail at once), so a database that returns is used again without a
restart. A connection the database dropped is replaced, and the operation run
once more on the new one, so a database restart costs no request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import is_postgres_url
from .permalink_backend import VERSION_TABLE, Backend, Cursor

__all__ = [
    "ID_BYTES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "VERSION_TABLE",
    "Backend",
    "Cursor",
    "PermalinkStore",
    "PermalinkStoreClosed",
    "PermalinkStoreError",
    "PermalinkStoreFull",
    "PermalinkStoreUnavailable",
    "SchemaVersionError",
    "backend_for",
    "is_valid_id",
    "migrate",
    "open_store",
]

log = Logger()

#: Random bytes in a new id: 128 bits, 22 URL-safe characters.
ID_BYTES = 16

# Ids we are willing to look up: our own (22 chars) and any shorter legacy
# ones (SageMathCell used 6 lowercase letters), never anything that needs
# escaping in a URL.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

_INSERT_ATTEMPTS = 5

#: Seconds after the database failed during which operations fail at once,
#: without trying it: a server that drops packets makes each try wait for the
#: connect timeout, and requests must not queue up behind those waits.
RETRY_AFTER = 2.0

_ROW_KEYS = ("id", "code", "language", "interacts", "created", "last_access", "requested")


class PermalinkStoreError(Exception):
    """The permalink database cannot be used (bad file, I/O error, ...)."""


class PermalinkStoreUnavailable(PermalinkStoreError):
    """The database cannot be reached or used just now (down, refused, dropped); later it may."""


class PermalinkStoreFull(Exception):
    """A new permalink would take the database past its size cap."""


class SchemaVersionError(PermalinkStoreError):
    """The database was written by a newer or unknown schema."""


class PermalinkStoreClosed(PermalinkStoreError):
    """An operation was attempted after ``PermalinkStore.close``."""


def is_valid_id(ident: str) -> bool:
    """Say whether ``ident`` could be a permalink id, so junk never hits SQL."""
    return isinstance(ident, str) and _ID_RE.fullmatch(ident) is not None


def _create_v1(cursor: Cursor) -> None:
    """
    Schema 1: one row per permalink, content hash unique for dedupe. In
    PostgreSQL, code and interacts are BYTEA (UTF-8): its text type cannot hold
    a NUL character, which code may contain.
    """
    content, real, count = (
        ("TEXT", "REAL", "INTEGER") if cursor.dialect == "sqlite" else ("BYTEA", "DOUBLE PRECISION", "BIGINT")
    )
    cursor.execute(
        f"""
        CREATE TABLE permalinks (
            id           TEXT PRIMARY KEY,
            code         {content} NOT NULL,
            language     TEXT NOT NULL,
            interacts    {content} NOT NULL,
            content_hash TEXT NOT NULL UNIQUE,
            created      {real} NOT NULL,
            last_access  {real} NOT NULL,
            requested    {count} NOT NULL DEFAULT 0
        )
        """
    )


#: Upgrade steps: ``MIGRATIONS[n]`` takes a database from version ``n`` to
#: ``n + 1``; each is given a ``Cursor`` (``cursor.dialect`` tells the back end).
#: Append a step (never edit one) to change the schema.
MIGRATIONS: tuple[Callable[[Cursor], None], ...] = (_create_v1,)

#: The schema version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(
    backend: Backend,
    cursor: Cursor,
    steps: Sequence[Callable[[Cursor], None]] = MIGRATIONS,
) -> tuple[int, int]:
    """
    Bring the database up to ``len(steps)``, atomically, and return
    ``(old_version, new_version)``.

    The version lives in the ``permalink_schema`` table, changed inside the
    same transaction as the tables, so a failed step leaves the database
    exactly as it was; processes starting at once migrate one after the other.
    A database without that table is taken as new (and refused if it holds
    tables of someone else's), or at the version an older sagecell_tw noted
    elsewhere (SQLite's ``user_version``). A version newer than ``len(steps)``
    raises ``SchemaVersionError``: old code must not write a newer layout it
    does not understand.
    """
    target = len(steps)
    cursor.execute(backend.begin_sql)
    try:
        backend.lock_schema(cursor)
        recorded = backend.table_exists(cursor, VERSION_TABLE)
        if recorded:
            rows = cursor.execute(f"SELECT version FROM {VERSION_TABLE}").fetchall()
            if len(rows) != 1:
                raise SchemaVersionError(f"table {VERSION_TABLE} holds {len(rows)} rows, not the one version row")
            version = rows[0][0]
        else:
            version = backend.unversioned_version(cursor)
        if version > target:
            raise SchemaVersionError(
                f"permalink database has schema version {version}, newer than "
                f"version {target} that this sagecell_tw understands; upgrade "
                f"sagecell_tw or point it at another database"
            )
        if version == 0:
            why = backend.foreign(cursor)
            if why:
                raise SchemaVersionError(
                    f"{why} but no sagecell_tw schema version; refusing to use it as the permalink database"
                )
        for step in steps[version:]:
            step(cursor)
        if version != target or not recorded:
            backend.record_version(cursor, target)
        cursor.execute("COMMIT")
    except BaseException:
        backend.rollback(cursor)
        raise
    return version, target


def _content_hash(code: str, language: str, interacts: str) -> str:
    """Hash the triple unambiguously (a JSON array, not a concatenation)."""
    blob = json.dumps([code, language, interacts], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _new_id() -> str:
    """Make an id nobody can guess or enumerate."""
    return secrets.token_urlsafe(ID_BYTES)


class _Connection(adbapi.Connection):
    """
    adbapi's connection, but one the database dropped is closed and forgotten
    instead of rolled back: the next operation opens a fresh one, and an
    outage the store already reports logs no "Rollback failed" traceback.
    """

    def rollback(self) -> None:
        if self._connection is None:
            return
        if getattr(self._connection, "closed", False):
            self._pool.disconnect(self._connection)
            self._connection = None
            return
        super().rollback()

    def reconnect(self) -> None:
        if self._connection is not None:
            self._pool.disconnect(self._connection)
            self._connection = None
        self._connection = self._pool.connect()


def backend_for(where: str) -> Backend:
    """The back end for a ``--permalink-db`` value: a PostgreSQL URL, else a SQLite file."""
    if is_postgres_url(where):
        from .permalink_postgres import PostgresBackend

        return PostgresBackend(where)
    from .permalink_sqlite import SQLiteBackend

    return SQLiteBackend(where)


def open_store(where: str, reactor: Any, clock: IReactorTime | None = None, **kw: Any) -> PermalinkStore:
    """A store on the database ``where`` names (see ``backend_for``); ``kw`` as ``PermalinkStore`` takes."""
    return PermalinkStore(backend_for(where), reactor, clock, **kw)


class PermalinkStore:
    """
    Permalinks in one database, reached only from its back end's pool.

    Construct it anywhere (even before the reactor runs): the schema check is
    queued first and every later operation waits for it. ``ready`` fires with
    the store once the schema is usable, or fails with why. A schema this
    code must not touch (``SchemaVersionError``) fails every later operation
    the same way; any other failure of the check (the database is down, say)
    is tried again by the next operation.
    """

    def __init__(
        self,
        backend: Backend | str,
        reactor: Any,
        clock: IReactorTime | None = None,
        *,
        migrations: Sequence[Callable[[Cursor], None]] = MIGRATIONS,
        max_bytes: int | None = None,
    ) -> None:
        """
        :param backend: the database (a ``Backend``, or a ``--permalink-db``
            value for ``backend_for``).
        :param max_bytes: most bytes the database may fill; None for no cap.
        :param reactor: provides the threads the pool uses (``IReactorThreads``,
            ``IReactorCore``); only the tap should pass the global reactor.
        :param clock: where timestamps come from; defaults to ``reactor``.
        :param migrations: schema steps; tests pass their own.
        """
        self.backend = backend_for(backend) if isinstance(backend, str) else backend
        self.where = self.backend.where
        self.max_bytes = max_bytes
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._pool = self.backend.pool(reactor)
        self._pool.connectionFactory = _Connection
        self._migrations = migrations
        self._closed = False
        self._pending = 0
        self._idle: list[defer.Deferred[None]] = []
        self._schema_error: BaseException | None = None
        self._schema_ok = False
        self._checking = False
        self._waiting: list[defer.Deferred[None]] = []
        #: None until the database answered or failed once; then whether it is usable
        self._usable: bool | None = None
        self._last_error: BaseException | None = None
        self._retry_at = 0.0
        self._check_schema()

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def open(cls, where: str, reactor: Any, clock: IReactorTime | None = None) -> defer.Deferred[PermalinkStore]:
        """Make a store and fire with it once the schema is usable."""
        return cls(where, reactor, clock).ready()

    def ready(self) -> defer.Deferred[PermalinkStore]:
        """Fire with this store once the schema check passed, or fail with why."""
        d = self._when_ready()
        d.addCallback(lambda _: self)
        return d

    def close(self) -> defer.Deferred[None]:
        """
        Refuse new work, let queued work finish, then close the database.
        Safe to call more than once; every call fires after the close.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if not self._closed:
            self._closed = True
            d.addCallback(lambda _: self._pool.close())
        if self._pending:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    # -- operations --------------------------------------------------------

    def store(self, code: str, language: str, interacts: str) -> defer.Deferred[str]:
        """
        Save a permalink and fire with its id.

        Saving content that is already stored returns the existing id and
        counts as an access (its ``last_access`` moves to now).
        """
        for name, value in (
            ("code", code),
            ("language", language),
            ("interacts", interacts),
        ):
            if not isinstance(value, str):
                return defer.fail(TypeError(f"{name} must be str, not {type(value).__name__}"))
        if "\x00" in language:
            return defer.fail(ValueError("language must not contain NUL"))
        now = self._clock.seconds()
        return self._run(self._store, code, language, interacts, now)

    def fetch(self, ident: str) -> defer.Deferred[dict[str, Any] | None]:
        """
        Fire with the permalink ``ident`` (and record the access), or with
        ``None`` if there is no such id.

        The dict has ``id``, ``code``, ``language``, ``interacts``, ``created``,
        ``last_access`` (this access) and ``requested`` (times fetched).
        """
        if not is_valid_id(ident):
            return defer.succeed(None)
        now = self._clock.seconds()
        return self._run(self._fetch, ident, now)

    def used_bytes(self) -> defer.Deferred[int]:
        """Fire with the bytes the database fills, as the size cap counts them."""
        return self._run(lambda cur: self.backend.used_bytes(cur))

    # -- plumbing ----------------------------------------------------------

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Count ``d`` as pending until it fires, so ``close`` can wait for it."""
        self._pending += 1

        def done(result: object) -> object:
            self._pending -= 1
            if not self._pending:
                idle, self._idle = self._idle, []
                for waiter in idle:
                    waiter.callback(None)
            return result

        d.addBoth(done)
        return d

    def _check_schema(self) -> None:
        """Run the migrations on the pool; operations wait for the outcome."""
        self._checking = True
        d = self._pool.runWithConnection(self._call, self._migrate, self._migrations)
        d.addErrback(self._translate)
        d.addBoth(self._schema_result)
        self._track(d)

    def _schema_result(self, result: object) -> None:
        """Record the schema check's outcome and release waiting operations."""
        self._checking = False
        if isinstance(result, Failure):
            error = result.value
            if isinstance(error, SchemaVersionError):
                self._schema_error = error
            self._note_failure(error)
        else:
            self._schema_ok = True
            self._note_success()
            old, new = result  # type: ignore[misc]
            if old != new:
                log.info(
                    "Permalink database {where} upgraded from schema {old} to {new}",
                    where=self.where,
                    old=old,
                    new=new,
                )
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            if isinstance(result, Failure):
                w.errback(result.value)
            else:
                w.callback(None)

    def _when_ready(self) -> defer.Deferred[None]:
        """A fresh Deferred that fires when the schema is usable (checking it again if the last check failed)."""
        if self._schema_error is not None:
            return defer.fail(self._schema_error)
        if self._schema_ok:
            return defer.succeed(None)
        if self._closed and not self._checking:
            return defer.fail(PermalinkStoreClosed("permalink store is closed"))
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        if not self._checking:
            self._check_schema()
        return d

    def _run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``fn(cursor, *args)`` on the pool once the schema is usable."""
        if self._closed:
            return defer.fail(PermalinkStoreClosed("permalink store is closed"))
        if self._usable is False and self._clock.seconds() < self._retry_at:
            return defer.fail(self._last_error)
        d = self._when_ready()
        d.addCallback(lambda _: self._operate(fn, *args))
        return self._track(d)

    def _operate(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d = self._pool.runWithConnection(self._call, fn, *args)
        d.addErrback(self._translate)
        d.addCallbacks(self._succeeded, self._failed)
        return d

    def _translate(self, failure: Failure) -> Failure:
        """A driver's error that means "cannot use the database now" becomes ``PermalinkStoreUnavailable``."""
        if failure.check(PermalinkStoreError, PermalinkStoreFull):
            return failure
        if failure.check(adbapi.ConnectionLost, *self.backend.unavailable):
            error: PermalinkStoreError = PermalinkStoreUnavailable(self.backend.why(failure.value))
        elif self._schema_ok:
            return failure  # a bug of ours, not the database's: 500
        else:
            error = PermalinkStoreError(f"cannot open permalink database {self.where}: {failure.value}")
        error.__cause__ = failure.value
        return Failure(error)

    def _succeeded(self, result: object) -> object:
        self._note_success()
        return result

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(PermalinkStoreUnavailable):
            self._note_failure(failure.value)
        return failure

    def _note_failure(self, error: BaseException) -> None:
        """Rest the database a moment; say once (not at every request) that it cannot be used, and why."""
        self._last_error = error
        self._retry_at = self._clock.seconds() + RETRY_AFTER
        if self._usable is False:
            return
        self._usable = False
        if isinstance(error, PermalinkStoreUnavailable):
            log.error(
                "Permalink database {where} cannot be used ({why}): permalinks answer 503 until it can,"
                " and cells are served as usual",
                where=self.where,
                why=str(error),
            )
        else:
            log.error("Permalink database {where} unusable: {error}", where=self.where, error=str(error))

    def _note_success(self) -> None:
        if self._usable is False:
            log.info("Permalink database {where} can be used again", where=self.where)
        self._usable = True

    # The methods below run on the pool's threads, never in the reactor.

    def _call(self, conn: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(cursor, *args)``; on a connection the database dropped, once more on a fresh one."""
        try:
            return fn(self.backend.cursor(conn), *args)
        except self.backend.unavailable:
            if not self.backend.lost(conn):
                raise
        conn.reconnect()
        return fn(self.backend.cursor(conn), *args)

    def _migrate(self, cur: Cursor, migrations: Sequence[Callable[[Cursor], None]]) -> tuple[int, int]:
        return migrate(self.backend, cur, migrations)

    def _store(self, cur: Cursor, code: str, language: str, interacts: str, now: float) -> str:
        digest = _content_hash(code, language, interacts)
        cur.execute(self.backend.begin_sql)
        try:
            ident = self._touch(cur, digest, now)
            if ident is None:
                self._check_room(cur, code, language, interacts)
                ident = self._insert(cur, code, language, interacts, digest, now)
            cur.execute("COMMIT")
        except BaseException:
            self.backend.rollback(cur)
            raise
        return ident

    @staticmethod
    def _touch(cur: Cursor, digest: str, now: float) -> str | None:
        """The id of stored content (now accessed), or None."""
        rows = cur.execute(
            "UPDATE permalinks SET last_access = ? WHERE content_hash = ? RETURNING id", (now, digest)
        ).fetchall()
        return rows[0][0] if rows else None

    def _check_room(self, cur: Cursor, code: str, language: str, interacts: str) -> None:
        """Raise ``PermalinkStoreFull`` unless the new row fits under ``max_bytes``."""
        if self.max_bytes is None:
            return
        used = self.backend.used_bytes(cur)
        need = sum(len(v.encode("utf-8", "surrogatepass")) for v in (code, language, interacts)) + 256
        if used + need > self.max_bytes:
            raise PermalinkStoreFull(f"the permalink database holds {used} bytes, and its limit is {self.max_bytes}")

    def _insert(self, cur: Cursor, code: str, language: str, interacts: str, digest: str, now: float) -> str:
        for _ in range(_INSERT_ATTEMPTS):
            ident = _new_id()
            rows = cur.execute(
                "INSERT INTO permalinks (id, code, language, interacts, content_hash, created, last_access, requested)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT DO NOTHING RETURNING id",
                (ident, self.backend.to_db(code), language, self.backend.to_db(interacts), digest, now, now),
            ).fetchall()
            if rows:
                return ident
            # A conflict: another daemon stored the same content since _touch
            # looked (PostgreSQL), or the id was taken (2**-128 odds).
            stored = self._touch(cur, digest, now)
            if stored is not None:
                return stored
        raise PermalinkStoreError("could not allocate a unique permalink id")

    def _fetch(self, cur: Cursor, ident: str, now: float) -> dict[str, Any] | None:
        rows = cur.execute(
            "UPDATE permalinks SET last_access = ?, requested = requested + 1 WHERE id = ?"
            " RETURNING id, code, language, interacts, created, last_access, requested",
            (now, ident),
        ).fetchall()
        if not rows:
            return None
        row = dict(zip(_ROW_KEYS, rows[0], strict=True))
        row["code"] = self.backend.from_db(row["code"])
        row["interacts"] = self.backend.from_db(row["interacts"])
        return row
