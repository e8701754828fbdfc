"""The dispatch loop: the one place that owns slots, retries and cancellation.

Sources are prepared concurrently and join the pool as each becomes ready, so the first
job starts on the fastest source while slower ones are still connecting. Jobs are
composed lazily, one at a time, while the loop has nothing else to do.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import traceback
from typing import Iterable, Iterator, Sequence

from hsm_core.jobs import AttemptResult, JobRecord, JobSpec, Outcome
from hsm_core.sources.base import BatchContext, ComputeSource, SourceFailure
from hsm_core.strategies import SourceView, Strategy

log = logging.getLogger(__name__)

COMPOSER = "launcher"  # the "source" named in attempts that failed before dispatch


class NoUsableSource(Exception):
    """No source at all could take jobs; the message names each and why."""


class Scheduler:
    def __init__(
        self,
        sources: Sequence[ComputeSource],
        strategy: Strategy,
        max_retries: int,
        retry_failed_jobs: int,
    ) -> None:
        self.sources = {source.name: source for source in sources}
        self.strategy = strategy
        self.max_retries = max_retries
        self.retry_failed_jobs = retry_failed_jobs

    async def run(self, batch: BatchContext, jobs: Iterable[JobSpec], count: int) -> list[JobRecord]:
        """Run `count` jobs; returns one record per job, in the jobs' index order."""
        return await _Run(self, batch, iter(jobs), count).execute()


class _Run:
    """The state of one batch: which sources are ready, which jobs wait, which run."""

    def __init__(self, scheduler: Scheduler, batch: BatchContext, jobs: Iterator[JobSpec], count: int):
        self.scheduler = scheduler
        self.batch = batch
        self.jobs = jobs
        self.exhausted = False
        self.records: list[JobRecord | None] = [None] * count
        self.finished = 0
        self.waiting: collections.deque[JobRecord] = collections.deque()
        self.preparing: dict[asyncio.Task[None], ComputeSource] = {}
        self.ready: list[ComputeSource] = []
        self.down: dict[str, str] = {}
        self.running: dict[asyncio.Task[AttemptResult], tuple[JobRecord, ComputeSource]] = {}
        self.last_pick: str | None = None
        self.dispatched = 0

    async def execute(self) -> list[JobRecord]:
        for source in self.scheduler.sources.values():
            task = asyncio.create_task(source.prepare(self.batch), name=f"prepare-{source.name}")
            self.preparing[task] = source
        try:
            await self._loop()
        finally:
            await self._cancel_all()
        return [record for record in self.records if record is not None]

    async def _loop(self) -> None:
        while self.finished < len(self.records):
            self._dispatch()
            if not self.running and not self.preparing and not self.ready:
                self._fail_remaining()
                return
            compose_ahead = not self.exhausted and len(self.waiting) < self._slots()
            done, _ = await asyncio.wait(
                [*self.running, *self.preparing],
                timeout=0 if compose_ahead else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done and compose_ahead:
                self._compose_next()
            for task in done:
                if task in self.preparing:
                    self._on_prepared(task)  # type: ignore[arg-type]
                else:
                    self._on_attempt_done(task)  # type: ignore[arg-type]

    def _slots(self) -> int:
        return sum(source.slots for source in self.ready)

    # -- jobs in -----------------------------------------------------------------------

    def _compose_next(self) -> JobRecord | None:
        """Compose one more job, or settle it at once when its config cannot be composed."""
        while not self.exhausted:
            spec = next(self.jobs, None)
            if spec is None:
                self.exhausted = True
                return None
            record = JobRecord(spec)
            if spec.compose_error is None:
                self.waiting.append(record)
                return record
            record.attempts.append(AttemptResult(COMPOSER, Outcome.FAILED, error=spec.compose_error))
            self._finish(record)
        return None

    def _dispatch(self) -> None:
        while self.ready:
            if not self.waiting and self._compose_next() is None:
                return
            record = self.waiting[0]
            source = self._pick(record)
            if source is None:
                return
            self.waiting.popleft()
            task = asyncio.create_task(source.run(record.spec), name=f"job-{record.spec.num}")
            self.running[task] = (record, source)
            self.dispatched += 1

    def _pick(self, record: JobRecord) -> ComputeSource | None:
        """Ask the strategy, preferring sources on which this job has not been lost."""
        busy = collections.Counter(source.name for _, source in self.running.values())
        lost_on = {attempt.source for attempt in record.attempts if attempt.outcome is Outcome.LOST}
        views = [SourceView(s.name, s.slots, busy[s.name]) for s in self.ready]
        fresh = [view for view in views if view.name not in lost_on and view.free > 0]
        name = self.scheduler.strategy(fresh or views, self.last_pick)
        if name is None:
            return None
        self.last_pick = name
        return self.scheduler.sources[name]

    # -- results out -------------------------------------------------------------------

    def _on_prepared(self, task: asyncio.Task[None]) -> None:
        source = self.preparing.pop(task)
        error = task.exception()
        if error is None:
            self.ready.append(source)
            order = list(self.scheduler.sources)
            self.ready.sort(key=lambda ready: order.index(ready.name))
        else:
            self._take_down(source, error)

    def _take_down(self, source: ComputeSource, error: BaseException) -> None:
        reason = str(error) if isinstance(error, SourceFailure) else repr(error)
        if source.name not in self.down:
            log.warning("Source %s is out of this sweep: %s", source.name, reason)
        self.down[source.name] = reason
        if source in self.ready:
            self.ready.remove(source)

    def _on_attempt_done(self, task: asyncio.Task[AttemptResult]) -> None:
        record, source = self.running.pop(task)
        error = task.exception()
        if isinstance(error, SourceFailure):
            self._take_down(source, error)
            attempt = AttemptResult(source.name, Outcome.LOST, error=str(error))
        elif error is not None:
            text = "".join(traceback.format_exception(error))
            attempt = AttemptResult(source.name, Outcome.FAILED, error=f"internal error: {text}")
        else:
            attempt = task.result()
        record.attempts.append(attempt)
        if self._may_retry(record, attempt):
            log.warning("Job %s %s on %s (%s); retrying", record.spec.label, attempt.outcome.value,
                        attempt.source, error_summary(attempt.error))
            self.waiting.appendleft(record)
        else:
            self._finish(record)

    def _may_retry(self, record: JobRecord, attempt: AttemptResult) -> bool:
        if attempt.outcome is Outcome.LOST:
            return record.count(Outcome.LOST) <= self.scheduler.max_retries
        if attempt.outcome is Outcome.FAILED:
            return record.count(Outcome.FAILED) <= self.scheduler.retry_failed_jobs
        return False

    def _finish(self, record: JobRecord) -> None:
        self.records[record.spec.index] = record
        self.finished += 1

    def _fail_remaining(self) -> None:
        """Every source is down: settle the jobs left, or refuse the batch if none was tried."""
        reasons = "; ".join(f"{name}: {why}" for name, why in self.down.items()) or "no source is enabled"
        if self.dispatched == 0:
            raise NoUsableSource(f"No compute source can run jobs. {reasons}")
        while self._compose_next() is not None:
            pass
        while self.waiting:
            record = self.waiting.popleft()
            record.attempts.append(AttemptResult(COMPOSER, Outcome.LOST, error=f"no source left ({reasons})"))
            self._finish(record)

    async def _cancel_all(self) -> None:
        """Stop every running attempt and preparation, and wait until each has stopped."""
        tasks = [*self.running, *self.preparing]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def error_summary(text: str | None) -> str:
    """The line of a traceback or cause that says what went wrong (its last)."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no details"
