# -*- test-case-name: tests.test_permalinks -*-
"""
What a permalink database back end is (``permalink_sqlite``,
``permalink_postgres``): the interface ``permalinks.PermalinkStore`` and its
migrations use, with the SQL they share written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.enterprise import adbapi

#: the one-row table holding the schema version, on every back end
VERSION_TABLE = "permalink_schema"


class Cursor:
    """
    A DB-API cursor that takes ``?`` placeholders on every back end, so the SQL
    here and in migration steps is written once; ``dialect`` (``"sqlite"`` or
    ``"postgresql"``) names the back end for the few statements that differ.
    """

    def __init__(self, raw: Any, dialect: str, paramstyle: str) -> None:
        self.raw = raw
        self.dialect = dialect
        self._format = paramstyle != "qmark"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if self._format:
            sql = sql.replace("?", "%s")
        if params:
            self.raw.execute(sql, tuple(params))
        else:
            self.raw.execute(sql)
        return self

    def fetchone(self) -> Any:
        return self.raw.fetchone()

    def fetchall(self) -> list[Any]:
        return self.raw.fetchall()


class Backend:
    """
    One kind of database: what differs between SQLite and PostgreSQL. The
    methods taking a cursor run on the pool's threads, never in the reactor.
    """

    #: what migration steps see as ``cursor.dialect``
    dialect = ""
    #: the statement that opens a write transaction
    begin_sql = "BEGIN"
    #: the driver's DB-API paramstyle ("qmark" takes the SQL as written, others get ``%s``)
    paramstyle = "qmark"
    #: driver errors that mean "the database cannot be used now" (answered 503, tried again later)
    unavailable: tuple[type[BaseException], ...] = ()

    def __init__(self, where: str) -> None:
        #: the file or the URL (without its password), for messages
        self.where = where

    def pool(self, reactor: Any) -> adbapi.ConnectionPool:
        """A connection pool on ``reactor``'s threads."""
        raise NotImplementedError

    def cursor(self, conn: Any) -> Cursor:
        return Cursor(conn.cursor(), self.dialect, self.paramstyle)

    def rollback(self, cur: Cursor) -> None:
        """Roll back if a transaction is still open (the database may have ended it)."""
        raise NotImplementedError

    def lock_schema(self, cur: Cursor) -> None:
        """Keep other processes from migrating at the same time, until this transaction ends."""

    def table_exists(self, cur: Cursor, name: str) -> bool:
        raise NotImplementedError

    def unversioned_version(self, cur: Cursor) -> int:
        """The version of a database without the version table: 0, or what older sagecell_tw noted elsewhere."""
        return 0

    def foreign(self, cur: Cursor) -> str | None:
        """Why a database without a schema version is not ours to take, or None when it is."""
        raise NotImplementedError

    def record_version(self, cur: Cursor, version: int) -> None:
        """Write ``version`` in the version table, creating it if missing."""
        cur.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
        cur.execute(f"DELETE FROM {VERSION_TABLE}")
        cur.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (?)", (version,))

    def used_bytes(self, cur: Cursor) -> int:
        """Bytes the permalinks fill, as the size cap counts them."""
        raise NotImplementedError

    def to_db(self, text: str) -> Any:
        """Code or interacts as its column holds it."""
        return text

    def from_db(self, value: Any) -> str:
        return value

    def lost(self, conn: Any) -> bool:
        """Whether the database dropped this connection (so a fresh one may succeed)."""
        return False

    def why(self, error: BaseException) -> str:
        """A driver error in one line, for the log and the operator."""
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
