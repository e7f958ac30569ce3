# -*- test-case-name: tests.test_permalinks -*-
"""
The PostgreSQL back end of the permalink store: one database that several
daemons share, so a permalink made through any daemon is read through any.

Reached with psycopg 3, a maintained DB-API 2.0 driver (imported only when a
``postgresql://`` URL is configured), on adbapi's threads: at most
``POOL_MAX`` connections per daemon, in autocommit mode with explicit
transactions, as the SQLite back end. A connection that is lost is replaced
(``PermalinkStore``); a server that cannot be reached fails within
``connect_timeout`` (5 s unless the URL says otherwise).

Code and interacts are BYTEA (UTF-8), not TEXT: PostgreSQL's text cannot hold
a NUL character, and code may contain one. Daemons that start at once migrate
the schema one after the other, under a transaction-scoped advisory lock. The
size cap counts ``pg_total_relation_size`` of the table: heap, TOAST (where
long values are kept compressed) and indexes, PostgreSQL's own measure of what
the table fills on disk.

Give sagecell_tw a database (or a schema, through the URL's
``options=-csearch_path%3D...``) of its own: a database that already has a
``permalinks`` table without our schema version is refused.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.enterprise import adbapi

from .permalink_backend import Backend, Cursor

__all__ = ["POOL_MAX", "PostgresBackend", "redact"]

#: Most connections (and pool threads) one daemon opens to the database.
POOL_MAX = 4

#: The advisory lock held while migrating: any constant bigint, the same in every daemon.
SCHEMA_LOCK = 0x5A6E_CE11_0001

#: Connection settings the URL may override.
DEFAULTS = {"connect_timeout": "5", "application_name": "sagecell_tw"}


def redact(url: str) -> str:
    """The URL without its password, fit for a log line."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@?#:]*):[^/?#]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


class PostgresBackend(Backend):
    """Permalinks in a PostgreSQL database, named by a ``postgresql://`` URL."""

    dialect = "postgresql"
    begin_sql = "BEGIN"
    paramstyle = "format"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        super().__init__(redact(url))
        given = conninfo_to_dict(url)
        self.conninfo = make_conninfo(url, **{k: v for k, v in DEFAULTS.items() if k not in given})
        #: connection refused or lost, server shutting down, ...: answered 503 and tried again later
        self.unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
        self._idle = psycopg.pq.TransactionStatus.IDLE

    def pool(self, reactor: Any) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "psycopg",
            self.conninfo,
            autocommit=True,
            cp_min=1,
            cp_max=POOL_MAX,
            cp_reactor=reactor,
        )

    def rollback(self, cur: Cursor) -> None:
        conn = cur.raw.connection
        if not conn.closed and conn.info.transaction_status != self._idle:
            cur.execute("ROLLBACK")

    def lock_schema(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    def table_exists(self, cur: Cursor, name: str) -> bool:
        (found,) = cur.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
        return found

    def foreign(self, cur: Cursor) -> str | None:
        return "database has a permalinks table" if self.table_exists(cur, "permalinks") else None

    def used_bytes(self, cur: Cursor) -> int:
        return cur.execute("SELECT pg_total_relation_size('permalinks')").fetchone()[0]

    def to_db(self, text: str) -> bytes:
        return text.encode("utf-8", "surrogatepass")

    def from_db(self, value: Any) -> str:
        return bytes(value).decode("utf-8", "surrogatepass")

    def lost(self, conn: Any) -> bool:
        return bool(conn.closed)
