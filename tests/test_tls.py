"""TLS: ``--port ssl:...`` serves the API over https and the kernel WebSocket over wss, verifiably."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import tempfile
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from service_identity.cryptography import verify_certificate_hostname
from support import Client, Daemon, stdout_of

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
    d = Daemon("--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1", pool_size=1).start()
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
