# -*- test-case-name: tests.test_tls -*-
"""
The site: one resource tree for the API, the WebSockets, the widget and the
demo page. Built by the tap; resources reach the managers through the service.
"""

from __future__ import annotations

# Twisted parses a request's Content-Type with the email package, which
# imports this (~3 ms) on the first such request: import it at start instead.
import email.policy  # noqa: F401
import os

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import resource, server, static
from zope.interface import implementer

from .. import SOURCE_ROOT
from ..logs import access_log_line
from .api import Api
from .files import KernelFiles
from .policy import LimitedRequest, NotFound, error_body, write_json
from .sagecell import SageCellCompat
from .websocket import KernelWebSocketFactory

STATIC = os.path.join(SOURCE_ROOT, "sagecell_tw", "static")

log = Logger()


class _Counted(ProtocolWrapper):
    """A connection that counts against its client's ``ConnectionsPerClient`` limit."""

    def hand_over(self):
        """
        Step out from between the connection and its protocol; return the
        transport we stood in front of. Autobahn takes a WebSocket's
        transport from the HTTP channel and reads TLS details from it, which
        must then be the TLS transport itself. The connection stays counted
        for as long as its socket is open.
        """
        inner = self.transport
        if isinstance(inner, ProtocolWrapper):
            inner.wrappedProtocol = self.wrappedProtocol
        else:
            inner.protocol = self.wrappedProtocol
        self.factory.handed_over(self)
        return inner


def _socket_of(transport):
    """The TCP (or unix) transport under any wrappers (TLS): it lives as long as the connection."""
    for _ in range(8):
        if not isinstance(transport, ProtocolWrapper):
            break
        transport = transport.transport
    return transport


@implementer(IProtocolNegotiationFactory)
class ConnectionsPerClient(WrappingFactory):
    """
    At most ``limit`` open connections from one client address; more are
    closed as they come, so that one client cannot use up the daemon's file
    descriptors and with them everyone's service. (Twisted's own
    ``LimitConnectionsByPeer`` still indexes addresses as tuples.) Counted
    by the connections' sockets, which outlive our wrapper when a
    WebSocket takes a connection over (``_Counted.hand_over``).
    """

    protocol = _Counted

    def __init__(self, site: server.Site, limit: int):
        super().__init__(site)
        self.limit = limit
        #: client address -> the sockets of its open connections
        self.open: dict[str, set] = {}
        self.refused = 0
        self._built = 0

    def logPrefix(self) -> str:
        return self.wrappedFactory.logPrefix()  # "Site starting on ...", as without us

    def acceptableProtocols(self) -> list[bytes]:
        """
        What TLS offers over ALPN: HTTP/1.1 only. The TLS layer asks the
        factory right under it; one that names no protocol fails the
        handshake of every client that offers ALPN (browsers, curl). Not h2,
        even where Twisted could speak it: WebSockets need HTTP/1.1's Upgrade.
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr):
        host = _host(addr)
        self._built += 1
        if self._built % 1024 == 0:
            for other in list(self.open):
                self._live(other)
        if len(self._live(host)) >= self.limit:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warn(
                    "refused a connection from {client}: it has {limit} open ({n} refused so far)",
                    event="limit_hit",
                    kind="max_connections_per_client",
                    client=host,
                    limit=self.limit,
                    n=self.refused,
                )
            return None
        return super().buildProtocol(addr)

    def _live(self, host: str) -> set:
        """The open sockets of ``host``'s connections, forgetting closed ones."""
        sockets = self.open.get(host, set())
        closed = {s for s in sockets if getattr(s, "disconnected", False)}
        sockets -= closed
        if not sockets:
            self.open.pop(host, None)
        return sockets

    def registerProtocol(self, p) -> None:
        super().registerProtocol(p)
        self.open.setdefault(_host(p.getPeer()), set()).add(_socket_of(p.transport))

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        host = _host(p.getPeer())
        sockets = self.open.get(host)
        if sockets is not None:
            sockets.discard(_socket_of(p.transport))
            if not sockets:
                del self.open[host]

    def handed_over(self, p) -> None:
        """``p`` left the connection to a WebSocket: no longer ours to unregister; its socket still counts."""
        self.protocols.pop(p, None)


def _host(addr) -> str:
    return getattr(addr, "host", None) or type(addr).__name__


class KernelSocketResource(WebSocketResource):
    """Autobahn's resource, for connections counted per client, and without the HTTP idle timeout."""

    def render(self, request):
        channel = request.channel
        if isinstance(channel.transport, _Counted):
            channel.transport = channel.transport.hand_over()
        # The HTTP channel gives its transport to the WebSocket but keeps its
        # idle timer, which would fire on a channel with no transport.
        channel.setTimeout(None)
        return super().render(request)


def default_permalink_db() -> str:
    if os.geteuid() == 0:
        return "/var/lib/sagecell/permalinks.sqlite3"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "sagecell_tw", "permalinks.sqlite3")


class Root(resource.Resource):
    """``/``: the demo page, and the first segment of every other path looked up in ``routes``."""

    def __init__(self, api: Api, routes: dict):
        super().__init__()
        self.api = api
        self.routes = routes
        self.index = static.File(os.path.join(STATIC, "index.html"), defaultType="text/html")

    def getChild(self, name, request):
        if name == b"" and not request.postpath:
            return self.index
        child = self.routes.get(name)
        if child is not None:
            return child
        return NotFound(self.api.policy)


class _NoSuchFile(resource.Resource):
    """A JSON 404: what a directory, or a file that is not there, answers under ``/static/``."""

    isLeaf = True

    def render(self, request):
        write_json(request, 404, error_body(404, f"{request.path.decode(errors='replace')[:200]} is not here"))
        return b""


class StaticFiles(static.File):
    """The widget's files, for any origin to load; directories are not listed (404)."""

    childNotFound = _NoSuchFile()

    def render(self, request):
        self.restat(False)
        if self.isdir():
            return self.childNotFound.render(request)
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"public, max-age=300")
        return super().render(request)

    def directoryListing(self):
        return self.childNotFound

    def createSimilarFile(self, path):
        f = StaticFiles(path, self.defaultType, self.ignoredExts, self.registry)
        f.processors = self.processors
        f.indexNames = []
        return f


def build_site(svc, config, reactor) -> server.Site:
    from ..core.permalinks import PermalinkStore
    from .permalinks import PermalinkResource, RateLimit

    api = Api(svc.sessions, config, reactor)
    ws_factory = KernelWebSocketFactory(svc.sessions, config, reactor=reactor, policy=api.policy)
    ws_resource = KernelSocketResource(ws_factory)
    api.files = KernelFiles(svc.sessions, config, reactor, api.policy)
    db = config.permalink_db or default_permalink_db()
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    store = PermalinkStore(db, reactor, max_bytes=config.permalink_db_max_size)
    static_dir = StaticFiles(STATIC)
    static_dir.indexNames = []
    permalinks = PermalinkResource(
        store,
        max_code_bytes=min(config.max_message_size, 1 << 20),
        rate=RateLimit(reactor, config.permalinks_per_minute),
    )
    compat = SageCellCompat(api, ws_resource, reactor)
    #: the first segment of a path -> what serves it ("/" itself is the demo page)
    routes = {
        b"api": api.resource(ws_resource),  # Jupyter Server's REST API and kernel WebSockets
        b"kernel": compat.kernel_resource(),  # SageMathCell: POST /kernel, its WebSockets and files
        b"service": compat.service_resource(),  # SageMathCell: POST /service, run code once
        b"permalink": compat.with_cors(permalinks),  # SageMathCell: permalinks, with its CORS
        b"static": static_dir,  # the widget's files, for any origin
        b"embedded_sagecell.js": StaticFiles(os.path.join(STATIC, "embed.js"), defaultType="application/javascript"),
        b"healthz": svc.health.resource(),  # the operator's: alive, ready
        b"metrics": svc.metrics.resource(),  # the operator's: Prometheus text
    }
    site = server.Site(Root(api, routes), timeout=config.http_idle_timeout, logFormatter=access_log_line)
    site.displayTracebacks = False
    limits = {"json": config.max_message_size, "upload": config.max_upload_size}
    request_factory = type("Request", (LimitedRequest,), {"body_limits": limits})
    site.requestFactory = request_factory
    return site
