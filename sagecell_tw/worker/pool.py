# -*- test-case-name: tests.test_flood -*-
"""
The fork server's pool as decisions given ``now``: how many kernels to fork
this turn, and when a kernel has been starting for too long. The manager
(``forkserver.ForkServer``) counts its children and forks; this holds what
the pool remembers between turns (the sessions waiting, the last take, the
kernels that died starting), so a test drives it with plain numbers.
"""

from __future__ import annotations

#: How long a kernel may take from fork to bound sockets before it is killed.
START_TIMEOUT = 60.0
#: While kernels were taken this recently, the pool is refilled one fork at a
#: time: the cores go to the kernels sessions wait for and to their first
#: cells, not to kernels nobody has asked for yet.
BUSY = 0.25
#: the longest pause after kernels died while starting (it doubles from 0.2 s)
MAX_BACKOFF = 30.0


class Pool:
    """``pool_size`` kernels ready, plus one per waiting session; forks in parallel up to ``parallel_forks``."""

    def __init__(self, pool_size: int, parallel_forks: int, max_kernels: int):
        self.pool_size = pool_size
        self.parallel_forks = parallel_forks
        self.max_kernels = max_kernels
        #: sessions the daemon has waiting for a kernel (its last "demand"):
        #: the pool grows by that many, so a burst is served by parallel forks
        #: instead of one refill per take
        self.demand = 0
        self.last_take = 0.0
        #: consecutive kernels that died before they were ready, and when the
        #: next fork may happen: a broken setup must not fork in a tight loop.
        self.failures = 0
        self.next_fork = 0.0

    def forks(self, ready: int, starting: int, children: int, now: float) -> int:
        """
        How many kernels to fork now: towards the target, as many at once as
        sessions wait, up to a core each; one at a time for the pool alone
        while sessions are being served (``BUSY``); never past ``max_kernels``.
        """
        if now < self.next_fork:
            return 0
        parallel = self.parallel_forks
        if now - self.last_take < BUSY:
            parallel = min(parallel, max(1, self.demand))
        target = self.pool_size + self.demand
        return max(0, min(target - ready - starting, parallel - starting, self.max_kernels - children))

    def wanted_by(self, waiting) -> None:
        """The daemon says how many sessions wait for a kernel."""
        self.demand = max(0, min(int(waiting), self.max_kernels)) if isinstance(waiting, int) else 0

    def took(self, now: float) -> None:
        self.last_take = now

    def ready(self) -> None:
        """A kernel started: whatever made kernels die while starting is gone."""
        self.failures = 0

    def died_starting(self, now: float) -> None:
        """A kernel died before it was ready: wait longer before the next fork, each time in a row."""
        self.failures += 1
        self.next_fork = now + min(0.1 * 2**self.failures, MAX_BACKOFF)

    @staticmethod
    def overdue(started: float, now: float) -> bool:
        """A kernel forked at ``started`` has taken too long to start."""
        return now - started > START_TIMEOUT
