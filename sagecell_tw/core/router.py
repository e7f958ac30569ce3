# -*- test-case-name: tests.test_lifecycle_clock,tests.test_ownership -*-
"""
The routing tables: which web session owns which kernel, and who is watching.

Plain model, no I/O: the session manager changes these tables and asks them
questions. A web session is what a Jupyter client calls a kernel: its id is
the one in ``/api/kernels/{id}``; the forked kernel behind it may change (a
restart swaps in a fresh one from the pool) while the id stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from .hold import IopubHold


@dataclass(eq=False)
class WebSession:
    id: str
    client: str
    name: str
    created: float
    last_activity: float
    kernel: Any = None  # kernels.Kernel, or None while it has none
    execution_state: str = "starting"
    #: WebSocket connections watching this session (objects with .deliver())
    connections: set = field(default_factory=set)
    #: messages that arrived while the session had no kernel
    pending: list = field(default_factory=list)
    disconnected_since: float | None = None
    closed: bool = False
    #: ids of the Jupyter notebook sessions (api.NotebookSessions) that use
    #: this session's kernel: they end with it
    notebook_sessions: set = field(default_factory=set)
    #: a kernel has been asked for and not arrived yet
    claiming: bool = False
    #: Deferreds fired once the claim settles (restart waits on these)
    claim_waiters: list = field(default_factory=list)
    #: msg_id -> sessions.Execution, for running execute_requests
    executions: dict = field(default_factory=dict)
    #: msg_id -> sessions.Execution for the latest execute_requests, running or
    #: not: their output counts against the output cap (late output too)
    outputs: dict = field(default_factory=dict)
    #: connections whose browser is behind: while any is, the kernel's
    #: output is not read (backpressure)
    paused: set = field(default_factory=set)
    #: msg_id -> when sent, of the browsers' shell and control messages its
    #: kernel has not finished, oldest first (inflow.MAX_IN_FLIGHT)
    in_flight: dict = field(default_factory=dict)
    #: connections not read while the kernel is that far behind
    held_input: set = field(default_factory=set)
    #: connections not read until their sender's rate limit allows (inflow.InputRate)
    slowed_input: set = field(default_factory=set)
    #: since when the kernel's shell is idle (its last status for a shell message), or None
    shell_idle_since: float | None = None
    #: iopub held back (from an execution's "idle" on) until the news of its
    #: files, which comes from a worker host, is out
    hold: IopubHold = field(default_factory=IopubHold)
    #: what was delivered lately, for connections that drop and come back (replay.Journal; None: no replay)
    journal: Any = None

    def model(self) -> dict:
        """The Jupyter Server kernel model."""
        from datetime import datetime

        iso = datetime.fromtimestamp(self.last_activity, UTC).isoformat().replace("+00:00", "Z")
        return {
            "id": self.id,
            "name": self.name,
            "last_activity": iso,
            "execution_state": self.execution_state,
            "connections": len(self.connections),
        }


class Routes:
    """session id -> WebSession; kernel id -> session id; client -> session ids."""

    def __init__(self):
        self.sessions: dict[str, WebSession] = {}
        self.by_kernel: dict[str, str] = {}
        self.by_client: dict[str, set[str]] = {}

    def add(self, session: WebSession) -> None:
        self.sessions[session.id] = session
        self.by_client.setdefault(session.client, set()).add(session.id)

    def remove(self, session: WebSession) -> None:
        self.sessions.pop(session.id, None)
        ids = self.by_client.get(session.client)
        if ids is not None:
            ids.discard(session.id)
            if not ids:
                del self.by_client[session.client]
        if session.kernel is not None:
            self.detach(session)

    def attach(self, session: WebSession, kernel) -> None:
        """``kernel`` now serves ``session``."""
        session.kernel = kernel
        self.by_kernel[kernel.id] = session.id

    def detach(self, session: WebSession):
        """``session`` has no kernel any more; returns the one it had."""
        kernel, session.kernel = session.kernel, None
        if kernel is not None and self.by_kernel.get(kernel.id) == session.id:
            del self.by_kernel[kernel.id]
        return kernel

    def get(self, session_id: str) -> WebSession | None:
        return self.sessions.get(session_id)

    def owner(self, kernel_id: str) -> WebSession | None:
        sid = self.by_kernel.get(kernel_id)
        return self.sessions.get(sid) if sid else None

    def count_for(self, client: str) -> int:
        return len(self.by_client.get(client, ()))

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self):
        return iter(list(self.sessions.values()))
