# -*- test-case-name: tests.test_ownership,tests.test_e2e_kernel_api -*-
"""
The Jupyter Server kernel REST API, enough for unmodified Jupyter clients.

``/api``, ``/api/status``, ``/api/kernelspecs``, ``/api/kernels[/{id}[/interrupt|/restart|/channels]]``
and ``/api/sessions[/{id}]``. Unlike Jupyter Server, a new session never
reuses another session's kernel because they share a ``path``.

Who may see and use what is ``policy.Policy``'s: anonymously, a kernel's
id (and a notebook session's id) is the capability to use it, and the two
listings answer 403; with ``--token``, token holders see everything.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from .. import __version__
from ..config import PYTHON, SAGE
from ..core.grants import new_grant
from ..core.sessions import LimitExceeded, SessionObserver
from .policy import HTTPError, JsonResource, Policy, Response, client_address, read_json

#: kernel name -> the other names a client may ask for it by
ALIASES = {PYTHON: ("python",), SAGE: ("sage",)}


def kernel_name(requested, served: tuple[str, ...]) -> str:
    """The kernel ``requested`` (a name or alias; None or "": the default, ``served[0]``), or 404."""
    if requested is None or requested == "":
        return served[0]
    if isinstance(requested, str):
        for name in served:
            if requested == name or requested in ALIASES[name]:
                return name
    raise HTTPError(404, f"no such kernel spec {requested!r}; this server runs {', '.join(served)}")


def kernelspec(name: str) -> dict:
    """The spec of kernel ``name``, as Jupyter names and describes it (passagemath's for Sage)."""
    if name == SAGE:
        argv = [sys.executable, "-m", "sage.repl.ipython_kernel", "-f", "{connection_file}"]
        display, language = f"passagemath {_version('passagemath-standard')}".strip(), "sage"
        interrupt = "signal"  # what this server does to interrupt it (kernels.Kernel.interrupt)
    else:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        display, language = "Python 3 (ipykernel)", "python"
        interrupt = "message"
    return {
        "name": name,
        "spec": {
            "argv": argv,
            "env": {},
            "display_name": display,
            "language": language,
            "interrupt_mode": interrupt,
            "metadata": {"debugger": False},
        },
        "resources": {},
    }


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


class Api:
    """Holds what the resources need; builds the ``/api`` tree."""

    def __init__(self, sessions, config, clock, files=None):
        self.sessions = sessions
        self.config = config
        self.clock = clock
        self.notebooks = NotebookSessions(sessions, config.max_kernels_per_client)
        self.policy = Policy(config, sessions, self.notebooks.models)
        self.started = clock.seconds()
        self.files = files
        #: the kernels served, the default first
        self.kernel_names = config.kernel_names()

    def iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    def new_kernel(self, request, name) -> dict:
        try:
            session = self.sessions.create(client_address(request), kernel_name(name, self.kernel_names))
        except LimitExceeded as e:
            raise HTTPError(e.status, str(e)) from None
        return session

    def refuse_listing(self, what: str) -> None:
        """403 for a listing the caller may not see (``Policy.may_list``)."""
        if not self.policy.may_list():
            raise HTTPError(
                403,
                f"this server does not list {what}: use the id you were given when you created yours",
            )


class NotebookSessions(SessionObserver):
    """
    Jupyter's notebook sessions (``/api/sessions``): a path and a name
    pointing at a kernel. Each is freed with its kernel's web session
    (shut down, culled, ended for any reason: the session manager's
    ``session_ended``), and one client holds at most ``limit`` of them, as many
    as it may hold kernels. The ids are capabilities, like kernel ids
    (``Policy.notebook_for`` checks them).
    """

    def __init__(self, sessions, limit: int):
        self.limit = limit
        #: this daemon's name, in the ids it makes (core/grants.py)
        self.daemon = sessions.config.daemon_name
        #: notebook-session id -> {"path", "name", "type", "kernel": WebSession, "client"}
        self.models: dict[str, dict] = {}
        #: client address -> its notebook-session ids
        self.by_client: dict[str, set[str]] = {}
        sessions.observers.append(self)

    def check_room(self, client: str) -> None:
        """429 if ``client`` holds its limit of notebook sessions (checked before a kernel is made for one)."""
        if len(self.by_client.get(client, ())) >= self.limit:
            raise HTTPError(
                429, f"you already have {self.limit} notebook sessions, the most one client may have; delete one first"
            )

    def add(self, client: str, kernel, fields: dict) -> str:
        self.check_room(client)
        sid = new_grant(self.daemon)
        self.models[sid] = {
            "path": fields.get("path", ""),
            "name": fields.get("name", ""),
            "type": fields.get("type", "notebook"),
            "kernel": kernel,
            "client": client,
        }
        self.by_client.setdefault(client, set()).add(sid)
        kernel.notebook_sessions.add(sid)
        return sid

    def point(self, sid: str, kernel) -> None:
        """Notebook session ``sid`` now uses ``kernel``."""
        model = self.models[sid]
        model["kernel"].notebook_sessions.discard(sid)
        model["kernel"] = kernel
        kernel.notebook_sessions.add(sid)

    def remove(self, sid: str) -> dict | None:
        model = self.models.pop(sid, None)
        if model is None:
            return None
        model["kernel"].notebook_sessions.discard(sid)
        ids = self.by_client.get(model["client"])
        if ids is not None:
            ids.discard(sid)
            if not ids:
                del self.by_client[model["client"]]
        return model

    def session_ended(self, session, reason: str) -> None:
        for sid in list(session.notebook_sessions):
            self.remove(sid)

    def model(self, sid: str) -> dict:
        """The Jupyter Server session model."""
        model = self.models[sid]
        return {
            "id": sid,
            "path": model["path"],
            "name": model["name"],
            "type": model["type"],
            "kernel": model["kernel"].model(),
            "notebook": {"path": model["path"], "name": model["name"]},
        }


class ApiInfo(JsonResource):
    needs_token = False

    def handle(self, request):
        return {"version": __version__, "server": "sagecell_tw"}


class Status(JsonResource):
    def __init__(self, api: Api):
        super().__init__(api.policy)
        self.api = api

    def handle(self, request):
        api = self.api
        last = max([s.last_activity for s in api.sessions.routes] + [api.started])
        return {
            "started": api.iso(api.started),
            "last_activity": api.iso(last),
            "connections": sum(len(s.connections) for s in api.sessions.routes),
            "kernels": len(api.sessions.routes),
        }


class KernelSpecs(JsonResource):
    def __init__(self, api: Api):
        super().__init__(api.policy)
        self.api = api

    def handle(self, request):
        names = self.api.kernel_names
        return {"default": names[0], "kernelspecs": {name: kernelspec(name) for name in names}}


class KernelSpec(JsonResource):
    def __init__(self, api: Api, name: str):
        super().__init__(api.policy)
        self.api = api
        self.name = name

    def handle(self, request):
        return kernelspec(kernel_name(self.name, self.api.kernel_names))


class Kernels(JsonResource):
    methods = ("GET", "POST")

    def __init__(self, api: Api):
        super().__init__(api.policy)
        self.api = api

    def handle(self, request):
        api = self.api
        if request.method == b"POST":
            body = read_json(request, api.config.max_message_size)
            if not isinstance(body, dict):
                raise HTTPError(400, "the body must be a JSON object")
            session = api.new_kernel(request, body.get("name"))
            return Response(201, session.model(), {"Location": f"{api.config.base_url}/api/kernels/{session.id}"})
        api.refuse_listing("kernels")
        return [s.model() for s in api.sessions.routes]


class KernelOne(JsonResource):
    methods = ("GET", "DELETE")

    def __init__(self, api: Api, kid: str):
        super().__init__(api.policy)
        self.api = api
        self.kid = kid

    def handle(self, request):
        session = self.api.policy.require_session(self.kid)
        if request.method == b"DELETE":
            d = self.api.sessions.shutdown(session, "shut down")
            return d.addCallback(lambda _: Response(204, None))
        return session.model()


class KernelAction(JsonResource):
    methods = ("POST",)

    def __init__(self, api: Api, kid: str, action: str):
        super().__init__(api.policy)
        self.api = api
        self.kid = kid
        self.action = action

    def handle(self, request):
        session = self.api.policy.require_session(self.kid)
        if self.action == "interrupt":
            self.api.sessions.interrupt(session)
            return Response(204, None)
        try:
            d = self.api.sessions.restart(session, client=client_address(request))
        except LimitExceeded as e:
            raise HTTPError(e.status, str(e)) from None

        def failed(f):
            raise HTTPError(503, f"restart failed: {f.getErrorMessage()}")

        return d.addCallbacks(lambda s: s.model(), failed)


class Sessions(JsonResource):
    methods = ("GET", "POST", "PATCH", "DELETE")

    def __init__(self, api: Api, sid: str | None):
        super().__init__(api.policy)
        self.api = api
        self.sid = sid

    def handle(self, request):
        api = self.api
        notebooks = api.notebooks
        method = request.method
        if self.sid is None:
            if method == b"GET":
                api.refuse_listing("sessions")
                return [notebooks.model(sid) for sid in list(notebooks.models)]
            if method == b"POST":
                return self._create(request)
            raise HTTPError(405, "use /api/sessions/{id}")
        if api.policy.notebook_for(self.sid) is None:
            raise api.policy.not_held(self.sid, f"no session {self.sid[:64]}")
        if method == b"GET":
            return notebooks.model(self.sid)
        if method == b"PATCH":
            return self._patch(request)
        if method == b"DELETE":
            model = notebooks.remove(self.sid)
            return api.sessions.shutdown(model["kernel"], "shut down").addCallback(lambda _: Response(204, None))
        raise HTTPError(405, "not allowed")

    def _fields(self, body: dict) -> dict:
        out = {}
        for key in ("path", "name", "type"):
            if key in body:
                if not isinstance(body[key], str) or len(body[key]) > 1024:
                    raise HTTPError(400, f"{key} must be a string")
                out[key] = body[key]
        if "notebook" in body and isinstance(body["notebook"], dict):
            nb = body["notebook"]
            if isinstance(nb.get("path"), str):
                out.setdefault("path", nb["path"])
        return out

    def _create(self, request):
        api = self.api
        body = read_json(request, api.config.max_message_size, allow_empty=False)
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        fields = self._fields(body)
        kernel = body.get("kernel") or {}
        if not isinstance(kernel, dict):
            raise HTTPError(400, "kernel must be an object")
        client = client_address(request)
        api.notebooks.check_room(client)
        if kernel.get("id"):
            session = api.policy.require_session(kernel["id"])
        else:
            session = api.new_kernel(request, kernel.get("name"))
        sid = api.notebooks.add(client, session, fields)
        return Response(201, api.notebooks.model(sid), {"Location": f"{api.config.base_url}/api/sessions/{sid}"})

    def _patch(self, request):
        api = self.api
        body = read_json(request, api.config.max_message_size, allow_empty=False)
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        fields = self._fields(body)
        model = api.notebooks.models[self.sid]
        kernel = body.get("kernel")
        if kernel is not None:
            if not isinstance(kernel, dict):
                raise HTTPError(400, "kernel must be an object")
            if kernel.get("id"):
                api.notebooks.point(self.sid, api.policy.require_session(kernel["id"]))
            else:
                old = model["kernel"]
                api.notebooks.point(self.sid, api.new_kernel(request, kernel.get("name")))
                api.sessions.shutdown(old, "replaced by a new kernel")
        model.update(fields)
        return api.notebooks.model(self.sid)
