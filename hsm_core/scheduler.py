"""The dispatch loop: the one place that owns slots, retries and cancellation.

Sources are prepared concurrently and join the pool as each becomes ready, so the first
job starts on the fastest source while slower ones are still connecting. Jobs are
composed lazily, one at a time, while the loop has nothing else to do. Must not know how
a source reaches its machine, Hydra, or what observers (journal, progress) do with events.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import traceback
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence, cast

from hsm_core import gpus
from hsm_core.breaker import RetryPolicy, SourceBreaker, State
from hsm_core.jobs import (
    NOT_DISPATCHED,
    AttemptEvent,
    AttemptResult,
    Collected,
    Ended,
    Handle,
    JobRecord,
    JobSpec,
    Noticed,
    Observer,
    Outcome,
    Released,
    StopLaunching,
)
from hsm_core.sources.base import ComputeSource, Session, SourceFailure, SourceUnfit
from hsm_core.strategies import SourceView, Strategy

log = logging.getLogger(__name__)

GPU_RECHECK_SECONDS = 5.0  # how often GPUs skipped for their memory use are read again


class NoUsableSource(Exception):
    """No source at all could take jobs; the message names each and why."""


@dataclasses.dataclass
class Detached:
    """An attempt that may still run on a machine the launcher cannot reach now: adopted when
    its source is back, lost when the source leaves the sweep."""

    record: JobRecord
    handle: Handle
    token: object  # its GPUs stay held meanwhile
    started: float


class Scheduler:
    def __init__(
        self,
        sources: Sequence[ComputeSource],
        strategy: Strategy,
        max_retries: int,
        retry_failed_jobs: int,
        reset_outputs: Callable[[JobSpec], None] = lambda spec: None,
        policy: RetryPolicy = RetryPolicy(),
        detach: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sources = {source.name: source for source in sources}
        self.strategy = strategy
        self.max_retries = max_retries
        self.retry_failed_jobs = retry_failed_jobs
        self.reset_outputs = reset_outputs  # fencing: a retry starts from an empty output dir
        self.detach = detach  # a lost link leaves its attempts running there (detach_grace), to adopt
        self.clock = clock
        self.wall_clock = wall_clock
        # Kept across batches: a quarantined source stays out for the rest of the sweep, and
        # a GPU stays held while a finished job's leftover process runs on.
        self.breakers = {source.name: SourceBreaker(policy) for source in sources}
        self.pools: dict[str, gpus.GpuPool] = {}
        self.next_start: dict[str, float] = {}  # stagger_s: no job starts on a source before this
        self.skipped_logged: set[tuple[str, gpus.Gpu]] = set()
        self.stopped: str | None = None  # why no job starts any more, for the rest of the sweep
        # Attempts with a result whose GPUs wait for a leftover process of the job to exit.
        self.lingering: set[asyncio.Task[None]] = set()

    def stop_launching(self, stop: StopLaunching) -> None:
        """Start no more jobs in this sweep (the running ones finish); said once."""
        if self.stopped is None:
            self.stopped = stop.why
            log.error("Starting no more jobs: %s", stop)

    async def run(self, session: Session, jobs: Iterable[JobSpec], observers: Sequence[Observer] = (),
                  adopt: Sequence[tuple[JobSpec, Handle]] = ()) -> list[JobRecord]:
        """Run the jobs; returns one record per job, in the jobs' index order. The jobs of
        `adopt` are attempts an earlier launcher left running: each is adopted on its source
        (its handle's) once that source is ready, and run again only when it cannot be."""
        run = _Run(self, session, iter(jobs), observers)
        for spec, handle in adopt:
            run.hold(JobRecord(spec), handle, object())
        return await run.execute()

    async def close(self) -> None:
        """Stop following lingering attempts (their sources are closed: nothing holds a GPU)."""
        for task in self.lingering:
            task.cancel()
        await asyncio.gather(*self.lingering, return_exceptions=True)


class _Run:
    """The state of one batch: which sources are ready, which jobs wait, which run."""

    def __init__(self, scheduler: Scheduler, session: Session, jobs: Iterator[JobSpec],
                 observers: Sequence[Observer]):
        self.scheduler = scheduler
        self.observers = observers
        self.session = session
        self.jobs = jobs
        self.exhausted = False
        self.records: dict[int, JobRecord] = {}
        self.waiting: collections.deque[JobRecord] = collections.deque()
        self.preparing: dict[asyncio.Task[None], ComputeSource] = {}
        self.ready: list[ComputeSource] = []
        self.running: dict[asyncio.Task[AttemptResult], tuple[JobRecord, ComputeSource, float, object]] = {}
        self.collecting: set[asyncio.Task[AttemptResult]] = set()  # running, but no longer in a slot
        self.last_pick: str | None = None
        self.dispatched = 0
        self.wake = asyncio.Event()  # a GPU came free, or was read again
        self.waking = asyncio.ensure_future(self.wake.wait())  # the wait on `wake` now pending
        self.rechecks: dict[str, asyncio.Task[None]] = {}
        self.handles: dict[asyncio.Task[AttemptResult], Handle] = {}  # of the running attempts submitted
        self.detached: dict[str, list[Detached]] = collections.defaultdict(list)  # by source name

    def hold(self, record: JobRecord, handle: Handle, token: object) -> None:
        """Keep an attempt an earlier launcher left running, to adopt it once its source is
        ready (a job of a source this launch does not have, or has put out, simply runs)."""
        breaker = self.scheduler.breakers.get(handle.source)
        if breaker is None or breaker.state is State.QUARANTINED:
            self.waiting.append(record)
            return
        started = handle.since or self.scheduler.wall_clock()
        self.dispatched += 1
        self._tell("job_started", record, handle.source, started)
        self.detached[handle.source].append(Detached(record, handle, token, started))

    async def execute(self) -> list[JobRecord]:
        for source in self.scheduler.sources.values():
            if self.scheduler.breakers[source.name].state is not State.QUARANTINED:
                self._prepare(source)
        try:
            await self._loop()
        finally:
            self.waking.cancel()
            await self._cancel_all()
        return [self.records[index] for index in sorted(self.records)]

    def _prepare(self, source: ComputeSource) -> None:
        task = asyncio.create_task(source.prepare(self.session), name=f"prepare-{source.name}")
        self.preparing[task] = source

    async def _loop(self) -> None:
        while not (self.exhausted and not self.waiting and not self.running and not any(self.detached.values())):
            if self.scheduler.stopped:
                self._settle_remaining(f"not started: {self.scheduler.stopped}")
                if not self.running:
                    return
            self._reconnect_due_sources()
            self._dispatch()
            next_retry = self._next_retry()
            if not self.running and not self.preparing and not self.ready and next_retry is None:
                for name in list(self.detached):
                    self._lose_detached(name, "no source is left")
                self._fail_remaining()
                return
            compose_ahead = not self.exhausted and len(self.waiting) < self._slots()
            due = [delay for delay in (next_retry, self._next_stagger()) if delay is not None]
            timeout = 0 if compose_ahead else min(due, default=None)
            waited: list[asyncio.Future[Any]] = [*self.running, *self.preparing, self.waking]
            done, _ = await asyncio.wait(waited, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if self.waking in done:
                done.discard(self.waking)
                self.wake.clear()
                self.waking = asyncio.ensure_future(self.wake.wait())
            if not done and compose_ahead:
                self._compose_next()
            for task in done:
                if task in self.preparing:
                    self._on_prepared(cast("asyncio.Task[None]", task))
                else:
                    self._on_attempt_done(cast("asyncio.Task[AttemptResult]", task))

    def _slots(self) -> int:
        """Slots of every source that is or may become ready: jobs composed ahead for them
        are ready to go the moment a source finishes connecting."""
        breakers = self.scheduler.breakers
        return sum(source.slots for source in self.scheduler.sources.values()
                   if breakers[source.name].state is not State.QUARANTINED)

    def _reconnecting(self) -> list[ComputeSource]:
        preparing = set(self.preparing.values())
        return [source for source in self.scheduler.sources.values()
                if self.scheduler.breakers[source.name].state is State.RECONNECTING and source not in preparing]

    def _next_retry(self) -> float | None:
        """Seconds until the next source is due to reconnect, or None when none will."""
        times = [self.scheduler.breakers[source.name].retry_at or 0.0 for source in self._reconnecting()]
        return max(0.0, min(times) - self.scheduler.clock()) if times else None

    def _reconnect_due_sources(self) -> None:
        now = self.scheduler.clock()
        for source in self._reconnecting():
            if (self.scheduler.breakers[source.name].retry_at or 0.0) <= now:
                self._prepare(source)

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
            self._settle(record, AttemptResult(NOT_DISPATCHED, Outcome.FAILED, error=spec.compose_error))
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
            if record.attempts:
                self.scheduler.reset_outputs(record.spec)
            token, job_gpus = object(), None
            pool = self.scheduler.pools.get(source.name)
            if pool is not None:
                job_gpus = pool.take(token) if pool.per_job else ()
            record.gpus = tuple(job_gpus or ())
            if source.gpu.stagger_s:
                self.scheduler.next_start[source.name] = self.scheduler.clock() + source.gpu.stagger_s
            started = self.scheduler.wall_clock()
            self._follow(record, source, self._attempt(record, source, job_gpus, token), started, token)
            self.dispatched += 1
            self._tell("job_started", record, source.name, started)
            if self.scheduler.stopped:
                return

    def _follow(self, record: JobRecord, source: ComputeSource, attempt: Any, started: float,
                token: object) -> None:
        """Run an attempt's coroutine as a task of this batch."""
        task = asyncio.create_task(attempt, name=f"job-{record.spec.num}")
        self.running[task] = (record, source, started, token)

    def _pick(self, record: JobRecord) -> ComputeSource | None:
        """Ask the strategy, preferring sources on which this job has not been lost."""
        busy = collections.Counter(source.name for task, (_, source, _, _) in self.running.items()
                                   if task not in self.collecting)
        lost_on = {attempt.source for attempt in record.attempts if attempt.outcome is Outcome.LOST}
        breakers = self.scheduler.breakers
        views = [SourceView(s.name, s.slots, busy[s.name], s.weight, breakers[s.name].failures, self._startable(s))
                 for s in self.ready]
        fresh = [view for view in views if view.name not in lost_on and view.free > 0]
        name = self.scheduler.strategy(fresh or views, self.last_pick)
        if name is None:
            return None
        self.last_pick = name
        return self.scheduler.sources[name]

    def _startable(self, source: ComputeSource) -> int | None:
        """Jobs that may start on the source now whatever its slots: 0 while its stagger_s
        runs, else as many as its usable GPUs allow (None: no limit)."""
        if self.scheduler.next_start.get(source.name, 0.0) > self.scheduler.clock():
            return 0
        pool = self.scheduler.pools.get(source.name)
        if pool is None:
            return None
        if self.waiting and pool.skipped():
            self._recheck_gpus_later(source, pool)
        return pool.capacity()

    def _next_stagger(self) -> float | None:
        """Seconds until a source waiting out its stagger_s may start a job again."""
        if not self.waiting:
            return None
        now = self.scheduler.clock()
        later = [at - now for at in self.scheduler.next_start.values() if at > now]
        return min(later, default=None)

    def _recheck_gpus_later(self, source: ComputeSource, pool: gpus.GpuPool) -> None:
        """Read the memory of GPUs skipped for another user's job again in a while."""
        if source.name in self.rechecks:
            return

        async def recheck() -> None:
            await asyncio.sleep(GPU_RECHECK_SECONDS)
            try:
                pool.read_memory(await source.read_gpus())
            except SourceFailure as failure:
                log.warning("Could not read the GPUs of %s again: %s", source.name, failure)
            finally:
                del self.rechecks[source.name]
                self.wake.set()

        self.rechecks[source.name] = asyncio.create_task(recheck(), name=f"gpus-{source.name}")

    def _take_gpus_of(self, source: ComputeSource) -> None:
        """A source that manages GPUs (set, or read when it got ready) gets its pool."""
        if source.devices is None:
            return
        pool = self.scheduler.pools.get(source.name)
        if pool is None or pool.devices != source.devices:
            pool = self.scheduler.pools[source.name] = gpus.GpuPool(
                source.devices, source.gpu.gpus_per_job, source.gpu.min_free_memory_mb)
        pool.read_memory(source.inventory)
        for gpu in pool.skipped():
            if (source.name, gpu) not in self.scheduler.skipped_logged:
                self.scheduler.skipped_logged.add((source.name, gpu))
                log.info("GPU %d of %s is skipped while it has %.0f MiB free (min_free_memory_mb is %.0f):"
                         " another job uses it; it is used once it frees up", gpu.index, source.name,
                         pool.free_memory_mb.get(gpu.ident, 0), pool.min_free_memory_mb)

    def _release_gpus(self, source: ComputeSource, token: object) -> None:
        """Give a job's GPUs back (its last process has exited, or it never ran)."""
        pool = self.scheduler.pools.get(source.name)
        if pool is not None:
            pool.release(token)
            self.wake.set()

    async def _attempt(self, record: JobRecord, source: ComputeSource, job_gpus: Sequence[gpus.Gpu] | None,
                       token: object) -> AttemptResult:
        """One attempt from its submission to its result, told by the source's events: the slot
        frees when the job ends, its GPUs once its last process has exited (maybe later)."""
        handle = await source.submit(record.spec, job_gpus)
        self._tell("job_submitted", record, handle)
        return await self._watch(record, source, handle, token)

    async def _adopt(self, record: JobRecord, source: ComputeSource, handle: Handle, token: object) -> AttemptResult:
        """Follow an attempt that outlived a launcher or a link, or call it lost when it is gone."""
        if not await source.adopt(handle, record.spec):
            return AttemptResult(source.name, Outcome.LOST, error=f"the attempt was gone from {source.name} when the"
                                 " launcher came back for it (its agent had stopped it: detach_grace over, or 0)")
        log.info("Job %s adopted on %s: it ran on while the launcher was away", record.spec.label, source.name)
        self._tell("job_adopted", record, handle)
        return await self._watch(record, source, handle, token)

    async def _watch(self, record: JobRecord, source: ComputeSource, handle: Handle, token: object) -> AttemptResult:
        self.handles[cast("asyncio.Task[AttemptResult]", asyncio.current_task())] = handle
        events = source.watch(handle)
        async for event in events:
            if isinstance(event, Noticed):
                self._tell("job_noticed", record, source.name, event.state, event.detail)
            elif isinstance(event, Ended):
                self.collecting.add(cast("asyncio.Task[AttemptResult]", asyncio.current_task()))
                self.wake.set()
            elif isinstance(event, Released):
                self._release_gpus(source, token)
                token = None
            elif isinstance(event, Collected):
                if token is not None:
                    self._follow_release(events, source, token)
                return event.result
        raise SourceFailure(f"{source.name} ended an attempt's events without its result")

    def _follow_release(self, events: AsyncIterator[AttemptEvent], source: ComputeSource, token: object) -> None:
        """Hold the attempt's GPUs until the source says its last process has exited."""

        async def follow() -> None:
            async for event in events:
                if isinstance(event, Released):
                    break
            self._release_gpus(source, token)

        task = asyncio.create_task(follow(), name=f"release-{source.name}")
        self.scheduler.lingering.add(task)
        task.add_done_callback(self.scheduler.lingering.discard)

    # -- results out -------------------------------------------------------------------

    def _on_prepared(self, task: asyncio.Task[None]) -> None:
        source = self.preparing.pop(task)
        error = task.exception()
        breaker = self.scheduler.breakers[source.name]
        if error is not None:
            self._mark_failed(source, error)
            return
        if breaker.state is State.RECONNECTING:
            log.info("Source %s is back", source.name)
            self._tell("source_changed", source.name, "back", "")
        breaker.ready()
        self._take_gpus_of(source)
        self.ready.append(source)
        order = list(self.scheduler.sources)
        self.ready.sort(key=lambda ready: order.index(ready.name))
        pool = self.scheduler.pools.get(source.name)
        for held in self.detached.pop(source.name, []):
            if pool is not None and held.token not in pool.held and held.handle.names.get("gpus"):
                # An earlier launcher's job: the GPUs its handle names are its own until it is released.
                held.record.gpus = pool.hold(held.token, [int(index) for index in held.handle.names["gpus"].split(",")])
            self._follow(held.record, source, self._adopt(held.record, source, held.handle, held.token), held.started,
                         held.token)

    def _mark_failed(self, source: ComputeSource, error: BaseException) -> None:
        """Record a source-level failure; its breaker says whether the source comes back."""
        reason = str(error) if isinstance(error, SourceFailure) else repr(error)
        breaker = self.scheduler.breakers[source.name]
        leaves = breaker.state is State.STARTING or isinstance(error, SourceUnfit)
        state = breaker.failed(self.scheduler.clock(), reason, permanent=isinstance(error, SourceUnfit))
        if leaves:
            log.warning("Source %s is out of this sweep: %s", source.name, reason)
        elif state is State.QUARANTINED:
            log.warning("Source %s is quarantined for the rest of the sweep after %d failures in a row over %.0fs: %s",
                        source.name, breaker.failures, self.scheduler.clock() - breaker.failing_since, reason)
        else:
            log.warning("Source %s lost: %s; reconnecting in %.0fs", source.name, reason,
                        (breaker.retry_at or 0.0) - self.scheduler.clock())
        change = "left" if leaves else "quarantined" if state is State.QUARANTINED else "lost"
        self._tell("source_changed", source.name, change, reason)
        if change != "lost":
            self._lose_detached(source.name, f"{source.name} did not come back ({reason})")

    def _lose_detached(self, name: str, why: str) -> None:
        """The attempts held for a source that will not be back are lost (run again elsewhere)."""
        for held in self.detached.pop(name, []):
            self._release_gpus(self.scheduler.sources[name], held.token)
            self._conclude(held.record, AttemptResult(name, Outcome.LOST, error=why), held.started)

    def _on_attempt_done(self, task: asyncio.Task[AttemptResult]) -> None:
        record, source, started, token = self.running.pop(task)
        self.collecting.discard(task)
        handle = self.handles.pop(task, None)
        error = task.exception()
        if isinstance(error, SourceFailure):
            if source in self.ready:  # the first of its running jobs to report the cause
                self.ready.remove(source)
                self._mark_failed(source, error)
            if (self.scheduler.detach and handle is not None
                    and self.scheduler.breakers[source.name].state is State.RECONNECTING):
                self._tell("job_noticed", record, source.name, "detached", f"the link to {source.name} was lost"
                           f" ({error}); the job may run on there, and is adopted when {source.name} is back")
                self.detached[source.name].append(Detached(record, handle, token, started))
                return
        if error is not None:  # the job and its processes are gone with it
            self._release_gpus(source, token)
        if isinstance(error, SourceFailure):
            attempt = AttemptResult(source.name, Outcome.LOST, error=str(error))
        elif error is not None:
            text = "".join(traceback.format_exception(error))
            attempt = AttemptResult(source.name, Outcome.FAILED, error=f"internal error: {text}")
        else:
            attempt = task.result()
            self.scheduler.breakers[source.name].worked()
        self._conclude(record, attempt, started)
        if handle is not None and error is None:
            source.acknowledge(handle)  # recorded: the machine may drop its copy

    def _conclude(self, record: JobRecord, attempt: AttemptResult, started: float) -> None:
        """Record an attempt's end; the job runs again or is finished."""
        attempt.started, attempt.ended = started, self.scheduler.wall_clock()
        record.attempts.append(attempt)
        retrying = self._may_retry(record, attempt)
        if retrying:
            self.waiting.appendleft(record)
        self._tell("job_ended", record, attempt, retrying)
        if not retrying:
            self._finish(record)

    def _tell(self, event: str, *details: Any) -> None:
        """Tell every observer of an event (an Observer method's name); one that cannot keep
        its record stops launching."""
        for observer in self.observers:
            try:
                getattr(observer, event)(*details)
            except StopLaunching as why:
                self.scheduler.stop_launching(why)

    def _may_retry(self, record: JobRecord, attempt: AttemptResult) -> bool:
        if self.scheduler.stopped:
            return False
        if attempt.outcome is Outcome.LOST:
            return record.count(Outcome.LOST) <= self.scheduler.max_retries
        if attempt.outcome is Outcome.FAILED:
            return record.count(Outcome.FAILED) <= self.scheduler.retry_failed_jobs
        return False

    def _settle(self, record: JobRecord, attempt: AttemptResult) -> None:
        """End a job without running it (it cannot be composed, or no source is left)."""
        attempt.started = attempt.ended = self.scheduler.wall_clock()
        record.attempts.append(attempt)
        self._tell("job_ended", record, attempt, False)
        self._finish(record)

    def _finish(self, record: JobRecord) -> None:
        self.records[record.spec.index] = record

    def _fail_remaining(self) -> None:
        """Every source is down: settle the jobs left, or refuse the batch if none was tried."""
        reasons = "; ".join(f"{name}: {breaker.reason}" for name, breaker in self.scheduler.breakers.items()
                            if breaker.reason) or "no source is enabled"
        if self.dispatched == 0:
            raise NoUsableSource(f"No compute source can run jobs. {reasons}")
        self._settle_remaining(f"no source left ({reasons})")

    def _settle_remaining(self, why: str) -> None:
        """End every job not yet started as lost, for `why`: a resume runs them."""
        while self._compose_next() is not None:
            pass
        while self.waiting:
            self._settle(self.waiting.popleft(), AttemptResult(NOT_DISPATCHED, Outcome.LOST, error=why))

    async def _cancel_all(self) -> None:
        """Stop every running attempt and preparation, and wait until each has stopped."""
        tasks = [*self.running, *self.preparing, *self.rechecks.values()]
        for _, source, _, token in self.running.values():
            self._release_gpus(source, token)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
