"""Strategies: pure functions that pick the source for the next job.

A strategy sees a snapshot of the usable sources (SourceView, in configured order) and
the name of the source it picked last, and returns the name of a source with a free
slot, or None when none has one. It never sleeps, never mutates and looks at nothing else.
Ties go to fewer past failures, then to the configured order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class SourceView:
    name: str
    slots: int
    running: int
    weight: float = 1.0  # declared capability: `weight`, else the GPU count, else 1
    failures: int = 0  # consecutive source-level failures (0 for a sound source)
    startable: int | None = None  # jobs that may start now whatever the slots (free GPUs, stagger)

    @property
    def free(self) -> int:
        free = self.slots - self.running
        return free if self.startable is None else min(free, self.startable)


Strategy = Callable[[Sequence[SourceView], Optional[str]], Optional[str]]


def round_robin(sources: Sequence[SourceView], last: str | None) -> str | None:
    """The next source after `last`, in the configured order, that has a free slot."""
    names = [source.name for source in sources]
    start = names.index(last) + 1 if last in names else 0
    for offset in range(len(sources)):
        source = sources[(start + offset) % len(sources)]
        if source.free > 0:
            return source.name
    return None


def least_loaded(sources: Sequence[SourceView], last: str | None) -> str | None:
    """The source with the lowest share of busy slots (running / slots)."""
    return _best(sources, lambda source: -source.running / source.slots)


def capability_based(sources: Sequence[SourceView], last: str | None) -> str | None:
    """The source with the most free capacity: free slots times declared weight."""
    return _best(sources, lambda source: source.free * source.weight)


def _best(sources: Sequence[SourceView], score: Callable[[SourceView], float]) -> str | None:
    candidates = [(score(source), -source.failures, -order, source.name)
                  for order, source in enumerate(sources) if source.free > 0]
    return max(candidates)[3] if candidates else None


STRATEGIES: dict[str, Strategy] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "capability_based": capability_based,
}
