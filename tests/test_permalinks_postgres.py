# -*- test-case-name: tests.test_permalinks_postgres -*-
"""
Permalinks of a multi-daemon site, end to end: real daemons (``support.Daemon``)
sharing one real PostgreSQL server (the session's ``postgres`` fixture).

A permalink made through one daemon is read through the other; the database
stopped under running daemons gives clear 503s while cells keep running, and
is used again once it is back; a daemon whose database is unreachable at start
says so in one sentence and serves cells all the same. And the option that
chooses the back end.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlencode

import pytest
from support import Client, Daemon, stdout_of
from twisted.python import usage

from sagecell_tw import config as configmod
from sagecell_tw import tap
from sagecell_tw.core.permalinks import RETRY_AFTER

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
UNAVAILABLE = "permalink database unavailable; try again later (running code is not affected)"


def post(daemon: Daemon, code: str):
    return daemon.request(
        "POST", "/permalink", raw=urlencode({"code": code, "language": "python"}).encode(), headers=FORM
    )


def sentences(daemon: Daemon, words: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if words in line]


def wait_for(daemon: Daemon, words: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sentences(daemon, words)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{words!r} never logged:\n{daemon.log()}")


@pytest.fixture(scope="module")
def pair(postgres):
    """Two daemons on one PostgreSQL database, as behind a load balancer."""
    url = postgres.new_database()
    daemons = []
    try:
        for _ in range(2):
            daemons.append(Daemon("--permalink-db", url, pool_size=1).start())
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def test_a_permalink_made_through_one_daemon_is_read_through_the_other(pair):
    one, other = pair
    status, made, _ = post(one, "print('made through one')")
    assert status == 200, made
    status, got, _ = other.request("GET", f"/permalink?q={made['query']}")
    assert (status, got) == (200, ["print('made through one')", "python", "[]"])
    # The same code through the other daemon is the same permalink, not a second one.
    status, again, _ = post(other, "print('made through one')")
    assert (status, again["query"]) == (200, made["query"])
    status, back, _ = post(other, "print('made through the other')")
    status, got, _ = one.request("GET", f"/permalink?q={back['query']}")
    assert (status, got) == (200, ["print('made through the other')", "python", "[]"])


def test_database_down_mid_run_gives_503_and_cells_keep_running(pair, postgres):
    one, other = pair
    status, made, _ = post(one, "print('before the outage')")
    assert status == 200
    client = Client(one, one.new_kernel())
    postgres.stop()
    try:
        for status, body, headers in (
            post(one, "print('during')"),
            one.request("GET", f"/permalink?q={made['query']}"),
        ):
            assert (status, body) == (503, {"error": UNAVAILABLE})
            assert headers["Content-Type"] == "application/json"
        reply, outputs = client.execute("print(6 * 7)")
        assert reply["status"] == "ok" and stdout_of(outputs) == "42\n"
        fresh = Client(one, one.new_kernel())
        reply, outputs = fresh.execute("print('a new session too')")
        assert stdout_of(outputs) == "a new session too\n"
        assert one.request("GET", "/healthz/live")[0] == 200
    finally:
        postgres.start()
    # Back: both daemons use it again (once RETRY_AFTER has passed), without a restart, the outage said once.
    deadline = time.monotonic() + RETRY_AFTER + 10
    while (answer := one.request("GET", f"/permalink?q={made['query']}"))[0] == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answer[:2] == (200, ["print('before the outage')", "python", "[]"])
    status, after, _ = post(other, "print('after the outage')")
    assert status == 200
    said = sentences(one, "cannot be used")
    assert len(said) == 1, said
    assert "permalinks answer 503 until it can, and cells are served as usual" in said[0]
    assert sentences(one, "can be used again")
    assert "Traceback" not in one.log() and "Rollback failed" not in one.log()
    client.close()
    fresh.close()


def test_a_daemon_that_cannot_reach_its_database_says_so_and_serves_cells():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    d = Daemon("--permalink-db", f"postgresql://sagecell:s3cret@127.0.0.1:{port}/cells", pool_size=1).start()
    try:
        said = wait_for(d, "Permalink database")
        assert len(said) == 1, said
        assert f"Permalink database postgresql://sagecell:***@127.0.0.1:{port}/cells cannot be used" in said[0]
        assert "Connection refused" in said[0]
        assert "s3cret" not in d.log() and "Traceback" not in d.log()
        status, body, _ = post(d, "print(1)")
        assert (status, body) == (503, {"error": UNAVAILABLE})
        client = Client(d, d.new_kernel())
        reply, outputs = client.execute("print(2 + 2)")
        assert stdout_of(outputs) == "4\n"
        client.close()
        assert len(sentences(d, "Permalink database")) == 1, "one sentence, not one per request"
    finally:
        d.stop()


def test_permalink_db_is_a_file_path_or_a_postgresql_url(tmp_path):
    for where in (
        str(tmp_path / "p.sqlite3"),
        "relative.sqlite3",
        "postgresql://u@db.example/cells",
        "postgres://db/c",
    ):
        assert configmod.build(options={"permalink-db": where}).permalink_db == where
    with pytest.raises(configmod.ConfigError, match=r"--permalink-db: mysql:// is not a database this server uses"):
        configmod.build(options={"permalink-db": "mysql://u@h/db"})
    with pytest.raises(configmod.ConfigError, match="--permalink-db: not a valid PostgreSQL URL") as caught:
        configmod.build(options={"permalink-db": "postgresql://u:s3cret@h/db?bogus=1"})
    assert "s3cret" not in str(caught.value)
    options = tap.Options()
    with pytest.raises(usage.UsageError, match="--permalink-db"):
        options.parseOptions(["--permalink-db", "sqlite:///x.db"])
