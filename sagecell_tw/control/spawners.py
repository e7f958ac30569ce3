# -*- test-case-name: tests.test_ops -*-
"""
The daemon's side of the spawner control channel, and the embedded spawner.

Spawners *connect* to the daemon's control ROUTER (so one may run on another
host) and speak JSON, one object per message (see ``forkserver``'s module
docstring for the kernel events). The daemon pings every spawner; one that is
silent for ``SILENCE`` seconds is taken as lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .. import SOURCE_ROOT

log = Logger()

PING_INTERVAL = 1.0
#: after this many spawners in a row die before their first kernel, say so loudly (and in /healthz)
FAILED_STARTS_TO_TELL = 3
SILENCE = 5.0
#: a request to a spawner (files on a worker host) fails after this long ...
REQUEST_TIMEOUT = 10.0
#: ... and at most this many wait for answers from one spawner at once
MAX_PENDING = 64


class RequestFailed(Exception):
    """A request to a spawner got no answer: it timed out, or the spawner went away."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Spawner:
    """One connected spawner, as seen by the daemon."""

    def __init__(self, identity: bytes, channel: ControlChannel, hello: dict, now: float):
        self.identity = identity
        self.channel = channel
        self.hello = hello
        self.name = str(hello.get("name") or identity.decode(errors="replace"))
        #: a spawner on a worker host relays its kernels over the network
        self.remote = bool(hello.get("relay"))
        self.host = str(hello.get("public_host") or hello.get("host", ""))
        cap = hello.get("max_kernels")
        #: most kernels in use at once on it (None: no limit of its own)
        self.max_kernels: int | None = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None
        self.last_heard = now
        self.pool = {"ready": 0, "starting": 0, "taken": 0}
        #: the kernel names it forks (a spawner before kernel names: Python's)
        kernels = hello.get("kernels")
        self.kernels: tuple[str, ...] = tuple(kernels) if isinstance(kernels, list) and kernels else ("python3",)
        #: request number -> (Deferred of (reply, data frame or None), its timeout call)
        self.pending: dict[int, tuple[defer.Deferred, object]] = {}

    def send(self, msg: dict, data: bytes | None = None) -> None:
        self.channel.send(self.identity, msg, data)

    def request(self, msg: dict, data: bytes | None = None, timeout: float = REQUEST_TIMEOUT) -> defer.Deferred:
        """
        Send ``msg`` (``cmd`` and its fields; ``req`` is added) and, optionally,
        a data frame; fires with ``(reply, data)`` when the spawner answers
        with the same ``req``, or fails with ``RequestFailed``: 504 after
        ``timeout``, 503 if the spawner goes away or has too many waiting.
        """
        if len(self.pending) >= MAX_PENDING:
            return defer.fail(RequestFailed(503, f"the worker host {self.host} is busy; try again in a moment"))
        req = self.channel.next_request()
        d: defer.Deferred = defer.Deferred()
        call = self.channel.clock.callLater(timeout, self._expire, req, timeout)
        self.pending[req] = (d, call)
        self.send(dict(msg, req=req), data)
        return d

    def _expire(self, req: int, timeout: float) -> None:
        d, _ = self.pending.pop(req, (None, None))
        if d is not None:
            d.errback(RequestFailed(504, f"the worker host {self.host} did not answer within {timeout:g} s"))

    def answered(self, msg: dict, data: bytes | None) -> None:
        """A reply from the spawner: to the request waiting for it, if any (a late one is dropped)."""
        req = msg.get("req")
        if not isinstance(req, int) or isinstance(req, bool):
            return
        d, call = self.pending.pop(req, (None, None))
        if d is None:
            return
        if call.active():
            call.cancel()
        d.callback((msg, data))

    def fail_pending(self, why: str) -> None:
        """The spawner is gone: every request waiting for it fails."""
        pending, self.pending = self.pending, {}
        for d, call in pending.values():
            if call.active():
                call.cancel()
            d.errback(RequestFailed(503, why))

    def take(self, kernel_id: str) -> None:
        self.send({"cmd": "take", "id": kernel_id})

    def kill(self, kernel_id: str, reason: str = "killed") -> None:
        self.send({"cmd": "kill", "id": kernel_id, "reason": reason})

    def interrupt(self, kernel_id: str) -> None:
        self.send({"cmd": "interrupt", "id": kernel_id})

    def shutdown(self) -> None:
        self.send({"cmd": "shutdown"})


class ControlChannel:
    """The ROUTER every spawner connects to; feeds the kernel manager."""

    def __init__(self, zmq, address: str, manager, clock, allowed_keys: str | None = None):
        self.zmq = zmq
        self.address = address
        #: directory of the worker hosts' public CURVE keys; None: no CURVE
        self.allowed_keys = allowed_keys
        self.zap = None
        self.manager = manager
        self.clock = clock
        self.spawners: dict[bytes, Spawner] = {}
        self.router = None
        self._requests = 0
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock
        #: called with (event, spawner) for "joined" and "lost"
        self.observers: list = []
        manager.on_demand.append(self._demand)

    def _demand(self, waiting: dict[str, int]) -> None:
        """
        Sessions are waiting for kernels (``waiting``: how many, by kernel
        name): each spawner forks ahead for its share of each name it serves.
        """
        spawners = list(self.spawners.values())
        #: kernel name -> how many spawners serve it
        serving = {name: sum(1 for s in spawners if name in s.kernels) for name in waiting}
        for spawner in spawners:
            share = sum(-(-n // serving[name]) for name, n in waiting.items() if name in spawner.kernels)
            spawner.send({"cmd": "demand", "waiting": share})

    def listen(self) -> None:
        if self.allowed_keys is not None:
            # Before the ROUTER exists: libzmq asks this handler about every
            # CURVE handshake from then on.
            self.zap = self.zmq.zap(self._authenticate)
            self.router = self.zmq.router(self.address, self._received, curve_server=True)
        else:
            self.router = self.zmq.router(self.address, self._received)
        self._pinger.start(PING_INTERVAL, now=False)

    def _authenticate(self, frames: list[bytes]) -> None:
        """
        A ZAP request (RFC 27): admit a CURVE client whose public key is in
        the allow-list directory, read afresh each time so that adding or
        removing a worker's key needs no restart.
        """
        from .. import keys

        reply, ok = keys.zap_answer(frames, keys.load_allowed(self.allowed_keys))
        if reply is None:
            return
        if not ok:
            log.warn(
                "refused a control connection from {address} ({mechanism}): key not in {dir}",
                event="worker_refused",
                address=frames[5].decode(errors="replace"),
                mechanism=frames[7].decode(errors="replace"),
                dir=self.allowed_keys,
            )
        self.zap.send(reply)

    def close(self) -> None:
        if self._pinger.running:
            self._pinger.stop()
        if self.zap is not None:
            self.zap.close()
        if self.router is not None:
            self.router.close()

    def send(self, identity: bytes, msg: dict, data: bytes | None = None) -> None:
        if self.router is not None:
            frames = [identity, json.dumps(msg).encode()]
            if data is not None:
                frames.append(data)
            self.router.send(frames)

    def next_request(self) -> int:
        self._requests += 1
        return self._requests

    def connected(self) -> bool:
        return bool(self.spawners)

    def _received(self, frames: list[bytes]) -> None:
        if len(frames) not in (2, 3):
            return
        identity, payload = frames[:2]
        data = frames[2] if len(frames) == 3 else None
        try:
            msg = json.loads(payload)
            event = msg["event"]
        except (ValueError, KeyError, TypeError):
            log.warn("malformed control message from {who!r}", who=identity)
            return
        now = self.clock.seconds()
        spawner = self.spawners.get(identity)
        if event == "hello":
            if spawner is not None and spawner.hello.get("pid") == msg.get("pid"):
                # The same process again (it answered several of our
                # {"cmd": "hello"}): nothing was lost, just sync once more.
                spawner.last_heard = now
                self._bound(spawner)
                spawner.send({"cmd": "sync", "keep": self.manager.adopt(spawner, lambda s: s is spawner)})
                return
            if spawner is not None:
                self._lost(spawner, "it said hello again (restarted)")
            spawner = Spawner(identity, self, msg, now)
            base_dir = msg.get("base_dir")
            for other in list(self.spawners.values()):
                if base_dir is not None and other.host == spawner.host and other.hello.get("base_dir") == base_dir:
                    self._lost(other, f"spawner {spawner.name} replaced it")
            self.spawners[identity] = spawner
            log.info(
                "spawner {name} joined (pid {pid}, pool {pool})",
                event="spawner_joined",
                name=spawner.name,
                pid=msg.get("pid"),
                pool=msg.get("pool_size"),
            )
            self._notify("joined", spawner)
            self._bound(spawner)
            # Kernels in use whose spawner is gone become this one's; it ends
            # every other kernel it finds that is not its own.
            keep = self.manager.adopt(spawner, lambda s: s is spawner or s not in self.spawners.values())
            spawner.send({"cmd": "sync", "keep": keep})
            spawner.send({"cmd": "status"})
            return
        if spawner is None:
            # A spawner we do not know (the daemon restarted under it): ask it
            # to introduce itself again.
            self.send(identity, {"cmd": "hello"})
            return
        spawner.last_heard = now
        if event == "ready":
            self.manager.kernel_ready(msg["kernel"], spawner)
        elif event == "dead":
            self.manager.kernel_dead(str(msg.get("id")), str(msg.get("reason") or "the kernel ended"))
        elif event == "pool":
            spawner.pool = {k: int(msg.get(k, 0)) for k in ("ready", "starting", "taken")}
        elif event == "files":
            spawner.answered(msg, data)
        elif event == "bye":
            self._lost(spawner, "it shut down")

    def _bound(self, spawner: Spawner) -> None:
        """Tell the spawner's guard (worker.guard) the largest message we take from a kernel."""
        if self.manager.max_message is not None:
            spawner.send({"cmd": "bound", "max_message": self.manager.max_message})

    def lost_process(self, pid: int, why: str) -> None:
        """The spawner process ``pid`` (ours) ended: no need to wait for its silence."""
        for spawner in list(self.spawners.values()):
            if spawner.hello.get("pid") == pid:
                self._lost(spawner, why)

    def _ping(self) -> None:
        now = self.clock.seconds()
        for spawner in list(self.spawners.values()):
            if now - spawner.last_heard > SILENCE:
                self._lost(spawner, f"silent for {SILENCE:.0f} s")
            else:
                spawner.send({"cmd": "ping", "t": now})

    def _lost(self, spawner: Spawner, why: str) -> None:
        if self.spawners.get(spawner.identity) is spawner:
            del self.spawners[spawner.identity]
        log.warn("spawner {name} lost: {why}", event="spawner_lost", name=spawner.name, why=why)
        spawner.fail_pending(f"the worker host {spawner.host} went away ({why})")
        if spawner.remote:
            # Its kernels were reached through its relay, which is gone.
            self.manager.spawner_lost(spawner, f"the worker host {spawner.host} went away ({why})")
        else:
            self.manager.spawner_lost(spawner)
        self._notify("lost", spawner)

    def _notify(self, event: str, spawner: Spawner) -> None:
        for observer in list(self.observers):
            observer(event, spawner)


class _SpawnerProcess(protocol.ProcessProtocol):
    def __init__(self, owner: EmbeddedSpawner):
        self.owner = owner
        self.ended: defer.Deferred = defer.Deferred()
        self._buf = b""
        #: the last line it wrote (a traceback's last line says what killed it)
        self.last_line = ""

    def errReceived(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines[-50:]:
            if line.strip():
                self.last_line = line.decode(errors="replace").strip()[:500]
                log.info("spawner: {line}", line=self.last_line)
        self._buf = self._buf[-4096:]

    outReceived = errReceived

    def processExited(self, reason) -> None:
        """
        The spawner process itself ended. Its pipes may stay open a while
        (its fork server shares them and is still ending its pool), but its
        pooled kernels are no use from this moment: say so now, before a
        new session is handed one of them.
        """
        self.owner._ended(self, reason.value)

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


class EmbeddedSpawner:
    """
    The spawner the daemon starts itself, restarted with backoff if it dies.

    ``reactor`` spawns processes and tells time; tests pass a fake.
    """

    def __init__(self, reactor, argv: list[str], env: dict, cwd: str, restart_max: float = 30.0):
        self.reactor = reactor
        #: called with (pid, reason) when the process ends, before any restart
        self.on_exit: list = []
        #: called with a message when the spawner cannot be restarted as it was
        self.on_cannot_restart: list = []
        self.started_as_root = False
        self.pid: int | None = None
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.restart_max = restart_max
        self.proc: _SpawnerProcess | None = None
        self.transport = None
        self.stopping = False
        self.restarts = 0
        self.backoff = 0.5
        self._restart_call = None
        #: a kernel of the current process has been ready (``working``)
        self._worked = False
        #: spawners in a row that died before one of their kernels was ready
        self.failed_starts = 0
        #: what the last of them said as it died ("" once one works)
        self.failure = ""

    def start(self) -> None:
        if self.proc is None and self.restarts == 0:
            self.started_as_root = os.geteuid() == 0
        elif self.started_as_root and os.geteuid() != 0:
            # twistd dropped us to the service account: a spawner started now
            # could not drop to the worker account, and kernels would run as
            # the daemon. Better no spawner than that.
            why = "the daemon no longer runs as root, so it cannot start a spawner that drops to the worker account"
            log.critical("cannot restart the spawner: {why}", event="spawner_restart_impossible", why=why)
            for hook in list(self.on_cannot_restart):
                hook(why)
            return
        self.proc = _SpawnerProcess(self)
        self._worked = False
        self.transport = self.reactor.spawnProcess(
            self.proc, self.argv[0], self.argv, env=self.env, path=self.cwd, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.pid = self.transport.pid
        log.info("started spawner process {pid}", event="spawner_started", pid=self.pid)

    def _ended(self, proc: _SpawnerProcess, reason) -> None:
        if proc is not self.proc:
            return
        self.proc = None
        for hook in list(self.on_exit):
            hook(self.pid, str(reason))
        if self.stopping:
            return
        if not self._worked:
            self.failed_starts += 1
            self.failure = f"{reason} {proc.last_line}".strip()
            if self.failed_starts == FAILED_STARTS_TO_TELL:
                log.critical(
                    "the spawner died {n} times in a row before starting a kernel (last: {failure}); "
                    "restarting it less and less often",
                    event="spawner_failing",
                    n=self.failed_starts,
                    failure=self.failure,
                )
        self.restarts += 1
        log.error(
            "the spawner died ({reason}); restarting it in {delay:.1f} s",
            event="spawner_died",
            reason=str(reason),
            delay=self.backoff,
            restarts=self.restarts,
        )
        self._restart_call = self.reactor.callLater(self.backoff, self._restart)
        self.backoff = min(self.backoff * 2, self.restart_max)

    def _restart(self) -> None:
        self._restart_call = None
        if not self.stopping:
            self.start()

    def working(self) -> None:
        """
        A kernel of this spawner is ready: it works, so the next failure
        starts the backoff afresh. Not its hello: a spawner whose fork
        server dies at start says hello first, and the backoff would never
        grow.
        """
        self._worked = True
        self.backoff = 0.5
        self.failed_starts = 0
        self.failure = ""

    def stop(self, timeout: float = 10.0) -> defer.Deferred:
        """TERM, wait, KILL; fires when the process has ended."""
        self.stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        proc = self.proc
        if proc is None:
            return defer.succeed(None)
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            pass

        def kill():
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass

        call = self.reactor.callLater(timeout, kill)
        proc.ended.addBoth(lambda r: (call.active() and call.cancel(), None)[1])
        return proc.ended


def spawner_argv(
    config, run_dir: str, control: str, daemon_group: str | None, kernel_name: str = "python3"
) -> list[str]:
    """
    The command line of the embedded spawner of ``kernel_name`` kernels.
    Each has a kernels dir of its own: a spawner ends the dirs in its own
    that are not its kernels'.
    """
    argv = [
        sys.executable,
        "-m",
        "sagecell_tw.worker.spawner",
        "--control",
        control,
        "--base-dir",
        os.path.join(run_dir, "kernels" if kernel_name == "python3" else f"kernels-{kernel_name}"),
        "--pool-size",
        str(config.pool_size),
        "--disk-quota",
        str(config.disk_quota),
        "--max-kernels",
        str(config.max_kernels + config.pool_size),
        "--limits",
        json.dumps(config.limits()),
        "--exit-with-parent",
        "--worker-user",
        config.worker_user,
        "--kernel-name",
        kernel_name,
    ]
    if config.preload is not None:
        argv += ["--preload", ",".join(config.preload)]
    if config.network:
        argv.append("--network")
    if daemon_group:
        argv += ["--daemon-group", daemon_group]
    return argv


def spawner_env() -> dict:
    """
    A small, fixed environment: kernels are forked from the spawner, and
    /proc/self/environ shows them what it was exec'd with, so nothing of the
    daemon's own environment goes there beyond what the spawner needs.
    """
    env = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    # The spawner must import the very sagecell_tw this daemon runs.
    env["PYTHONPATH"] = SOURCE_ROOT
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


#: what the worker account must import for the embedded spawner and its fork server to run
WORKER_IMPORTS = "import sagecell_tw.worker.spawner, sagecell_tw.worker.forkserver, ipykernel.kernelapp"


def worker_cannot_run(config, python: str = sys.executable) -> str | None:
    """
    Why the worker account cannot run the embedded spawner on ``python``, or None.

    The spawner starts as root and drops to the worker account before it
    imports most of what it needs, so a Python or packages only root can
    read (a pyenv or conda Python under /root, a virtualenv in a 0700 home)
    fail only then, at every restart. The same imports, run once at start
    as that account with the spawner's environment, find it out first.
    """
    from ..accounts import lookup_account

    try:
        account = lookup_account(config.worker_user)
    except LookupError as e:
        return str(e)
    try:
        out = subprocess.run(
            [python, "-c", WORKER_IMPORTS],
            env=spawner_env(),
            cwd="/",
            user=account.uid,
            group=account.gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
        )
    except OSError as e:
        return f"the worker account {account.name!r} cannot run {python} ({e.strerror})"
    except subprocess.TimeoutExpired:
        return None  # slow, not broken: the spawner will tell
    if out.returncode == 0:
        return None
    lines = out.stderr.decode(errors="replace").strip().splitlines()
    said = lines[-1] if lines else f"exit status {out.returncode}"
    return f"the worker account {account.name!r} cannot import sagecell_tw with {python} ({said})"
