# -*- test-case-name: tests.test_permalinks -*-
"""
The SQLite back end of the permalink store: one file, the embedded default
for a daemon of its own.

One connection on one pool thread, in autocommit mode with explicit
``BEGIN IMMEDIATE`` transactions (the write lock is taken at the start, so a
check and the write that follows it cannot interleave with another writer), in
WAL mode so readers of the file never wait for the writer.

The schema version is kept in the ``permalink_schema`` table and, as well, in
``PRAGMA user_version``: sagecell_tw of before the table read only the pragma,
and must find there a version too new for it rather than write to a layout it
does not know. A file made by that older code (the pragma, no table) is taken
at the pragma's version and gets the table at its first migration.

The size cap counts the pages in use (``page_count - freelist_count``) times
the page size: the file's own measure, indexes included.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.enterprise import adbapi

from .permalink_backend import Backend, Cursor

__all__ = ["SQLiteBackend"]


def _open_connection(conn: sqlite3.Connection) -> None:
    """Per-connection settings, run on the pool's thread at connect time."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")


class SQLiteBackend(Backend):
    """Permalinks in one SQLite file."""

    dialect = "sqlite"
    begin_sql = "BEGIN IMMEDIATE"
    paramstyle = "qmark"
    #: "unable to open database file", "disk I/O error", "database is locked", ...
    unavailable = (sqlite3.OperationalError,)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def pool(self, reactor: Any) -> adbapi.ConnectionPool:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        return adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_connection,
            cp_reactor=reactor,
        )

    def rollback(self, cur: Cursor) -> None:
        if cur.raw.connection.in_transaction:
            cur.execute("ROLLBACK")

    def table_exists(self, cur: Cursor, name: str) -> bool:
        rows = cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchall()
        return bool(rows)

    def unversioned_version(self, cur: Cursor) -> int:
        (version,) = cur.execute("PRAGMA user_version").fetchone()
        return version

    def foreign(self, cur: Cursor) -> str | None:
        (objects,) = cur.execute("SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchone()
        return "file is a SQLite database with tables" if objects else None

    def record_version(self, cur: Cursor, version: int) -> None:
        super().record_version(cur, version)
        # PRAGMA takes no parameters; version is an int we computed.
        cur.execute(f"PRAGMA user_version = {int(version)}")

    def used_bytes(self, cur: Cursor) -> int:
        values = {}
        for pragma in ("page_size", "page_count", "freelist_count"):
            values[pragma] = cur.execute(f"PRAGMA {pragma}").fetchone()[0]
        return (values["page_count"] - values["freelist_count"]) * values["page_size"]
