# -*- test-case-name: tests.test_api -*-
"""
The site: one resource tree for the API, the WebSockets, the widget and the
demo page. Built by the tap; resources reach the managers through the service.
"""

from __future__ import annotations

import os

from autobahn.twisted.resource import WebSocketResource
from twisted.web import resource, server, static

from .api import Api
from .files import KernelFiles
from .sagecell_compat import SageCellCompat
from .webbase import LimitedRequest, NotFound
from .websocket import KernelWebSocketFactory

STATIC = os.path.join(os.path.dirname(__file__), "static")

class KernelSocketResource(WebSocketResource):
    """Autobahn's resource, minus the HTTP idle timeout once the connection is a WebSocket."""

    def render(self, request):
        # The HTTP channel gives its transport to the WebSocket but keeps its
        # idle timer, which would fire on a channel with no transport.
        request.channel.setTimeout(None)
        return super().render(request)


def default_permalink_db() -> str:
    if os.geteuid() == 0:
        return "/var/lib/sagecell/permalinks.sqlite3"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "sagecell_tw", "permalinks.sqlite3")


class Root(resource.Resource):
    def __init__(self, api: Api, extra: dict):
        super().__init__()
        self.api = api
        self.extra = extra
        self.index = static.File(os.path.join(STATIC, "index.html"), defaultType="text/html")

    def getChild(self, name, request):
        if name == b"" and not request.postpath:
            return self.index
        child = self.extra.get(name)
        if child is not None:
            return child
        return NotFound(self.api.policy)


class KernelFilesOnly(resource.Resource):
    """
    ``/kernel/{id}/files/...``, SageMathCell's file URLs, and nothing else:
    the place of sagecell_compat's ``/kernel`` tree (POST /kernel, channels),
    which routes files the same way, through ``svc.files_resource_for``.
    """

    def __init__(self, policy, files_resource_for):
        super().__init__()
        self.policy = policy
        self.files_resource_for = files_resource_for

    def render(self, request):
        return NotFound(self.policy).render(request)

    def getChild(self, name, request):
        rest = [p.decode(errors="replace") for p in request.postpath]
        if name and rest and rest[0] == "files":
            return self.files_resource_for(name.decode(errors="replace"), rest[1:], request)
        return NotFound(self.policy)


class StaticFiles(static.File):
    """The widget's files, for any origin to load."""

    def render(self, request):
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"public, max-age=300")
        return super().render(request)

    def createSimilarFile(self, path):
        f = StaticFiles(path, self.defaultType, self.ignoredExts, self.registry)
        f.processors = self.processors
        f.indexNames = []
        return f


def build_site(svc, config, reactor) -> server.Site:
    from .permalink_web import PermalinkResource
    from .permalinks import PermalinkStore

    ws_factory = KernelWebSocketFactory(svc.sessions, config, reactor=reactor)
    ws_resource = KernelSocketResource(ws_factory)
    api = Api(svc.sessions, svc.kernels, svc, config, reactor)
    svc.api = api
    api.files = KernelFiles(svc.sessions, config, reactor, api.policy)
    #: (kernel_id, segments, request) -> resource, for /kernel/{id}/files/...
    svc.files_resource_for = api.files.resource_for
    db = config.permalink_db or default_permalink_db()
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    store = PermalinkStore(db, reactor)
    svc.permalinks = store
    static_dir = StaticFiles(STATIC)
    static_dir.indexNames = []
    extra = {
        b"api": api.resource(ws_resource),
        b"static": static_dir,
        b"embedded_sagecell.js": StaticFiles(os.path.join(STATIC, "embed.js"), defaultType="application/javascript"),
        b"permalink": PermalinkResource(store, max_code_bytes=min(config.max_message_size, 1 << 20)),
        b"kernel": KernelFilesOnly(api.policy, api.files.resource_for),
    }
    compat = SageCellCompat(api, ws_resource, reactor)
    extra[b"kernel"] = compat.kernel_resource()
    extra[b"service"] = compat.service_resource()
    extra[b"permalink"] = compat.with_cors(extra[b"permalink"])
    svc.extend_site(extra, api, ws_resource)
    site = server.Site(Root(api, extra), timeout=config.http_idle_timeout)
    site.displayTracebacks = False
    request_factory = type("Request", (LimitedRequest,), {"body_limit": max(config.max_message_size, config.max_upload_size)})
    site.requestFactory = request_factory
    return site
