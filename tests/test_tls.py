"""
TLS: ``--port ssl:...`` serves the API over https and the kernel WebSocket
over wss, verifiably, to clients that offer ALPN (curl, browsers) and to
clients that do not; the per-client connection limit counts TLS connections.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from service_identity.cryptography import verify_certificate_hostname
from support import Client, Daemon, stdout_of
from twisted.internet import defer
from twisted.trial import unittest

MAX_CONNECTIONS = 6

pytestmark = pytest.mark.slow


def self_signed(directory: str) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def tls_daemon():
    tmp = tempfile.mkdtemp(prefix="sagecell-tls-")
    key, cert = self_signed(tmp)
    d = Daemon(
        "--port",
        f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        pool_size=1,
        max_connections_per_client=MAX_CONNECTIONS,
    ).start()
    try:
        yield d, cert
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_api_over_verified_tls(tls_daemon):
    d, cert = tls_daemon
    ctx = ssl.create_default_context(cafile=cert)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    verify_certificate_hostname(x509.load_der_x509_certificate(der), "localhost")  # service_identity
    with urllib.request.urlopen(f"https://localhost:{d.port}/api", context=ctx, timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["server"] == "sagecell_tw"
    # A client that does not trust the certificate is refused.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://localhost:{d.port}/api", context=ssl.create_default_context(), timeout=10)


def test_kernel_websocket_over_wss(tls_daemon):
    d, cert = tls_daemon
    ctx = ssl.create_default_context(cafile=cert)
    req = urllib.request.Request(f"https://localhost:{d.port}/api/kernels", data=b"{}", method="POST")
    with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
        kid = json.loads(r.read())["id"]

    class Wss:
        ws_url = f"wss://localhost:{d.port}"

    c = Client(Wss, kid, sslopt={"ca_certs": cert, "cert_reqs": ssl.CERT_REQUIRED})
    reply, outputs = c.execute("print(6 * 7)")
    assert reply["status"] == "ok" and stdout_of(outputs) == "42\n"
    c.close()


def alpn_socket(port: int, cert: str, offer=("h2", "http/1.1")) -> ssl.SSLSocket:
    """A verified TLS connection that offers ALPN the way browsers and curl do."""
    ctx = ssl.create_default_context(cafile=cert)
    ctx.set_alpn_protocols(list(offer))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def test_curl_offering_alpn_gets_the_api(tls_daemon):
    d, cert = tls_daemon
    out = subprocess.run(
        ["curl", "-sS", "--cacert", cert, "-w", "\\n%{http_code} %{http_version}", f"https://localhost:{d.port}/api"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    assert status == "200 1.1" and json.loads(body)["server"] == "sagecell_tw"
    # A POST with a body, as a script would start a session.
    out = subprocess.run(
        ["curl", "-sS", "--cacert", cert, "-X", "POST", "-d", "{}", f"https://localhost:{d.port}/api/kernels"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    kid = json.loads(out.stdout)["id"]
    subprocess.run(
        ["curl", "-sS", "--cacert", cert, "-X", "DELETE", f"https://localhost:{d.port}/api/kernels/{kid}"],
        capture_output=True,
        timeout=30,
        check=True,
    )


def test_alpn_offering_h2_first_is_answered_with_http11_and_wss_works(tls_daemon):
    d, cert = tls_daemon
    with alpn_socket(d.port, cert) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    req = urllib.request.Request(f"https://localhost:{d.port}/api/kernels", data=b"{}", method="POST")
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=cert), timeout=30) as r:
        kid = json.loads(r.read())["id"]

    class Wss:
        ws_url = f"wss://localhost:{d.port}"

    # websocket-client uses the socket it is given as it is: ours offered ALPN.
    c = Client(Wss, kid, socket=alpn_socket(d.port, cert))
    assert c.ws.sock.selected_alpn_protocol() == "http/1.1"
    reply, outputs = c.execute("print(6 * 7)")
    assert reply["status"] == "ok" and stdout_of(outputs) == "42\n"
    c.close()


def _answers(sock: ssl.SSLSocket) -> bool:
    """Does an HTTP/1.1 request on this open TLS connection get a response?"""
    try:
        sock.sendall(b"GET /api HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return sock.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_connection_limit_counts_tls_connections(tls_daemon):
    d, cert = tls_daemon
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = alpn_socket(d.port, cert)
            assert _answers(s)
            held.append(s)
        # One more from the same address is closed as it comes.
        try:
            extra = alpn_socket(d.port, cert)
        except OSError:
            pass
        else:
            with extra:
                assert not _answers(extra)
    finally:
        for s in held:
            s.close()
    # Closed connections stop counting.
    deadline = time.monotonic() + 10
    while True:
        try:
            with alpn_socket(d.port, cert) as s:
                if _answers(s):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the closed connections still count"
        time.sleep(0.1)


class NoDelayTests(unittest.TestCase):
    """
    Every HTTP connection, plain or TLS, through the per-client counting
    wrapper, has TCP_NODELAY: a response is never held back by Nagle's
    algorithm waiting for a client's delayed ACK (~40 ms).
    """

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="sagecell-nodelay-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    @defer.inlineCallbacks
    def check(self, endpoint: str, tls: bool):
        from twisted.internet import endpoints, reactor
        from twisted.web import resource, server

        from sagecell_tw.web.site import ConnectionsPerClient
        from sagecell_tw.web.websocket import socket_of

        seen = defer.Deferred()

        class Probe(resource.Resource):
            isLeaf = True

            def render(self, request):
                sock = socket_of(request.channel.transport).getHandle()
                seen.callback(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                return b"ok"

        port = yield endpoints.serverFromString(reactor, endpoint).listen(ConnectionsPerClient(server.Site(Probe()), 8))
        self.addCleanup(port.stopListening)
        number = port.getHost().port

        def get():
            raw = socket.create_connection(("127.0.0.1", number), timeout=10)
            if tls:
                raw = ssl._create_unverified_context().wrap_socket(raw)
            with raw:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return raw.recv(100)

        from twisted.internet.threads import deferToThread

        answer = yield deferToThread(get)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"))
        self.assertTrue((yield seen))

    def test_plain(self):
        return self.check("tcp:0:interface=127.0.0.1", tls=False)

    def test_tls(self):
        key, cert = self_signed(self.tmp)
        return self.check(f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1", tls=True)
