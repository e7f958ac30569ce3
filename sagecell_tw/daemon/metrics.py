# -*- test-case-name: tests.test_ops -*-
"""
``GET /metrics``: the daemon's numbers in the Prometheus text format.

One private ``CollectorRegistry`` per service (never the global one), so a
test process can run several services. Gauges and the relay counters are
read from the managers at scrape time: the hot path (each relayed message)
only adds to two plain integers in the session manager, and allocates
nothing for metrics.

=====================================  ========================================
sagecell_kernels_running               kernels owned by sessions (gauge)
sagecell_pool_ready                    kernels forked and ready (gauge)
sagecell_sessions                      open sessions (gauge)
sagecell_spawners_connected            spawners on the control channel (gauge)
sagecell_spawn_seconds                 fork to ready, per kernel (histogram)
sagecell_kernels_spawned_total         kernels that became ready
sagecell_kernels_died_total            kernels that ended
sagecell_sessions_started_total        sessions created
sagecell_messages_total{direction}     messages relayed: to_kernel, from_kernel
sagecell_message_bytes_total{direction} their bytes (JSON parts and buffers)
sagecell_limits_hit_total{kind}        exec_timeout, max_kernels, ...
sagecell_spawner_restarts_total        embedded spawner restarts after a death
sagecell_spawners_lost_total           spawners that went away
=====================================  ========================================

Open to anyone who can reach the port, like /healthz: it holds counts only.
Restrict it at the reverse proxy if that matters.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web import resource

from ..core.sessions import SessionObserver
from ..web.policy import ReadOnly

SPAWN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The registry of one service, fed by the managers' observer hooks."""

    def __init__(self, svc):
        self.svc = svc
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.spawn_seconds = Histogram(
            "sagecell_spawn_seconds", "Seconds from fork to a ready kernel", buckets=SPAWN_BUCKETS, registry=r
        )
        self.spawned = Counter("sagecell_kernels_spawned", "Kernels that became ready", registry=r)
        self.died = Counter("sagecell_kernels_died", "Kernels that ended", registry=r)
        self.sessions_started = Counter("sagecell_sessions_started", "Sessions created", registry=r)
        self.limits = Counter("sagecell_limits_hit", "Limits hit, by kind", ["kind"], registry=r)
        self.spawners_lost = Counter("sagecell_spawners_lost", "Spawners that went away", registry=r)
        r.register(_Live(svc))

    def attach(self) -> None:
        svc = self.svc
        svc.sessions.observers.append(_SessionCounts(self))
        svc.kernels.observers.append(self._kernel_event)

    def attach_control(self, control) -> None:
        control.observers.append(lambda event, _spawner: event == "lost" and self.spawners_lost.inc())

    def _kernel_event(self, event: str, kernel) -> None:
        if event == "ready":
            self.spawned.inc()
            seconds = kernel.info.get("spawn_seconds")
            if isinstance(seconds, (int, float)) and seconds >= 0:
                self.spawn_seconds.observe(seconds)
        elif event == "died":
            self.died.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def resource(self) -> resource.Resource:
        return MetricsResource(self)


class _SessionCounts(SessionObserver):
    """Counts the sessions started and the limits hit."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def session_started(self, session) -> None:
        self.metrics.sessions_started.inc()

    def limit_hit(self, session, kind: str) -> None:
        self.metrics.limits.labels(kind=kind or "unknown").inc()


class _Live:
    """Numbers read from the managers when scraped."""

    def __init__(self, svc):
        self.svc = svc

    def describe(self):
        return []

    def collect(self):
        svc = self.svc
        kernels, sessions = svc.kernels, svc.sessions
        yield GaugeMetricFamily("sagecell_kernels_running", "Kernels owned by sessions", value=kernels.live_count())
        yield GaugeMetricFamily(
            "sagecell_pool_ready", "Kernels forked and ready", value=sum(1 for k in kernels.pool if k.state == "pooled")
        )
        yield GaugeMetricFamily("sagecell_sessions", "Open sessions", value=len(sessions.routes))
        spawners = len(svc.control.spawners) if svc.control is not None else 0
        yield GaugeMetricFamily("sagecell_spawners_connected", "Spawners on the control channel", value=spawners)
        messages = CounterMetricFamily("sagecell_messages", "Messages relayed", labels=["direction"])
        messages.add_metric(["to_kernel"], sessions.msgs_to_kernels)
        messages.add_metric(["from_kernel"], sessions.msgs_from_kernels)
        yield messages
        size = CounterMetricFamily("sagecell_message_bytes", "Bytes of messages relayed", labels=["direction"])
        size.add_metric(["to_kernel"], sessions.bytes_to_kernels)
        size.add_metric(["from_kernel"], sessions.bytes_from_kernels)
        yield size
        restarts = sum(embedded.restarts for embedded in svc.embedded)
        yield CounterMetricFamily("sagecell_spawner_restarts", "Embedded spawner restarts", value=restarts)


class MetricsResource(ReadOnly):
    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def read(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return self.metrics.render()
