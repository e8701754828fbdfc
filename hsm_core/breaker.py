"""A circuit breaker per source: when to try a failing source again, and when to stop trying.

Pure functions of time: the scheduler owns the clock and asks these; they never sleep,
so tests drive them with plain numbers. Must not know sources, connections or jobs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    """Where a source stands in the sweep."""

    STARTING = "starting"  # being connected and prepared for the first time
    READY = "ready"  # takes jobs
    RECONNECTING = "reconnecting"  # failed; tried again at `retry_at`
    QUARANTINED = "quarantined"  # out for the rest of the sweep


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 1.0  # seconds before the first reconnection
    factor: float = 2.0
    max_delay: float = 30.0
    # A source is out for good after this many failures in a row spanning this many seconds:
    # a laptop waking refuses connections for a few seconds, which is no lost machine.
    quarantine_after: int = 3
    quarantine_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Backoff before the attempt that follows `failures` consecutive failures (>= 1)."""
        return min(self.max_delay, self.first_delay * self.factor ** (failures - 1))


@dataclass
class SourceBreaker:
    """One source's failures and what follows from them (a circuit breaker)."""

    policy: RetryPolicy
    state: State = State.STARTING
    failures: int = 0  # consecutive, reset by a success
    failing_since: float = 0.0  # when the first of them happened
    retry_at: float | None = None
    reason: str = ""

    def ready(self) -> None:
        """Connected and prepared. Failures still count until a job goes through."""
        self.state, self.retry_at = State.READY, None

    def worked(self) -> None:
        """An attempt ran to its end (whatever the task did): the source is sound."""
        self.failures = 0

    def failed(self, now: float, reason: str, permanent: bool = False) -> State:
        """Record a failure: reconnect later, or quarantine. A source that never became
        ready (refused, unreachable, wrong host key, mismatched Python) or whose failure is
        `permanent` (it cannot load the task) is not retried: those causes need the user.
        One that worked is quarantined only once its failures last (RetryPolicy)."""
        self.failures += 1
        self.failing_since = now if self.failures == 1 else self.failing_since
        self.reason = reason
        lasting = (self.failures >= self.policy.quarantine_after
                   and now - self.failing_since >= self.policy.quarantine_after_s)
        if permanent or self.state is State.STARTING or lasting:
            self.state, self.retry_at = State.QUARANTINED, None
        else:
            self.state, self.retry_at = State.RECONNECTING, now + self.policy.delay(self.failures)
        return self.state
