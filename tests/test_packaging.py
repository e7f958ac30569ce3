"""
The package as installed (setup.sh runs ``pip install .``): what twistd finds.

Runs against the installed distribution, not this checkout: the commands
start in ``/`` with no PYTHONPATH. Skips where sagecell_tw is not installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def dist():
    try:
        return importlib.metadata.distribution("sagecell_tw")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sagecell_tw is not installed in this Python (setup.sh installs it)")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def twistd(*args: str) -> subprocess.CompletedProcess:
    """The ``twistd`` script of this Python's environment, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(script):
        pytest.skip(f"no twistd script beside {sys.executable}")
    return subprocess.run([script, *args], cwd="/", env=clean_env(), capture_output=True, text=True, timeout=60)


def test_the_plugin_ships_without_an_init_of_twisteds_plugins_folder(dist):
    files = {str(f) for f in dist.files or ()}
    assert "twisted/plugins/sagecell_plugin.py" in files
    assert "twisted/plugins/__init__.py" not in files
    assert not any(f.startswith("twisted/") and f.endswith("dropin.cache") for f in files)


def test_twistd_help_lists_sagecell(dist):
    out = twistd("--help")
    assert out.returncode == 0, out.stderr
    assert any(line.split()[:1] == ["sagecell"] for line in out.stdout.splitlines()), out.stdout


def test_twistd_sagecell_help_names_the_options(dist):
    out = twistd("sagecell", "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--port", "--pool-size", "--preload", "--worker-user", "--token", "--allow-origin"):
        assert option in out.stdout, option
