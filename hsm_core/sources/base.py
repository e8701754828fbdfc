"""ComputeSource: the one extension point. A source reaches one machine and runs jobs there.

A source knows nothing of strategies, retries or time limits: the scheduler owns those.
It reports each attempt as an AttemptResult, and raises SourceFailure when the machine
itself can no longer take jobs (the scheduler then stops using it).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from hsm_core.jobs import AttemptResult, JobSpec


class SourceFailure(Exception):
    """The source cannot run jobs (unreachable, refused, broken environment)."""


class SourceUnfit(SourceFailure):
    """The source works but cannot run this sweep (its Python lacks what the task imports):
    waiting does not help, so it leaves the sweep at once instead of reconnecting."""


@dataclass(frozen=True)
class BatchContext:
    """What every job of a batch shares; sent once per source, not once per job."""

    sid: str  # content hash of blob: a source that has it already skips the upload
    blob: bytes  # cloudpickled (hydra_context, task_function, Singleton state)
    sys_path: tuple[str, ...]  # where the launcher found the user's modules
    cwd: str  # the launcher's working directory: jobs start there
    sweep_dir: str  # hydra.sweep.dir, absolute


class ComputeSource(abc.ABC):
    def __init__(self, name: str, slots: int, weight: float = 1.0) -> None:
        self.name = name
        self.slots = slots
        self.weight = weight  # declared capability, for the capability_based strategy

    @abc.abstractmethod
    async def prepare(self, batch: BatchContext) -> None:
        """Get ready to run the batch's jobs (connect, start the agent, send the shared part)."""

    @abc.abstractmethod
    async def run(self, job: JobSpec) -> AttemptResult:
        """Run one job to its end. Cancelling the call stops the job on the machine."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything this source started."""
