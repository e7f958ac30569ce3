# -*- test-case-name: tests.test_ops -*-
"""
``GET /healthz``: is the daemon alive, and is it ready for new sessions?

- ``/healthz/live``: 200 whenever the reactor answers at all (liveness; a
  service manager or orchestrator restarts the daemon when this fails).
- ``/healthz`` and ``/healthz/ready``: 200 when a spawner is connected and at
  least one kernel is forked and ready, else 503 (readiness: a load balancer
  stops sending new visitors). Both carry the same JSON body:
  ``{"live", "ready", "spawners", "pool", "kernels", "sessions", "why"}``.
  ``why`` also carries what the embedded spawner said as it died, while it
  keeps dying before its first kernel (a fault only a later start shows).

No token: probes must not need a secret, and the body holds only counts.
"""

from __future__ import annotations

from twisted.web import resource

from ..web.policy import ReadOnly, write_json


class Health:
    """Reads the managers; owns nothing."""

    def __init__(self, svc):
        self.svc = svc

    def state(self) -> dict:
        svc = self.svc
        spawners = len(svc.control.spawners) if svc.control is not None else 0
        pools = _pools(svc.kernels.pool)
        pool = sum(pools.values())
        why = []
        if not spawners:
            why.append("no spawner is connected")
        if not pool:
            why.append("no kernel is ready in the pool")
        ready = not why
        for embedded in getattr(svc, "embedded", ()):
            if embedded.failed_starts:
                why.append(
                    f"the spawner died {embedded.failed_starts} times in a row before starting a kernel "
                    f"(last: {embedded.failure})"
                )
        return {
            "live": True,
            "ready": ready,
            "spawners": spawners,
            "pool": pool,
            "pools": pools,
            "kernels": svc.kernels.live_count(),
            "sessions": len(svc.sessions.routes),
            "why": "; ".join(why),
        }

    def resource(self, kind: str = "ready") -> resource.Resource:
        """``/healthz`` and ``/healthz/ready`` (kind "ready"), ``/healthz/live`` ("live")."""
        return HealthResource(self, kind)


class HealthResource(ReadOnly):
    def __init__(self, health: Health, kind: str):
        super().__init__()
        self.health = health
        self.kind = kind

    def read(self, request):
        state = self.health.state()
        write_json(request, 200 if self.kind == "live" or state["ready"] else 503, state)
        return b""


def _pools(pool) -> dict[str, int]:
    """Pooled kernels by kernel name: Sage's master takes seconds to be ready, Python's milliseconds."""
    counts: dict[str, int] = {}
    for kernel in pool:
        if kernel.state == "pooled":
            name = getattr(kernel, "name", "python3")
            counts[name] = counts.get(name, 0) + 1
    return counts
