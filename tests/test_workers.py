"""
Worker hosts: least-loaded placement, lost hosts, CURVE keys, and (as root)
a daemon and two workers in network namespaces this test makes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import zmq
from fakes import FakeZmq, kernel_info
from support import ROOT, Client, found_in_memory, scan_memory, stdout_of
from twisted.internet import task

from sagecell_tw import config as configmod
from sagecell_tw import keys
from sagecell_tw.control import spawners
from sagecell_tw.core import kernels
from sagecell_tw.worker import keeper, records


class Hosts:
    """A control channel fed by hand, with a task.Clock."""

    def __init__(self):
        self.clock = task.Clock()
        self.zmq = FakeZmq()
        self.manager = kernels.KernelManager(self.zmq, self.clock, max_kernels=50, shutdown_grace=1.0)
        self.channel = spawners.ControlChannel(self.zmq, "tcp://10.0.0.1:5555", self.manager, self.clock)
        self.channel.listen()
        self.router = self.zmq.routers[0]
        self.n = 0

    def hear(self, identity: bytes, msg: dict) -> None:
        self.router.on_message([identity, json.dumps(msg).encode()])

    def join(self, name: str, max_kernels: int = 10, pool: int = 0) -> None:
        hello = {"event": "hello", "name": name, "host": "same-hostname", "public_host": name, "base_dir": "/k"}
        self.hear(name.encode(), dict(hello, pid=hash(name) & 0xFFFF, max_kernels=max_kernels, relay=True))
        for _ in range(pool):
            self.ready(name)

    def ready(self, name: str) -> str:
        self.n += 1
        kid = f"{name}-k{self.n}"
        self.hear(name.encode(), {"event": "ready", "kernel": kernel_info(kid, relay=name)})
        self.manager.kernels[kid]._warm()  # its iopub answered
        return kid

    def take(self) -> kernels.Kernel:
        return self.manager.take().result

    def pongs(self, *names: str) -> None:
        for name in names:
            self.hear(name.encode(), {"event": "pong", "t": self.clock.seconds()})


# -- placement -------------------------------------------------------------------


def test_sessions_go_to_the_least_loaded_host_within_its_capacity():
    h = Hosts()
    h.join("a", max_kernels=2, pool=4)
    h.join("b", max_kernels=10, pool=4)
    placed = [h.take().spawner.name for _ in range(4)]
    # a, b, a, b: each new session goes where fewest are in use ...
    assert placed == ["a", "b", "a", "b"]
    # ... and "a" is full at 2, though it still has pooled kernels.
    assert [h.take().spawner.name for _ in range(2)] == ["b", "b"]
    assert sum(1 for k in h.manager.pool if k.spawner.name == "a") == 2
    # The kernels reach the relays over tcp, with the worker's CURVE key.
    address, curve = h.zmq.connects[0]
    assert address == "tcp://a:1" and curve == {"server_key": b"S" * 40}


def test_a_finished_session_frees_room_on_its_host():
    h = Hosts()
    h.join("a", max_kernels=1, pool=2)
    h.join("b", max_kernels=1, pool=2)
    first = h.take()
    second = h.take()
    assert {first.spawner.name, second.spawner.name} == {"a", "b"}
    d = h.manager.take()
    assert not d.called  # both hosts full: the session waits
    d.addErrback(lambda f: None)
    h.hear(first.spawner.name.encode(), {"event": "dead", "id": first.id, "reason": "done"})
    assert h.take().spawner.name == first.spawner.name


def test_a_silent_host_ends_its_sessions_and_new_ones_go_elsewhere():
    h = Hosts()
    h.join("a", pool=2)
    h.join("b", pool=2)
    on_a = h.take()
    on_b = h.take()
    assert (on_a.spawner.name, on_b.spawner.name) == ("a", "b")
    deaths = []
    on_a.on_death = deaths.append
    # "a" goes quiet; "b" keeps answering pings.
    for _ in range(7):
        h.clock.advance(spawners.PING_INTERVAL)
        h.pongs("b")
    assert deaths and "the worker host a went away" in deaths[0]
    assert on_a.state == "dead" and on_b.state == "assigned"
    assert all(s.closed for s in on_a.sockets.values())
    assert [sp.name for sp in h.channel.spawners.values()] == ["b"]
    assert {h.take().spawner.name for _ in range(1)} == {"b"}
    # "a" comes back (its link healed, or it restarted): it says hello and rejoins.
    h.join("a", pool=1)
    assert h.take().spawner.name == "a"


def test_a_local_spawner_lost_keeps_its_sessions_for_adoption():
    h = Hosts()
    h.hear(b"local", {"event": "hello", "name": "local", "host": "h", "base_dir": "/k", "pid": 1})
    h.hear(b"local", {"event": "ready", "kernel": kernel_info("k1")})
    h.manager.kernels["k1"]._warm()
    kernel = h.take()
    h.channel.lost_process(1, "it died")
    assert kernel.state == "assigned"  # a restarted spawner adopts it


# -- keys ------------------------------------------------------------------------


def test_keys_generate_secret_0600_and_zap_admits_only_listed_keys(tmp_path):
    public, secret = keys.generate(str(tmp_path / "keys"), "w1")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pub, sec = keys.load_secret(secret)
    assert keys.load_public(public) == pub and len(sec) == 40
    os.chmod(secret, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        keys.load_secret(secret)
    allowed = keys.load_allowed(str(tmp_path / "keys"))
    assert allowed == {pub}
    raw = zmq.utils.z85.decode(pub)
    request = [b"peer", b"", b"1.0", b"7", b"", b"10.0.0.2", b"", b"CURVE", raw]
    reply, ok = keys.zap_answer(request, allowed)
    assert ok and reply[3:5] == [b"7", b"200"]
    reply, ok = keys.zap_answer(request[:8] + [b"x" * 32], allowed)
    assert not ok and reply[4] == b"400"
    assert keys.zap_answer(request[:8] + [b""], allowed)[1] is False
    assert keys.zap_answer([b"junk"], allowed) == (None, False)


def test_worker_keys_need_a_secret_key_and_tcp_control():
    with pytest.raises(configmod.ConfigError, match="go together"):
        configmod.build({}, {"worker_keys": "/etc/sagecell/workers"})
    with pytest.raises(configmod.ConfigError, match="tcp://"):
        configmod.build({}, {"worker_keys": "/w", "curve_secret_key": "/k"})
    with pytest.raises(configmod.ConfigError, match="embedded-spawner false"):
        configmod.build({}, {"worker_keys": "/w", "curve_secret_key": "/k", "control": "tcp://10.0.0.1:5555"})
    ok = {"worker_keys": "/w", "curve_secret_key": "/k", "control": "tcp://10.0.0.1:5555", "embedded_spawner": "false"}
    assert configmod.build({}, ok).worker_keys == "/w"


def test_keeper_ends_only_its_managers_kernels_once_a_pipe_closes(tmp_path):
    """keeper.watch: EOF on any pipe it holds; then the kernels recorded as its manager's end, no others."""
    base = str(tmp_path)
    records.prepare(base)
    procs = {owner: subprocess.Popen(["sleep", "60"]) for owner in ("mine", "other")}
    kids = {}
    try:
        for owner, proc in procs.items():
            kids[owner] = uuid.uuid4().hex
            os.mkdir(os.path.join(base, kids[owner]))
            records.write(base, kids[owner], proc.pid, owner)
        front_r, front_w = os.pipe()
        manager_r, manager_w = os.pipe()
        os.close(manager_w)  # the manager died; the front lives on
        keeper.watch(base, "mine", [front_r, manager_r], grace=0)
        assert procs["mine"].wait(5) == -signal.SIGKILL
        assert procs["other"].poll() is None
        assert records.kernel_ids(base) == [kids["other"]]
        assert sorted(os.listdir(base)) == sorted([".records", kids["other"]])
        for fd in (front_r, front_w, manager_r):
            os.close(fd)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


# -- real hosts in network namespaces -------------------------------------------


def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (apt-get install iproute2)"
    probe = f"scprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


class NetnsDaemon:
    """The daemon in its namespace, reached by the test through a unix socket (no address in ours)."""

    ws_url = "ws://localhost"

    def __init__(self, web_sock: str, log_path: str):
        self.web_sock = web_sock
        self.log_path = log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = UnixHTTP(self.web_sock)
        conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"null")
        conn.close()
        return resp.status, answer

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, lower-case headers, body bytes); the path goes on the wire exactly as given."""
        conn = UnixHTTP(self.web_sock)
        try:
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def new_kernel(self) -> str:
        status, body = self.request("POST", "/api/kernels", {"name": "python3"})
        assert status == 201, body
        return body["id"]

    def client(self, kernel_id: str) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.web_sock)
        return Client(self, kernel_id, socket=sock)

    def host_of(self, kernel_id: str) -> str:
        """The worker a session's kernel runs on, from the daemon's log."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            log = self.log()
            got = re.findall(rf"session {kernel_id} got kernel (\w+)", log)
            if got:
                where = re.findall(rf"kernel {got[-1]} ready \(pid \d+\) on (\w+)", log)
                return where[-1]
            time.sleep(0.05)
        raise AssertionError(f"no kernel for {kernel_id}")


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def until_dead(client: Client, timeout: float = 15.0) -> str:
    """Read until the session says its kernel died; the text it showed."""
    text = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = client.recv(max(0.1, deadline - time.monotonic()))
        if m["msg_type"] == "stream":
            text += m["content"]["text"]
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "dead":
            return text
    raise AssertionError(f"no dead status; saw {text!r}")


def live_kernels(daemon: NetnsDaemon, host: str) -> dict[int, str]:
    """Host pid: start time of each kernel the daemon was told is ready on ``host`` and that still runs."""
    pids = {int(p) for p in re.findall(rf"ready \(pid (\d+)\) on {host}\b", daemon.log())}
    return {p: records.start_time(p) for p in pids if records.start_time(p) and not records.zombie(p)}


def still_running(kernels_seen: dict[int, str]) -> list[int]:
    return [p for p, start in kernels_seen.items() if records.start_time(p) == start and not records.zombie(p)]


def spawner_processes(front: int) -> tuple[int, int]:
    """The manager and the keeper a spawner front forked (the manager is the zygote's parent)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass

    def is_zygote(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"sagecell_tw.worker.zygote" in f.read()
        except OSError:
            return False

    ours = children.get(front, [])
    managers = [c for c in ours if any(is_zygote(z) for z in children.get(c, []))]
    keepers = [c for c in ours if c not in managers]
    assert len(managers) == 1 and len(keepers) == 1, (ours, managers)
    return managers[0], keepers[0]


def wait_all_ended(kernels_seen: dict[int, str], since: float, what: str) -> None:
    """Every one of ``kernels_seen`` ends within the keeper's grace period (and some slack) of ``since``."""
    limit = since + keeper.ORPHAN_GRACE + 3
    while still_running(kernels_seen) and time.monotonic() < limit:
        time.sleep(0.1)
    assert not still_running(kernels_seen), f"{what}: kernels still run: {still_running(kernels_seen)}"


def check_files_on_a_worker(daemon: NetnsDaemon, kid: str, c: Client) -> None:
    """Files of a kernel on a worker host, through the daemon: up, news, listing, down, attacks."""
    base = f"/api/kernels/{kid}/files"
    payload = bytes(range(256)) * 1200 + bytes(range(256))  # every byte value; over a chunk
    status, _, body = daemon.raw("PUT", f"{base}/in/all.bin", payload)
    assert status == 201, body
    model = json.loads(body)
    assert (model["path"], model["size"], model["url"]) == ("in/all.bin", len(payload), f"{base}/in/all.bin")
    reply, out = c.execute(
        "import hashlib\n"
        "d = open('in/all.bin', 'rb').read()\n"
        "print(hashlib.sha256(d).hexdigest(), len(d))\n"
        "open('out.bin', 'wb').write(d[::-1] * 3)"
    )
    assert reply["status"] == "ok", reply
    assert stdout_of(out).split() == [hashlib.sha256(payload).hexdigest(), str(len(payload))]
    expected = payload[::-1] * 3
    # The news of what the code wrote (not of the upload), before the execution's idle.
    news = [m for m in out if m["msg_type"] == "sagecell.files"]
    assert len(news) == 1, [m["msg_type"] for m in out]
    assert [(f["path"], f["change"], f["size"]) for f in news[0]["content"]["files"]] == [
        ("out.bin", "created", len(expected))
    ]
    idle = [i for i, m in enumerate(out) if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"]
    assert out.index(news[0]) < idle[-1]
    status, _, body = daemon.raw("GET", f"{base}/")
    assert status == 200
    assert {f["path"]: f["size"] for f in json.loads(body)["files"]} == {
        "in/all.bin": len(payload),
        "out.bin": len(expected),
    }
    status, _, body = daemon.raw("GET", f"{base}/in/")
    assert [f["url"] for f in json.loads(body)["files"]] == [f"{base}/in/all.bin"]
    # Downloads: whole, a range, HEAD; the same headers as for a local kernel.
    status, headers, body = daemon.raw("GET", f"{base}/out.bin")
    assert status == 200 and body == expected
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith('attachment; filename="out.bin"')
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"] == "sandbox allow-scripts"
    status, headers, body = daemon.raw("GET", f"{base}/out.bin", headers={"Range": "bytes=1000-400999"})
    assert status == 206 and body == expected[1000:401000]
    assert headers["content-range"] == f"bytes 1000-400999/{len(expected)}"
    status, headers, body = daemon.raw("HEAD", f"{base}/in/all.bin")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(payload))
    # A form upload, as the widget sends it.
    form = (
        b'--B0undary\r\nContent-Disposition: form-data; name="path"\r\n\r\nsub/form.bin\r\n'
        b'--B0undary\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n--B0undary--\r\n"
    )
    status, _, body = daemon.raw("POST", f"{base}/", form, {"Content-Type": "multipart/form-data; boundary=B0undary"})
    assert status == 201 and json.loads(body)["path"] == "sub/form.bin", body
    assert daemon.raw("GET", f"{base}/sub/form.bin")[2] == payload
    # Attacks: climbing out, and links the code made to outside; nothing changes.
    planted = f"/tmp/sagecell-planted-{uuid.uuid4().hex}"
    assert c.execute("import os\nos.symlink('/etc/passwd', 'pw')\nos.symlink('/tmp', 'tmp')")[0]["status"] == "ok"
    for path in (f"{base}/%2e%2e/%2e%2e/x", f"{base}/..%2F..%2Fx", f"{base}/in/%2e%2e/%2e%2e/%2e%2e/etc/passwd"):
        assert daemon.raw("GET", path)[0] in (400, 403), path
        assert daemon.raw("PUT", path, b"evil")[0] in (400, 403), path
    assert daemon.raw("GET", f"{base}/pw")[0] == 403
    status, _, body = daemon.raw("PUT", f"{base}/tmp/{os.path.basename(planted)}", b"evil")
    assert status in (403, 409), (status, body)
    assert not os.path.exists(planted)
    status, _, body = daemon.raw("GET", f"{base}/")
    assert sorted(f["path"] for f in json.loads(body)["files"]) == ["in/all.bin", "out.bin", "sub/form.bin"]
    out = c.execute("import os\nprint(sorted(n for n in os.listdir('.') if n.startswith('.')))")[1]
    assert stdout_of(out) == "[]\n"  # no temporary upload file left behind


@pytest.mark.slow
def test_workers_on_other_hosts_over_curve():
    why = _netns_available()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    ns = {role: f"sc9{role}{tag}" for role in ("d", "w1", "w2")}
    tmp = tempfile.mkdtemp(prefix="sagecell-workers-")
    os.chmod(tmp, 0o711)
    procs: dict[str, subprocess.Popen] = {}
    made: list[str] = []

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    def in_ns(name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns[name], *cmd]

    env = dict(os.environ, PYTHONPATH=ROOT, PYDEVD_DISABLE_FILE_VALIDATION="1")

    def start_worker(w: str) -> None:
        n = w[-1]
        procs[w] = subprocess.Popen(
            in_ns(
                w,
                sys.executable,
                "-m",
                "sagecell_tw.worker.spawner",
                "--control",
                f"tcp://10.199.{n}.1:5555",
                "--public-host",
                f"10.199.{n}.2",
                "--curve-secret",
                f"{tmp}/keys/{w}.key_secret",
                "--daemon-key",
                f"{tmp}/keys/daemon.key",
                "--name",
                w,
                "--base-dir",
                f"{tmp}/{w}",
                "--pool-size",
                "2",
                "--max-kernels",
                "6",
                "--preload",
                "",
                "--worker-user",
                "sagecell-worker",
            ),
            stdout=open(f"{tmp}/{w}.log", "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for n in ("1", "2"):
            d_end, w_end = f"sc9d{n}x{tag}", f"sc9w{n}x{tag}"
            sh(
                "ip",
                "link",
                "add",
                d_end,
                "netns",
                ns["d"],
                "type",
                "veth",
                "peer",
                "name",
                w_end,
                "netns",
                ns[f"w{n}"],
            )
            sh("ip", "-n", ns["d"], "addr", "add", f"10.199.{n}.1/24", "dev", d_end)
            sh("ip", "-n", ns[f"w{n}"], "addr", "add", f"10.199.{n}.2/24", "dev", w_end)
            sh("ip", "-n", ns["d"], "link", "set", d_end, "up")
            sh("ip", "-n", ns[f"w{n}"], "link", "set", w_end, "up")
        for who in ("daemon", "w1", "w2", "stranger"):
            keys.generate(f"{tmp}/keys", who)
        os.makedirs(f"{tmp}/allowed")
        for w in ("w1", "w2"):
            shutil.copy(f"{tmp}/keys/{w}.key", f"{tmp}/allowed/")
        web = f"{tmp}/web.sock"
        procs["daemon"] = subprocess.Popen(
            in_ns(
                "d",
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "sagecell",
                "--port",
                f"unix:{web}",
                "--run-dir",
                f"{tmp}/run",
                "--permalink-db",
                f"{tmp}/permalinks.sqlite3",
                "--embedded-spawner",
                "false",
                "--control",
                "tcp://0.0.0.0:5555",
                "--curve-secret-key",
                f"{tmp}/keys/daemon.key_secret",
                "--worker-keys",
                f"{tmp}/allowed",
            ),
            stdout=open(f"{tmp}/daemon.log", "wb"),
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=env,
            start_new_session=True,
        )
        daemon = NetnsDaemon(web, f"{tmp}/daemon.log")
        wait_for(lambda: os.path.exists(web), 30, "the daemon's socket")
        start_worker("w1")
        start_worker("w2")
        wait_for(lambda: len(re.findall(r"ready \(pid \d+\) on w", daemon.log())) >= 4, 30, "both pools")

        # A worker whose key is not on the list is refused (and never joins).
        procs["stranger"] = subprocess.Popen(
            in_ns("w1", sys.executable, "-m", "sagecell_tw.worker.spawner", "--control", "tcp://10.199.1.1:5555",
                  "--curve-secret", f"{tmp}/keys/stranger.key_secret", "--daemon-key", f"{tmp}/keys/daemon.key",
                  "--name", "stranger", "--base-dir", f"{tmp}/stranger", "--pool-size", "0", "--preload", "",
                  "--worker-user", "sagecell-worker"),
            stdout=open(f"{tmp}/stranger.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: "refused a control connection" in daemon.log(), 15, "the stranger refused")

        # Sessions are spread over both hosts, and work (shell, iopub, stdin).
        sessions = {}
        for _ in range(4):
            kid = daemon.new_kernel()
            c = daemon.client(kid)
            reply, out = c.execute("print(input('?') * 2)", allow_stdin=True, stdin_reply="ab")
            assert reply["status"] == "ok" and stdout_of(out) == "abab\n"
            sessions[kid] = c
        hosts = {kid: daemon.host_of(kid) for kid in sessions}
        assert sorted(hosts.values()) == ["w1", "w1", "w2", "w2"], hosts
        assert "spawner stranger joined" not in daemon.log()
        check_files_on_a_worker(daemon, kid, sessions[kid])

        # No kernel holds its worker's CurveZMQ secret (or another's) in its memory.
        on_w1 = next(c for k, c in sessions.items() if hosts[k] == "w1")
        scan_memory(on_w1, "import zmq\n_controls.append(zmq.curve_keypair()[1])")
        worker_secrets = {w: keys.load_secret(f"{tmp}/keys/{w}.key_secret")[1].decode() for w in ("w1", "w2")}
        assert found_in_memory(on_w1, worker_secrets) == []

        # w1's front dies (kill -9): its sessions are told, the others keep
        # working, new ones go to w2; none of its kernels runs on unreachable.
        w1_kernels = live_kernels(daemon, "w1")
        assert len(w1_kernels) >= 2, w1_kernels
        os.killpg(procs["w1"].pid, signal.SIGKILL)
        procs["w1"].wait(10)
        t0 = time.monotonic()
        for kid, c in sessions.items():
            if hosts[kid] == "w1":
                assert "the worker host 10.199.1.2 went away" in until_dead(c)
        lost_after = time.monotonic() - t0
        assert lost_after < spawners.SILENCE + 4
        wait_all_ended(w1_kernels, t0, "w1's front killed")
        for kid, c in sessions.items():
            if hosts[kid] == "w2":
                reply, out = c.execute("print('still here')")
                assert stdout_of(out) == "still here\n"
        kid = daemon.new_kernel()
        sessions[kid] = c = daemon.client(kid)
        assert c.execute("print(1)")[0]["status"] == "ok" and daemon.host_of(kid) == "w2"
        hosts[kid] = "w2"

        # w1 comes back and rejoins; its front and manager are killed at
        # once: the keeper ends its kernels. It comes back again.
        start_worker("w1")
        wait_for(lambda: daemon.log().count("spawner w1 joined") >= 2, 30, "w1 to rejoin")
        wait_for(lambda: len(live_kernels(daemon, "w1")) >= 2, 30, "w1's pool")
        w1_kernels = live_kernels(daemon, "w1")
        manager, _keeper = spawner_processes(procs["w1"].pid)
        os.kill(manager, signal.SIGKILL)
        os.kill(procs["w1"].pid, signal.SIGKILL)
        procs["w1"].wait(10)
        wait_all_ended(w1_kernels, time.monotonic(), "w1's front and manager killed at once")
        start_worker("w1")
        wait_for(lambda: daemon.log().count("spawner w1 joined") >= 3, 30, "w1 to rejoin")
        wait_for(lambda: len(live_kernels(daemon, "w1")) >= 2, 30, "w1's pool")

        # w2's link is cut.
        sh("ip", "-n", ns["d"], "link", "set", f"sc9d2x{tag}", "down")
        t0 = time.monotonic()
        for kid, c in sessions.items():
            if hosts[kid] == "w2":
                assert "the worker host 10.199.2.2 went away" in until_dead(c)
        assert time.monotonic() - t0 < spawners.SILENCE + 4
        kid = daemon.new_kernel()
        c = daemon.client(kid)
        reply, out = c.execute("print(2 + 2)")
        assert stdout_of(out) == "4\n" and daemon.host_of(kid) == "w1"

        # The link heals: w2 says hello again and takes sessions once more.
        sh("ip", "-n", ns["d"], "link", "set", f"sc9d2x{tag}", "up")
        wait_for(lambda: daemon.log().count("spawner w2 joined") >= 2, 20, "w2 to rejoin")
        for c in sessions.values():
            c.close()
    except BaseException:
        for name in ("daemon", "w1", "w2"):
            path = f"{tmp}/{name}.log"
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    print(f"--- {name}.log\n{f.read()[-4000:]}")
        raise
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM if name == "daemon" else signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for name in made:
            # Whatever still runs in our namespaces (kernels of a killed worker) is ours.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        # Kernels live each in a network namespace of its own that ``ip
        # netns pids`` does not list: end any left by the records of their spawners.
        for w in ("w1", "w2"):
            for kid in records.kernel_ids(f"{tmp}/{w}"):
                records.end(f"{tmp}/{w}", kid)
        time.sleep(0.2)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes its veth ends with it
        shutil.rmtree(tmp, ignore_errors=True)
    _ = uuid
