# -*- test-case-name: tests.test_proxy -*-
"""
Who the visitor is behind a reverse proxy: ``--trusted-proxies``.

A proxy connects to us from its own address; it names the visitor in
``X-Forwarded-For`` (or ``Forwarded: for=``) and the scheme the visitor used
in ``X-Forwarded-Proto``. Anyone can write those headers, so they count only
on connections from a trusted proxy, and in the address chain only the
right-most address that is not a trusted proxy is believed: every hop to its
right was written by a proxy we trust, while what is to its left the visitor
may have made up. That address is the client every per-client limit keys on
(kernels, restarts, permalinks, WebSocket input), and the access log's.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet.address import IPv4Address, IPv6Address

#: a ``for=`` element of an RFC 7239 ``Forwarded`` header
_FORWARDED_FOR = re.compile(r'(?:^|[;,\s])for\s*=\s*("[^"]*"|[^;,\s]+)', re.IGNORECASE)
#: the longest chain of hops we read (a longer header is cut, keeping its right end: ours)
MAX_HOPS = 32


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it (``1.2.3.4``, ``1.2.3.4:56``, ``[::1]:80``, ``"[::1]"``), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class TrustedProxies:
    """The addresses whose forwarding headers count, and how to read those headers."""

    def __init__(self, networks: tuple[str, ...] | list[str] = ()):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str | None) -> bool:
        """Whether a connection from ``host`` is one of our proxies."""
        if not self.networks or not host:
            return False
        ip = parse_ip(host)
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def client(self, peer: str, forwarded_for: list[str], forwarded: list[str]) -> str:
        """
        The visitor's address: ``peer`` itself unless it is a trusted proxy;
        then the right-most address of the chain (``X-Forwarded-For``, else
        ``Forwarded``'s ``for=``) that is not a trusted proxy. A chain of
        nothing but trusted proxies gives its left-most; an entry that is no
        address (``unknown``, a typo of a proxy's) ends the walk at the last
        trusted hop, which then stands for the visitor.
        """
        if not self.trusts(peer):
            return peer
        if forwarded_for:
            hops = [h for value in forwarded_for for h in value.split(",")]
        else:
            hops = [m.group(1) for value in forwarded for m in _FORWARDED_FOR.finditer(value)]
        client = peer
        for hop in reversed(hops[-MAX_HOPS:]):
            ip = parse_ip(hop)
            if ip is None:
                break
            client = str(ip)
            if not self.trusts(client):
                break
        return client

    def scheme(self, peer: str, forwarded_proto: list[str], secure: bool) -> bool:
        """Whether the visitor's connection is secure: ours is, or a trusted proxy says its was (https)."""
        if secure or not self.trusts(peer) or not forwarded_proto:
            return secure
        last = forwarded_proto[-1].split(",")[-1].strip().lower()
        return last in ("https", "wss")


class ForwardedRequest:
    """
    A ``server.Request`` mixin: ``getClientAddress`` and ``isSecure`` are the
    visitor's when the connection is from a trusted proxy (``proxies``, set
    on the site's request class), the socket's otherwise.
    """

    proxies: TrustedProxies = TrustedProxies()
    _visitor = None

    def getClientAddress(self):
        addr = super().getClientAddress()
        proxies = self.proxies
        host = getattr(addr, "host", None)
        if not proxies or host is None or not proxies.trusts(host):
            return addr
        if self._visitor is None or self._visitor[0] is not addr:
            headers = self.requestHeaders
            client = proxies.client(
                host,
                [v.decode("latin-1") for v in headers.getRawHeaders(b"x-forwarded-for", [])],
                [v.decode("latin-1") for v in headers.getRawHeaders(b"forwarded", [])],
            )
            kind = IPv6Address if ":" in client else IPv4Address
            self._visitor = (addr, kind("TCP", client, 0) if client != host else addr)
        return self._visitor[1]

    def isSecure(self) -> bool:
        secure = super().isSecure()
        addr = super().getClientAddress()
        host = getattr(addr, "host", None)
        if not self.proxies or host is None:
            return secure
        protos = [v.decode("latin-1") for v in self.requestHeaders.getRawHeaders(b"x-forwarded-proto", [])]
        return self.proxies.scheme(host, protos, secure)
