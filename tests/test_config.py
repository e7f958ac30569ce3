"""The configuration: a TOML file under the command-line options, checked at start."""

import os
import subprocess
import sys

import pytest

from sagecell_tw import config as configmod
from sagecell_tw.tap import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "sagecell.toml"
    path.write_text(text)
    return str(path)


def test_file_values_under_options(tmp_path):
    path = write(
        tmp_path,
        '[kernels]\npool_size = 2\nmax_kernels = 10\n[limits]\nexec_timeout = 5\n[web]\nallow_origin = ["https://a.example"]\n',
    )
    opts = Options()
    opts.parseOptions(["--config", path, "--pool-size", "3"])
    cfg = opts.config
    assert cfg.pool_size == 3  # the option wins
    assert cfg.max_kernels == 10  # the file's value
    assert cfg.exec_timeout == 5.0 and isinstance(cfg.exec_timeout, float)
    assert cfg.allow_origin == ("https://a.example",)
    assert cfg.idle_timeout == configmod.Config().idle_timeout  # the default


def test_the_example_file_is_valid():
    cfg = configmod.build(configmod.load_toml(os.path.join(ROOT, "etc", "sagecell.toml")))
    assert cfg.run_dir == "/run/sagecell" and cfg.worker_user == "sagecell-worker"
    assert cfg.daemon_group == "sagecell-worker" and not cfg.log_code


@pytest.mark.parametrize(
    "text, words",
    [
        ("pool_size = -1\n", "--pool-size"),
        ("pool_size = 2.5\n", "--pool-size"),
        ("max_messages_per_second = 0\n", "--max-messages-per-second"),
        ("cpu_seconds = true\n", "--cpu-seconds"),
        ("exec_timeout = 'soon'\n", "--exec-timeout"),
        ("network = 'maybe'\n", "--network"),
        ("allow_origin = ['example.org']\n", "--allow-origin"),
        ("pool_size = 9\nmax_kernels = 4\n", "--pool-size"),
        ("[web]\nport = 8888\n", "--port"),
        ("colour = 'blue'\n", "'colour'"),
        ("[kernels]\npool_size = 1\n[limits]\npool_size = 2\n", "set twice"),
        ("[web.extra]\nport = 'tcp:1'\n", "[web.extra]"),
        ("pool_size = \n", "not valid TOML"),
    ],
)
def test_bad_file_names_the_setting(tmp_path, text, words):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.build(configmod.load_toml(write(tmp_path, text)))
    assert words in str(e.value)


def test_unknown_option_rejected():
    with pytest.raises(configmod.ConfigError, match="unknown option setting 'colour'"):
        configmod.build({}, {"colour": "blue"})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(configmod.ConfigError, match="--config: cannot read"):
        configmod.load_toml(str(tmp_path / "nope.toml"))


def twistd(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sagecell", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def test_daemon_refuses_bad_option_at_start(tmp_path):
    r = twistd("--pool-size=-1", cwd=str(tmp_path))
    assert r.returncode != 0
    assert "--pool-size must be zero or more, not -1" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout


def test_daemon_refuses_bad_file_at_start(tmp_path):
    path = write(tmp_path, "[kernels]\npool_size = [\n")
    r = twistd("--config", path, cwd=str(tmp_path))
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "--config" in out and "not valid TOML" in out and "Traceback" not in out
    path = write(tmp_path, "[limits]\nmax_kernels = 0\n")
    r = twistd("--config", path, cwd=str(tmp_path))
    assert r.returncode != 0 and "--max-kernels must be more than zero" in r.stderr + r.stdout


def test_daemon_refuses_bad_port_at_start(tmp_path):
    r = twistd("--port", f"ssl:0:privateKey={tmp_path}/missing.pem", cwd=str(tmp_path))
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "--port" in out and "missing.pem" in out and "Traceback" not in out
