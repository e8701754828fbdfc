"""Strategies: pure functions that pick the source for the next job.

A strategy sees a snapshot of the sources (SourceView) and the name of the source it
picked last, and returns the name of a source with a free slot, or None when none has
one. It never sleeps, never mutates and never looks at anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class SourceView:
    name: str
    slots: int
    running: int

    @property
    def free(self) -> int:
        return self.slots - self.running


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


STRATEGIES: dict[str, Strategy] = {"round_robin": round_robin}
