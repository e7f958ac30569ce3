# -*- test-case-name: tests.test_workers -*-
"""
The spawner process: the fork server plus its link to the daemon.

``python -m sagecell_tw.worker.spawner --control ipc:///run/sagecell/control``

It forks the fork server's manager first (which drops to the worker account
itself and starts the zygote kernels are forked from), before any zmq
context or key exists in this process; only then does it read a worker
host's CurveZMQ secret key (as root: its file may be root's only), drop to
the worker account, and open a DEALER socket that *connects* to
the daemon's control ROUTER, so the spawner may as well run on another host.
It relays JSON messages both ways; pool accounting lives in the fork server.
Every kernel is read through its guard (guard.py), polled in the same loop:
the daemon, or the relay on a worker host, connects to the guard's sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

from .. import accounts
from ..files.worker import WorkerFiles
from ..kernel import cgroup, sandbox
from . import forkserver, keeper
from .guard import Guard

PROTOCOL = 1
#: Without a word from the daemon for this long, an embedded spawner stops.
DAEMON_SILENCE = 30.0
#: Without a ping for this long, speak first: a daemon that restarted does not
#: know us, and answers with {"cmd": "hello"}.
NUDGE_AFTER = 3.0


def default_preload() -> tuple[str, ...]:
    """numpy, sympy and matplotlib, each where installed."""
    import importlib.util

    wanted = ("numpy", "sympy", "matplotlib", "matplotlib.pyplot")
    return tuple(m for m in wanted if importlib.util.find_spec(m.split(".")[0]) is not None)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sagecell-spawner", description=__doc__.split("\n\n")[0])
    p.add_argument("--control", required=True, help="the daemon's control address (zmq endpoint)")
    p.add_argument("--base-dir", required=True, help="where kernel directories are made")
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--max-kernels", type=int, default=64)
    p.add_argument("--disk-quota", type=int, default=0, help="most bytes in a kernel's working dir (0: unchecked)")
    p.add_argument("--preload", default=None, help="comma-separated modules to import once")
    p.add_argument(
        "--kernel-name", default="python3", choices=("python3", "sagemath"), help="the kernels this spawner forks"
    )
    p.add_argument("--worker-user", default=None, help="account to run as (only when started as root)")
    p.add_argument("--daemon-group", default=None, help="group whose members may reach kernel dirs")
    p.add_argument("--limits", default="{}", help="JSON object of sandbox.Limits fields")
    p.add_argument("--network", action="store_true", help="let kernels use the network")
    p.add_argument("--no-userns", action="store_true", help="do not use user namespaces")
    p.add_argument("--exit-with-parent", action="store_true", help="die when the daemon process dies")
    p.add_argument("--name", default=None, help="this spawner's name (default: host name and pid)")
    w = p.add_argument_group("worker host", "a spawner on another host than the daemon's, over CurveZMQ")
    w.add_argument("--curve-secret", default=None, help="this worker's NAME.key_secret (sagecell-keys generate)")
    w.add_argument("--daemon-key", default=None, help="the daemon's public NAME.key")
    w.add_argument("--public-host", default=None, help="address of this host the daemon reaches kernels at (relay)")
    w.add_argument("--relay-ports", default=None, help="LOW-HIGH: ports the relay may bind (for firewalls)")
    args = p.parse_args(argv)
    if bool(args.curve_secret) != bool(args.daemon_key):
        p.error("--curve-secret and --daemon-key go together")
    if args.public_host and not args.curve_secret:
        p.error("--public-host (a relay over the network) needs --curve-secret and --daemon-key")
    if args.relay_ports:
        try:
            low, high = (int(x) for x in args.relay_ports.split("-"))
        except ValueError:
            p.error(f"--relay-ports must be LOW-HIGH, not {args.relay_ports!r}")
        if not 0 < low <= high < 65536:
            p.error(f"--relay-ports {args.relay_ports!r} is not a port range")
        args.relay_ports = (low, high)
    return args


def fork_config(args: argparse.Namespace) -> forkserver.ForkConfig:
    preload = default_preload() if args.preload is None else tuple(m for m in args.preload.split(",") if m)
    gid = sandbox.group_id(args.daemon_group) if args.daemon_group else None
    return forkserver.ForkConfig(
        base_dir=args.base_dir,
        pool_size=args.pool_size,
        max_kernels=args.max_kernels,
        disk_quota=args.disk_quota,
        preload=preload,
        kernel_name=args.kernel_name,
        limits=sandbox.Limits(**json.loads(args.limits)),
        network=args.network,
        userns=not args.no_userns and sandbox.user_namespaces_available(),
        daemon_gid=gid,
        host=socket.gethostname(),
        hide=(os.path.dirname(args.control[len("ipc://") :]),) if args.control.startswith("ipc://") else (),
        keep_in_use=not args.public_host,
    )


def prepare_base_dir(path: str, account: accounts.Account | None, gid: int | None) -> None:
    """Kernel dirs live here: traversable by the daemon's group, listable by no kernel."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    if account is not None:
        os.chown(path, account.uid, gid if gid is not None else account.gid)
    os.chmod(path, 0o711 if gid is None else 0o710)


def memory_cgroup(config: forkserver.ForkConfig, account: accounts.Account | None) -> None:
    """The parent of the kernels' memory cgroups (kernel.cgroup), made before the drop; or a note of why there is none."""
    if not config.limits.address_space or config.limits.address_space <= 0:
        return
    try:
        parent = cgroup.prepare(account.uid if account else None, account.gid if account else None)
    except (cgroup.Unavailable, OSError) as e:
        config.notes += (f"a memory cgroup per kernel ({e}): real memory is held by the address-space limit only",)
    else:
        config.memory_cgroup = parent.as_json()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = fork_config(args)
    account = None
    if os.geteuid() == 0:
        account = accounts.lookup_account(args.worker_user or "sagecell-worker")
    prepare_base_dir(config.base_dir, account, config.daemon_gid)
    memory_cgroup(config, account)
    manager_alive, held_by_manager = os.pipe()
    pid, ours = start_manager(config, account, held_by_manager)
    os.close(held_by_manager)
    if config.keep_in_use:
        os.close(manager_alive)
    else:
        # A worker host: its kernels end with the spawner (keeper.py). The
        # front holds its end of the keeper's pipe until it dies.
        keeper.start(config.base_dir, pid, manager_alive, lambda: become(account))
    curve = None
    if args.curve_secret:
        from .. import keys

        # Read only now, after the manager (and with it the zygote every
        # kernel is forked from) went its own way: no kernel's memory ever
        # held it. As root, before the drop: the key file may be root's only.
        curve = keys.load_secret(args.curve_secret), keys.load_public(args.daemon_key)
    become(account)
    if args.exit_with_parent:  # after the drop, which clears it
        sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGTERM)
    return Front(ours, pid, args, config, curve).run()


def become(account: accounts.Account | None) -> None:
    if account is not None:
        sandbox.drop_privileges(account)


def start_manager(
    config: forkserver.ForkConfig, account: accounts.Account | None, alive: int
) -> tuple[int, socket.socket]:
    """
    Fork the fork server's manager, which drops to ``account`` itself and
    holds ``alive`` (a pipe's write end) for as long as it lives; its pid
    and our end of its socket.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            # all else: the read end of ``alive`` above all
            sandbox.close_fds_except((0, 1, 2, alive, theirs.fileno()))
            become(account)
            os.environ["HOME"] = config.base_dir
        except BaseException:
            os._exit(1)
        forkserver.serve(theirs, config)
    theirs.close()
    return pid, ours


class Front:
    """Relays between the daemon (zmq) and the fork server (socket pair)."""

    def __init__(self, sock: socket.socket, server_pid: int, args: argparse.Namespace, config, curve=None):
        #: ((public, secret), daemon's public key) on a worker host
        self.curve = curve
        self.relay = None
        self.sock = sock
        self.server_pid = server_pid
        self.args = args
        self.config = config
        self.stopping = False
        self.name = args.name or f"{socket.gethostname()}:{os.getpid()}"
        #: the daemon's file commands for kernels here (worker hosts; see files.worker)
        self.files = WorkerFiles(config.base_dir, os.geteuid(), config.disk_quota)
        #: every kernel here is read through it (guard.py)
        self.guard = Guard(config.base_dir, self._breach, config.daemon_gid)

    def run(self) -> int:
        import zmq

        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.setsockopt(zmq.IDENTITY, self.name.encode())
        poller = zmq.Poller()
        self.poller = poller
        if self.curve is not None:
            (public, secret), daemon_key = self.curve
            dealer.curve_publickey, dealer.curve_secretkey, dealer.curve_serverkey = public, secret, daemon_key
            if self.args.public_host:
                from .relay import Relay

                self.relay = Relay(ctx, self.args.public_host, public, secret, daemon_key, self.args.relay_ports)
                poller.register(self.relay.zap, zmq.POLLIN)
        dealer.connect(self.args.control)
        self.dealer = dealer
        self._hello()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self.sock.fileno(), zmq.POLLIN)
        poller.register(self.guard.fileno(), zmq.POLLIN)
        heard = nudged = time.monotonic()
        code = 0
        while not self.stopping:
            events = dict(poller.poll(500))
            if dealer in events:
                heard = time.monotonic()
                while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._from_daemon(dealer.recv_multipart(zmq.NOBLOCK))
            if self.sock.fileno() in events:
                try:
                    data = self.sock.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    code = 1
                    break
                relayed = self._relayed(data)
                if relayed is not None:
                    self._send_raw(relayed)
            if self.guard.fileno() in events:
                self.guard.service()
            if self.relay is not None:
                for sock in events:
                    if sock is self.relay.zap:
                        self.relay.authenticate()
                    elif sock in self.relay.peers:
                        self.relay.forward(sock)
            self.files.expire()
            silent = time.monotonic() - heard
            if self.args.exit_with_parent and silent > DAEMON_SILENCE:
                break
            if silent > NUDGE_AFTER and time.monotonic() - nudged > NUDGE_AFTER:
                nudged = time.monotonic()
                self._to_daemon({"event": "pong", "t": None})
        self.files.close()
        self._stop_server()
        self._to_daemon({"event": "bye", "name": self.name})
        if self.relay is not None:
            self.relay.close_all()
        self.guard.close_all()
        dealer.close()
        ctx.term()
        return code

    def _hello(self) -> None:
        self._to_daemon(
            {
                "event": "hello",
                "protocol": PROTOCOL,
                "name": self.name,
                "host": self.config.host,
                "base_dir": self.config.base_dir,
                "pid": os.getpid(),
                "pool_size": self.config.pool_size,
                "kernels": [self.config.kernel_name],
                "max_kernels": self.config.max_kernels,
                "userns": self.config.userns,
                "network": self.config.network,
                "uid": os.getuid(),
                "relay": self.relay is not None,
                "public_host": self.args.public_host,
            }
        )

    def _relayed(self, data: bytes) -> bytes | None:
        """
        A fork server event for the daemon, with ready kernels' addresses
        turned into their guard's (and then into the relay's, on a worker
        host); the kernels it names are the only ones whose files the daemon
        may ask for. None: nothing to tell (a kernel that cannot be guarded
        is ended instead, and its death told).
        """
        import zmq

        try:
            msg = json.loads(data)
        except ValueError:
            return data
        event = msg.get("event") if isinstance(msg, dict) else None
        if event == "ready" and isinstance(msg.get("kernel"), dict):
            try:
                info = self.guard.open(msg["kernel"])
            except (OSError, KeyError, TypeError) as e:
                self._end_kernel(str(msg["kernel"].get("id")), f"its sockets could not be guarded ({e})")
                return None
            self.files.kernel_ready(info.get("id"))
            if self.relay is not None:
                info, socks = self.relay.open(info)
                for sock in socks:
                    self.poller.register(sock, zmq.POLLIN)
            return json.dumps(dict(msg, kernel=info)).encode()
        if event == "dead":
            kid = str(msg.get("id"))
            self.files.kernel_dead(kid)
            if self.relay is not None:
                for sock in self.relay.close(kid):
                    self.poller.unregister(sock)
            self.guard.close(kid)
        return data

    def _breach(self, kernel_id: str, reason: str) -> None:
        """The guard cut a kernel off (guard.py): end it; its visitor is told ``reason``."""
        self._end_kernel(kernel_id, reason)

    def _end_kernel(self, kernel_id: str, reason: str) -> None:
        sys.stderr.write(f"sagecell spawner: ending kernel {kernel_id}: {reason}\n")
        try:
            self.sock.send(json.dumps({"cmd": "kill", "id": kernel_id, "reason": reason}).encode())
        except OSError:
            pass

    def _on_term(self, _signo, _frame) -> None:
        self.stopping = True

    def _to_daemon(self, msg: dict) -> None:
        self._send_raw(json.dumps(msg).encode())

    def _send_raw(self, data: bytes, extra: bytes | None = None) -> None:
        """Never block on the daemon: with no daemon connected a DEALER send would wait forever."""
        import zmq

        try:
            if extra is None:
                self.dealer.send(data, zmq.NOBLOCK)
            else:
                self.dealer.send_multipart([data, extra], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _from_daemon(self, parts: list[bytes]) -> None:
        if not parts or len(parts) > 2:
            return
        try:
            msg = json.loads(parts[0])
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        cmd = msg.get("cmd")
        if cmd == "ping":
            self._to_daemon({"event": "pong", "t": msg.get("t")})
        elif cmd == "shutdown":
            self.stopping = True
        elif cmd == "hello":  # a daemon that does not know us (it restarted)
            self._hello()
        elif cmd == "bound":  # the largest message the daemon takes from a kernel
            limit = msg.get("max_message")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                self.guard.limit = limit
        elif cmd == "files":
            reply, data = self.files.handle(msg, parts[1] if len(parts) == 2 else None)
            self._send_raw(json.dumps(reply).encode(), data)
        elif cmd in ("take", "kill", "interrupt", "status", "sync", "demand"):
            self.sock.send(json.dumps(msg).encode())

    def _stop_server(self) -> None:
        try:
            self.sock.send(json.dumps({"cmd": "shutdown"}).encode())
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.server_pid, os.WNOHANG)
            if pid:
                break
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                if data:
                    self._send_raw(data)
            except BlockingIOError:
                time.sleep(0.02)
            except OSError:
                time.sleep(0.02)
        else:
            try:
                os.kill(self.server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.server_pid, 0)


if __name__ == "__main__":
    sys.exit(main())
