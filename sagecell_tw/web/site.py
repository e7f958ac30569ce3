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
from collections.abc import Callable
from typing import NamedTuple

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import resource, server, static
from zope.interface import implementer

from .. import SOURCE_ROOT
from ..logs import access_log_line
from . import api as jupyter
from . import sagecell
from .api import Api
from .files import KernelFiles
from .policy import LimitedRequest, NotFound, client_address, error_body, write_json
from .proxies import ForwardedRequest, TrustedProxies
from .sagecell import SageCellCompat
from .statics import CompressedFile
from .websocket import KernelWebSocketFactory, socket_of

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

    def __init__(self, site: server.Site, limit: int, proxies: TrustedProxies | None = None):
        super().__init__(site)
        self.limit = limit
        #: --trusted-proxies: each carries many visitors' connections, so it is not held to one
        #: client's limit (the proxy limits its visitors: etc/nginx-sagecell.conf's limit_conn)
        self.proxies = proxies or TrustedProxies()
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
        if len(self._live(host)) >= self.limit and not self.proxies.trusts(host):
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
        self.open.setdefault(_host(p.getPeer()), set()).add(socket_of(p.transport))

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        host = _host(p.getPeer())
        sockets = self.open.get(host)
        if sockets is not None:
            sockets.discard(socket_of(p.transport))
            if not sockets:
                del self.open[host]

    def handed_over(self, p) -> None:
        """``p`` left the connection to a WebSocket: no longer ours to unregister; its socket still counts."""
        self.protocols.pop(p, None)


def _host(addr) -> str:
    return getattr(addr, "host", None) or type(addr).__name__


class KernelSocketResource(WebSocketResource):
    """
    Autobahn's resource for one kernel's WebSocket, as its route names it; for
    connections counted per client, and without the HTTP idle timeout.
    """

    def __init__(self, factory, policy, kernel_id: str, sagecell: bool):
        super().__init__(_BoundFactory(factory, kernel_id, sagecell))
        self.policy = policy
        self.kernel_id = kernel_id

    def render(self, request):
        if request.getHeader(b"upgrade") is None and self.policy.session_for(self.kernel_id) is None:
            return NotFound(self.policy).render(request)  # a plain GET for a kernel that is not there
        self._factory.client = client_address(request)  # the visitor's, behind a trusted proxy
        channel = request.channel
        if isinstance(channel.transport, _Counted):
            channel.transport = channel.transport.hand_over()
        # The HTTP channel gives its transport to the WebSocket but keeps its
        # idle timer, which would fire on a channel with no transport.
        channel.setTimeout(None)
        return super().render(request)


class _BoundFactory:
    """The site's WebSocket factory, handing its protocol the kernel id and framing of the route."""

    def __init__(self, factory, kernel_id: str, sagecell: bool):
        self.factory = factory
        self.kernel_id = kernel_id
        self.sagecell = sagecell
        #: the client address of the upgrade request (``ForwardedRequest``)
        self.client: str | None = None

    def buildProtocol(self, addr):
        protocol = self.factory.buildProtocol(addr)
        if protocol is not None:
            protocol.kernel_id = self.kernel_id
            protocol.sagecell = self.sagecell
            protocol.forwarded_client = self.client
        return protocol


def default_permalink_db() -> str:
    if os.geteuid() == 0:
        return "/var/lib/sagecell/permalinks.sqlite3"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "sagecell_tw", "permalinks.sqlite3")


class Route(NamedTuple):
    """
    One path the daemon serves. ``path`` names its variable segments in
    braces; ``{rest...}`` at the end takes every segment left (a file's
    path). ``serve`` is called with those segments, by name, as text, and
    returns the resource that answers; methods, token, CORS and errors are
    the resource's, through its policy.
    """

    path: str
    serve: Callable[..., resource.Resource]


def routes(api: Api, compat: SageCellCompat, sockets, files: KernelFiles, permalinks, static_dir, health, metrics):
    """Every path the daemon serves, in the order they are tried."""
    policy, credentialed = api.policy, compat.policy
    index = static.File(os.path.join(STATIC, "index.html"), defaultType="text/html")
    embed = StaticFiles(os.path.join(STATIC, "embed.js"), defaultType="application/javascript")
    threejs = threejs_files()
    return [
        Route("/", lambda: index),
        # Jupyter Server's REST API and kernel WebSockets
        Route("/api", lambda: jupyter.ApiInfo(policy)),
        Route("/api/status", lambda: jupyter.Status(api)),
        Route("/api/kernelspecs", lambda: jupyter.KernelSpecs(api)),
        Route("/api/kernelspecs/{name}", lambda name: jupyter.KernelSpec(api, name)),
        Route("/api/kernels", lambda: jupyter.Kernels(api)),
        Route("/api/kernels/{kernel_id}", lambda kernel_id: jupyter.KernelOne(api, kernel_id)),
        Route(
            "/api/kernels/{kernel_id}/channels",
            lambda kernel_id: KernelSocketResource(sockets, policy, kernel_id, False),
        ),
        Route(
            "/api/kernels/{kernel_id}/interrupt", lambda kernel_id: jupyter.KernelAction(api, kernel_id, "interrupt")
        ),
        Route("/api/kernels/{kernel_id}/restart", lambda kernel_id: jupyter.KernelAction(api, kernel_id, "restart")),
        Route(
            "/api/kernels/{kernel_id}/files/{rest...}",
            lambda kernel_id, rest: files.resource_for(kernel_id, rest, files.api_prefix),
        ),
        Route("/api/sessions", lambda: jupyter.Sessions(api, None)),
        Route("/api/sessions/{session_id}", lambda session_id: jupyter.Sessions(api, session_id)),
        # SageMathCell's endpoints, with its credentialed CORS
        Route("/kernel", lambda: sagecell.KernelCreate(compat)),
        Route("/kernel/{kernel_id}", lambda kernel_id: sagecell.KernelOne(compat, kernel_id)),
        Route(
            "/kernel/{kernel_id}/channels",
            lambda kernel_id: KernelSocketResource(sockets, credentialed, kernel_id, True),
        ),
        Route(
            "/kernel/{kernel_id}/files/{rest...}",
            lambda kernel_id, rest: files.resource_for(kernel_id, rest, files.sagecell_prefix),
        ),
        Route("/kernel/{rest...}", lambda rest: NotFound(credentialed)),
        Route("/service", lambda: sagecell.Service(compat)),
        Route("/permalink", lambda: permalinks),
        # the widget, for any origin to load
        Route("/embedded_sagecell.js", lambda: embed),
        Route("/static/threejs-sage/{rest...}", lambda rest: threejs),
        Route("/static/{rest...}", lambda rest: static_dir),
        # the operator's
        Route("/healthz", lambda: health.resource("ready")),
        Route("/healthz/ready", lambda: health.resource("ready")),
        Route("/healthz/live", lambda: health.resource("live")),
        Route("/metrics", lambda: metrics),
    ]


class Root(resource.Resource):
    """
    Finds the route a request's path matches and hands over to its resource:
    the whole path is matched here at once, so no resource below parses a
    path of its own (but the static tree, which walks what is left of it).
    A trailing slash is the same path without it; what matches no route is
    a JSON 404.
    """

    def __init__(self, table: list[Route], policy, base_url: str = ""):
        super().__init__()
        self.table = [(_segments(route.path), route.serve) for route in table]
        self.policy = policy
        #: --base-url's segments: every route lies under them, and nothing else is served
        self.prefix = [p.encode() for p in _segments(base_url)]

    def getChild(self, name, request):
        path = [name] + request.postpath
        prefix = self.prefix
        if prefix:
            if path[: len(prefix)] != prefix:
                return NotFound(self.policy)
            if len(path) == len(prefix):
                return _ToSlash(self.policy)  # "/prefix": the page's relative links need "/prefix/"
            request.prepath += prefix
            path = path[len(prefix) :]
        for pattern, serve in self.table:
            found = _match(pattern, path)
            if found is None:
                continue
            values, rest = found
            # what is left stays for the resource to walk (the static tree); JSON resources are leaves
            request.prepath += path[: len(path) - len(rest)]
            request.postpath = rest
            return serve(**values)
        return NotFound(self.policy)


def _segments(path: str) -> list[str]:
    return [p for p in path.strip("/").split("/") if p]


def _match(pattern: list[str], path: list[bytes]) -> tuple[dict, list[bytes]] | None:
    """(the named segments as text, the segments a ``{rest...}`` leaves), or None."""
    tail = bool(pattern) and pattern[-1] == "{rest...}"
    fixed = pattern[:-1] if tail else pattern
    if not tail:
        if path[-1:] == [b""]:
            path = path[:-1]  # "/api/kernels/" is "/api/kernels"
        if len(path) != len(fixed):
            return None
    elif len(path) < len(fixed):
        return None
    values = {}
    for want, got in zip(fixed, path):
        text = got.decode(errors="replace")
        if want.startswith("{"):
            if not text:
                return None
            values[want.strip("{}")] = text
        elif text != want:
            return None
    rest = path[len(fixed) :]
    if tail:
        values["rest"] = [p.decode(errors="replace") for p in rest]
    return values, rest


class _ToSlash(resource.Resource):
    """``/prefix`` (the --base-url without its slash): a redirect to ``/prefix/``, query kept (``?z=``)."""

    isLeaf = True

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            return NotFound(self.policy).render(request)
        path, sep, query = request.uri.partition(b"?")
        request.setResponseCode(301)
        request.setHeader(b"location", path + b"/" + sep + query)
        request.setHeader(b"content-length", b"0")
        return b""


class _NoSuchFile(resource.Resource):
    """A JSON 404: what a directory, or a file that is not there, answers under ``/static/``."""

    isLeaf = True

    def render(self, request):
        write_json(request, 404, error_body(404, f"{request.path.decode(errors='replace')[:200]} is not here"))
        return b""


class StaticFiles(CompressedFile):
    """The widget's files, for any origin to load; directories are not listed (404)."""

    childNotFound = _NoSuchFile()

    def render(self, request):
        self.restat(False)
        if self.isdir():
            return self.childNotFound.render(request)
        request.setHeader(b"access-control-allow-origin", b"*")
        return super().render(request)

    def directoryListing(self):
        return self.childNotFound

    def createSimilarFile(self, path):
        f = StaticFiles(path, self.defaultType, self.ignoredExts, self.registry)
        f.processors = self.processors
        f.indexNames = []
        return f


def threejs_files() -> resource.Resource:
    """
    three.js as Sage's 3D scenes load it (``{version}/three.min.js``): the
    files of ``jupyter_threejs_sage``, which passagemath's plotting needs,
    found without importing anything. The widget points scenes here
    (js/src/threejs.js) instead of a CDN. Without it (a Python-only
    install), a JSON 404 as for any file not there.
    """
    import importlib.util

    spec = importlib.util.find_spec("jupyter_threejs_sage")
    for where in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(where, "static")
        if os.path.isdir(path):
            files = StaticFiles(path, defaultType="application/javascript")
            files.indexNames = []
            return files
    return _NoSuchFile()


def build_site(svc, config, reactor) -> server.Site:
    from ..core.permalinks import open_store
    from .permalinks import PermalinkResource, RateLimit

    api = Api(svc.sessions, config, reactor)
    sockets = KernelWebSocketFactory(svc.sessions, config, reactor=reactor, policy=api.policy)
    api.files = KernelFiles(svc.sessions, config, reactor, api.policy)
    store = open_store(config.permalink_db or default_permalink_db(), reactor, max_bytes=config.permalink_db_max_size)
    svc.permalinks = store  # closed when the service stops
    static_dir = StaticFiles(STATIC)
    static_dir.indexNames = []
    compat = SageCellCompat(api, reactor)
    permalinks = compat.with_cors(
        PermalinkResource(
            store,
            max_code_bytes=min(config.max_message_size, 1 << 20),
            rate=RateLimit(reactor, config.permalinks_per_minute),
        )
    )
    table = routes(api, compat, sockets, api.files, permalinks, static_dir, svc.health, svc.metrics.resource())
    root = Root(table, api.policy, config.base_url)
    site = server.Site(root, timeout=config.http_idle_timeout, logFormatter=access_log_line)
    site.displayTracebacks = False
    limits = {"json": config.max_message_size, "upload": config.max_upload_size}
    proxies = TrustedProxies(config.trusted_proxies)
    request_factory = type("Request", (ForwardedRequest, LimitedRequest), {"body_limits": limits, "proxies": proxies})
    site.requestFactory = request_factory
    return site
