"""
Test helpers: a real daemon in a subprocess, and a plain WebSocket Jupyter client.

Everything talks to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import websocket  # websocket-client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Daemon:
    """``twistd -n sagecell`` on a free loopback port, stopped by its PID."""

    def __init__(self, *args: str, pool_size: int = 2, env: dict | None = None, **options):
        self.tmp = tempfile.mkdtemp(prefix="sagecell-test-")
        os.chmod(self.tmp, 0o711)
        self.log_path = os.path.join(self.tmp, "twistd.log")
        self.args = [
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--pool-size",
            str(pool_size),
            "--permalink-db",
            os.path.join(self.tmp, "permalinks.sqlite3"),
            "--run-dir",
            os.path.join(self.tmp, "run"),
            *args,
        ]
        # Python kernels unless a test asks for others: they start in
        # milliseconds where Sage's master takes seconds. kernels=None: the default.
        options.setdefault("kernels", "python3")
        #: --base-url, where every path is served (the health check too)
        self.prefix = (options.get("base_url") or "").rstrip("/")
        for key, value in options.items():
            if value is not None:
                self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.port = 0
        #: ids of the kernels ``new_kernel`` made (an anonymous daemon lists none)
        self.created: list[str] = []

    @property
    def run_dir(self) -> str:
        return os.path.join(self.tmp, "run")

    def start(self, timeout: float = 60.0) -> Daemon:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> Daemon:
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "sagecell", *self.args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"Site (?:\(TLS\) )?starting on (\d+)", self.log())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.log())
            time.sleep(0.05)
        else:
            raise RuntimeError("daemon did not start:\n" + self.log())
        self.wait_pool(1, timeout=deadline - time.monotonic())
        return self

    def wait_pool(self, n: int, timeout: float = 30.0) -> None:
        """Until /healthz says ready: a spawner is connected and a warm kernel waits in the pool."""
        deadline = time.monotonic() + timeout
        tls = any(a.startswith("ssl:") for a in self.args)
        url = (f"https://127.0.0.1:{self.port}" if tls else self.url) + self.prefix + "/healthz/ready"
        # Only "is a kernel ready?": the TLS tests check the certificate themselves.
        context = ssl._create_unverified_context() if tls else None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5, context=context) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.log())
            time.sleep(0.05)
        raise RuntimeError("pool did not fill:\n" + self.log())

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, parsed JSON or None, headers)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
                status, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            payload, status, hdrs = e.read(), e.code, dict(e.headers)
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload
        return status, parsed, hdrs

    def kernel_pid(self, kernel_id: str, timeout: float = 10.0) -> int:
        """The host pid of the process behind a session (from the daemon's log).

        Inside its PID namespace a kernel is pid 1: never ask it for its pid
        to signal it from outside.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(rf"session {kernel_id} got kernel \w+ \(pid (\d+)\)", self.log())
            if found:
                return int(found[-1])
            time.sleep(0.05)
        raise AssertionError(f"no kernel pid logged for {kernel_id}")

    def new_kernel(self) -> str:
        status, body, _ = self.request("POST", "/api/kernels", {"name": "python3"})
        assert status == 201, (status, body)
        self.created.append(body["id"])
        return body["id"]


def msg(msg_type: str, content: dict, channel: str = "shell", session: str = "test") -> dict:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": session,
            "username": "test",
            "date": "2026-01-01T00:00:00Z",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


class Client:
    """A plain JSON-framing WebSocket client, as a script would write one."""

    def __init__(self, daemon: Daemon, kernel_id: str, session: str | None = None, **kw):
        self.session = session or uuid.uuid4().hex
        self.daemon = daemon
        self.kernel_id = kernel_id
        self.ws = websocket.create_connection(
            f"{daemon.ws_url}/api/kernels/{kernel_id}/channels?session_id={self.session}", timeout=30, **kw
        )
        self.backlog: list[dict] = []

    def send(self, m: dict) -> dict:
        m["header"]["session"] = self.session
        self.ws.send(json.dumps(m))
        return m

    def recv(self, timeout: float = 30.0) -> dict:
        if self.backlog:
            return self.backlog.pop(0)
        self.ws.settimeout(timeout)
        data = self.ws.recv()
        return json.loads(data)

    def execute(self, code: str, timeout: float = 30.0, allow_stdin: bool = False, stdin_reply: str | None = None):
        """Run code; return (reply content, [iopub messages with this parent])."""
        return self.outcome(self.start_execute(code, allow_stdin), timeout, stdin_reply)

    def start_execute(self, code: str, allow_stdin: bool = False) -> dict:
        """Send an execute_request; return it (for ``outcome``)."""
        return self.send(
            msg(
                "execute_request",
                {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": allow_stdin, "stop_on_error": True},
            )
        )

    def outcome(self, req: dict, timeout: float = 30.0, stdin_reply: str | None = None):
        """
        (reply content, [iopub messages with this parent]) of a request sent.

        Waits for the reply *and* the kernel's idle status: the reply comes on
        shell and output on iopub, and nothing orders two channels (a reply
        may overtake the last output), but a kernel goes idle only after it
        has sent all the output of the request.
        """
        mid = req["header"]["msg_id"]
        reply, outputs, idle = None, [], False
        deadline = time.monotonic() + timeout
        while (reply is None or not idle) and time.monotonic() < deadline:
            m = self.recv(max(0.1, deadline - time.monotonic()))
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "dead":
                # The kernel was ended (a limit, a kill): no reply will come.
                outputs.append(m)
                return {"status": "dead"}, outputs
            if m.get("parent_header", {}).get("msg_id") != mid:
                if m["channel"] == "iopub" and m["msg_type"] == "stream" and not m.get("parent_header"):
                    outputs.append(m)  # the daemon's own notices
                continue
            if m["channel"] == "shell" and m["msg_type"].endswith("_reply"):
                reply = m
            elif m["channel"] == "stdin" and m["msg_type"] == "input_request":
                r = msg("input_reply", {"value": stdin_reply or ""}, channel="stdin")
                r["parent_header"] = m["header"]
                self.send(r)
            elif m["channel"] == "iopub":
                outputs.append(m)
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    idle = True
        assert reply is not None, "no execute_reply in time"
        assert idle, "an execute_reply, but the kernel did not go idle in time"
        return reply["content"], outputs

    def close(self):
        self.ws.close()


def stdout_of(outputs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def descendants(pid: int, most: int = 1000) -> list[int]:
    """``pid`` and every process under it (host view), at most ``most`` of them."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo and len(out) < most:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


#: Defines ``memory_digests()`` in a kernel: the sha256 hex digests of every
#: secret-shaped string in the kernel's readable memory (/proc/self/maps and
#: /proc/self/mem, freed heap included), and how many bytes it read.
#: Secret-shaped: every 32 and 64 hex chars in a run of hex (kernel ids, keys,
#: dirs), and the last 40 chars of a run of Z85 (a CurveZMQ key). The test
#: then asks which digests of secrets it knows are among them: the secrets
#: themselves never enter the kernel, so it cannot find them by looking at
#: the question. The digests stay in the kernel (``_scan["result"]``) for
#: the questions of later cells: a test may learn a secret only after the scan.
MEMORY_SCAN = r"""
def memory_digests():
    import hashlib, os, re
    hexrun = re.compile(rb"[0-9a-f]{32,}")
    z85run = re.compile(rb"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40,}")
    found, read = set(), 0
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        for r in regions:
            if r[1][0] != "r":
                continue
            lo, hi = (int(x, 16) for x in r[0].split("-"))
            pos, tail = lo, b""
            while pos < hi:
                try:
                    chunk = os.pread(fd, min(1 << 24, hi - pos), pos)
                except OSError:
                    break
                if not chunk:
                    break
                read += len(chunk)
                pos += len(chunk)
                data = tail + chunk
                for m in hexrun.finditer(data):
                    run = m.group()
                    for n in (32, 64):
                        for i in range(len(run) - n + 1):
                            found.add(hashlib.sha256(run[i : i + n]).hexdigest())
                for m in z85run.finditer(data):
                    found.add(hashlib.sha256(m.group()[-40:]).hexdigest())
                tail = data[-256:]
    finally:
        os.close(fd)
    return found, read

def scan_in_background():
    # A computation has a wall-clock limit; the scan may take longer than it.
    import threading
    threading.Thread(target=lambda: _scan.update(result=memory_digests()), daemon=True).start()

_scan = {}
"""


def sha256_hex(secret: str | bytes) -> str:
    import hashlib

    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


def scan_memory(client: Client, controls: str = "", timeout: float = 120.0) -> int:
    """
    Scan the kernel's memory (MEMORY_SCAN); return the bytes it read.
    ``controls``: code run first that appends to ``_controls`` strings the
    kernel makes and must then find (own key and the like): else the scan
    proves nothing, and this fails.
    """
    code = MEMORY_SCAN + "\n_controls = []\n" + controls + "\nscan_in_background()\n"
    reply, out = client.execute(code)
    assert reply["status"] == "ok", (reply, stdout_of(out))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply, out = client.execute(
            "import hashlib, json, time\n"
            "time.sleep(0.5)\n"
            "_r = _scan.get('result')\n"
            "print(json.dumps(None if _r is None else [_r[1], [c.decode(errors='replace') for c in _controls"
            " if hashlib.sha256(c).hexdigest() not in _r[0]]]))"
        )
        assert reply["status"] == "ok", (reply, stdout_of(out))
        result = json.loads(stdout_of(out))
        if result is not None:
            read, missed = result
            assert read > 10 << 20, f"the scan read only {read} bytes"
            assert not missed, f"the scan did not find what the kernel itself holds: {missed}"
            return read
    raise AssertionError("the memory scan did not finish in time")


def found_in_memory(client: Client, secrets: dict[str, str]) -> list[str]:
    """Which of ``secrets`` (name: secret) the last ``scan_memory`` of this kernel found."""
    digests = {sha256_hex(v): k for k, v in secrets.items()}
    reply, out = client.execute(
        f"import json\nprint(json.dumps(sorted(set({sorted(digests)!r}) & _scan['result'][0])))"
    )
    assert reply["status"] == "ok", (reply, stdout_of(out))
    return sorted(digests[d] for d in json.loads(stdout_of(out)))


def stored_bytes(pid: int) -> int:
    """Bytes in the regular files ``pid`` holds open (Twisted spools request bodies to unlinked temp files)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total
