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
