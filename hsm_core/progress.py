"""Where a sweep stands: a line per job start and end and a periodic summary in the log,
or, on a terminal, one live status line instead; and a summary per source at the end.

An observer of the scheduler's events (jobs.JobRecord in, text out): must not know the
scheduler, the sources or the journal."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from hsm_core import gpus
from hsm_core.console import CONSOLE, Console
from hsm_core.jobs import AttemptResult, JobRecord, Observer, Outcome, error_summary

log = logging.getLogger(__name__)


@dataclass
class SourceTally:
    slots: int
    busy: int = 0
    jobs: int = 0
    failed: int = 0
    retried: int = 0
    durations: list[float] = field(default_factory=list)


class Progress(Observer):
    """A scheduler Observer for a whole sweep, whose sweeper may launch several batches
    (adaptive sweepers: one per `n_jobs` trials). `live` draws a status line on `stream`
    instead of log lines. With `planned` (the sweeper's n_trials) jobs count to it across
    batches, and the summary per source comes once, at the end; without, jobs count to the
    batches announced so far, with the batch number from the second batch on."""

    def __init__(self, planned: int | None = None, live: bool = False, console: Console = CONSOLE,
                 summary_every: float = 30.0) -> None:
        self.planned = planned
        self.announced = 0  # jobs of the batches so far (resumed ones aside)
        self.restored = 0  # jobs an earlier launch completed (resume)
        self.batches = 0
        self.tallies: dict[str, SourceTally] = {}
        self.drawing = live  # a status line while the console is a terminal (it may go away: SIGHUP)
        self.console = console
        self.summary_every = summary_every
        self.started_jobs: set[int] = set()  # job nums: a retried job is still one job
        self.outcomes: collections.Counter[Outcome] = collections.Counter()
        self.retried_jobs: set[int] = set()
        self.failures: list[tuple[JobRecord, AttemptResult]] = []
        self.began = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None

    def begin_batch(self, jobs: int, restored: int, sources: Sequence[tuple[str, int]]) -> None:
        """A batch of `jobs` to run (`restored` more were completed by an earlier launch)."""
        self.batches += 1
        self.announced += jobs
        self.restored += restored
        for name, slots in sources:
            self.tally(name).slots = slots

    @property
    def total(self) -> int:
        if self.planned:
            return max(self.planned, self.announced + self.restored)
        return self.announced

    def counted(self, jobs: int) -> str:
        """`[jobs/total]`, and the batch when the total is only what was announced so far."""
        batch = f" batch {self.batches}" if self.planned is None and self.batches > 1 else ""
        return f"[{self.with_restored(jobs)}/{self.total}{batch}]"

    def with_restored(self, jobs: int) -> int:
        """`jobs` of this launch, plus those an earlier one completed when the total is the sweep's."""
        return jobs + (self.restored if self.planned else 0)

    # -- the Observer protocol ----------------------------------------------------------

    def job_started(self, record: JobRecord, source: str, started: float) -> None:
        self.started_jobs.add(record.spec.num)
        self.tally(source).busy += 1
        if not self.live:
            attempt = len(record.attempts) + 1
            again = f" (attempt {attempt})" if attempt > 1 else ""
            log.info(f"{self.counted(len(self.started_jobs))} job {record.spec.label} started on {source}"
                     f"{gpus.label(record.gpus)}{again}")
        self.draw()

    def job_ended(self, record: JobRecord, attempt: AttemptResult, retrying: bool) -> None:
        tally = self.tally(attempt.source)
        if attempt.dispatched:  # one settled without running never took a slot
            tally.busy -= 1
        tally.jobs += 1
        tally.durations.append(attempt.duration)
        if retrying:
            tally.retried += 1
            self.retried_jobs.add(record.spec.num)
        else:
            self.outcomes[attempt.outcome] += 1
            if attempt.outcome is not Outcome.COMPLETED:
                tally.failed += 1
                self.failures.append((record, attempt))
        where = f" ({attempt.where})" if attempt.where else ""
        line = (f"{self.counted(sum(self.outcomes.values()))} job {record.spec.label} {attempt.outcome.value}"
                f" on {attempt.source}{where} after {attempt.duration:.1f}s")
        if attempt.outcome is not Outcome.COMPLETED:  # shown on a terminal too: it needs attention
            log.warning(f"{line} ({error_summary(attempt.error)}){'; retrying' if retrying else ''}")
        elif not self.live:
            log.info(line)
        self.draw()

    # -- display --------------------------------------------------------------------------

    def tally(self, source: str) -> SourceTally:
        return self.tallies.setdefault(source, SourceTally(slots=0))

    @property
    def done(self) -> int:
        return self.with_restored(sum(self.outcomes.values()))

    @property
    def running(self) -> int:
        return sum(tally.busy for tally in self.tallies.values())

    def summary(self) -> str:
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (f"Progress: {self.done}/{self.total} ({share:.1f}%) - {self.outcomes[Outcome.COMPLETED]} completed,"
                f" {self.total_failed} failed, {len(self.retried_jobs)} retried, {self.running} running")

    @property
    def total_failed(self) -> int:
        return self.outcomes[Outcome.FAILED] + self.outcomes[Outcome.LOST]

    def eta(self) -> str:
        durations = [d for tally in self.tallies.values() for d in tally.durations]
        slots = sum(tally.slots for tally in self.tallies.values()) or 1
        if not durations:
            return "?"
        seconds = (self.total - self.done) * (sum(durations) / len(durations)) / slots
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    @property
    def live(self) -> bool:
        return self.drawing and self.console.on_terminal

    def draw(self) -> None:
        if not self.live:
            return
        busy = " ".join(f"{name} {tally.busy}/{tally.slots}" for name, tally in self.tallies.items() if tally.slots)
        self.console.show(f"{busy} | {self.done}/{self.total}: {self.outcomes[Outcome.COMPLETED]} completed,"
                          f" {self.total_failed} failed, {self.running} running, ETA {self.eta()}")

    def start(self) -> None:
        """Begin the periodic summary (log) or refresh (live)."""
        self.timer = asyncio.get_running_loop().call_later(1.0 if self.live else self.summary_every, self._tick)

    def _tick(self) -> None:
        if self.live:
            self.draw()
        else:
            log.info(self.summary())
        self.start()

    def finish(self) -> None:
        """At a batch's end: stop the timer; at the sweep's end (or a batch's, when the
        sweep's size is unknown), log the summary per source and every failed job's cause."""
        if self.timer is not None:
            self.timer.cancel()
        if self.live:
            self.console.hide()
        log.info(self.summary())
        if self.planned and self.done < self.planned:
            return  # more batches follow
        rows = [("SOURCE", "JOBS", "FAILED", "RETRIED", "MEAN", "MAX")]
        for name, tally in self.tallies.items():
            if tally.jobs:
                mean = sum(tally.durations) / len(tally.durations)
                rows.append((name, str(tally.jobs), str(tally.failed), str(tally.retried), f"{mean:.1f}s",
                             f"{max(tally.durations):.1f}s"))
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        for row in rows if len(rows) > 1 else []:  # no job ended (interrupted): no table
            log.info("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        for record, attempt in self.failures:
            log.error(f"Job {record.spec.label} {attempt.outcome.value} on {attempt.source}:"
                      f" {error_summary(attempt.error)}")
        self.failures.clear()
