"""
A real nginx in front of a test daemon: etc/nginx-sagecell.conf as shipped,
pointed at loopback ports, run from a temp dir with its own main config
(no root paths, no daemonizing) and stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "nginx-sagecell.conf")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
#: the prefix etc/nginx-sagecell.conf serves
PREFIX = "/sagecell"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_config(daemon_port: int, listen_port: int) -> str:
    """The shipped file, its "(test)" lines pointed at the daemon's port and a loopback port."""
    with open(SHIPPED) as f:
        text = f.read()
    for old, new in (
        ("server 127.0.0.1:8888;", f"server 127.0.0.1:{daemon_port};"),
        ("listen 80;", f"listen 127.0.0.1:{listen_port};"),
    ):
        assert text.count(old) == 1, f"etc/nginx-sagecell.conf no longer has {old!r} once"
        text = text.replace(old, new)
    return text


class Nginx:
    """``nginx -g 'daemon off;'`` on a free loopback port, proxying ``PREFIX`` to ``daemon``."""

    def __init__(self, daemon_port: int, port: int | None = None):
        if not os.path.exists(NGINX):
            raise RuntimeError("no nginx here (apt-get install -y nginx; setup.sh installs it for the tests)")
        self.tmp = tempfile.mkdtemp(prefix="sagecell-nginx-")
        self.port = port or free_port()
        with open(os.path.join(self.tmp, "sagecell.conf"), "w") as f:
            f.write(site_config(daemon_port, self.port))
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.tmp, d))
        user = "user root;" if os.geteuid() == 0 else ""  # its temp dirs are ours
        main = f"""
{user}
worker_processes 1;
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {self.tmp}/access.log;
    client_body_temp_path {self.tmp}/body;
    proxy_temp_path {self.tmp}/proxy;
    fastcgi_temp_path {self.tmp}/fastcgi;
    uwsgi_temp_path {self.tmp}/uwsgi;
    scgi_temp_path {self.tmp}/scgi;
    include {self.tmp}/sagecell.conf;
}}
"""
        self.conf = os.path.join(self.tmp, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(main)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Nginx:
        check = subprocess.run([NGINX, "-t", "-p", self.tmp, "-c", self.conf], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError("nginx -t refused the config:\n" + check.stderr)
        self.proc = subprocess.Popen(
            [NGINX, "-p", self.tmp, "-c", self.conf, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("nginx exited:\n" + self.error_log()) from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening:\n" + self.error_log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master ends its workers, open WebSockets too
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.tmp, "error.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{PREFIX}"
