"""
Shared helpers for the benchmarks: a lean client, daemon process facts, statistics.

The client is deliberately thin so that the figures measure the server: a
blocking raw-socket WebSocket client (``RawWS``) for single-connection
timings, and an asyncio twin (``AsyncWS``) for bursts of many sessions from
one thread. Both speak just enough RFC 6455 for a Jupyter kernel socket:
text frames out (masked with an all-zero key, which is valid and costs no
XOR), text/binary frames in, ping answered, fragments joined. HTTP requests
are raw HTTP/1.1 on a fresh loopback connection, as a browser's first
request would be. Everything talks to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from support import Daemon, descendants, stored_bytes  # noqa: E402,F401  (re-exported for the benchmarks)

# -- statistics ---------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, nearest rank (p99 of 20 samples is the maximum)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(values: list[float], scale: float = 1.0) -> dict:
    import statistics

    return {
        "median": statistics.median(values) * scale,
        "p99": pct(values, 99) * scale,
        "min": min(values) * scale,
        "n": len(values),
    }


# -- messages -------------------------------------------------------------------


def request(msg_type: str, content: dict, session: str, channel: str = "shell") -> tuple[bytes, str]:
    """A Jupyter message in the default JSON framing, and its msg_id."""
    mid = uuid.uuid4().hex
    body = {
        "header": {
            "msg_id": mid,
            "msg_type": msg_type,
            "session": session,
            "username": "bench",
            "date": "2026-01-01T00:00:00Z",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }
    return json.dumps(body).encode(), mid


def execute(code: str, session: str) -> tuple[bytes, str]:
    return request(
        "execute_request",
        {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        session,
    )


# -- HTTP -------------------------------------------------------------------------


def _http_bytes(method: str, path: str, port: int, body: dict | None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + data


def _parse_http(raw: bytes) -> tuple[int, dict | None]:
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        payload = out
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, None


def http(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict | None]:
    """One request on a fresh connection; (status, parsed JSON body or None)."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_http_bytes(method, path, port, body))
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return _parse_http(b"".join(chunks))


def new_kernel(port: int, name: str = "python3") -> str:
    status, body = http(port, "POST", "/api/kernels", {"name": name})
    if status != 201:
        raise RuntimeError(f"POST /api/kernels: {status} {body}")
    return body["id"]


# -- WebSocket framing --------------------------------------------------------------


def _handshake(port: int, path: str) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    req = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return req, key


def _frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload  # zero mask: payload goes as is


class _Parser:
    """Incremental frame parser: feed bytes, take whole messages."""

    def __init__(self):
        self.buf = bytearray()
        self.frags: list[bytes] = []
        self.control: list[tuple[int, bytes]] = []

    def messages(self) -> list[bytes]:
        out = []
        buf = self.buf
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                hdr = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                hdr = 10
            if b1 & 0x80:
                raise ValueError("server frames must not be masked")
            if n - pos < hdr + length:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + length])
            pos += hdr + length
            opcode = b0 & 0x0F
            if opcode >= 8:
                self.control.append((opcode, payload))
                continue
            self.frags.append(payload)
            if b0 & 0x80:
                out.append(b"".join(self.frags) if len(self.frags) > 1 else self.frags[0])
                self.frags = []
        del buf[:pos]
        return out


class Closed(Exception):
    pass


class RawWS:
    """Blocking WebSocket client to a kernel's channels; ``recv()`` returns parsed messages."""

    def __init__(self, port: int, kernel_id: str, session: str | None = None, timeout: float = 30.0):
        self.session = session or uuid.uuid4().hex
        path = f"/api/kernels/{kernel_id}/channels?session_id={self.session}"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, _key = _handshake(port, path)
        self.sock.sendall(req)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Closed("closed during handshake")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"WebSocket refused: {head[:200]!r}")
        self.parser = _Parser()
        self.parser.buf += rest
        self.pending: list[bytes] = []
        self.bytes_in = 0

    def send(self, payload: bytes) -> None:
        self.sock.sendall(_frame(payload))

    def recv_raw(self, timeout: float = 30.0) -> bytes:
        while not self.pending:
            self.pending.extend(self.parser.messages())
            self._control()
            if self.pending:
                break
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                raise Closed("server closed the connection")
            self.bytes_in += len(chunk)
            self.parser.buf += chunk
        return self.pending.pop(0)

    def recv(self, timeout: float = 30.0) -> dict:
        return json.loads(self.recv_raw(timeout))

    def _control(self) -> None:
        for opcode, payload in self.parser.control:
            if opcode == 9:  # ping
                self.sock.sendall(_frame(payload, 10))
            elif opcode == 8:
                raise Closed(f"server closed: {payload[2:]!r}")
        self.parser.control.clear()

    def run(self, code: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
        """Execute and wait for the reply and idle; (reply content, iopub messages of it)."""
        payload, mid = execute(code, self.session)
        self.send(payload)
        return self.wait(mid, timeout)

    def wait(self, mid: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
        deadline = time.monotonic() + timeout
        reply, outputs, idle = None, [], False
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply/idle for {mid} in {timeout} s")
            m = self.recv(left)
            if m.get("parent_header", {}).get("msg_id") != mid:
                continue
            if m["channel"] == "shell":
                reply = m["content"]
            elif m["channel"] == "iopub":
                outputs.append(m)
                if m["msg_type"] == "status" and m["content"].get("execution_state") == "idle":
                    idle = True
        return reply, outputs

    def close(self) -> None:
        try:
            self.sock.sendall(b"\x88\x82\0\0\0\0\x03\xe8")
        except OSError:
            pass
        self.sock.close()


class AsyncWS:
    """The same client on asyncio streams: many sessions from one thread."""

    def __init__(self, reader, writer, session: str):
        self.reader, self.writer, self.session = reader, writer, session
        self.parser = _Parser()
        self.pending: list[bytes] = []

    @classmethod
    async def connect(cls, port: int, kernel_id: str) -> AsyncWS:
        session = uuid.uuid4().hex
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, _ = _handshake(port, f"/api/kernels/{kernel_id}/channels?session_id={session}")
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"WebSocket refused: {head[:200]!r}")
        return cls(reader, writer, session)

    def send(self, payload: bytes) -> None:
        self.writer.write(_frame(payload))

    async def recv(self) -> dict:
        while not self.pending:
            self.pending.extend(self.parser.messages())
            for opcode, payload in self.parser.control:
                if opcode == 9:
                    self.writer.write(_frame(payload, 10))
            self.parser.control.clear()
            if self.pending:
                break
            chunk = await self.reader.read(1 << 18)
            if not chunk:
                raise Closed("server closed the connection")
            self.parser.buf += chunk
        return json.loads(self.pending.pop(0))

    async def wait_reply(self, mid: str) -> dict:
        while True:
            m = await self.recv()
            if m["channel"] == "shell" and m.get("parent_header", {}).get("msg_id") == mid:
                return m

    def close(self) -> None:
        self.writer.close()


async def a_http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(_http_bytes(method, path, port, body))
    raw = await reader.read(-1)
    writer.close()
    return _parse_http(raw)


# -- one new session, timed -----------------------------------------------------------


def new_session_to_reply(port: int) -> tuple[float, str]:
    """POST /api/kernels -> WebSocket -> execute ``1+1`` -> execute_reply; (seconds, kernel id)."""
    t0 = time.perf_counter()
    kid = new_kernel(port)
    ws = RawWS(port, kid)
    payload, mid = execute("1+1", ws.session)
    ws.send(payload)
    while True:
        m = ws.recv()
        if m["channel"] == "shell" and m["parent_header"].get("msg_id") == mid:
            break
    dt = time.perf_counter() - t0
    ws.close()
    return dt, kid


async def a_new_session_to_reply(port: int, name: str = "python3", code: str = "1+1") -> tuple[float, str | None, str]:
    """The asyncio twin, for a kernel ``name`` running ``code``; (seconds, kernel id, error or '')."""
    t0 = time.perf_counter()
    try:
        status, body = await a_http(port, "POST", "/api/kernels", {"name": name})
        if status != 201:
            return time.perf_counter() - t0, None, f"POST {status}: {body}"
        kid = body["id"]
        ws = await AsyncWS.connect(port, kid)
        payload, mid = execute(code, ws.session)
        ws.send(payload)
        reply = await ws.wait_reply(mid)
        dt = time.perf_counter() - t0
        ws.close()
        if reply["content"].get("status") != "ok":
            return dt, kid, f"execute failed: {reply['content']}"
        return dt, kid, ""
    except Exception as e:  # a burst reports every failure, it does not stop at the first
        return time.perf_counter() - t0, None, repr(e)


def burst(
    port: int, n: int, timeout: float = 120.0, name: str = "python3", code: str = "1+1"
) -> tuple[list[float], list[str], list[str]]:
    """n new sessions at once from one asyncio loop; (seconds of each, kernel ids, errors)."""

    async def main():
        sessions = (a_new_session_to_reply(port, name, code) for _ in range(n))
        return await asyncio.wait_for(asyncio.gather(*sessions), timeout)

    results = asyncio.run(main())
    times = [dt for dt, kid, err in results if not err]
    kids = [kid for _dt, kid, _err in results if kid]
    errors = [err for _dt, _kid, err in results if err]
    return times, kids, errors


# -- processes ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def rollup(pid: int) -> dict[str, int]:
    """/proc/pid/smaps_rollup in KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    out[parts[0][:-1]] = int(parts[1])
    except OSError:
        pass
    return out


def kernel_pss_mib(pid: int) -> float:
    """PSS of one kernel: all its processes."""
    return sum(rollup(p).get("Pss", 0) for p in descendants(pid)) / 1024


def kernel_private_mib(pid: int) -> float:
    return sum(r.get("Private_Dirty", 0) + r.get("Private_Clean", 0) for r in map(rollup, descendants(pid))) / 1024


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    st = _stat(pid)
    if st is None:
        return 0.0
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
