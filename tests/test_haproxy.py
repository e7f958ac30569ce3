"""
Several daemons behind a real HAProxy (etc/haproxy.cfg): each kernel's
requests reach the daemon that holds it, new sessions spread over the
daemons, and when one daemon dies its sessions are told and new sessions go
to the other. Also the ids that carry a daemon's name (core/grants.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket
from balancer import HAProxy, crash, free_port, haproxy_binary, render, start_all
from support import Client, Daemon, stdout_of

from sagecell_tw import config as configmod
from sagecell_tw.core import grants

# -- ids that name their daemon ------------------------------------------------


def test_a_grant_keeps_its_128_random_bits_after_the_daemon_name():
    ids = {grants.new_grant("d1") for _ in range(1000)}
    assert len(ids) == 1000
    for grant in ids:
        name, random = grant.split("-")
        assert name == "d1" and re.fullmatch(r"[0-9a-f]{32}", random)
        assert grants.daemon_of(grant) == "d1"
    plain = grants.new_grant("")
    assert re.fullmatch(r"[0-9a-f]{32}", plain) and grants.daemon_of(plain) is None


def test_only_another_daemons_grant_is_lost_elsewhere():
    mine, theirs = grants.new_grant("d2"), grants.new_grant("d1")
    assert grants.lost_elsewhere(mine, "d2") is None
    assert "kernel lost: the server d1" in grants.lost_elsewhere(theirs, "d2")
    for junk in ("d1-xyz", "D1-" + "0" * 32, "d1-" + "0" * 31, "a" * 17 + "-" + "0" * 32, None, 5, "0" * 32):
        assert grants.lost_elsewhere(junk, "d2") is None, junk


@pytest.mark.parametrize("name", ["D1", "d-1", "d_1", "a" * 17, " d1", "d1\n"])
def test_a_daemon_name_the_balancer_cannot_route_by_is_refused_at_start(name):
    with pytest.raises(configmod.ConfigError, match="--daemon-name"):
        configmod.build({}, {"daemon_name": name})
    assert configmod.build({}, {"daemon_name": "web07"}).daemon_name == "web07"


def test_the_shipped_configuration_is_valid_haproxy():
    binary = haproxy_binary()
    assert binary, "haproxy is not installed (setup.sh installs it)"
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as f:
        f.write(render({"d1": 1, "d2": 2, "d3": 3}, 8080))
        f.flush()
        check = subprocess.run([binary, "-c", "-f", f.name], capture_output=True, text=True)
    assert check.returncode == 0 and "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr


def test_haproxy_limits_the_open_connections_of_one_visitor():
    """The daemons cannot (they see HAProxy's address): past the limit, a visitor's next connection is closed."""
    front = HAProxy({"d1": free_port()}, per_visitor=3).start()
    held = []
    try:
        # HAProxy may still count start()'s probe for a moment and close one of these as over
        # the limit: hold three that are open before each try of a fourth.
        assert poll(lambda: hold(held, 3, front.port) and answered(front.port) is False), (
            "a fourth connection was served"
        )
        held.pop().close()
        assert poll(lambda: answered(front.port) is True), "a connection within the limit was refused"
    finally:
        for s in held:
            s.close()
        front.stop()


def hold(held: list, n: int, port: int) -> bool:
    """Keep ``n`` open connections to ``port`` in ``held``, replacing any the other end closed."""
    for s in list(held):
        if not _open(s):
            s.close()
            held.remove(s)
    while len(held) < n:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return True


def _open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)
        s.settimeout(5)


def answered(port: int) -> bool:
    """Whether HAProxy answers a request on a new connection (its own 503 here: no daemon is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 503")
    except OSError:  # refused, reset, or no answer in time on a loaded machine: not served
        return False


def poll(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# -- two daemons behind a real HAProxy -----------------------------------------

NODE = shutil.which("node")
JUPYTER_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jupyterlab_client")

SESSIONS = 100
#: sessions checked at once: each takes a kernel from its daemon's pool, and two cores fork them
AT_ONCE = 6
#: sessions left open on each daemon when one is killed
HELD = 3


@pytest.fixture(scope="module")
def site():
    """Daemons d1 and d2 (one permalink file, WAL) behind HAProxy; stopped by their PIDs."""
    shared = tempfile.mkdtemp(prefix="sagecell-shared-")
    options = dict(
        pool_size=4,
        max_kernels=40,
        # every visitor comes from HAProxy's address, 127.0.0.1
        max_kernels_per_client=40,
        permalinks_per_minute=1000,
        permalink_db=os.path.join(shared, "permalinks.sqlite3"),
    )
    daemons = {name: Daemon(daemon_name=name, **options) for name in ("d1", "d2")}
    front = None
    try:
        start_all(list(daemons.values()))
        front = HAProxy({name: d.port for name, d in daemons.items()}).start()
        yield front, daemons
    finally:
        if front is not None:
            front.stop()
        for d in daemons.values():
            d.stop()


class SageCellClient(Client):
    """A client on SageMathCell's socket path, ``/kernel/{id}/channels``."""

    def __init__(self, front, kernel_id: str):
        self.session = uuid.uuid4().hex
        self.daemon = front
        self.kernel_id = kernel_id
        self.ws = websocket.create_connection(f"{front.ws_url}/kernel/{kernel_id}/channels", timeout=30)
        self.backlog = []


def new_session(front, i: int) -> tuple[str, Client]:
    """A kernel through the front door, one of four ways a client asks for one, and a socket to it."""
    way = i % 4
    if way == 0:
        status, body, _ = front.request("POST", "/api/kernels", {"name": "python3"})
        assert status == 201, (status, body)
        kid = body["id"]
    elif way == 1:
        status, body, _ = front.request("POST", "/api/sessions", {"path": f"n{i}.ipynb", "type": "notebook"})
        assert status == 201, (status, body)
        kid = body["kernel"]["id"]
        status, again, _ = front.request("GET", f"/api/sessions/{body['id']}")
        assert status == 200 and again["kernel"]["id"] == kid, (status, again)
    else:
        status, body, _ = front.request("POST", "/kernel", {"CellSessionID": f"page{i}"})
        assert status == 200, (status, body)
        kid = body["id"]
    client = SageCellClient(front, kid) if way == 3 else Client(front, kid)
    return kid, client


def check_session(front, i: int) -> str:
    """
    One visitor's session through HAProxy: its code, files and interrupt all
    reach its own kernel. Returns the daemon named in its id.
    """
    kid, c = new_session(front, i)
    try:
        token = uuid.uuid4().hex
        reply, out = c.execute(f"import os, time\nmine = {token!r}\nopen('mine.txt', 'w').write(mine)\nprint(mine)")
        assert reply["status"] == "ok" and stdout_of(out).strip() == token, (reply, out)
        reply, out = c.execute("print(mine)")
        assert stdout_of(out).strip() == token, (kid, out)
        files = "kernel" if i % 4 >= 2 else "api/kernels"
        status, body, _ = front.request("GET", f"/{files}/{kid}/files/mine.txt")
        assert (status, body) == (200, token.encode()), (kid, status, body)
        status, model, _ = front.request("GET", f"/api/kernels/{kid}")
        assert status == 200 and model["id"] == kid, (status, model)
        interrupted(front, c, kid)
        return grants.daemon_of(kid)
    finally:
        c.close()
        status, body, _ = front.request("DELETE", f"/api/kernels/{kid}")
        assert status == 204, (kid, status, body)


def interrupted(front, c: Client, kid: str) -> None:
    """``POST .../interrupt`` through HAProxy stops this session's sleep within a second."""
    req = c.start_execute("time.sleep(30)")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = c.recv(10)
        if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == req["header"]["msg_id"]:
            break
    time.sleep(0.2)  # into time.sleep
    t0 = time.monotonic()
    status, body, _ = front.request("POST", f"/api/kernels/{kid}/interrupt")
    assert status == 204, (kid, status, body)
    reply, _ = c.outcome(req, timeout=5)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", (kid, reply)
    assert time.monotonic() - t0 < 2.0


def jupyter_client_on(front, daemon: str) -> subprocess.Popen:
    """@jupyterlab/services with a kernel on ``daemon``, waiting for a line on stdin (tests/jupyterlab_client/lost.mjs)."""
    assert NODE and os.path.isdir(os.path.join(JUPYTER_CLIENT, "node_modules", "@jupyterlab", "services")), (
        "node and tests/jupyterlab_client/node_modules are needed (setup.sh installs them)"
    )
    proc = subprocess.Popen(
        [NODE, "lost.mjs", front.url, daemon],
        cwd=JUPYTER_CLIENT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready = json.loads(proc.stdout.readline() or "{}")
    assert ready.get("step") == "ready" and ready["id"].startswith(daemon + "-"), ready
    return proc


def run_sessions(front, numbers) -> list[str]:
    with ThreadPoolExecutor(AT_ONCE) as pool:
        return list(pool.map(lambda i: check_session(front, i), numbers))


def test_every_request_reaches_its_daemon_and_a_dead_daemons_sessions_are_told(site):
    front, daemons = site
    # 1. Half the sessions with both daemons up: each works end to end, and both daemons take some.
    served = run_sessions(front, range(SESSIONS // 2))
    assert set(served) == {"d1", "d2"}, served
    assert min(served.count("d1"), served.count("d2")) >= SESSIONS // 10, served

    # 2. Permalinks through one daemon are read through the other (one SQLite file, WAL).
    status, made, _ = daemons["d1"].request(
        "POST",
        "/permalink",
        raw=b"code=print(6*7)&language=python",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, (status, made)
    status, got, _ = daemons["d2"].request("GET", f"/permalink?q={made['query']}")
    assert status == 200 and "print(6*7)" in json.dumps(got), (status, got)

    # 3. Sessions held open on both daemons, d1's in the middle of a computation; then d1 dies.
    held = []
    while (
        len([h for h in held if h[0].startswith("d1-")]) < HELD
        or len([h for h in held if h[0].startswith("d2-")]) < HELD
    ):
        assert len(held) < 4 * HELD, [h[0] for h in held]
        kid, c = new_session(front, 0)
        reply, _ = c.execute("x = 1")
        assert reply["status"] == "ok"
        held.append((kid, c))
    jupyter = jupyter_client_on(front, "d1")
    on_d1 = [(kid, c) for kid, c in held if kid.startswith("d1-")]
    on_d2 = [(kid, c) for kid, c in held if kid.startswith("d2-")]
    for _, c in on_d1:
        c.start_execute("import time; time.sleep(60)")
    crash(daemons["d1"])
    jupyter.stdin.write("killed\n")
    jupyter.stdin.flush()

    # Its sessions are told: the socket closes, and the kernel's URLs answer "kernel lost".
    for kid, c in on_d1:
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            for _ in range(100):
                c.recv(10)
        status, body, _ = front.request("GET", f"/api/kernels/{kid}")
        assert status == 503 and body["message"].startswith("kernel lost: the server d1"), (status, body)
        status, body, _ = front.request("POST", f"/kernel/{kid}/files/x", raw=b"")
        assert status == 503 and "kernel lost" in body["message"], (status, body)
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            Client(front, kid)
        assert refused.value.status_code == 503
        # d2 itself says so too, should a balancer bring it one of d1's kernels (nginx's next upstream)
        status, body, _ = daemons["d2"].request("GET", f"/api/kernels/{kid}")
        assert status == 503 and body["message"].startswith("kernel lost: the server d1"), (status, body)
    # So does JupyterLab's own client library: its kernel's REST calls raise the message, and its
    # socket is not connected (it retries, with backoff, for over a minute before "disconnected").
    seen = json.loads(jupyter.communicate(timeout=60)[0].splitlines()[-1])
    assert seen["step"] == "lost", seen
    assert seen["rest"]["status"] == 503 and seen["rest"]["message"].startswith("kernel lost: the server d1"), seen
    assert seen["connectionStatus"] != "connected" and seen["execute"], seen
    # d2's sessions go on as if nothing happened.
    for kid, c in on_d2:
        reply, out = c.execute("x += 1\nprint(x)")
        assert reply["status"] == "ok" and stdout_of(out).strip() == "2", (kid, reply, out)

    # 4. The other half: every new session is served by d2, all of it working.
    served = run_sessions(front, range(SESSIONS // 2, SESSIONS - len(held)))
    assert set(served) == {"d2"}, served
    status, got, _ = front.request("GET", f"/permalink?q={made['query']}")
    assert status == 200, (status, got)
    # Once HAProxy has marked d1 down, it answers for d1's kernels itself, as clearly.
    deadline = time.monotonic() + 15
    while "sagecell/d1 is DOWN" not in front.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "sagecell/d1 is DOWN" in front.log(), front.log()[-2000:]
    for kid, _ in on_d1:
        status, body, headers = front.request("GET", f"/api/kernels/{kid}")
        assert status == 503 and body["message"].startswith("kernel lost: the server d1"), (status, body)
        assert "server" not in {k.lower() for k in headers}, headers  # HAProxy's answer, not a daemon's
    for kid, c in on_d2:
        c.close()
        front.request("DELETE", f"/api/kernels/{kid}")


def test_an_id_naming_no_daemon_of_ours_gets_no_kernel(site):
    front, daemons = site
    alive = [d for d in daemons.values() if d.proc.poll() is None][0]
    kid = alive.new_kernel()
    try:
        random = kid.split("-")[1]
        # The random part alone, or under a made-up name: HAProxy balances it, and no daemon grants it.
        for forged in (random, f"zz9-{random}"):
            status, body, _ = front.request("GET", f"/api/kernels/{forged}")
            assert status in (404, 503) and "kernel" in body["message"], (forged, status, body)
            status, body, _ = front.request("POST", f"/api/kernels/{forged}/interrupt")
            assert status in (404, 503), (forged, status, body)
        status, _, _ = front.request("GET", f"/api/kernels/{kid}")
        assert status == 200
    finally:
        alive.request("DELETE", f"/api/kernels/{kid}")
