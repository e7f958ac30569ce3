"""
Operations, end to end on real daemons: the systemd units' command lines,
health and metrics, JSON logs, graceful shutdown, restarts without orphans,
and a spawner that dies under a live daemon.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import websocket
from fakes import FakeChannel, FakeZmq, kernel_info
from support import ROOT, Client, Daemon, descendants, msg, stdout_of
from twisted.internet import task
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from sagecell_tw.control import spawners
from sagecell_tw.core import kernels
from sagecell_tw.daemon import health, metrics

VENV_IN_UNITS = "/opt/sagecell_tw/venv"


# -- helpers --------------------------------------------------------------------


def wait_for(cond, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kernel_pid(client: Client) -> int:
    """The kernel's host pid. Inside its own PID namespace a kernel is pid 1: never signal that."""
    client.execute("1")
    pid = client.daemon.kernel_pid(client.kernel_id)
    assert pid > 1
    return pid


def spawner_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"started spawner process (\d+)", log)]


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in metrics"
    return float(m.group(1))


def kill_leftovers(pids):
    """Our own kernels (host pids, > 1) that a test left orphaned on purpose: no systemd cgroup here."""
    for pid in pids:
        assert pid > 1
        for p in descendants(pid):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def tmp711():
    """A temp dir the worker account can pass through (pytest's tmp_path sits under a 0700 dir)."""
    import pathlib

    path = tempfile.mkdtemp(prefix="sagecell-ops-")
    os.chmod(path, 0o711)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


class NoPoolDaemon(Daemon):
    """A daemon whose pool may stay empty (no embedded spawner)."""

    def wait_pool(self, n: int, timeout: float = 30.0) -> None:
        pass


# -- systemd units, run as written --------------------------------------------


def unit_service_section(path: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]" and "=" in line:
                key, value = line.split("=", 1)
                values.setdefault(key, []).append(value)
    return values


def unit_command(path: str, env: dict) -> tuple[list[str], dict]:
    """ExecStart as systemd would run it: ${VAR} from Environment= (ours where given), the venv mapped."""
    service = unit_service_section(path)
    unit_env = {}
    for assignment in service.get("Environment", []):
        for item in shlex.split(assignment):
            k, v = item.split("=", 1)
            unit_env[k] = v
    unit_env.update(env)
    (line,) = service["ExecStart"]
    line = line.lstrip("-+@!:")
    line = re.sub(r"\$\{(\w+)\}", lambda m: unit_env[m.group(1)], line)
    argv = shlex.split(line)
    venv = os.path.realpath(os.path.dirname(os.path.dirname(sys.executable)))
    assert argv[0].startswith(VENV_IN_UNITS + "/"), argv[0]
    argv[0] = venv + argv[0][len(VENV_IN_UNITS) :]
    if service.get("NoNewPrivileges") == ["yes"] and shutil.which("setpriv"):
        # What systemd would apply too, as far as a plain process can: no new
        # privileges and the unit's capability bounding set.
        caps = service["CapabilityBoundingSet"][0].split()
        bounding = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
        argv = ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set={bounding}", "--", *argv]
    return argv, unit_env


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the units' privilege drops")


def ensure_accounts() -> None:
    for name in ("sagecell", "sagecell-worker"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            if not shutil.which("systemd-sysusers"):
                pytest.skip("no sagecell accounts and no systemd-sysusers to make them")
            subprocess.run(["systemd-sysusers", os.path.join(ROOT, "etc", "sagecell-sysusers.conf")], check=True)


@pytest.mark.slow
@pytest.mark.root
@needs_root
def test_daemon_unit_execstart_serves_and_drops_root(tmp711):
    tmp_path = tmp711
    import tomllib

    ensure_accounts()
    os.chmod(tmp_path, 0o711)
    with open(os.path.join(ROOT, "etc", "sagecell.toml"), "rb") as f:
        example = tomllib.load(f)
    state = tmp_path / "state"
    state.mkdir()
    shutil.chown(state, "sagecell", "sagecell")  # the unit's ExecStartPre
    example["web"]["port"] = "tcp:0:interface=127.0.0.1"
    example["kernels"]["run_dir"] = str(tmp_path / "run")
    example["kernels"]["pool_size"] = 1
    example["kernels"]["kernels"] = ["python3"]  # one spawner, whether or not Sage is installed
    example["storage"]["permalink_db"] = str(state / "permalinks.sqlite3")
    conf = tmp_path / "sagecell.toml"
    conf.write_text(
        "".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in kv.items()) for s, kv in example.items())
    )
    argv, unit_env = unit_command(os.path.join(ROOT, "etc", "sagecell.service"), {"SAGECELL_CONFIG": str(conf)})
    # A development install is editable: the plugin is found through PYTHONPATH.
    env = dict(os.environ, **unit_env, PYTHONPATH=ROOT)
    log_path = tmp_path / "out.log"
    leftovers = []
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        port = int(
            wait_for(lambda: re.search(r"Site starting on (\d+)", log_path.read_text()), 30, "the site").group(1)
        )
        status, body, _ = get(f"http://127.0.0.1:{port}/api")
        assert status == 200 and json.loads(body)["server"] == "sagecell_tw"
        wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 30, "readiness")
        # The daemon really dropped to `sagecell`, and still reaches its kernels.
        assert "set uid/gid" in log_path.read_text()
        with open(f"/proc/{proc.pid}/status") as f:
            uid = int(re.search(r"^Uid:\s+(\d+)", f.read(), re.M).group(1))
        assert uid == pwd.getpwnam("sagecell").pw_uid
        d = Daemon()
        d.port, d.log_path = port, str(log_path)
        client = Client(d, d.new_kernel())
        reply, out = client.execute("import os; print(6 * 7, os.getuid())")
        assert reply["status"] == "ok"
        answer, kuid = stdout_of(out).split()
        assert answer == "42" and int(kuid) == pwd.getpwnam("sagecell-worker").pw_uid
        leftovers.append(kernel_pid(client))
        # Dropped from root, it cannot start a spawner that drops to the
        # worker account: it shuts down for systemd to restart it.
        (spawner,) = spawner_pids(log_path.read_text())
        os.kill(spawner, signal.SIGKILL)
        proc.wait(30)
        assert "cannot restart the spawner" in log_path.read_text()
    except BaseException:
        print(log_path.read_text())
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        kill_leftovers(leftovers)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.root
@needs_root
def test_spawner_unit_execstart_and_restart_keeps_sessions():
    ensure_accounts()
    d = NoPoolDaemon("--embedded-spawner", "false", "--daemon-group", "sagecell-worker").start()
    procs = []
    try:
        os.chmod(d.run_dir, 0o711)
        argv, unit_env = unit_command(
            os.path.join(ROOT, "etc", "sagecell-spawner.service"), {"SAGECELL_RUN_DIR": d.run_dir}
        )
        env = dict(os.environ, **unit_env, PYTHONPATH=ROOT)
        status, body, _ = get(d.url + "/healthz")
        assert status == 503 and json.loads(body)["ready"] is False
        assert get(d.url + "/healthz/live")[0] == 200

        def start_spawner():
            p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            return p

        first = start_spawner()
        wait_for(lambda: get(d.url + "/healthz")[0] == 200, 30, "a ready pool")
        client = Client(d, d.new_kernel())
        client.execute("x = 41")
        pid = kernel_pid(client)
        # The spawner crashes; systemd (here: we) starts it again.
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        start_spawner()
        wait_for(lambda: len(re.findall(r"spawner \S+ joined", d.log())) >= 2, 30, "the new spawner")
        reply, out = client.execute("print(x + 1)")
        assert stdout_of(out) == "42\n" and alive(pid)
        wait_for(lambda: get(d.url + "/healthz")[0] == 200, 30, "a ready pool again")
        # The daemon crashes and a new one starts on the same run dir: the
        # running spawner speaks first, joins it, and ends the kernels that
        # no session of the new daemon uses.
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        b = NoPoolDaemon()
        b.tmp, b.log_path, b.args = d.tmp, os.path.join(d.tmp, "twistd-b.log"), list(d.args)
        b.start()
        try:
            wait_for(lambda: re.search(r"spawner \S+ joined", b.log()), 15, "the spawner to join the new daemon")
            wait_for(lambda: not alive(pid), 10, "the old daemon's kernel to end")
            wait_for(lambda: get(b.url + "/healthz")[0] == 200, 30, "a ready pool with the new daemon")
        finally:
            b.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)
        d.stop()


# -- health, metrics, logs ----------------------------------------------------


@pytest.mark.slow
def test_health_and_metrics(daemon):
    # Earlier tests of this module took kernels: the pool may still be refilling.
    wait_for(lambda: get(daemon.url + "/healthz")[0] == 200, 15, "a ready pool")
    status, body, headers = get(daemon.url + "/healthz")
    state = json.loads(body)
    assert status == 200 and state["live"] and state["ready"] and state["pool"] >= 1 and state["spawners"] == 1
    assert get(daemon.url + "/healthz/live")[0] == 200
    assert get(daemon.url + "/healthz/ready")[0] == 200
    _, before, _ = get(daemon.url + "/metrics")
    before = before.decode()
    client = Client(daemon, daemon.new_kernel())
    client.execute("print('x' * 1000)")
    status, text, headers = get(daemon.url + "/metrics")
    text = text.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    assert metric(text, "sagecell_kernels_running") >= 1
    assert metric(text, "sagecell_sessions") >= 1
    assert metric(text, "sagecell_spawners_connected") == 1
    assert metric(text, "sagecell_spawn_seconds_count") >= 1
    assert 0 < metric(text, "sagecell_spawn_seconds_sum") / metric(text, "sagecell_spawn_seconds_count") < 5
    grew = metric(text, "sagecell_messages_total", '{direction="from_kernel"}') - metric(
        before, "sagecell_messages_total", '{direction="from_kernel"}'
    )
    assert grew >= 3  # at least the stream, the reply and idle (a young SUB may miss busy)
    assert metric(text, "sagecell_message_bytes_total", '{direction="from_kernel"}') > 1000
    assert metric(text, "sagecell_messages_total", '{direction="to_kernel"}') >= 1
    assert metric(text, "sagecell_sessions_started_total") >= 1
    assert metric(text, "sagecell_spawner_restarts_total") == 0
    client.close()


@pytest.mark.slow
def test_json_log_lines_without_users_code(tmp711):
    tmp_path = tmp711
    os.chmod(tmp_path, 0o711)
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sagecell"]
    argv += ["--port", "tcp:0:interface=127.0.0.1", "--pool-size", "1", "--run-dir", str(tmp_path / "run")]
    argv += ["--permalink-db", str(tmp_path / "p.sqlite3"), "--log-json", "true", "--exec-timeout", "1"]
    log_path = tmp_path / "out.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT)
        )

    def events():
        return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]

    try:
        ready = wait_for(lambda: [e for e in events() if e.get("event") == "kernel_ready"], 30, "a ready kernel")
        assert 0 < ready[0]["spawn_seconds"] < 10 and ready[0]["pid"] > 0
        port = int(wait_for(lambda: re.search(r"starting on (\d+)", log_path.read_text()), 10, "port").group(1))
        d = Daemon()
        d.port = port
        kid = d.new_kernel()
        c = Client(d, kid)
        secret = "never-log-this-7f3a"
        c.execute(f"print('{secret}')")
        c.execute("import time; time.sleep(3)", timeout=20)  # over --exec-timeout: a limit is hit
        d.request("DELETE", f"/api/kernels/{kid}")
        wait_for(lambda: [e for e in events() if e.get("event") == "session_stop"], 10, "session_stop")
        all_events = events()
        names = {e.get("event") for e in all_events}
        assert {
            "session_start",
            "session_kernel",
            "session_stop",
            "kernel_ready",
            "limit_hit",
            "spawner_started",
        } <= names
        start = [e for e in all_events if e.get("event") == "session_start"][0]
        assert start["session"] == kid and start["client"] == "127.0.0.1" and start["log_level"]["name"] == "info"
        limit = [e for e in all_events if e.get("event") == "limit_hit"][0]
        assert limit["kind"] == "exec_timeout" and limit["session"] == kid
        assert secret not in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# -- shutdown, restart, supervision --------------------------------------------


@pytest.mark.slow
def test_sigterm_tells_sessions_and_ends_every_kernel():
    d = Daemon(pool_size=2).start()
    try:
        clients = [Client(d, d.new_kernel()) for _ in range(2)]
        pids = [kernel_pid(c) for c in clients]
        pooled = [int(p) for p in re.findall(r"ready \(pid (\d+)\)", d.log())]
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        for c in clients:
            seen, close = list(c.backlog), None
            c.ws.settimeout(10)
            while close is None:
                opcode, data = c.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    close = data
                elif opcode == websocket.ABNF.OPCODE_TEXT:
                    seen.append(json.loads(data))
            assert int.from_bytes(close[:2], "big") == 1000 and b"shutting down" in close[2:]
            texts = "".join(m["content"].get("text", "") for m in seen if m["msg_type"] == "stream")
            assert "the server is shutting down" in texts
            assert seen[-1]["msg_type"] == "status" and seen[-1]["content"]["execution_state"] == "dead"
        d.proc.wait(30)
        assert time.monotonic() - t0 < 15
        assert not [p for p in pids + pooled if alive(p)]
        kernels = os.path.join(d.run_dir, "kernels")
        assert not os.path.exists(kernels) or not [n for n in os.listdir(kernels) if not n.startswith(".")]
    finally:
        d.stop()


@pytest.mark.slow
def test_restart_with_same_run_dir_leaves_no_orphans():
    a = Daemon(pool_size=1).start()
    leftovers = []
    try:
        client = Client(a, a.new_kernel())
        pid = kernel_pid(client)
        leftovers.append(pid)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        # Its spawner goes with it (PDEATHSIG) and ends its kernels; a
        # SIGKILLed spawner would have left them: make sure of the worst case.
        wait_for(lambda: not [p for p in spawner_pids(a.log()) if alive(p)], 15, "the spawner to go")
        b = Daemon(pool_size=1)
        b.tmp, b.log_path = a.tmp, os.path.join(a.tmp, "twistd-b.log")
        b.args = list(a.args)
        b.start()
        try:
            wait_for(lambda: not alive(pid), 10, "the old kernel to end")
            kdir = os.path.join(b.run_dir, "kernels")
            wait_for(lambda: len([n for n in os.listdir(kdir) if not n.startswith(".")]) == 1, 10, "only the new pool")
        finally:
            b.stop()
    finally:
        kill_leftovers(leftovers)
        a.stop()


@pytest.mark.slow
def test_orphans_of_a_killed_spawner_end_when_a_daemon_starts():
    """The worst case: the whole tree SIGKILLed at once, kernels left behind."""
    a = Daemon(pool_size=1).start()
    leftovers = []
    try:
        client = Client(a, a.new_kernel())
        pid = kernel_pid(client)
        leftovers.append(pid)
        log = a.log()
        for spawner in spawner_pids(log):
            os.kill(spawner, signal.SIGSTOP)  # no PDEATHSIG clean-up this time
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        # The front and the fork server die without a word: SIGKILL both.
        fork_servers = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(spawner_pids(log)[0])], capture_output=True, text=True
            ).stdout.split()
        ]
        for p in fork_servers + spawner_pids(log):
            os.kill(p, signal.SIGKILL)
        time.sleep(0.3)
        assert alive(pid), "the kernel should have been orphaned for this test"
        b = Daemon(pool_size=1)
        b.tmp, b.log_path, b.args = a.tmp, os.path.join(a.tmp, "twistd-b.log"), list(a.args)
        b.start()
        try:
            wait_for(lambda: not alive(pid), 10, "the orphan to end")
        finally:
            b.stop()
    finally:
        kill_leftovers(leftovers)
        a.stop()


@pytest.mark.slow
def test_dead_spawner_is_restarted_and_sessions_keep_their_kernels():
    d = Daemon(pool_size=1).start()
    try:
        client = Client(d, d.new_kernel())
        client.execute("x = 41")
        pid = kernel_pid(client)
        other = Client(d, d.new_kernel())
        other_pid = kernel_pid(other)
        (spawner,) = spawner_pids(d.log())
        os.kill(spawner, signal.SIGKILL)
        wait_for(lambda: len(spawner_pids(d.log())) == 2, 15, "a new spawner")
        wait_for(lambda: len(re.findall(r"spawner \S+ joined", d.log())) == 2, 30, "the new spawner to join")
        assert "the spawner died" in d.log()
        # The running kernels kept serving their sessions.
        reply, out = client.execute("print(x + 1)")
        assert stdout_of(out) == "42\n" and alive(pid)
        wait_for(lambda: get(d.url + "/healthz")[0] == 200, 30, "a refilled pool")
        _, text, _ = get(d.url + "/metrics")
        assert metric(text.decode(), "sagecell_spawner_restarts_total") == 1
        assert metric(text.decode(), "sagecell_spawners_lost_total") == 1
        # The new spawner watches the adopted kernels: a death is noticed...
        os.kill(other_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        state = None
        while time.monotonic() < deadline and state != "dead":
            m = other.recv(5)
            state = m["content"].get("execution_state") if m["msg_type"] == "status" else state
        assert state == "dead"
        # ... and a shutdown really ends the process and removes its directory.
        for k in (client.kernel_id, other.kernel_id):
            d.request("DELETE", f"/api/kernels/{k}")
        wait_for(lambda: not alive(pid), 10, "the adopted kernel to end")
        kdir = os.path.join(d.run_dir, "kernels")
        # Only the new pool's kernel keeps a directory (named by kernel, not session, id).
        wait_for(lambda: len([n for n in os.listdir(kdir) if not n.startswith(".")]) == 1, 10, "their dirs to go")
    finally:
        d.stop()


def _first_answers(d: Daemon) -> str:
    """A new session, as a Jupyter client starts one: kernel_info, then an execution; what it saw."""
    client = Client(d, d.new_kernel())
    try:
        req = client.send(msg("kernel_info_request", {}))
        deadline = time.monotonic() + 10
        while True:
            m = client.recv(max(0.1, deadline - time.monotonic()))
            if m["msg_type"] == "kernel_info_reply" and m["parent_header"].get("msg_id") == req["header"]["msg_id"]:
                break
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "dead":
                return "told dead"
        reply, out = client.execute("print(6 * 7)", timeout=10)
        return f"{reply['status']} {stdout_of(out).strip()}"
    finally:
        client.close()


@pytest.mark.slow
def test_sessions_started_as_the_spawner_dies_all_get_live_kernels():
    """Kill -9 of the embedded spawner, then ten new sessions within two seconds: every one is answered."""
    d = Daemon(pool_size=4, max_kernels_per_client=16).start()
    kernel_pids: set[int] = set()
    try:
        d.wait_pool(4)
        client = Client(d, d.new_kernel())
        client.execute("x = 41")
        (spawner,) = spawner_pids(d.log())
        fork_servers = [
            int(p) for p in subprocess.run(["pgrep", "-P", str(spawner)], capture_output=True, text=True).stdout.split()
        ]
        os.kill(spawner, signal.SIGKILL)
        results: list[str] = []

        def one(i: int) -> None:
            time.sleep(i * 0.2)
            try:
                results.append(_first_answers(d))
            except Exception as e:  # the assertion below shows it
                results.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == ["ok 42"] * 10, (results, d.log()[-5000:])
        reply, out = client.execute("print(x + 1)")
        assert stdout_of(out) == "42\n", (reply, out, d.log()[-5000:])
        kernel_pids = {int(p) for p in re.findall(r"ready \(pid (\d+)\)", d.log())}
    finally:
        d.stop()
    # Nothing left behind: the kernels of both spawners, and the old fork server.
    wait_for(lambda: not any(alive(p) for p in kernel_pids | set(fork_servers)), 15, "every kernel to end")


@pytest.mark.slow
def test_unknown_health_path_is_404(daemon):
    assert get(daemon.url + "/healthz/nope")[0] == 404


# -- the same logic, fast: fakes and task.Clock -----------------------------------


class FakeTransport:
    def __init__(self, pid: int):
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, sig):
        self.signals.append(sig)


class FakeReactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, childFDs=None):
        transport = FakeTransport(1000 + len(self.spawned))
        self.spawned.append((proto, transport))
        return transport


def end_process(proto):
    """The process is reaped, then its pipes close: Twisted's order."""
    proto.processExited(Failure(ProcessTerminated(signal=9)))
    proto.processEnded(Failure(ProcessTerminated(signal=9)))


def test_embedded_spawner_exit_is_reported_while_its_pipes_are_still_open(monkeypatch):
    # The fork server shares the spawner's stderr and ends its pool for a
    # while after the spawner is killed: its pooled kernels must be known
    # gone from the moment the spawner process is, not when the pipes close.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    reactor = FakeReactor()
    sp = spawners.EmbeddedSpawner(reactor, ["spawner"], {}, "/")
    exits = []
    sp.on_exit.append(lambda pid, why: exits.append(pid))
    sp.start()
    proto = reactor.spawned[-1][0]
    proto.processExited(Failure(ProcessTerminated(signal=9)))
    assert exits == [1000]
    reactor.advance(0.5)
    assert len(reactor.spawned) == 2
    proto.processEnded(Failure(ProcessTerminated(signal=9)))  # the pipes close later: nothing more happens
    assert exits == [1000] and len(reactor.spawned) == 2
    assert sp.stop().called is False  # the new process is the one to stop


def test_embedded_spawner_restarts_with_backoff_and_reports_exits(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    reactor = FakeReactor()
    sp = spawners.EmbeddedSpawner(reactor, ["spawner"], {}, "/", restart_max=2.0)
    exits = []
    sp.on_exit.append(lambda pid, why: exits.append(pid))
    sp.start()
    for n, delay in enumerate([0.5, 1.0, 2.0, 2.0], start=1):
        end_process(reactor.spawned[-1][0])
        assert exits[-1] == 999 + n and sp.restarts == n
        reactor.advance(delay - 0.01)
        assert len(reactor.spawned) == n
        reactor.advance(0.01)
        assert len(reactor.spawned) == n + 1
    sp.working()  # a kernel of it was ready: the next death waits 0.5 s again
    end_process(reactor.spawned[-1][0])
    reactor.advance(0.5)
    assert len(reactor.spawned) == 6


def test_spawner_dying_at_start_backs_off_and_health_says_why(monkeypatch):
    # Its fork server dies on an import after the spawner said hello: the
    # hello must not reset the backoff, and /healthz says what it last wrote.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    reactor = FakeReactor()
    sp = spawners.EmbeddedSpawner(reactor, ["spawner"], {}, "/", restart_max=8.0)
    svc = FakeSvc(1, 0)
    svc.embedded = [sp]
    sp.start()
    waits = []
    for _ in range(6):
        proto = reactor.spawned[-1][0]
        proto.errReceived(b"Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'typing'\n")
        end_process(proto)
        waits.append(sp.backoff)
        reactor.advance(sp.backoff)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    why = health.Health(svc).state()["why"]
    assert "died 6 times in a row before starting a kernel" in why
    assert "No module named 'typing'" in why
    sp.working()
    assert "spawner died" not in health.Health(svc).state()["why"]


def test_worker_python_check_names_what_fails(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("runs the check as the worker account: needs root")
    ensure_accounts()
    from sagecell_tw import config as configmod

    config = configmod.build({}, {})
    assert spawners.worker_cannot_run(config) is None  # this very Python and checkout: the tests run on them
    monkeypatch.setattr(spawners, "WORKER_IMPORTS", "import sagecell_tw, no_such_module_xyz")
    assert "No module named 'no_such_module_xyz'" in spawners.worker_cannot_run(config)
    assert "does not exist" in spawners.worker_cannot_run(configmod.build({}, {"worker_user": "no-such-user-xyz"}))


@pytest.mark.slow
@pytest.mark.root
@needs_root
def test_daemon_on_a_python_the_worker_cannot_read_stops_with_one_sentence(tmp_path):
    """As from a pyenv under /root: a Python whose prefix is in a 0700 directory."""
    ensure_accounts()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "py" / "bin").mkdir(parents=True)
    (private / "py" / "lib").mkdir()
    base = os.path.realpath(sys._base_executable)
    shutil.copy2(base, private / "py" / "bin" / os.path.basename(base))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    os.symlink(os.path.dirname(os.__file__), private / "py" / "lib" / version)
    venv = private / "venv"
    subprocess.run(
        [str(private / "py" / "bin" / os.path.basename(base)), "-m", "venv", "--without-pip", str(venv)], check=True
    )
    # This venv's packages (Twisted ...), readable by root only through it.
    site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    (venv / "lib" / version / "site-packages" / "outer.pth").write_text("\n".join(site) + "\n")
    d = Daemon(pool_size=1)
    started = time.monotonic()
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "sagecell",
            *d.args,
        ],
        capture_output=True,
        text=True,
        cwd=d.tmp,
        env=d.env,
        timeout=60,
    )
    try:
        assert out.returncode != 0 and time.monotonic() - started < 30
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert len(lines) == 1, lines
        assert "sagecell-worker" in lines[0] and "Permission denied" in lines[0] and "/opt/sagecell_tw/venv" in lines[0]
        assert "spawner" not in out.stdout  # none was started, none restarted
    finally:
        shutil.rmtree(d.tmp, ignore_errors=True)


def test_embedded_spawner_is_not_restarted_once_root_is_dropped(monkeypatch):
    euid = [0]
    monkeypatch.setattr(os, "geteuid", lambda: euid[0])
    reactor = FakeReactor()
    sp = spawners.EmbeddedSpawner(reactor, ["spawner"], {}, "/")
    refused = []
    sp.on_cannot_restart.append(refused.append)
    sp.start()
    euid[0] = 994  # twistd --uid
    end_process(reactor.spawned[-1][0])
    reactor.advance(60)
    assert len(reactor.spawned) == 1 and len(refused) == 1 and "root" in refused[0]


def control_messages(router: FakeChannel, identity: bytes) -> list[dict]:
    return [json.loads(p[1]) for p in router.sent if p[0] == identity]


def test_new_spawner_replaces_old_one_and_adopts_kernels_in_use():
    clock = task.Clock()
    zmq = FakeZmq()
    manager = kernels.KernelManager(zmq, clock, max_kernels=8, shutdown_grace=1.0)
    channel = spawners.ControlChannel(zmq, "ipc:///x", manager, clock)
    channel.listen()
    router = zmq.routers[0]

    def hear(identity: bytes, msg: dict):
        router.on_message([identity, json.dumps(msg).encode()])
        if msg["event"] == "ready":  # its iopub answered: poolable
            manager.kernels[msg["kernel"]["id"]]._warm()

    hello = {"event": "hello", "host": "h", "base_dir": "/run/k", "pid": 1}
    hear(b"old", dict(hello, name="old"))
    assert {"cmd": "sync", "keep": []} in control_messages(router, b"old")
    hear(b"old", {"event": "ready", "kernel": kernel_info("k1")})
    hear(b"old", {"event": "ready", "kernel": kernel_info("k2")})
    taken = manager.take()
    assert taken.result.id == "k1" and manager.pool[0].id == "k2"
    # A new spawner for the same base dir: the old one is gone at once, its
    # pooled kernel with it; the kernel in use moves to the new spawner.
    hear(b"new", dict(hello, name="new", pid=2))
    assert list(channel.spawners) == [b"new"]
    assert not manager.pool and "k2" not in manager.kernels
    assert {"cmd": "sync", "keep": ["k1"]} in control_messages(router, b"new")
    assert taken.result.spawner.identity == b"new"
    # The same process saying hello again (it answered several nudges) loses nothing.
    hear(b"new", {"event": "ready", "kernel": kernel_info("k3")})
    hear(b"new", dict(hello, name="new", pid=2))
    assert list(channel.spawners) == [b"new"] and [k.id for k in manager.pool] == ["k3"]
    assert control_messages(router, b"new")[-1] == {"cmd": "sync", "keep": ["k1"]}
    # Its death, reported by the new spawner, reaches the session's kernel.
    hear(b"new", {"event": "dead", "id": "k1", "reason": "the kernel ended"})
    assert taken.result.state == "dead"
    # A spawner the daemon does not know (the daemon restarted) is asked to say hello.
    hear(b"stranger", {"event": "pool", "ready": 1})
    assert control_messages(router, b"stranger") == [{"cmd": "hello"}]
    channel.close()


def test_embedded_spawner_process_end_loses_it_at_once():
    clock = task.Clock()
    zmq = FakeZmq()
    manager = kernels.KernelManager(zmq, clock, max_kernels=8, shutdown_grace=1.0)
    channel = spawners.ControlChannel(zmq, "ipc:///x", manager, clock)
    channel.listen()
    zmq.routers[0].on_message([b"s", json.dumps({"event": "hello", "name": "s", "pid": 77}).encode()])
    zmq.routers[0].on_message([b"s", json.dumps({"event": "ready", "kernel": kernel_info("k1")}).encode()])
    manager.kernels["k1"]._warm()
    assert len(manager.pool) == 1
    channel.lost_process(77, "its process ended")
    assert not channel.spawners and not manager.pool
    channel.close()


def test_a_killed_spawners_pooled_kernels_are_not_handed_out(monkeypatch):
    """From the moment its process is reaped, while its fork server still holds the pipes."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    reactor = FakeReactor()
    zmq = FakeZmq()
    manager = kernels.KernelManager(zmq, reactor, max_kernels=8, shutdown_grace=1.0, wait_timeout=5.0)
    channel = spawners.ControlChannel(zmq, "ipc:///x", manager, reactor)
    channel.listen()
    sp = spawners.EmbeddedSpawner(reactor, ["spawner"], {}, "/")
    sp.on_exit.append(lambda pid, why: channel.lost_process(pid, why))  # as the service wires it
    sp.start()
    hear = zmq.routers[0].on_message
    hear([b"s", json.dumps({"event": "hello", "name": "s", "pid": sp.pid}).encode()])
    hear([b"s", json.dumps({"event": "ready", "kernel": kernel_info("k1")}).encode()])
    manager.kernels["k1"]._warm()
    reactor.spawned[-1][0].processExited(Failure(ProcessTerminated(signal=9)))
    taken = manager.take()
    assert not taken.called  # it waits for the next spawner's kernel
    hear([b"t", json.dumps({"event": "hello", "name": "t", "pid": 2}).encode()])
    hear([b"t", json.dumps({"event": "ready", "kernel": kernel_info("k2")}).encode()])
    manager.kernels["k2"]._warm()
    assert taken.result.id == "k2"
    channel.close()


class FakeSvc:
    def __init__(self, spawners_connected: int, pooled: int):
        self.control = type("C", (), {"spawners": {i: None for i in range(spawners_connected)}})()
        self.kernels = type(
            "K", (), {"pool": [type("k", (), {"state": "pooled"})()] * pooled, "live_count": lambda self: 3}
        )()
        self.kernels.observers = []
        self.sessions = type("S", (), {"routes": [1, 2], "observers": []})()
        s = self.sessions
        s.msgs_to_kernels, s.bytes_to_kernels, s.msgs_from_kernels, s.bytes_from_kernels = 5, 500, 7, 7000
        self.embedded = [type("E", (), {"restarts": 2, "failed_starts": 0, "failure": ""})()]


@pytest.mark.parametrize(
    "path, connected, pooled, status",
    [
        (b"/healthz", 1, 1, 200),
        (b"/healthz", 1, 0, 503),
        (b"/healthz", 0, 0, 503),
        (b"/healthz/ready", 0, 1, 503),
        (b"/healthz/live", 0, 0, 200),
    ],
)
def test_health_resource(path, connected, pooled, status):
    from twisted.web.test.requesthelper import DummyRequest

    kind = "live" if path.endswith(b"/live") else "ready"  # as the site's routes ask for them
    req = DummyRequest(path.split(b"/")[1:])
    health.Health(FakeSvc(connected, pooled)).resource(kind).render(req)
    body = json.loads(b"".join(req.written))
    assert req.responseCode == status and body["live"] is True and body["ready"] is bool(connected and pooled)
    assert body["sessions"] == 2 and body["kernels"] == 3
    if status == 503:
        assert body["why"]


def test_metrics_text():
    svc = FakeSvc(1, 2)
    m = metrics.Metrics(svc)
    m.attach()
    m.attach_control(type("C", (), {"observers": []})())
    ready = type("k", (), {"info": {"spawn_seconds": 0.042}})()
    for observer in svc.kernels.observers:
        observer("ready", ready)
        observer("died", ready)
    for observer in svc.sessions.observers:
        observer.session_started(None)
        observer.limit_hit(None, "exec_timeout")
        observer.limit_hit(None, "exec_timeout")
    text = m.render().decode()
    assert metric(text, "sagecell_pool_ready") == 2
    assert metric(text, "sagecell_kernels_running") == 3
    assert metric(text, "sagecell_sessions") == 2
    assert metric(text, "sagecell_spawners_connected") == 1
    assert metric(text, "sagecell_spawn_seconds_count") == 1
    assert metric(text, "sagecell_spawn_seconds_bucket", '{le="0.05"}') == 1
    assert metric(text, "sagecell_spawn_seconds_bucket", '{le="0.025"}') == 0
    assert metric(text, "sagecell_kernels_spawned_total") == 1 and metric(text, "sagecell_kernels_died_total") == 1
    assert metric(text, "sagecell_limits_hit_total", '{kind="exec_timeout"}') == 2
    assert metric(text, "sagecell_messages_total", '{direction="from_kernel"}') == 7
    assert metric(text, "sagecell_message_bytes_total", '{direction="to_kernel"}') == 500
    assert metric(text, "sagecell_spawner_restarts_total") == 2
    # A second service gets a registry of its own.
    assert metric(metrics.Metrics(FakeSvc(0, 0)).render().decode(), "sagecell_spawn_seconds_count") == 0
