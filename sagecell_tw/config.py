# -*- test-case-name: tests.test_config -*-
"""
The service's configuration: one validated, frozen object.

Built from defaults, then a TOML file (``--config``), then command-line
options, each layer over the last. A bad value fails at start with a message
naming the option. Plain model: no Twisted, no zmq.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the option."""


def _positive(name: str, value, allow_zero: bool = False):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"--{name} must be a number, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{name} must be {'zero or more' if allow_zero else 'more than zero'}, not {value!r}")
    return value


@dataclass(frozen=True)
class Config:
    """Every setting of a running service. Times are seconds, sizes bytes."""

    # -- the web side
    port: str = "tcp:8888:interface=127.0.0.1"
    token: str = ""
    allow_origin: tuple[str, ...] = ("*",)
    max_message_size: int = 10 << 20
    base_url: str = ""  # "" or "/a/path": every route is served under it (normalized: no trailing slash)
    trusted_proxies: tuple[str, ...] = ()  # addresses/CIDRs whose X-Forwarded-For/-Proto count
    max_connections_per_client: int = 256
    max_sockets_per_session: int = 32
    http_idle_timeout: float = 120.0
    # -- spawning kernels
    pool_size: int = 4
    preload: tuple[str, ...] | None = None  # None: whichever of numpy, sympy, matplotlib exist
    #: the kernels served (KERNEL_NAMES), the default first; None: Sage where installed, and Python
    kernels: tuple[str, ...] | None = None
    worker_user: str = "sagecell-worker"
    daemon_group: str = ""  # "" : the group twistd --gid gives us, where known
    run_dir: str = ""  # "" : a fresh private dir under $XDG_RUNTIME_DIR or /tmp
    control: str = ""  # "" : ipc://{run_dir}/control
    embedded_spawner: bool = True
    spawner_restart_max: float = 30.0
    # -- worker hosts (CurveZMQ on the control channel and kernel relays)
    curve_secret_key: str = ""  # the daemon's NAME.key_secret (sagecell-keys generate)
    worker_keys: str = ""  # directory of the worker hosts' public NAME.key files
    # -- limits
    max_kernels: int = 64
    max_kernels_per_client: int = 8
    max_kernels_per_page: int = 4  # SageMathCell's POST /kernel, per CellSessionID
    max_restarts_per_minute: int = 6  # per session; per client address, three times this
    max_messages_per_second: int = 100  # a session's browsers' messages (64 KiB counts as one more), bursts as many
    address_space: int = 1 << 30
    cpu_seconds: int = 600
    processes: int = 64
    file_size: int = 100 << 20
    open_files: int = 256
    disk_quota: int = 200 << 20
    network: bool = False
    exec_timeout: float = 30.0
    idle_timeout: float = 900.0
    disconnect_timeout: float = 60.0
    replay_bytes: int = 1 << 20  # per session: output kept for a WebSocket that reconnects
    max_lifetime: float = 4 * 3600.0
    shutdown_grace: float = 1.0
    # -- output
    max_output_bytes: int = 16 << 20
    interrupt_on_output_cap: bool = False
    # -- SageMathCell compatibility
    requires_tos: bool = False
    # -- several daemons behind a load balancer
    daemon_name: str = ""  # "" : ids name no daemon (core/grants.py)
    # -- storage
    permalink_db: str = ""  # a SQLite file or a postgresql:// URL; "" : web.site.default_permalink_db()
    permalink_db_max_size: int = 1 << 30  # bytes the permalink database may fill
    permalinks_per_minute: int = 30  # new permalinks per client address (a burst of as many)
    # -- files
    max_upload_size: int = 100 << 20
    # -- logging
    log_json: bool = False
    log_code: bool = False

    def __post_init__(self):
        for name in (
            "pool_size",
            "max_kernels",
            "max_kernels_per_client",
            "max_kernels_per_page",
            "max_restarts_per_minute",
            "max_messages_per_second",
            "max_message_size",
            "open_files",
            "max_sockets_per_session",
            "max_connections_per_client",
            "permalink_db_max_size",
            "permalinks_per_minute",
            "replay_bytes",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, not {v!r}")
        _positive("pool-size", self.pool_size, allow_zero=True)
        _positive("max-kernels", self.max_kernels)
        _positive("max-kernels-per-client", self.max_kernels_per_client)
        _positive("max-kernels-per-page", self.max_kernels_per_page)
        _positive("max-restarts-per-minute", self.max_restarts_per_minute)
        _positive("max-messages-per-second", self.max_messages_per_second)
        _positive("max-message-size", self.max_message_size)
        _positive("max-sockets-per-session", self.max_sockets_per_session)
        _positive("max-connections-per-client", self.max_connections_per_client)
        _positive("permalink-db-max-size", self.permalink_db_max_size)
        _positive("permalinks-per-minute", self.permalinks_per_minute)
        for name in (
            "exec_timeout",
            "idle_timeout",
            "disconnect_timeout",
            "max_lifetime",
            "shutdown_grace",
            "spawner_restart_max",
            "http_idle_timeout",
        ):
            _positive(name.replace("_", "-"), getattr(self, name))
        for name in ("address_space", "cpu_seconds", "processes", "file_size", "disk_quota", "max_output_bytes"):
            _positive(name.replace("_", "-"), getattr(self, name), allow_zero=True)
        _positive("max-upload-size", self.max_upload_size)
        _positive("replay-bytes", self.replay_bytes, allow_zero=True)
        object.__setattr__(self, "base_url", _base_url(self.base_url))
        _check_proxies(self.trusted_proxies)
        if self.pool_size > self.max_kernels:
            raise ConfigError(f"--pool-size ({self.pool_size}) cannot exceed --max-kernels ({self.max_kernels})")
        for origin in self.allow_origin:
            if origin != "*" and "://" not in origin:
                raise ConfigError(f"--allow-origin: {origin!r} is not '*' nor an origin like https://example.org")
        if bool(self.curve_secret_key) != bool(self.worker_keys):
            raise ConfigError("--curve-secret-key and --worker-keys go together: set both or neither")
        if self.worker_keys and not self.control.startswith("tcp://"):
            raise ConfigError("--worker-keys needs --control tcp://ADDRESS:PORT for the worker hosts to connect to")
        if self.worker_keys and self.embedded_spawner:
            raise ConfigError(
                "--worker-keys: the embedded spawner has no CURVE keys; set --embedded-spawner false "
                "(run sagecell-worker.service on this host too for local kernels)"
            )
        if self.daemon_name and re.fullmatch(DAEMON_NAME, self.daemon_name) is None:
            raise ConfigError(
                f"--daemon-name must be 1 to 16 lowercase letters and digits (as the balancer names it), "
                f"not {self.daemon_name!r}"
            )
        if not self.port:
            raise ConfigError("--port must be a Twisted endpoint string such as tcp:8888")
        _check_permalink_db(self.permalink_db)
        if self.kernels is not None:
            self._check_kernels()

    def _check_kernels(self) -> None:
        if not self.kernels:
            raise ConfigError(f"--kernels must name at least one of {', '.join(KERNEL_NAMES)}")
        for name in self.kernels:
            if name not in KERNEL_NAMES:
                raise ConfigError(
                    f"--kernels: {name!r} is not a kernel this server runs; choose from {', '.join(KERNEL_NAMES)}"
                )
        if len(set(self.kernels)) != len(self.kernels):
            raise ConfigError("--kernels names a kernel twice")
        if SAGE in self.kernels and not sage_available():
            raise ConfigError(
                "--kernels: sagemath needs passagemath, which is not installed here "
                "(./setup.sh installs it; or leave sagemath out)"
            )

    def kernel_names(self) -> tuple[str, ...]:
        """The kernels served, the default first: ``kernels``, or Sage where installed and Python."""
        if self.kernels is not None:
            return self.kernels
        return (SAGE, PYTHON) if sage_available() else (PYTHON,)

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a browser page at ``origin`` may use the API."""
        if origin is None:
            return True  # not a browser cross-origin request
        return "*" in self.allow_origin or origin.rstrip("/") in {o.rstrip("/") for o in self.allow_origin}

    def limits(self) -> dict:
        """The kernel rlimits, as sandbox.Limits takes them."""
        return {
            "address_space": self.address_space,
            "cpu_seconds": self.cpu_seconds,
            "processes": self.processes,
            "file_size": self.file_size,
            "open_files": self.open_files,
        }


#: a daemon's name (--daemon-name), as the balancer names its server (HAProxy's ``server d1 ...``);
#: it goes into the ids the daemon makes (core/grants.py)
DAEMON_NAME = r"[a-z0-9]{1,16}"


def _base_url(value: str) -> str:
    """``--base-url`` as ``/a/path`` (or ""): one leading slash, none trailing, plain path segments."""
    path = value.strip()
    if path in ("", "/"):
        return ""
    if not path.startswith("/"):
        raise ConfigError(f"--base-url must be a path starting with '/', such as /sagecell/, not {value!r}")
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if segment in (".", "..") or any(c in segment for c in "?#%\\") or not segment.isprintable() or " " in segment:
            raise ConfigError(f"--base-url: {value!r} is not a plain path (no '.', '..', '?', '#', '%', spaces)")
    return "/" + "/".join(segments)


def _check_proxies(values: tuple[str, ...]) -> None:
    import ipaddress

    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(
                f"--trusted-proxies: {value!r} is not an address or network such as 127.0.0.1 or 10.0.0.0/8"
            ) from None


def is_postgres_url(where: str) -> bool:
    """Whether a ``--permalink-db`` value names a PostgreSQL database (else it is a SQLite file)."""
    return where.startswith(("postgresql://", "postgres://"))


def _check_permalink_db(where: str) -> None:
    """A file path, or a PostgreSQL URL that parses and whose driver is installed."""
    if not is_postgres_url(where):
        if "://" in where:
            raise ConfigError(
                f"--permalink-db: {where.split('://', 1)[0]}:// is not a database this server uses;"
                " give a SQLite file path or a postgresql:// URL"
            )
        return
    try:
        from psycopg import conninfo
    except ImportError:
        raise ConfigError(
            "--permalink-db postgresql://...: the PostgreSQL driver psycopg is not installed"
            " (pip install 'sagecell_tw[postgresql]')"
        ) from None
    try:
        conninfo.conninfo_to_dict(where)
    except Exception as e:  # psycopg.ProgrammingError; its message names the bad part, never the password
        raise ConfigError(f"--permalink-db: not a valid PostgreSQL URL: {e}") from None


#: the kernels a server may run: Sage (passagemath's ``sagemath`` kernel) and Python
SAGE, PYTHON = "sagemath", "python3"
KERNEL_NAMES = (SAGE, PYTHON)


def sage_available() -> bool:
    """Whether passagemath's full Sage library is installed (found, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("sage.all_cmdline") is not None
    except (ImportError, ValueError):
        return False


#: option name (with dashes) -> field name
OPTION_NAMES = {f.name.replace("_", "-"): f.name for f in fields(Config)}


def _coerce(name: str, value, current):
    """Turn a string (command line) or TOML value into the field's type."""
    if isinstance(current, bool) or name in ("embedded_spawner", "network", "log_json", "log_code", "interrupt_on_output_cap"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name.replace('_', '-')} must be true or false, not {value!r}")
    if name in ("allow_origin", "preload", "kernels", "trusted_proxies"):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"--{name.replace('_', '-')} must be a list of strings, not {value!r}")
    if isinstance(current, int) or name in ("max_message_size",):
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, not {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool):
            # A TOML 2.5 or true must not reach setrlimit() in a kernel.
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, not {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number of seconds, not {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"--{name.replace('_', '-')} must be a string, not {value!r}")
    return value


def parse_size(text: str) -> int:
    """``10M``, ``1G``, ``4096``, ``512k`` -> bytes."""
    text = text.strip()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if text and text[-1].lower() in units:
        return int(float(text[:-1]) * units[text[-1].lower()])
    return int(text)


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    flat: dict = {}
    # Sections are for the reader only: [web], [kernels], [limits] ... all
    # hold plain option names.
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, v in items:
            if isinstance(v, dict):
                raise ConfigError(f"--config: {path}: [{key}.{name}] is not a known section; sections hold plain settings")
            if name in flat:
                raise ConfigError(f"--config: {path}: {name!r} is set twice")
            flat[name] = v
    return flat


def build(file_values: dict | None = None, options: dict | None = None) -> Config:
    """Defaults, under the file's values, under the command line's."""
    base = Config()
    values: dict = {}
    for layer, what in ((file_values or {}, "config file"), (options or {}, "option")):
        for key, value in layer.items():
            if value is None:
                continue
            name = OPTION_NAMES.get(key.replace("_", "-"))
            if name is None:
                raise ConfigError(f"unknown {what} setting {key!r}")
            values[name] = _coerce(name, value, getattr(base, name))
    try:
        return dataclasses.replace(base, **values)
    except TypeError as e:  # pragma: no cover - guarded by OPTION_NAMES
        raise ConfigError(str(e)) from None


def default_run_dir() -> str:
    root = os.environ.get("XDG_RUNTIME_DIR") if os.geteuid() != 0 else None
    return os.path.join(root or "/tmp", "sagecell")

