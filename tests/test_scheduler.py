"""The scheduler's logic, driven by fake sources (pure logic: no processes, no sleeping)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Sequence

import pytest

from hsm_core.breaker import RetryPolicy
from hsm_core.jobs import (
    AttemptEvent,
    AttemptResult,
    Collected,
    Ended,
    Handle,
    JobRecord,
    JobSpec,
    Observer,
    Outcome,
    Released,
    StopLaunching,
)
from hsm_core.scheduler import NoUsableSource, Scheduler
from hsm_core.sources.base import ComputeSource, Session, SourceFailure
from hsm_core.strategies import round_robin

SESSION = Session(id="s", blob=b"", sys_path=(), cwd="/", sweep_dir="/sweep")


class FakeSource(ComputeSource):
    """Answers each job with `behaviour(job, source)`; records what it ran."""

    def __init__(self, name: str, slots: int, behaviour: Callable[[JobSpec, "FakeSource"], Outcome],
                 prepare_error: str | None = None) -> None:
        super().__init__(name, slots)
        self.behaviour = behaviour
        self.prepare_error = prepare_error
        self.ran: list[int] = []
        self.submitted: dict[str, JobSpec] = {}
        self.running = self.peak = self.prepared = 0

    async def prepare(self, session: Session) -> None:
        self.prepared += 1
        if self.prepare_error:
            raise SourceFailure(self.prepare_error)

    async def submit(self, job: JobSpec, job_gpus: object = None) -> Handle:
        self.ran.append(job.num)
        self.running += 1
        self.peak = max(self.peak, self.running)
        handle = Handle(self.name, f"{job.num}.{len(self.ran)}")
        self.submitted[handle.key] = job
        return handle

    async def watch(self, handle: Handle) -> AsyncIterator[AttemptEvent]:
        await asyncio.sleep(0)
        self.running -= 1
        outcome = self.behaviour(self.submitted.pop(handle.key), self)
        result = AttemptResult(self.name, outcome, error=None if outcome is Outcome.COMPLETED else "cause")
        yield Ended(result)
        yield Collected(result)
        yield Released()

    async def close(self) -> None:
        pass


def jobs(count: int, compose_error_at: int | None = None) -> list[JobSpec]:
    return [JobSpec(index=i, num=i, overrides=[f"x={i}"], payload=b"",
                    compose_error="bad override" if i == compose_error_at else None) for i in range(count)]


FAST = RetryPolicy(first_delay=0.001, max_delay=0.01, quarantine_after_s=0)  # reconnections without real waiting


def run(sources: Sequence[ComputeSource], specs: list[JobSpec], max_retries: int = 3, retry_failed: int = 0):
    scheduler = Scheduler(sources, round_robin, max_retries=max_retries, retry_failed_jobs=retry_failed,
                          policy=FAST)
    return asyncio.run(scheduler.run(SESSION, specs))


def always(outcome: Outcome) -> Callable[[JobSpec, FakeSource], Outcome]:
    return lambda job, source: outcome


def test_every_job_once_in_order_and_slots_respected() -> None:
    a, b = FakeSource("a", 2, always(Outcome.COMPLETED)), FakeSource("b", 1, always(Outcome.COMPLETED))
    records = run([a, b], jobs(9))
    assert [r.spec.num for r in records] == list(range(9))
    assert all(r.final.outcome is Outcome.COMPLETED and len(r.attempts) == 1 for r in records)
    assert sorted(a.ran + b.ran) == list(range(9)) and a.ran and b.ran
    assert a.peak <= 2 and b.peak <= 1


def test_a_lost_job_moves_to_another_source() -> None:
    lost_on_a = FakeSource("a", 1, always(Outcome.LOST))
    b = FakeSource("b", 1, always(Outcome.COMPLETED))
    records = run([lost_on_a, b], jobs(4))
    assert all(r.final.outcome is Outcome.COMPLETED and r.final.source == "b" for r in records)
    assert all(r.count(Outcome.LOST) <= 1 for r in records)


def test_a_job_lost_every_time_fails_after_max_retries() -> None:
    records = run([FakeSource("a", 1, always(Outcome.LOST))], jobs(2), max_retries=2)
    assert [len(r.attempts) for r in records] == [3, 3]
    assert all(r.final.outcome is Outcome.LOST for r in records)


@pytest.mark.parametrize("retry_failed, attempts", [(0, 1), (2, 3)])
def test_task_failures_rerun_only_when_asked(retry_failed: int, attempts: int) -> None:
    [record] = run([FakeSource("a", 1, always(Outcome.FAILED))], jobs(1), retry_failed=retry_failed)
    assert len(record.attempts) == attempts and record.final.outcome is Outcome.FAILED


def test_a_job_that_cannot_be_composed_fails_alone() -> None:
    source = FakeSource("a", 2, always(Outcome.COMPLETED))
    records = run([source], jobs(4, compose_error_at=1))
    assert [r.final.outcome for r in records] == [Outcome.COMPLETED, Outcome.FAILED, Outcome.COMPLETED,
                                                  Outcome.COMPLETED]
    assert records[1].final.error == "bad override" and 1 not in source.ran


def test_a_source_that_cannot_be_prepared_is_left_out() -> None:
    down = FakeSource("down", 4, always(Outcome.COMPLETED), prepare_error="host key mismatch")
    up = FakeSource("up", 1, always(Outcome.COMPLETED))
    records = run([down, up], jobs(3))
    assert down.ran == [] and up.ran == [0, 1, 2]
    assert all(r.final.outcome is Outcome.COMPLETED for r in records)


def test_no_usable_source_refuses_the_batch_naming_each_reason() -> None:
    sources = [FakeSource("a", 1, always(Outcome.COMPLETED), prepare_error="connection refused"),
               FakeSource("b", 1, always(Outcome.COMPLETED), prepare_error="cloudpickle missing")]
    with pytest.raises(NoUsableSource, match="a: connection refused; b: cloudpickle missing"):
        run(sources, jobs(2))


def test_when_the_last_source_dies_the_remaining_jobs_fail_with_the_reason() -> None:
    def die_after_first(job: JobSpec, source: FakeSource) -> Outcome:
        if len(source.ran) > 1:
            raise SourceFailure("connection lost")
        return Outcome.COMPLETED

    records = run([FakeSource("a", 1, die_after_first)], jobs(4), max_retries=1)
    assert records[0].final.outcome is Outcome.COMPLETED
    assert all(r.final.outcome is Outcome.LOST for r in records[1:])
    assert "a: connection lost" in records[-1].final.error


def test_a_source_that_loses_its_connection_reconnects_and_takes_jobs_again() -> None:
    def drop_second_run(job: JobSpec, source: FakeSource) -> Outcome:
        if len(source.ran) == 2:
            raise SourceFailure("connection lost")
        return Outcome.COMPLETED

    flaky = FakeSource("flaky", 1, drop_second_run)
    records = run([flaky], jobs(4))
    assert all(r.final.outcome is Outcome.COMPLETED for r in records)
    assert flaky.prepared == 2 and len(flaky.ran) == 5  # one reconnection, one re-run


def test_a_source_failing_again_and_again_is_quarantined() -> None:
    def always_lost_connection(job: JobSpec, source: FakeSource) -> Outcome:
        raise SourceFailure("connection reset")

    broken = FakeSource("broken", 1, always_lost_connection)
    records = run([broken], jobs(2), max_retries=10)
    assert len(broken.ran) == FAST.quarantine_after and broken.prepared == FAST.quarantine_after
    assert all(r.final.outcome is Outcome.LOST for r in records)
    assert "no source left (broken: connection reset)" in records[-1].final.error


def test_a_retried_job_starts_from_empty_outputs() -> None:
    def lose_job_one_once(job: JobSpec, source: FakeSource) -> Outcome:
        return Outcome.LOST if job.num == 1 and source.ran.count(1) == 1 else Outcome.COMPLETED

    reset: list[int] = []
    scheduler = Scheduler([FakeSource("a", 2, lose_job_one_once)], round_robin, max_retries=3,
                          retry_failed_jobs=0, reset_outputs=lambda spec: reset.append(spec.num), policy=FAST)
    records = asyncio.run(scheduler.run(SESSION, jobs(3)))
    assert [len(r.attempts) for r in records] == [1, 2, 1]
    assert reset == [1]


class FullDisk(Observer):
    """An observer that cannot keep any record once `after` attempts have ended."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.ended = 0

    def job_ended(self, record: JobRecord, attempt: AttemptResult, retrying: bool) -> None:
        self.ended += 1
        if self.ended > self.after:
            raise StopLaunching("the disk is full", "Fix: free space")


def test_an_observer_that_cannot_record_stops_new_starts() -> None:
    """The 3rd end (a lost job's) cannot be recorded: its retry and every later job end as
    lost with the reason, none started; a second batch of the sweep starts nothing."""
    source = FakeSource("a", 1, lambda job, source: Outcome.LOST if job.num == 2 else Outcome.COMPLETED)
    scheduler = Scheduler([source], round_robin, max_retries=3, retry_failed_jobs=0, policy=FAST)
    records = asyncio.run(scheduler.run(SESSION, jobs(6), [FullDisk(after=2)]))
    assert source.ran == [0, 1, 2]
    assert [r.attempts[-1].outcome for r in records] == [Outcome.COMPLETED] * 2 + [Outcome.LOST] * 4
    assert [a.error for a in records[2].attempts] == ["cause", "not started: the disk is full"]
    assert all(r.attempts[-1].error == "not started: the disk is full" and not r.attempts[-1].dispatched
               for r in records[3:])
    later = asyncio.run(scheduler.run(SESSION, jobs(2), [FullDisk(after=0)]))
    assert source.ran == [0, 1, 2] and all(r.attempts[-1].error == "not started: the disk is full" for r in later)


class DetachingSource(FakeSource):
    """Its link breaks under every job's first watch (the job runs on over there); adopt()
    finds the job again unless `forgets` (its agent stopped it)."""

    def __init__(self, name: str, prepare_errors: int = 0, forgets: bool = False) -> None:
        super().__init__(name, 2, always(Outcome.COMPLETED))
        self.prepare_errors, self.forgets = prepare_errors, forgets
        self.watched: set[str] = set()
        self.adopted: list[str] = []

    async def prepare(self, session: Session) -> None:
        self.prepared += 1
        if self.prepared > 1 and self.prepare_errors:
            self.prepare_errors -= 1
            raise SourceFailure("unreachable")

    async def adopt(self, handle: Handle, job: JobSpec | None = None) -> bool:
        self.adopted.append(handle.key)
        if job is not None:
            self.submitted[handle.key] = job
        return not self.forgets

    async def watch(self, handle: Handle) -> AsyncIterator[AttemptEvent]:
        if handle.key not in self.watched:
            self.watched.add(handle.key)
            raise SourceFailure("the link was lost")
        async for event in super().watch(handle):
            yield event


class Told(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def job_noticed(self, record: JobRecord, source: str, state: str, detail: str) -> None:
        self.events.append((state, record.spec.num))

    def job_adopted(self, record: JobRecord, handle: Handle) -> None:
        self.events.append(("adopted", record.spec.num))


def detaching_run(sources: Sequence[ComputeSource], specs: list[JobSpec], policy: RetryPolicy = FAST,
                  adopt: Sequence[tuple[JobSpec, Handle]] = ()) -> tuple[list[JobRecord], Told]:
    told = Told()
    scheduler = Scheduler(sources, round_robin, max_retries=3, retry_failed_jobs=0, policy=policy, detach=True)
    return asyncio.run(scheduler.run(SESSION, specs, [told], adopt)), told


def test_with_detach_a_lost_links_attempts_are_held_and_adopted_when_the_source_is_back() -> None:
    source = DetachingSource("a", prepare_errors=1)
    records, told = detaching_run([source], jobs(2), RetryPolicy(first_delay=0.001, quarantine_after_s=60))
    assert all(r.attempts[-1].outcome is Outcome.COMPLETED and len(r.attempts) == 1 for r in records)
    assert source.ran == [0, 1] and sorted(source.adopted) == ["0.1", "1.2"]  # submitted once each
    assert sorted(told.events) == [("adopted", 0), ("adopted", 1), ("detached", 0), ("detached", 1)]


def test_a_held_attempt_whose_source_is_quarantined_is_lost_and_runs_elsewhere() -> None:
    gone = DetachingSource("gone", prepare_errors=100)
    other = FakeSource("other", 1, always(Outcome.COMPLETED))
    records, _ = detaching_run([gone, other], jobs(1), RetryPolicy(first_delay=0.001, quarantine_after_s=0))
    [record] = records
    assert [(a.source, a.outcome) for a in record.attempts] == [("gone", Outcome.LOST), ("other", Outcome.COMPLETED)]
    assert "gone did not come back" in (record.attempts[0].error or "")


def test_an_earlier_launchers_attempt_is_adopted_or_else_lost_and_run_again() -> None:
    kept, forgotten = DetachingSource("kept"), DetachingSource("forgot", forgets=True)
    for source in (kept, forgotten):
        source.watched.add("old")  # no link to break: this launcher reached the agent afresh
    specs = jobs(2)
    records, told = detaching_run([kept, forgotten], [],
                                  adopt=[(specs[0], Handle("kept", "old")), (specs[1], Handle("forgot", "old"))])
    assert 0 not in kept.ran + forgotten.ran  # adopted, never submitted again
    assert records[0].attempts[-1].outcome is Outcome.COMPLETED and len(records[0].attempts) == 1
    assert ("adopted", 0) in told.events
    gone = records[1].attempts[0]
    assert gone.outcome is Outcome.LOST and "was gone from forgot" in str(gone.error)
    assert records[1].attempts[-1].outcome is Outcome.COMPLETED  # run again
