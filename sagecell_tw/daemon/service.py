# -*- test-case-name: tests.test_ops -*-
"""
The daemon as one Twisted service: wires the control channel, the embedded
spawner, the kernel and session managers and the web site together, and
takes them down in order.

Nothing that forks or opens zmq happens before ``privilegedStartService``:
twistd daemonizes (forks) after ``makeService``, and a zmq context must not
cross a fork.
"""

from __future__ import annotations

import grp
import os
import shutil
import tempfile

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ..control import spawners
from ..control.transport import ZmqContext
from ..core.kernels import KernelManager, message_bound
from ..core.sessions import SessionManager, SessionObserver
from .health import Health
from .metrics import Metrics

log = Logger()


class LimitLog(SessionObserver):
    """Logs the limits sessions hit (the session manager logs the rest of its events itself)."""

    def limit_hit(self, session, kind: str) -> None:
        sid = session.id if session is not None else None
        log.info("limit hit: {kind} (session {session})", event="limit_hit", kind=kind, session=sid)


class SageCellService(service.MultiService):
    """Everything but the listening port, which the tap adds as a child."""

    def __init__(self, config, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.zmq = ZmqContext(reactor)
        self.kernels = KernelManager(
            self.zmq,
            reactor,
            config.max_kernels,
            config.shutdown_grace,
            max_message=message_bound(config.max_output_bytes),
        )
        self.sessions = SessionManager(self.kernels, config, reactor)
        self.control: spawners.ControlChannel | None = None
        #: the spawners we started: one per kernel name (each forks from its own master)
        self.embedded: list[spawners.EmbeddedSpawner] = []
        self.run_dir = ""
        self._own_run_dir = False
        self.warnings: list[str] = []
        self.metrics = Metrics(self)
        self.metrics.attach()
        self.health = Health(self)
        self.sessions.observers.append(LimitLog())

    # -- start ------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        self.zmq.start()
        self.run_dir = self._make_run_dir()
        control = self.config.control or f"ipc://{os.path.join(self.run_dir, 'control')}"
        allowed = None
        if self.config.curve_secret_key:
            from .. import keys

            self.zmq.curve = keys.load_secret(self.config.curve_secret_key)
            allowed = self.config.worker_keys
        elif control.startswith("tcp://"):
            self.warnings.append(f"the control channel {control} is neither encrypted nor authenticated: set --worker-keys")
        self.control = spawners.ControlChannel(self.zmq, control, self.kernels, self.reactor, allowed_keys=allowed)
        self.control.listen()
        self.metrics.attach_control(self.control)
        worker_gid = self._worker_gid()
        if control.startswith("ipc://"):
            path = control[len("ipc://") :]
            if worker_gid is not None:
                os.chown(path, -1, worker_gid)
            os.chmod(path, 0o660 if worker_gid is not None else 0o600)
        if self.config.embedded_spawner:
            self._start_embedded(control)
        super().privilegedStartService()

    def _worker_gid(self) -> int | None:
        if os.geteuid() != 0:
            return None
        from ..accounts import lookup_account

        return lookup_account(self.config.worker_user).gid

    def _make_run_dir(self) -> str:
        if self.config.run_dir:
            path = self.config.run_dir
            os.makedirs(path, mode=0o711, exist_ok=True)
        else:
            path = tempfile.mkdtemp(prefix="sagecell-")
            self._own_run_dir = True
        # The worker account must pass through to the kernels dir and the
        # control socket, and see nothing else here.
        os.chmod(path, 0o711)
        return path

    def _daemon_group(self) -> str | None:
        """The group the daemon runs as after twistd's --gid, which must reach kernel dirs."""
        if os.geteuid() != 0:
            return None
        if self.config.daemon_group:
            return self.config.daemon_group
        # twistd does not tell its services about --gid; an Application's
        # IProcess gid is only set by .tac files.
        from twisted.application.service import IProcess

        top = self
        while getattr(top, "parent", None) is not None:
            top = top.parent
        proc = IProcess(top, None)
        gid = getattr(proc, "gid", None)
        if gid is None or gid == 0:
            return None
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return None

    def _start_embedded(self, control: str) -> None:
        if os.geteuid() != 0:
            self.warnings.append(
                "not run as root: kernels run as this same account, separated from the daemon only by "
                "user, network, mount and PID namespaces where the kernel allows them"
            )
        for name in self.config.kernel_names():
            argv = spawners.spawner_argv(self.config, self.run_dir, control, self._daemon_group(), name)
            embedded = spawners.EmbeddedSpawner(
                self.reactor, argv, spawners.spawner_env(), self.run_dir, self.config.spawner_restart_max
            )
            embedded.on_exit.append(lambda pid, why: self.control.lost_process(pid, f"its process ended ({why})"))
            embedded.on_cannot_restart.append(self._cannot_restart_spawner)
            self.embedded.append(embedded)
            embedded.start()
        self.kernels.observers.append(self._embedded_kernel_ready)

    def _embedded_kernel_ready(self, event: str, kernel) -> None:
        for embedded in self.embedded:
            if event == "ready" and getattr(kernel.spawner, "hello", {}).get("pid") == embedded.pid:
                embedded.working()

    def _cannot_restart_spawner(self, why: str) -> None:
        """Stop cleanly: the service manager (systemd's Restart=always) starts us again as root."""
        log.critical("shutting down so that the service manager restarts the daemon: {why}", why=why)
        self.reactor.callLater(0, self.reactor.stop)

    def startService(self) -> None:
        for warning in self.warnings:
            log.warn("{warning}", warning=warning)
        self.sessions.start()
        super().startService()

    # -- stop ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self):
        # Stop listening first, so nobody new arrives while we wind down.
        yield defer.maybeDeferred(super().stopService)
        self.sessions.stop()
        yield _bounded(self.reactor, self.sessions.shutdown_all("the server is shutting down"), 3.0)
        yield _bounded(self.reactor, defer.DeferredList(self.kernels.kill_all("the server is shutting down"), consumeErrors=True), 3.0)
        if self.control is not None:
            for spawner in list(self.control.spawners.values()):
                spawner.shutdown()
        yield defer.DeferredList([embedded.stop(timeout=10.0) for embedded in self.embedded], consumeErrors=True)
        if self.control is not None:
            self.control.close()
        self.zmq.shutdown()
        permalinks = getattr(self, "permalinks", None)
        if permalinks is not None:
            yield _bounded(self.reactor, permalinks.close(), 3.0)
        if self._own_run_dir and self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _bounded(reactor, d: defer.Deferred, seconds: float) -> defer.Deferred:
    """``d``, or None after ``seconds``: shutdown must not hang on a stuck kernel."""
    out: defer.Deferred = defer.Deferred()
    call = reactor.callLater(seconds, lambda: out.called or out.callback(None))

    def done(result):
        if call.active():
            call.cancel()
        if not out.called:
            out.callback(None)

    d.addBoth(done)
    return out
