# -*- test-case-name: tests.test_permalinks -*-
"""
Permalink storage: code, language and interact state kept in SQLite under an
unguessable id, so a shared link (``/?q=ID``) outlives the kernel that ran it.

All SQLite access happens on the one worker thread of a
L{twisted.enterprise.adbapi.ConnectionPool}, so the reactor never waits for the
disk. Time comes from an injected L{IReactorTime}, so tests drive it with
L{twisted.internet.task.Clock}.

Identical (code, language, interacts) triples share one id: the JS client asks
for a permalink every time the permalink box opens, and deduplication keeps
those repeats from growing the database. Because ids are random (not derived
from the content), knowing the content gives no more than the id of that same
content.

The database has a size cap (C{max_bytes}): a new permalink that would take
it past the cap fails with L{PermalinkStoreFull}; repeats of stored content
still answer, and nothing already stored is touched.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "ID_BYTES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PermalinkStore",
    "PermalinkStoreClosed",
    "PermalinkStoreError",
    "PermalinkStoreFull",
    "SchemaVersionError",
    "is_valid_id",
    "migrate",
]

log = Logger()

#: Random bytes in a new id: 128 bits, 22 URL-safe characters.
ID_BYTES = 16

# Ids we are willing to look up: our own (22 chars) and any shorter legacy
# ones (SageMathCell used 6 lowercase letters), never anything that needs
# escaping in a URL.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

_INSERT_ATTEMPTS = 5


class PermalinkStoreError(Exception):
    """The permalink database cannot be used (bad file, I/O error, ...)."""


class PermalinkStoreFull(Exception):
    """A new permalink would take the database past its size cap."""


class SchemaVersionError(PermalinkStoreError):
    """The database file was written by a newer or unknown schema."""


class PermalinkStoreClosed(PermalinkStoreError):
    """An operation was attempted after L{PermalinkStore.close}."""


def is_valid_id(ident: str) -> bool:
    """Say whether C{ident} could be a permalink id, so junk never hits SQL."""
    return isinstance(ident, str) and _ID_RE.fullmatch(ident) is not None


def _create_v1(cursor: Any) -> None:
    """Schema 1: one row per permalink, content hash unique for dedupe."""
    cursor.execute(
        """
        CREATE TABLE permalinks (
            id           TEXT PRIMARY KEY,
            code         TEXT NOT NULL,
            language     TEXT NOT NULL,
            interacts    TEXT NOT NULL,
            content_hash TEXT NOT NULL UNIQUE,
            created      REAL NOT NULL,
            last_access  REAL NOT NULL,
            requested    INTEGER NOT NULL DEFAULT 0
        )
        """
    )


#: Upgrade steps: C{MIGRATIONS[n]} takes a database from version C{n} to
#: C{n + 1}. Append a step (never edit one) to change the schema.
MIGRATIONS: tuple[Callable[[Any], None], ...] = (_create_v1,)

#: The schema version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(
    cursor: Any,
    steps: Sequence[Callable[[Any], None]] = MIGRATIONS,
) -> tuple[int, int]:
    """
    Bring the database up to C{len(steps)}, atomically, and return
    C{(old_version, new_version)}.

    The version lives in C{PRAGMA user_version}, which SQLite changes inside
    the same transaction as the tables, so a failed step leaves the file
    exactly as it was. A version newer than C{len(steps)} raises
    L{SchemaVersionError}: old code must not write a newer layout it does not
    understand. C{cursor} must be on a connection in autocommit mode
    (C{isolation_level=None}), because this function runs its own
    transaction.
    """
    target = len(steps)
    cursor.execute("BEGIN IMMEDIATE")
    try:
        cursor.execute("PRAGMA user_version")
        (version,) = cursor.fetchone()
        if version > target:
            raise SchemaVersionError(
                f"permalink database has schema version {version}, newer than "
                f"version {target} that this sagecell_tw understands; upgrade "
                f"sagecell_tw or point it at another database file"
            )
        if version == 0:
            cursor.execute(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            )
            (objects,) = cursor.fetchone()
            if objects:
                raise SchemaVersionError(
                    "file is a SQLite database with tables but no sagecell_tw "
                    "schema version; refusing to use it as the permalink database"
                )
        for step in steps[version:]:
            step(cursor)
        if version != target:
            # PRAGMA takes no parameters; target is an int we computed.
            cursor.execute(f"PRAGMA user_version = {int(target)}")
        cursor.execute("COMMIT")
    except BaseException:
        _rollback(cursor)
        raise
    return version, target


def _rollback(cursor: Any) -> None:
    """Roll back if a transaction is still open (SQLite may have ended it)."""
    if cursor.connection.in_transaction:
        cursor.execute("ROLLBACK")


def _content_hash(code: str, language: str, interacts: str) -> str:
    """Hash the triple unambiguously (a JSON array, not a concatenation)."""
    blob = json.dumps([code, language, interacts], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _new_id() -> str:
    """Make an id nobody can guess or enumerate."""
    return secrets.token_urlsafe(ID_BYTES)


def _open_connection(conn: sqlite3.Connection) -> None:
    """Per-connection settings, run on the pool's thread at connect time."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")


class PermalinkStore:
    """
    Permalinks in one SQLite file, reached only from a one-thread pool.

    Construct it anywhere (even before the reactor runs): the schema check is
    queued first on the pool's single thread and every later operation waits
    for it. L{ready} fires with the store once the schema is usable, or fails
    with L{SchemaVersionError}/L{PermalinkStoreError}; operations made after a
    failed check fail with the same error.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        clock: IReactorTime | None = None,
        *,
        migrations: Sequence[Callable[[Any], None]] = MIGRATIONS,
        max_bytes: int | None = None,
    ) -> None:
        """
        @param path: the SQLite file (created if missing).
        @param max_bytes: most bytes the database may fill (pages in use);
            None for no cap.
        @param reactor: provides the threads the pool uses (L{IReactorThreads},
            L{IReactorCore}); only the tap should pass the global reactor.
        @param clock: where timestamps come from; defaults to C{reactor}.
        @param migrations: schema steps; tests pass their own.
        """
        self.path = path
        self.max_bytes = max_bytes
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_connection,
            cp_reactor=reactor,
        )
        self._closed = False
        self._pending = 0
        self._idle: list[defer.Deferred[None]] = []
        self._schema_error: BaseException | None = None
        self._schema_checked = False
        self._waiting: list[defer.Deferred[None]] = []
        d = self._pool.runWithConnection(self._migrate, migrations)
        d.addBoth(self._schema_result)
        self._track(d)

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def open(
        cls, path: str, reactor: Any, clock: IReactorTime | None = None
    ) -> defer.Deferred[PermalinkStore]:
        """Make a store and fire with it once the schema is usable."""
        return cls(path, reactor, clock).ready()

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
        counts as an access (its C{last_access} moves to now).
        """
        for name, value in (
            ("code", code),
            ("language", language),
            ("interacts", interacts),
        ):
            if not isinstance(value, str):
                return defer.fail(
                    TypeError(f"{name} must be str, not {type(value).__name__}")
                )
        now = self._clock.seconds()
        return self._run(self._store, code, language, interacts, now)

    def fetch(self, ident: str) -> defer.Deferred[dict[str, Any] | None]:
        """
        Fire with the permalink C{ident} (and record the access), or with
        C{None} if there is no such id.

        The dict has C{id}, C{code}, C{language}, C{interacts}, C{created},
        C{last_access} (this access) and C{requested} (times fetched).
        """
        if not is_valid_id(ident):
            return defer.succeed(None)
        now = self._clock.seconds()
        return self._run(self._fetch, ident, now)

    # -- plumbing ----------------------------------------------------------

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Count C{d} as pending until it fires, so L{close} can wait for it."""
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

    def _schema_result(self, result: object) -> None:
        """Record the schema check's outcome and release waiting operations."""
        self._schema_checked = True
        if isinstance(result, Failure):
            error = result.value
            if not isinstance(error, PermalinkStoreError):
                error = PermalinkStoreError(
                    f"cannot open permalink database {self.path!r}: {error}"
                )
                error.__cause__ = result.value
            self._schema_error = error
            log.error(
                "Permalink database {path} unusable: {error}",
                path=self.path,
                error=str(error),
            )
        else:
            old, new = result  # type: ignore[misc]
            if old != new:
                log.info(
                    "Permalink database {path} upgraded from schema {old} to {new}",
                    path=self.path,
                    old=old,
                    new=new,
                )
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            self._fire_ready(w)

    def _fire_ready(self, d: defer.Deferred[None]) -> None:
        if self._schema_error is not None:
            d.errback(self._schema_error)
        else:
            d.callback(None)

    def _when_ready(self) -> defer.Deferred[None]:
        """A fresh Deferred that fires when the schema check is done."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._schema_checked:
            self._fire_ready(d)
        else:
            self._waiting.append(d)
        return d

    def _run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run C{fn(connection, *args)} on the pool once the schema is usable."""
        if self._closed:
            return defer.fail(PermalinkStoreClosed("permalink store is closed"))
        d = self._when_ready()
        d.addCallback(lambda _: self._pool.runWithConnection(fn, *args))
        return self._track(d)

    # The methods below run on the pool's thread, never in the reactor.

    def _migrate(
        self, conn: sqlite3.Connection, migrations: Sequence[Callable[[Any], None]]
    ) -> tuple[int, int]:
        return migrate(conn.cursor(), migrations)

    def _store(
        self,
        conn: sqlite3.Connection,
        code: str,
        language: str,
        interacts: str,
        now: float,
    ) -> str:
        digest = _content_hash(code, language, interacts)
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute("SELECT id FROM permalinks WHERE content_hash = ?", (digest,))
            row = cur.fetchone()
            if row is not None:
                ident = row[0]
                cur.execute(
                    "UPDATE permalinks SET last_access = ? WHERE id = ?",
                    (now, ident),
                )
            else:
                self._check_room(cur, code, language, interacts)
                ident = self._insert(cur, code, language, interacts, digest, now)
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        return ident

    def _check_room(self, cur: sqlite3.Cursor, code: str, language: str, interacts: str) -> None:
        """Raise L{PermalinkStoreFull} unless the new row fits under C{max_bytes}."""
        if self.max_bytes is None:
            return
        values = {}
        for pragma in ("page_size", "page_count", "freelist_count"):
            cur.execute(f"PRAGMA {pragma}")
            values[pragma] = cur.fetchone()[0]
        used = (values["page_count"] - values["freelist_count"]) * values["page_size"]
        need = sum(len(v.encode("utf-8", "surrogatepass")) for v in (code, language, interacts)) + 256
        if used + need > self.max_bytes:
            raise PermalinkStoreFull(f"the permalink database holds {used} bytes, and its limit is {self.max_bytes}")

    @staticmethod
    def _insert(
        cur: sqlite3.Cursor,
        code: str,
        language: str,
        interacts: str,
        digest: str,
        now: float,
    ) -> str:
        for _ in range(_INSERT_ATTEMPTS):
            ident = _new_id()
            try:
                cur.execute(
                    "INSERT INTO permalinks (id, code, language, interacts,"
                    " content_hash, created, last_access, requested)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    (ident, code, language, interacts, digest, now, now),
                )
            except sqlite3.IntegrityError:
                # Only an id collision can get here (the hash was just checked
                # inside this transaction); 2**-128 odds, but try another.
                continue
            return ident
        raise PermalinkStoreError("could not allocate a unique permalink id")

    @staticmethod
    def _fetch(
        conn: sqlite3.Connection, ident: str, now: float
    ) -> dict[str, Any] | None:
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "UPDATE permalinks SET last_access = ?, requested = requested + 1"
                " WHERE id = ?",
                (now, ident),
            )
            if cur.rowcount == 0:
                cur.execute("ROLLBACK")
                return None
            cur.execute(
                "SELECT id, code, language, interacts, created, last_access,"
                " requested FROM permalinks WHERE id = ?",
                (ident,),
            )
            row = cur.fetchone()
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        keys = (
            "id",
            "code",
            "language",
            "interacts",
            "created",
            "last_access",
            "requested",
        )
        return dict(zip(keys, row, strict=True))
