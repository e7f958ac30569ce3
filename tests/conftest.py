import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from support import Daemon  # noqa: E402


@pytest.fixture(scope="module")
def daemon():
    """One real daemon for a test module, stopped (SIGTERM) at the end."""
    d = Daemon(pool_size=3).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the whole test session (pgserver.py), stopped by its PID at the end."""
    from pgserver import PostgresServer, bindir

    if bindir() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (./setup.sh installs Debian's postgresql)")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


#: test modules whose skips, when the suite runs as root (as in CI), are failures: as root every
#: one of their preconditions can be had, so a skip there means an attack went untried. A module
#: names in ``SKIPS_ROOT_CANNOT_HELP`` the skips that are about the install, not the privileges.
MUST_RUN_AS_ROOT = ("test_security.py",)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and os.geteuid() == 0 and item.path.name in MUST_RUN_AS_ROOT:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in why for allowed in getattr(item.module, "SKIPS_ROOT_CANNOT_HELP", ())):
            report.outcome = "failed"
            report.longrepr = f"skipped as root, where the security tests must run: {why}"
    return report
