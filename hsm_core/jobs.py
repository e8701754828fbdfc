"""What travels through the scheduler: a job, one attempt at running it, and its outcome.

Plain data and the rules for reading it; stdlib only (it travels with the worker). Every
other room may import it; it imports none of them.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field
from typing import Any, Union


class Outcome(enum.Enum):
    """How one attempt ended; only LOST is the infrastructure's fault and worth a retry elsewhere."""

    COMPLETED = "completed"  # the task returned; its value came back
    FAILED = "failed"  # the task raised, exited by itself, crashed, or its result cannot travel
    LOST = "lost"  # the machine, connection or worker went away, or something killed the job


class StopLaunching(Exception):
    """An observer cannot keep the sweep's record (its disk is full): start no more jobs, and
    let the running ones finish."""

    def __init__(self, why: str, fix: str) -> None:
        super().__init__(f"{why}. {fix}")
        self.why = why  # short: each job that does not start says it


# The launcher's own folder in a sweep dir (journal, results, lock): never a job's dir.
LAUNCHER_FOLDER = ".hsm"
LAUNCHER_LOG = "launcher.log"  # in it: what the launcher prints once its terminal went away

# The "source" of an attempt that never reached one: its config did not compose, or no
# source was left to run it.
NOT_DISPATCHED = "launcher"

# Signals a process gets from its own faults: a crash of the task, not of the machine.
SELF_INFLICTED_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
)


@dataclass
class JobSpec:
    """One job of a batch: what the scheduler, the sources and the journal need of it, kept
    small (a sweep holds one per job). The config itself travels as `payload` only."""

    index: int  # position in the batch: results come back in this order
    num: int  # hydra.job.num
    overrides: list[str]
    key: str = ""  # the job in the journal: its overrides' hash, `.N` added for their N-th repeat in the sweep
    config_hash: str = ""  # of its composed config (Hydra's own keys aside): a resume tells a changed config by it
    subdir: str = ""  # hydra.sweep.subdir as resolved for this job: its output dir in the sweep dir
    payload: bytes | None = None  # the cloudpickled sweep config; dropped once the job is settled
    job_dir: str = ""  # hydra.sweep.dir/subdir, resolved: where the job's outputs land here
    written_sweep_dir: Any = None  # hydra.sweep.dir as the config writes it (interpolations kept)
    compose_error: str | None = None  # set when this job's config could not be composed

    @property
    def label(self) -> str:
        return f"#{self.num} ({' '.join(self.overrides) or 'no overrides'})"


@dataclass
class AttemptResult:
    """What a source reports for one attempt."""

    source: str
    outcome: Outcome
    job_return: Any = None  # Hydra's JobReturn as the worker built it
    error: str | None = None  # formatted traceback or cause
    started: float = 0.0  # wall-clock seconds, set by the scheduler
    ended: float = 0.0
    where: str = ""  # the source's own name for the attempt, when it has one (a Slurm job id and node)

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def dispatched(self) -> bool:
        """Whether the attempt ran on a source (and so took a slot there)."""
        return self.source != NOT_DISPATCHED


@dataclass(frozen=True)
class Handle:
    """One attempt as its machine knows it, named well enough for a later process to find it
    again (the journal keeps it): its source, a key unique to the attempt, and the machine's
    own names for it (a Slurm job id and the attempt's folder, a process id)."""

    source: str
    key: str
    names: dict[str, str] = field(default_factory=dict, hash=False)
    since: float = field(default=0.0, compare=False)  # when it was submitted (wall clock), when known


# What a source's watch() says of an attempt, in this order: Noticed (any number, while it
# waits or runs), Ended, Collected; Released comes once after Ended, before or after Collected.


@dataclass(frozen=True)
class Noticed:
    """What the machine's own scheduler says of the attempt (Slurm: pending, and why)."""

    state: str
    detail: str


@dataclass(frozen=True)
class Ended:
    """The job has ended (its slot is free); its outputs may still be on their way."""

    result: AttemptResult


@dataclass(frozen=True)
class Collected:
    """The job's outputs are here: the attempt's final result."""

    result: AttemptResult


@dataclass(frozen=True)
class Released:
    """Every process of the job has exited: its GPUs are free."""


AttemptEvent = Union[Noticed, Ended, Collected, Released]


@dataclass
class JobRecord:
    """Everything that happened to a job; the last attempt decides its result."""

    spec: JobSpec
    attempts: list[AttemptResult] = field(default_factory=list)
    gpus: tuple[Any, ...] = ()  # the GPUs (gpus.Gpu) of the attempt running now or last

    @property
    def final(self) -> AttemptResult | None:
        return self.attempts[-1] if self.attempts else None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for attempt in self.attempts if attempt.outcome is outcome)


class Observer:
    """Told of the sweep's events by the scheduler (the journal, the progress display, ...).
    Each event is a no-op here: an observer overrides those it cares about. One that cannot
    keep its record raises StopLaunching."""

    def job_started(self, record: JobRecord, source: str, started: float) -> None:
        """An attempt was handed to `source`."""

    def job_ended(self, record: JobRecord, attempt: AttemptResult, retrying: bool) -> None:
        """An attempt ended (or a job was settled without running); `retrying`: it runs again."""

    def job_submitted(self, record: JobRecord, handle: Handle) -> None:
        """The machine has taken the attempt: its handle (job_started came before)."""

    def job_noticed(self, record: JobRecord, source: str, state: str, detail: str) -> None:
        """What the machine's own scheduler says of a running attempt (Slurm: pending, and why),
        or `detached`: the link to its machine is gone, the attempt may still run there."""

    def job_adopted(self, record: JobRecord, handle: Handle) -> None:
        """The launcher follows an attempt again that outlived a launcher or a link (its handle)."""

    def source_changed(self, source: str, change: str, reason: str) -> None:
        """A source was `lost` (it reconnects), is `back`, was `quarantined`, or `left` the sweep."""


def classify_death(exit_code: int | None, signum: int | None) -> tuple[Outcome, str]:
    """Why a job process ended without writing a result, and whose fault it was."""
    if signum is None:
        return Outcome.FAILED, f"the job process exited with code {exit_code} before reporting a result"
    name = signal.Signals(signum).name
    if signum in SELF_INFLICTED_SIGNALS:
        return Outcome.FAILED, f"the job process crashed ({name})"
    return Outcome.LOST, f"the job process was killed by {name}"


def error_summary(text: str | None) -> str:
    """The line of a traceback or cause that says what went wrong (its last)."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no details"
