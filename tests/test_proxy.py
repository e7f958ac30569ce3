"""
Behind a reverse proxy: the whole API under a path prefix (--base-url)
through a real nginx running etc/nginx-sagecell.conf, the visitor's address
from X-Forwarded-For only when a --trusted-proxies address sends it, and a
WebSocket cut mid-output and reconnected through the proxy with nothing
lost (or a notice of what could not be kept).

Visitors come from other loopback addresses (127.0.0.2, .3, ...): nginx
and the daemon trust 127.0.0.1 only, so a visitor's own address is never a
trusted one.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
import uuid
from urllib.parse import urlsplit

import pytest
import websocket
from nginx import PREFIX, Nginx
from support import Client, Daemon, msg, stdout_of
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from sagecell_tw import config as configmod
from sagecell_tw import messages
from sagecell_tw.web.proxies import ForwardedRequest, TrustedProxies

pytestmark = pytest.mark.timeout(180)

PER_CLIENT = 3
LOOP = "import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep({pause})\n"


@pytest.fixture(scope="module")
def site():
    """(daemon under /sagecell/ trusting 127.0.0.1, nginx in front of it)."""
    d = Daemon(
        "--trusted-proxies",
        "127.0.0.1",
        base_url=PREFIX + "/",
        pool_size=2,
        max_kernels_per_client=PER_CLIENT,
        replay_bytes="256k",
    ).start()
    proxy = None
    try:
        proxy = Nginx(d.port).start()
        yield d, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        d.stop()


def call(url: str, method: str = "GET", body=None, headers=None, source: str = "127.0.0.2"):
    """(status, JSON or bytes, headers) of one request from the loopback address ``source``."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30, source_address=(source, 0))
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = dict(headers or {})
    if isinstance(body, dict):
        hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(raw) if raw and "json" in got.get("content-type", "") else raw
    except ValueError:
        parsed = raw
    return resp.status, parsed, got


def ws_from(url: str, source: str = "127.0.0.2", **kw) -> websocket.WebSocket:
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30, source_address=(source, 0))
    return websocket.create_connection(url, socket=sock, timeout=30, **kw)


class ProxiedClient(Client):
    """support.Client through nginx, from a visitor's address; ``reconnect`` comes back as the same session."""

    def __init__(self, proxy: Nginx, kernel_id: str, source: str = "127.0.0.2"):
        self.session = uuid.uuid4().hex
        self.proxy, self.kernel_id, self.source = proxy, kernel_id, source
        self.backlog = []
        self.ws = ws_from(self._url(), source)
        self.last_msg_id = None

    def _url(self, last: str | None = None) -> str:
        url = f"{self.proxy.ws_url}/api/kernels/{self.kernel_id}/channels?session_id={self.session}"
        return url + (f"&last_msg_id={last}" if last else "")

    def recv(self, timeout: float = 30.0) -> dict:
        m = super().recv(timeout)
        self.last_msg_id = m["header"]["msg_id"]
        return m

    def cut(self) -> None:
        """The network goes: no close handshake, the socket is just gone."""
        self.ws.sock.shutdown(socket.SHUT_RDWR)
        self.ws.sock.close()

    def reconnect(self, exact: bool = True) -> None:
        self.ws = ws_from(self._url(self.last_msg_id if exact else None), self.source)


def new_kernel(proxy: Nginx, source: str = "127.0.0.2", headers=None) -> str:
    status, body, hdrs = call(f"{proxy.url}/api/kernels", "POST", {"name": "python3"}, headers, source)
    assert status == 201, (status, body)
    return body["id"]


def delete(proxy: Nginx, kid: str) -> None:
    status, _, _ = call(f"{proxy.url}/api/kernels/{kid}", "DELETE")
    assert status == 204, status


def v1_parts(frame: bytes) -> tuple[str, dict, dict]:
    """(channel, header, content) of a v1 subprotocol frame: u64 LE count and offsets, then the parts."""
    n = struct.unpack("<Q", frame[:8])[0]
    offsets = list(struct.unpack("<" + "Q" * n, frame[8 : 8 * (n + 1)]))
    parts = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
    return parts[0].decode(), json.loads(parts[1]), json.loads(parts[4])


def lines(outputs: list[dict]) -> list[int]:
    return [int(x) for x in stdout_of(outputs).split()]


def until_idle(client: Client, mid: str, timeout: float = 60.0) -> list[dict]:
    """Every message up to the kernel's idle after request ``mid`` (the daemon's notices included)."""
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = client.recv(max(0.1, deadline - time.monotonic()))
        got.append(m)
        if m["msg_type"] == "status" and m["parent_header"].get("msg_id") == mid:
            if m["content"]["execution_state"] == "idle":
                return got
    raise AssertionError("the kernel did not go idle in time")


# -- the API under the prefix, through nginx ---------------------------------------


def test_rest_api_under_the_prefix_through_nginx(site):
    daemon, proxy = site
    status, body, _ = call(f"{proxy.url}/api")
    assert status == 200 and body["server"] == "sagecell_tw"
    status, specs, _ = call(f"{proxy.url}/api/kernelspecs")
    assert status == 200 and "python3" in specs["kernelspecs"]
    status, model, hdrs = call(f"{proxy.url}/api/kernels", "POST", {"name": "python3"})
    assert status == 201 and hdrs["location"] == f"{PREFIX}/api/kernels/{model['id']}"
    kid = model["id"]
    status, again, _ = call(f"http://127.0.0.1:{proxy.port}{hdrs['location']}")
    assert status == 200 and again["id"] == kid
    status, _, _ = call(f"{proxy.url}/api/kernels/{kid}/interrupt", "POST", b"")
    assert status == 204
    # the page, the widget and the bare prefix
    status, page, _ = call(f"{proxy.url}/?z=abc")
    assert status == 200 and b'src="static/embed.js"' in page
    status, _, hdrs = call(f"{proxy.url}/embedded_sagecell.js")
    assert status == 200 and "javascript" in hdrs["content-type"]
    status, _, hdrs = call(f"http://127.0.0.1:{proxy.port}{PREFIX}?z=abc")
    assert status == 301 and hdrs["location"].endswith(f"{PREFIX}/?z=abc")
    status, _, hdrs = call(f"{daemon.url}{PREFIX}?z=abc")  # the daemon's own, for proxies that pass it on
    assert status == 301 and hdrs["location"] == f"{PREFIX}/?z=abc"
    # nothing outside the prefix
    status, body, _ = call(f"{daemon.url}/api/kernels/{kid}")
    assert status == 404 and body["status"] == 404
    delete(proxy, kid)
    status, _, _ = call(f"{proxy.url}/api/kernels/{kid}")
    assert status == 404


def test_jupyter_websocket_and_files_through_nginx(site):
    _, proxy = site
    kid = new_kernel(proxy)
    try:
        client = ProxiedClient(proxy, kid)
        reply, out = client.execute("open('hello.txt', 'w').write('through the proxy')\nprint('wrote')")
        assert reply["status"] == "ok" and stdout_of(out) == "wrote\n"
        status, listing, _ = call(f"{proxy.url}/api/kernels/{kid}/files/")
        assert status == 200, listing
        (entry,) = [f for f in listing["files"] if f["path"] == "hello.txt"]
        assert entry["url"] == f"{PREFIX}/api/kernels/{kid}/files/hello.txt"
        status, data, _ = call(f"http://127.0.0.1:{proxy.port}{entry['url']}")
        assert status == 200 and data == b"through the proxy"
        client.close()
        # the v1 subprotocol through the proxy
        ws = ws_from(f"{proxy.ws_url}/api/kernels/{kid}/channels", subprotocols=[messages.V1_SUBPROTOCOL])
        try:
            assert ws.getsubprotocol() == messages.V1_SUBPROTOCOL
            ws.send_binary(messages.Message.build("shell", "kernel_info_request", {}, session="v1").to_v1_frame())
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                channel, header, content = v1_parts(ws.recv())
                if header["msg_type"] == "kernel_info_reply":
                    break
            assert channel == "shell" and content["status"] == "ok"
        finally:
            ws.close()
    finally:
        delete(proxy, kid)


def test_sagecell_kernel_and_socket_through_nginx(site):
    daemon, proxy = site
    status, body, hdrs = call(f"{proxy.url}/kernel", "POST", b"accepted_tos=true&timeout=inf")
    assert status == 200, body
    assert body["ws_url"] == f"ws://127.0.0.1:{proxy.port}{PREFIX}/"
    ws = ws_from(body["ws_url"] + f"kernel/{body['id']}/channels")
    try:
        req = msg("execute_request", {"code": "print(6 * 7)", "silent": False})
        del req["channel"]  # SageMathCell's client sends no channel: shell
        ws.send(json.dumps(req))
        text, deadline = "", time.monotonic() + 30
        while "42" not in text and time.monotonic() < deadline:
            m = json.loads(ws.recv())
            if m["msg_type"] == "stream":
                text += m["content"]["text"]
        assert text == "42\n"
    finally:
        ws.close()
    # X-Forwarded-Proto: nginx sets it ($scheme); straight to the daemon only a trusted address may
    trusted = call(f"{daemon.url}{PREFIX}/kernel", "POST", b"", {"X-Forwarded-Proto": "https"}, "127.0.0.1")
    untrusted = call(f"{daemon.url}{PREFIX}/kernel", "POST", b"", {"X-Forwarded-Proto": "https"}, "127.0.0.5")
    assert trusted[1]["ws_url"].startswith("wss://") and untrusted[1]["ws_url"].startswith("ws://")
    for answer in (body, trusted[1], untrusted[1]):
        call(f"{proxy.url}/kernel/{answer['id']}", "DELETE")


# -- who the visitor is ----------------------------------------------------------------


def test_a_spoofed_forwarded_for_is_ignored_and_the_per_client_limit_holds(site):
    daemon, proxy = site
    made = []
    try:
        # Through nginx from 127.0.0.2, each request naming another address before nginx's own.
        for i in range(PER_CLIENT):
            made.append(new_kernel(proxy, "127.0.0.2", {"X-Forwarded-For": f"203.0.113.{i + 1}"}))
        status, body, _ = call(
            f"{proxy.url}/api/kernels", "POST", {"name": "python3"}, {"X-Forwarded-For": "203.0.113.99"}
        )
        assert status == 429 and "already have" in body["message"]
        # ... and straight to the daemon, where 127.0.0.2 is no trusted proxy
        status, body, _ = call(
            f"{daemon.url}{PREFIX}/api/kernels", "POST", {"name": "python3"}, {"X-Forwarded-For": "203.0.113.98"}
        )
        assert status == 429
        # Another visitor behind the same proxy has a limit of its own.
        made.append(new_kernel(proxy, "127.0.0.3"))
        # From the trusted proxy the header counts: the visitor it names is the one limited ...
        status, _, _ = call(
            f"{daemon.url}{PREFIX}/api/kernels",
            "POST",
            {"name": "python3"},
            {"X-Forwarded-For": "127.0.0.2"},
            "127.0.0.1",
        )
        assert status == 429
        made.append(new_kernel(proxy, "127.0.0.1", {"X-Forwarded-For": "198.51.100.7"}))
        # ... and the daemon's log names the visitors, never a spoofed address
        log = daemon.log()
        assert f"session {made[-2]} started for 127.0.0.3" in log
        assert f"session {made[-1]} started for 198.51.100.7" in log
        for kid in made[:PER_CLIENT]:
            assert f"session {kid} started for 127.0.0.2" in log
        assert "203.0.113." not in log
    finally:
        for kid in made:
            delete(proxy, kid)


def test_forwarded_chains():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    client = proxies.client
    assert client("192.0.2.1", ["6.6.6.6"], []) == "192.0.2.1"  # untrusted peer: headers ignored
    assert client("127.0.0.1", ["6.6.6.6, 192.0.2.9"], []) == "192.0.2.9"  # right-most untrusted
    assert client("127.0.0.1", ["6.6.6.6", "192.0.2.9, 10.1.1.1"], []) == "192.0.2.9"  # hops of several headers
    assert client("127.0.0.1", ["10.2.2.2, 10.1.1.1"], []) == "10.2.2.2"  # only proxies: the left-most
    assert client("127.0.0.1", ["6.6.6.6, unknown"], []) == "127.0.0.1"  # garbage: the last trusted hop
    assert client("127.0.0.1", [], ['for=192.0.2.60;proto=https, for="[2001:db8::1]:4711"']) == "2001:db8::1"
    assert client("::ffff:127.0.0.1", ["192.0.2.3:5555"], []) == "192.0.2.3"
    assert client("::1", ["[2001:db8::2]:80"], []) == "2001:db8::2"
    assert client("127.0.0.1", [], []) == "127.0.0.1"
    assert proxies.scheme("127.0.0.1", ["https"], False) and not proxies.scheme("192.0.2.1", ["https"], False)
    assert proxies.scheme("192.0.2.1", [], True)
    assert not TrustedProxies().trusts("127.0.0.1")


def test_a_request_from_a_trusted_proxy_is_the_visitors():
    class Plain(DummyRequest):
        def isSecure(self):
            return False  # the connection to us is plain http

    class Request(ForwardedRequest, Plain):
        proxies = TrustedProxies(["127.0.0.1"])

    def request(peer: str, headers: dict):
        r = Request([b""])
        r.client = IPv4Address("TCP", peer, 1234)
        for k, v in headers.items():
            r.requestHeaders.setRawHeaders(k, [v])
        return r

    r = request("127.0.0.1", {"X-Forwarded-For": "6.6.6.6, 192.0.2.9", "X-Forwarded-Proto": "https"})
    assert r.getClientAddress().host == "192.0.2.9" and r.isSecure()
    r = request("192.0.2.1", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
    assert r.getClientAddress().host == "192.0.2.1" and not r.isSecure()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"base-url": "sagecell"}, "--base-url must be a path starting with '/'"),
        ({"base-url": "/a/../b"}, "--base-url: '/a/../b' is not a plain path"),
        ({"base-url": "/a?b"}, "is not a plain path"),
        ({"trusted-proxies": "127.0.0.1, nginx.local"}, "--trusted-proxies: 'nginx.local' is not an address"),
    ],
)
def test_bad_proxy_options_fail_at_start(options, message):
    with pytest.raises(configmod.ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        configmod.build({}, options)


def test_proxy_options_are_normalized():
    cfg = configmod.build({}, {"base-url": "/sage/cell/", "trusted-proxies": "127.0.0.1, 10.0.0.0/8"})
    assert cfg.base_url == "/sage/cell" and cfg.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")
    assert configmod.build({}, {"base-url": "/"}).base_url == ""


# -- reconnecting through the proxy -------------------------------------------------------


def test_a_websocket_cut_mid_output_reconnects_with_nothing_lost(site):
    _, proxy = site
    kid = new_kernel(proxy)
    try:
        client = ProxiedClient(proxy, kid)
        req = client.start_execute(LOOP.format(n=300, pause=0.004))
        seen: list[dict] = []
        while len(lines(seen)) < 40:
            seen.append(client.recv())
        client.cut()  # mid-output: the kernel goes on printing
        time.sleep(0.3)
        client.reconnect()
        seen += until_idle(client, req["header"]["msg_id"])
        assert lines(seen) == list(range(300))
        assert not [m for m in seen if "[sagecell]" in m.get("content", {}).get("text", "")]
        reply, out = client.execute("print(i)")  # the same live session: its variables are there
        assert stdout_of(out) == "299\n"
        client.close()
    finally:
        delete(proxy, kid)


def test_a_proxy_restart_mid_output_loses_nothing(site):
    daemon, _ = site
    proxy = Nginx(daemon.port).start()
    try:
        kid = new_kernel(proxy)
        client = ProxiedClient(proxy, kid)
        req = client.start_execute(LOOP.format(n=200, pause=0.01))
        seen: list[dict] = []
        while len(lines(seen)) < 30:
            seen.append(client.recv())
        proxy.stop()  # every connection through it goes
        with pytest.raises((websocket.WebSocketException, OSError)):
            for _ in range(10_000):
                seen.append(client.recv(timeout=5))
        proxy = Nginx(daemon.port, port=proxy.port).start()
        client.reconnect()
        seen += until_idle(client, req["header"]["msg_id"])
        assert lines(seen) == list(range(200))
        client.close()
        delete(proxy, kid)
    finally:
        proxy.stop()


def test_a_jupyter_client_coming_back_with_its_session_id_gets_what_it_missed(site):
    """No ?last_msg_id= (a plain Jupyter client): what came after its socket closed, the reply included."""
    _, proxy = site
    kid = new_kernel(proxy)
    try:
        client = ProxiedClient(proxy, kid)
        req = client.start_execute("import time\ntime.sleep(1)\n" + LOOP.format(n=50, pause=0))
        client.close()
        time.sleep(2.5)
        client.reconnect(exact=False)
        got = until_idle(client, req["header"]["msg_id"])
        if not any(m["msg_type"] == "execute_reply" for m in got):
            got.append(client.recv())  # the reply (shell) may trail the idle (iopub) by a little
        assert lines(got) == list(range(50))
        assert [m["content"]["status"] for m in got if m["msg_type"] == "execute_reply"] == ["ok"]
    finally:
        delete(proxy, kid)


def test_past_the_replay_bound_the_newest_output_comes_back_with_a_notice(site):
    _, proxy = site
    kid = new_kernel(proxy)
    try:
        client = ProxiedClient(proxy, kid)
        req = client.start_execute("import time\ntime.sleep(1)\nfor i in range(1500):\n    print(str(i).ljust(999))\n")
        client.recv()  # busy
        client.cut()
        time.sleep(4)
        client.reconnect()
        got = until_idle(client, req["header"]["msg_id"])
        (notice,) = [m for m in got if "[sagecell]" in m.get("content", {}).get("text", "")]
        text = notice["content"]["text"]
        assert "could not be kept for you" in text and f"the last {256 << 10} bytes per session" in text
        tail = lines(got)
        assert 50 < len(tail) < 1500 and tail == list(range(1500 - len(tail), 1500))
        assert got.index(notice) < min(i for i, m in enumerate(got) if m["msg_type"] == "stream" and m is not notice)
    finally:
        delete(proxy, kid)


def test_a_trusted_proxy_is_not_held_to_one_clients_connection_limit():
    """Its connections carry many visitors (nginx limits each: limit_conn); anyone else is held to the limit."""
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    from sagecell_tw.web.site import ConnectionsPerClient

    site = server.Site(resource.Resource(), timeout=None)  # no idle timer left in the global reactor
    counted = ConnectionsPerClient(site, 2, TrustedProxies(["127.0.0.1"]))

    def connect(host: str):
        addr = IPv4Address("TCP", host, 40000)
        protocol = counted.buildProtocol(addr)
        if protocol is not None:
            protocol.makeConnection(StringTransport(peerAddress=addr))
        return protocol

    assert all(connect("127.0.0.1") is not None for _ in range(5))
    assert [connect("192.0.2.7") is not None for _ in range(3)] == [True, True, False]
