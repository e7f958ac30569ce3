# -*- test-case-name: tests.test_config -*-
"""
``twistd sagecell``: options in, services out. Only wiring happens here.

This is the one module that touches the global reactor.
"""

from __future__ import annotations

import os

from twisted.application import strports
from twisted.python import usage

from . import config as configmod

HELP = {
    "port": "where to listen: a Twisted endpoint string (tcp:8888:interface=127.0.0.1, ssl:8443:privateKey=...)",
    "token": "require this token (Authorization: token ..., or ?token=); empty: anonymous access",
    "allow_origin": "comma-separated origins that may use the API and WebSockets ('*' for any)",
    "max_message_size": "largest WebSocket message or JSON body, in bytes (10M, 512k ...)",
    "base_url": "path prefix every route is served under, as a reverse proxy forwards it (/sagecell/; default: none)",
    "trusted_proxies": "comma-separated addresses or networks (127.0.0.1, 10.0.0.0/8) of reverse proxies whose "
    "X-Forwarded-For and X-Forwarded-Proto count; from any other address they are ignored",
    "max_connections_per_client": "most open connections (HTTP and WebSocket) from one client address; more are closed at once",
    "max_sockets_per_session": "most WebSockets open to one session at once",
    "http_idle_timeout": "close an HTTP connection idle this long, seconds (WebSockets have their own pings)",
    "pool_size": "kernels kept forked and ready",
    "preload": "comma-separated modules the fork server imports once (default: numpy, sympy, matplotlib where installed)",
    "kernels": "comma-separated kernels to serve, the default first: sagemath, python3 (default: both where Sage is installed)",
    "worker_user": "the unprivileged account kernels run as (when started as root)",
    "daemon_group": "the group the daemon drops to (twistd --gid): kernel dirs are made reachable by it",
    "run_dir": "directory for the control socket and kernel dirs (default: a fresh one in /tmp)",
    "control": "zmq address spawners connect to (default: ipc:// in the run dir)",
    "embedded_spawner": "start a spawner ourselves (true/false)",
    "curve_secret_key": "the daemon's CurveZMQ secret key file (sagecell-keys generate): encrypts the link to worker hosts",
    "worker_keys": "directory of worker hosts' public key files allowed to connect to --control tcp://...",
    "spawner_restart_max": "longest wait, in seconds, before restarting a dead spawner",
    "max_kernels": "most kernels running at once, overall",
    "max_kernels_per_client": "most kernels one client address may have",
    "max_restarts_per_minute": "most kernel restarts (or new kernels after a death) of one session a minute; "
    "of one client address, three times this (more: 429, or a Jupyter error on the socket)",
    "max_messages_per_second": "most messages a second the browsers of one session may send (a burst of as many; "
    "each 64 KiB counts as one more); past it their sockets are read no faster",
    "max_kernels_per_page": "most kernels one page (SageMathCell CellSessionID) may have through POST /kernel",
    "address_space": "per-kernel address space limit, bytes (0: none)",
    "cpu_seconds": "per-kernel CPU time limit, seconds",
    "processes": "per-kernel process limit",
    "file_size": "largest file a kernel may write, bytes",
    "open_files": "most open files per kernel",
    "disk_quota": "most bytes in a kernel's working directory",
    "network": "let kernels use the network (true/false; for trusted deployments)",
    "exec_timeout": "wall-clock limit of one execution, seconds (interrupt, then kill); default 30, as SageMathCell's",
    "idle_timeout": "end a session idle this long, seconds",
    "disconnect_timeout": "end a session with no browser connected this long, seconds",
    "replay_bytes": "per session, bytes of recent output kept for a WebSocket that drops and reconnects "
    "(within --disconnect-timeout) to replay; more and the oldest goes, with a notice (0: no replay)",
    "max_lifetime": "end any session this old, seconds",
    "shutdown_grace": "seconds between a kernel's shutdown request and SIGKILL",
    "max_output_bytes": "output cap per execution, bytes",
    "interrupt_on_output_cap": "interrupt the code when it hits the output cap (true/false)",
    "requires_tos": "SageMathCell's /kernel and /service refuse (403) requests without accepted_tos=true (true/false)",
    "daemon_name": "this daemon's name in the ids it makes (d1-...), for a load balancer over several daemons "
    "to send each kernel's requests back to it (etc/haproxy.cfg); the balancer's name for its server",
    "permalink_db": "where permalinks live: a SQLite file (default: /var/lib/sagecell/permalinks.sqlite3 as root, "
    "else under $XDG_DATA_HOME), or postgresql://USER@HOST/DB for a database several daemons share",
    "permalink_db_max_size": "most bytes the permalink database may fill; new permalinks past it are refused (507)",
    "permalinks_per_minute": "new permalinks one client address may make per minute (and at once); more are refused (429)",
    "max_upload_size": "largest file upload, bytes",
    "log_json": "log JSON lines (true/false)",
    "log_code": "log users' code (true/false; off by default)",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "A live code cell server: sandboxed IPython kernels forked from a warm master."
    optParameters = [["config", "c", None, "TOML configuration file; command-line options override it"]] + [
        [name.replace("_", "-"), None, None, HELP.get(name, "")] for name in configmod.OPTION_NAMES.values()
    ]

    def postOptions(self):
        given = {k: v for k, v in self.items() if k != "config" and v is not None}
        try:
            file_values = configmod.load_toml(self["config"]) if self["config"] else {}
            self.config = configmod.build(file_values, given)
        except configmod.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        check_port(self.config.port)
        if self.config.curve_secret_key:
            from . import keys

            try:
                keys.load_secret(self.config.curve_secret_key)
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--curve-secret-key: {e}") from None
        parent = getattr(self, "parent", None)
        if self.config.log_json and parent is not None and not parent.get("logger"):
            # twistd reads its observer factory after parsing, before it
            # starts logging: JSON lines become its one and only observer.
            parent["logger"] = "sagecell_tw.logs.json_observer"


def check_port(port: str) -> None:
    """Parse the endpoint string now (and load TLS files): a bad one fails at start, naming --port."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_NoReactor(), port)
    except Exception as e:
        raise usage.UsageError(f"--port {port!r}: {e}") from None


def _more_open_files(most: int = 1 << 16) -> None:
    """
    Raise our soft limit of open files to the hard one (at most ``most``):
    each browser connection and each kernel's four sockets need descriptors,
    and the usual soft limit of 1024 would run out long before
    --max-kernels or --max-connections-per-client do.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def check_worker_python(config) -> None:
    """
    Stop at once, with one sentence, if the worker account cannot run this
    Python and sagecell_tw (as it must: the spawner drops to it), instead of
    restarting a spawner that dies at start again and again.
    """
    from .control import spawners

    why = spawners.worker_cannot_run(config)
    if why:
        raise SystemExit(
            f"sagecell: {why}: install sagecell_tw where that account can read it "
            "(as root, ./setup.sh puts a virtualenv in /opt/sagecell_tw/venv) and run twistd from there."
        )


class _NoReactor:
    """Parsing an endpoint string only stores the reactor; the real one is not ours to install here."""


def makeService(options: Options):
    from twisted.internet import reactor

    from .daemon.service import SageCellService
    from .web.site import ConnectionsPerClient, build_site

    config = options.config
    if config.embedded_spawner and os.geteuid() == 0:
        check_worker_python(config)
    _more_open_files()
    top = SageCellService(config, reactor)
    site = build_site(top, config, reactor)
    from .web.proxies import TrustedProxies

    counted = ConnectionsPerClient(site, config.max_connections_per_client, TrustedProxies(config.trusted_proxies))
    listener = strports.service(config.port, counted, reactor=reactor)
    listener.setServiceParent(top)
    return top
