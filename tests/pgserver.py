"""
A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries,
``initdb`` into a temporary directory, listening only on a unix socket in that
directory, stopped by its PID.

PostgreSQL refuses to run as root: as root (as in CI) the server runs as the
``postgres`` account the Debian package makes; otherwise as whoever runs the
tests. It trusts local connections (only its socket, in a directory of its
own) and skips fsync, since nothing in it needs to outlive the test session.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from urllib.parse import quote


def bindir() -> str | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps it off PATH), or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        initdb = shutil.which("initdb")
        return os.path.dirname(initdb) if initdb else None
    newest = max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p.split("/")[-3])])
    return os.path.dirname(newest)


class PostgresServer:
    """One server, started once per test session; ``url()`` names a database on it."""

    def __init__(self) -> None:
        self.bin = bindir()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (./setup.sh installs Debian's postgresql)")
        self.account = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.tmp = tempfile.mkdtemp(prefix="sagecell-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.log_path = os.path.join(self.tmp, "server.log")
        self.proc: subprocess.Popen | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.account)
            os.chown(self.tmp, entry.pw_uid, entry.pw_gid)
            os.chmod(self.tmp, 0o755)  # the socket's directory: daemons under test connect through it
        self._as_account(
            [os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust"]
            + ["-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            timeout=60,
        )

    def _as_account(self, argv: list[str], timeout: float) -> None:
        out = subprocess.run(argv, user=self._user(), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed:\n{out.stdout}\n{out.stderr}")

    def _user(self) -> str | None:
        return self.account if os.geteuid() == 0 else None

    @property
    def socket(self) -> str:
        return os.path.join(self.tmp, ".s.PGSQL.5432")

    def start(self, timeout: float = 30.0) -> PostgresServer:
        """Start the server and wait (bounded) until it accepts connections."""
        import psycopg

        log = open(self.log_path, "ab")
        argv = [
            os.path.join(self.bin, "postgres"),
            "-D",
            self.data,
            "-c",
            "listen_addresses=",
            "-c",
            f"unix_socket_directories={self.tmp}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]
        self.proc = subprocess.Popen(argv, user=self._user(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited:\n" + self.log())
            if os.path.exists(self.socket):
                try:
                    psycopg.connect(self.url(), connect_timeout=2).close()
                    return self
                except psycopg.OperationalError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("postgres did not start:\n" + self.log())

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT: sessions are ended, nothing waits for clients), by the server's PID."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        """A ``postgresql://`` URL through the socket; with ``schema``, that schema first on the search path."""
        url = f"postgresql://postgres@/{dbname}?host={quote(self.tmp, safe='/')}"
        if schema:
            url += "&options=" + quote(f"-csearch_path={schema}", safe="")
        return url

    def execute(self, sql: str, dbname: str = "postgres") -> list:
        """Run one statement (autocommit) and return its rows, if it has any."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def new_schema(self) -> str:
        """A fresh, empty schema; a URL whose connections use it."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.execute(f"CREATE SCHEMA {name}")
        return self.url(schema=name)

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = "db_" + uuid.uuid4().hex[:12]
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)
