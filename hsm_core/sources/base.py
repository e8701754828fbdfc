"""ComputeSource: the one extension point. A source reaches one machine and runs jobs there.

A source knows nothing of strategies, retries or time limits: the scheduler owns those.
An attempt is submitted (a durable Handle comes back), then watched: its events
(jobs.AttemptEvent) end with its result. A source raises SourceFailure when the machine
itself can no longer take jobs (the scheduler then stops using it).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from hsm_core import gpus
from hsm_core.jobs import AttemptEvent, Handle, JobSpec


class SourceFailure(Exception):
    """The source cannot run jobs (unreachable, refused, broken environment)."""


class SourceUnfit(SourceFailure):
    """The source works but cannot run this sweep (its Python lacks what the task imports):
    waiting does not help, so it leaves the sweep at once instead of reconnecting."""


@dataclass(frozen=True)
class Session:
    """What every job of a batch shares; sent once per machine, not once per job."""

    id: str  # content hash of blob: an agent that has loaded it already is not sent it again
    blob: bytes  # hydra_job.session_blob: the task function and Hydra's state
    sys_path: tuple[str, ...]  # where the launcher found the user's modules
    cwd: str  # the launcher's working directory: jobs start there
    sweep_dir: str  # hydra.sweep.dir, absolute
    main: str | None = None  # the user's main program: its script's path, or a `python -m` module's name


class ComputeSource(abc.ABC):
    def __init__(self, name: str, slots: int, weight: float = 1.0, gpu: gpus.GpuPlan = gpus.GpuPlan()) -> None:
        self.name = name
        self.max_parallel_jobs = slots
        self.slots = slots  # capped by the GPUs once they are known
        self.weight = weight  # declared capability, for the capability_based strategy
        self.gpu = gpu
        self.devices: list[gpus.Gpu] | None = gpus.configured(gpu.gpus)  # None: no GPUs to hand out
        self.inventory: list[dict[str, Any]] = []  # nvidia-smi's last reading (gpus: auto)

    @abc.abstractmethod
    async def prepare(self, session: Session) -> None:
        """Get ready to run the batch's jobs (connect, start the agent, send the shared part)."""

    @abc.abstractmethod
    async def submit(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None = None) -> Handle:
        """Start one attempt of the job, seeing only `job_gpus` (None: the source hands out no
        GPUs); returns once the machine has taken it. Cancelling the call stops it there."""

    @abc.abstractmethod
    def watch(self, handle: Handle) -> AsyncIterator[AttemptEvent]:
        """The attempt's events (jobs.AttemptEvent: Noticed, Ended, Collected, Released), to
        its last. Cancelling the iteration stops the attempt on the machine."""

    async def adopt(self, handle: Handle, job: JobSpec | None = None) -> bool:
        """Take on an attempt of `job` that an earlier process (or a link now gone) submitted,
        so that watch() follows it; False when this source cannot (the attempt is then run
        again). Called after prepare()."""
        return False

    def acknowledge(self, handle: Handle) -> None:
        """The attempt's result is recorded: the machine may drop what it kept of it."""
        return None

    async def read_gpus(self) -> list[dict[str, Any]]:
        """nvidia-smi on the machine (probe.gpu_inventory); SourceFailure when it cannot be read."""
        return []

    async def learn_gpus(self) -> None:
        """With gpus: auto, read the machine's GPUs; then fit the slots to them. Called at the
        end of prepare()."""
        if self.gpu.gpus == "auto":
            self.inventory = await self.read_gpus()
            self.devices = gpus.probed(self.inventory)
        if self.devices is not None and self.gpu.gpus_per_job:
            if len(self.devices) < self.gpu.gpus_per_job:
                raise SourceUnfit(f"{len(self.devices)} GPUs found, fewer than gpus_per_job ({self.gpu.gpus_per_job})."
                                  f" Fix: check `nvidia-smi` on that machine, or lower {self.name}'s gpus_per_job")
            self.slots = min(self.max_parallel_jobs, len(self.devices) // self.gpu.gpus_per_job)

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything this source started."""
