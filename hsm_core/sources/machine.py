"""A compute source as a composition: a channel (how the launcher reaches the machine's
worker agent: a pipe to a child process here, or an SSH connection) and a provider (where
the jobs run: processes the agent forks, or Slurm jobs it submits), after Parsl's split of
channel, provider and executor.

MachineSource owns an attempt's life as events (ComputeSource.watch); the channel owns
the machine's reach and the files around a job (placement, fencing, pulls); the provider
owns starting, ending and adopting jobs. None knows strategies, retries or time limits.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from hsm_core import gpus
from hsm_core.jobs import AttemptEvent, AttemptResult, Collected, Ended, Handle, JobSpec, Noticed, Released
from hsm_core.settings import RemoteSettings
from hsm_core.sources.agent import AgentClient, ByteReader, ByteWriter
from hsm_core.sources.base import ComputeSource, Session, SourceFailure, SourceUnfit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a session's jobs run on the machine, in the machine's own paths."""

    cwd: str
    sweep_dir: str | None  # None: the sweep dir the config names (this machine's)
    sys_path: list[str]
    main: str | None


@dataclass(frozen=True)
class Spawned:
    """A process a channel started on its machine: its stdout and stdin (another worker
    agent's link) and how to end it (its input closed, then waited for)."""

    reader: ByteReader
    writer: ByteWriter
    connection_errors: tuple[type[BaseException], ...]  # what the streams raise when the link ends
    end: Callable[[], Awaitable[None]]


class Channel(abc.ABC):
    """How the launcher reaches a machine's worker agent, and the files around a job there."""

    agent: AgentClient | None = None
    remote: RemoteSettings | None = None  # None: this machine, as the launcher runs it
    home = ""  # the login user's home there
    pull_interval: float | None = None  # seconds between two while_running() calls; None: none

    @abc.abstractmethod
    async def open(self, session: Session) -> None:
        """Reach the machine (again, when its agent is gone) and make the session's files
        present there; `agent` then serves it."""

    @abc.abstractmethod
    def placement(self, session: Session) -> Placement:
        """Where the session's jobs run there."""

    def where(self) -> str:
        """The machine, for a refusal's text ("" for this machine)."""
        return ""

    async def spawn(self, program: str) -> Spawned:
        """Start `program` (a shell command) there as the agent was started (after the setup
        lines and env): a Slurm allocation's worker agent, by srun."""
        raise SourceFailure(f"{type(self).__name__} cannot start processes")

    async def before_job(self, job: JobSpec) -> None:
        """Make the job's output dir there empty (a retry starts from nothing)."""
        return None  # here the scheduler's reset_outputs does it

    async def while_running(self, job: JobSpec) -> AttemptResult | None:
        """Work done every pull_interval while the job runs; a result ends the attempt at once."""
        return None

    async def collect(self, job: JobSpec, result: AttemptResult) -> AttemptResult:
        """What is left once the job has ended (bringing its outputs back), its slot already
        free; the attempt's final result."""
        return result

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the agent's input: it stops its jobs (TERM, then KILL) and exits."""


class Provider(abc.ABC):
    """Where a machine's jobs run, through its agent."""

    hands_out_gpus = True  # False: the provider's scheduler does (Slurm)

    @abc.abstractmethod
    async def attach(self, channel: Channel, session: Session) -> None:
        """Work through the channel's (new) agent for this session."""

    @abc.abstractmethod
    async def submit(self, session: Session, job: JobSpec, placement: Placement,
                     job_gpus: Sequence[gpus.Gpu] | None) -> Handle:
        """Start the job; its handle once the machine has taken it."""

    @abc.abstractmethod
    async def ended(self, handle: Handle) -> AttemptResult:
        """The job's end; cancelling the call stops the job."""

    def notices(self, handle: Handle) -> asyncio.Queue[Noticed]:
        """What the provider's scheduler says of the job as it says it (none here)."""
        return asyncio.Queue()

    async def adopt(self, handle: Handle) -> bool:
        """Follow a job an earlier process started; False when this provider cannot."""
        return False

    def acknowledge(self, handle: Handle) -> None:
        """The job's result is recorded: what the machine kept of it may go."""
        return None

    async def released(self, handle: Handle) -> None:
        """Wait until every process of the ended job has exited (its GPUs are free then)."""
        return None

    async def close(self) -> None:
        """Stop following jobs."""
        return None


class ForkProvider(Provider):
    """Jobs as processes the machine's agent forks, one guard and process group each."""

    def __init__(self) -> None:
        self.agent: AgentClient | None = None

    async def attach(self, channel: Channel, session: Session) -> None:
        self.agent = channel.agent

    async def submit(self, session: Session, job: JobSpec, placement: Placement,
                     job_gpus: Sequence[gpus.Gpu] | None) -> Handle:
        assert self.agent is not None and job.payload is not None
        key, pid = await self.agent.submit(session, job.payload, placement.cwd, gpus.environment(job_gpus),
                                           placement.sweep_dir)
        names = {"pid": str(pid)}
        if job_gpus:  # a later launcher that adopts the job holds them for it
            names["gpus"] = ",".join(str(gpu.index) for gpu in job_gpus)
        return Handle(self.agent.name, key, names)

    async def ended(self, handle: Handle) -> AttemptResult:
        assert self.agent is not None
        return await self.agent.finished(handle.key)

    async def adopt(self, handle: Handle) -> bool:
        """A job of an agent that outlived its launcher (Detachable): running, or ended while
        no launcher was there; False when this agent has no such job."""
        assert self.agent is not None
        try:
            await self.agent.adopt(handle.key)
        except SourceFailure as refusal:
            if self.agent.broken:
                raise
            log.info("%s: job %s cannot be adopted: %s", self.agent.name, handle.key, refusal)
            return False
        return True

    def acknowledge(self, handle: Handle) -> None:
        if self.agent is not None:
            self.agent.forget(handle.key)

    async def released(self, handle: Handle) -> None:
        if self.agent is not None:
            await self.agent.released(handle.key)


class MachineSource(ComputeSource):
    """One machine: a channel to its agent and a provider of its jobs' processes."""

    def __init__(self, name: str, slots: int, weight: float, gpu: gpus.GpuPlan, channel: Channel,
                 provider: Provider, detach_grace: float = 0.0) -> None:
        super().__init__(name, slots, weight, gpu)
        self.channel = channel
        self.provider = provider
        self.detach_grace = detach_grace  # how long the machine's jobs outlive a lost launcher
        if not provider.hands_out_gpus:
            self.devices = None
        self.session: Session | None = None
        self.attempt_jobs: dict[str, JobSpec] = {}  # by handle key: the job each attempt runs

    @property
    def remote(self) -> RemoteSettings | None:
        """The machine's settings as the channel knows them now (its Python, once found)."""
        return self.channel.remote

    async def prepare(self, session: Session) -> None:
        await self.channel.open(session)
        agent = self.channel.agent
        assert agent is not None
        if self.detach_grace:
            await agent.detachable(self.detach_grace)
        await self.provider.attach(self.channel, session)
        placement = self.channel.placement(session)
        try:
            await agent.open_session(session, placement.sys_path, placement.main)
        except SourceUnfit as refusal:
            raise SourceUnfit(f"{refusal}{self.channel.where()}") from None
        self.session = session
        await self.learn_gpus()

    async def read_gpus(self) -> list[dict[str, Any]]:
        if self.channel.agent is None:
            raise SourceFailure("read_gpus() before prepare()")
        found = await self.channel.agent.call("gpus")
        if isinstance(found, dict):
            raise SourceUnfit(f"gpus: auto, but {found['error']}. Fix: run nvidia-smi there, or list the gpus")
        return found

    async def submit(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None = None) -> Handle:
        if self.channel.agent is None or self.session is None:
            raise SourceFailure("submit() before prepare()")
        await self.channel.before_job(job)
        handle = await self.provider.submit(self.session, job, self.channel.placement(self.session), job_gpus)
        self.attempt_jobs[handle.key] = job
        return handle

    async def adopt(self, handle: Handle, job: JobSpec | None = None) -> bool:
        adopted = await self.provider.adopt(handle)
        if adopted and job is not None:
            self.attempt_jobs[handle.key] = job
        return adopted

    def acknowledge(self, handle: Handle) -> None:
        self.provider.acknowledge(handle)

    async def watch(self, handle: Handle) -> AsyncIterator[AttemptEvent]:
        """Notices while the job runs (the channel's while_running() every pull_interval), its
        end, what the channel's collect() makes of it, and its release. Leaving the iteration
        stops the job."""
        channel, job = self.channel, self.attempt_jobs.pop(handle.key, None)
        notices = self.provider.notices(handle)
        ending = asyncio.ensure_future(self.provider.ended(handle))
        refusal: AttemptResult | None = None  # while_running() ended the attempt
        try:
            while not ending.done() and refusal is None:
                notice = asyncio.ensure_future(notices.get())
                try:
                    await asyncio.wait({ending, notice}, timeout=channel.pull_interval,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    notice.cancel()
                if notice.done() and not notice.cancelled():
                    yield notice.result()
                elif not ending.done() and job is not None:
                    refusal = await channel.while_running(job)
            if refusal is not None:
                await stop(ending)  # never one left running
        except BaseException:  # cancelled, or the iteration closed early
            await stop(ending)
            raise
        result = refusal or ending.result()
        yield Ended(result)
        if refusal is None and job is not None:  # a refused attempt's outputs stay where they are
            result = await channel.collect(job, result)
        yield Collected(result)
        await self.provider.released(handle)
        yield Released()

    async def close(self) -> None:
        await self.provider.close()
        await self.channel.close()


async def stop(running: asyncio.Future[Any]) -> None:
    """Cancel a job's wait and wait until the machine has ended it (TERM, grace, KILL). A lost
    connection ends it too: the agent stops its jobs when its link goes."""
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError, SourceFailure):
        await running
