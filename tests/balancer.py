"""
Test helpers for several daemons behind a real HAProxy: the shipped
``etc/haproxy.cfg`` with its bind and server lines pointed at loopback
ports, run in the foreground and stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from support import ROOT, Daemon, descendants

SHIPPED = os.path.join(ROOT, "etc", "haproxy.cfg")


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(servers: dict[str, int], port: int, shipped: str = SHIPPED, per_visitor: int = 4000) -> str:
    """
    The shipped configuration, listening on 127.0.0.1:``port``, over ``servers``
    (name: port) on loopback, with at most ``per_visitor`` connections from one
    address (every visitor of a test comes from 127.0.0.1).
    """
    with open(shipped) as f:
        text = f.read()
    text, n = re.subn(r"(?m)^    bind :80$", f"    bind 127.0.0.1:{port}", text)
    assert n == 1, "etc/haproxy.cfg: no 'bind :80' line in the frontend"
    lines = "".join(f"    server {name} 127.0.0.1:{p}\n" for name, p in servers.items())
    text, n = re.subn(r"(?m)(^    server \S+ \S+\n)+", lines, text)
    assert n == 1, "etc/haproxy.cfg: no block of server lines"
    # as many connections as this machine's limit of open files allows (the shipped figure needs LimitNOFILE)
    text = re.sub(r"(?m)^    maxconn \d+$", "    maxconn 4000", text)
    text, n = re.subn(r"sc0_conn_cur gt \d+", f"sc0_conn_cur gt {per_visitor}", text)
    assert n == 1, "etc/haproxy.cfg: no per-visitor connection limit"
    # the stats page is the operator's, on a fixed port: not in tests
    return text.split("\n# Optional: HAProxy's own page")[0]


class HAProxy:
    """``haproxy -db`` on the rendered configuration; ``url``/``ws_url`` as a Daemon's, for ``Client``."""

    def __init__(self, servers: dict[str, int], **options):
        self.tmp = tempfile.mkdtemp(prefix="sagecell-haproxy-")
        self.port = free_port()
        self.config = os.path.join(self.tmp, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(render(servers, self.port, **options))
        self.log_path = os.path.join(self.tmp, "haproxy.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    request = Daemon.request

    def start(self, timeout: float = 10.0) -> HAProxy:
        binary = haproxy_binary()
        assert binary, "haproxy is not installed (setup.sh installs it)"
        check = subprocess.run([binary, "-c", "-q", "-f", self.config], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([binary, "-db", "-f", self.config], stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited:\n" + self.log())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("haproxy did not listen:\n" + self.log())

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def crash(daemon: Daemon) -> None:
    """
    SIGKILL a daemon, as a crash would; then end its spawner and kernels
    (which a crashed daemon leaves behind), all by the PIDs it started.
    """
    assert daemon.proc is not None
    family = descendants(daemon.proc.pid)
    daemon.proc.kill()
    daemon.proc.wait(10)
    for pid in family[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_all(daemons) -> None:
    """Start the daemons side by side (each waits for its pool); all started, or all stopped."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(daemons)) as pool:
        failures = [f.exception() for f in [pool.submit(d.start) for d in daemons]]
    if any(failures):
        for d in daemons:
            d.stop()
        raise next(f for f in failures if f)
