"""A Slurm cluster's jobs run by warm worker agents inside allocations (a Provider), as
Parsl's HighThroughputExecutor and dask-jobqueue run theirs.

An allocation is a batch job that only holds its resources (slurm.hold_script). Once Slurm
runs it, the launcher starts a worker agent in it as a job step (`srun --overlap`) through
the login node's channel: the step's stdin and stdout are the agent's link (no port, nothing
relayed on the login node). Jobs then start on it by a fork, as on an SSH host, and write
their outputs where the login node's agent sees them (the shared filesystem).

Owns the pool: allocations asked for while jobs wait for a slot (never more than
`max_allocations`; a refusal that waiting ends is waited out), a job placed on a warm
allocation with a free slot whose time left fits it, each slot's share of the step's GPUs,
idle allocations released after `idle_timeout_s`, and an allocation's end (its time limit,
preemption, a scancel) made the end of its jobs as lost. Must not know strategies, retries
(a lost job is the scheduler's to run again) or what kind of channel reaches the login node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import posixpath
import shlex
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from hsm_core import gpus, slurm, sync, wire
from hsm_core.jobs import AttemptResult, Handle, JobSpec, Noticed, Outcome
from hsm_core.sources.agent import AgentClient
from hsm_core.sources.base import Session, SourceFailure, SourceUnfit
from hsm_core.sources.machine import Channel, Placement, Provider, Spawned
from hsm_core.sources.slurm import SlurmQueue, Watched, never_starting, sweep_job_name

log = logging.getLogger(__name__)

AGENT_START_TIMEOUT_SECONDS = 120.0  # srun's step and the agent's hello
TEND_SECONDS = 1.0  # how often idle and ended allocations are looked for
PENDING_POLL_SECONDS = 0.25  # squeue while a new allocation waits to run: its start is every job's
END_LOOKUPS, END_LOOKUP_SECONDS = 6, 0.5  # squeue calls for the state an allocation ended in


@dataclass(frozen=True)
class PoolSettings:
    """How a source's allocations are sized and kept (the `remotes.NAME` keys of mode allocation)."""

    max_allocations: int
    jobs_per_allocation: int
    idle_timeout_s: float
    allocation_time: str | None  # each allocation's --time (None: the partition's default)
    job_time: str | None  # `time`: each job's limit, which is also its expected duration
    heartbeat: tuple[float, float] | None = None  # (ping interval, silence limit) for the agents

    @property
    def job_limit(self) -> float | None:
        """`time` in seconds."""
        return slurm.duration(self.job_time) if self.job_time else None


@dataclass
class Allocation:
    """One batch job of the pool and the worker agent in it."""

    job_id: str
    slots: int
    watched: Watched
    agent: AgentClient | None = None
    spawned: Spawned | None = None
    node: str = ""
    ends_at: float | None = None  # loop time Slurm ends it (None: no limit known)
    devices: list[str] = field(default_factory=list)  # the step's GPUs, shared out by slot
    busy: dict[str, int] = field(default_factory=dict)  # job key (or a reservation) -> its slot
    idle_since: float = 0.0
    draining: bool = False  # takes no new job: its time left fits none
    ran: int = 0  # jobs started in it
    ending: asyncio.Task[str] | None = None  # why it ended, once its link broke

    @property
    def warm(self) -> bool:
        return self.agent is not None and not self.agent.broken

    @property
    def where(self) -> str:
        return f"allocation {self.job_id}, node {self.node}"

    def free_slot(self) -> int | None:
        taken = set(self.busy.values())
        return next((slot for slot in range(self.slots) if slot not in taken), None)

    def slot_environment(self, slot: int) -> dict[str, str]:
        """The slot's own share of the step's GPUs (none when the step has none)."""
        share = len(self.devices) // self.slots
        if not share:
            return {}
        return gpus.environment([gpus.Gpu(int(ident) if ident.isdigit() else slot, ident)
                                 for ident in self.devices[slot * share:(slot + 1) * share]])


def slots(count: int) -> str:
    return f"{count} job slot{'s' if count > 1 else ''}"


def expected_seconds(job_limit: float | None, durations: Sequence[float]) -> float:
    """How long the next job is expected to run: its limit when set, else the mean of the
    jobs that ended so far (0 before any has)."""
    if job_limit is not None:
        return job_limit
    return sum(durations) / len(durations) if durations else 0.0


def fits(time_left: float | None, expected: float) -> bool:
    """Whether a job expected to run `expected` seconds may start with `time_left` (None: no limit)."""
    return time_left is None or time_left >= expected + slurm.FIT_MARGIN_SECONDS


class AllocationProvider(Provider):
    """Jobs forked by warm worker agents inside a pool of Slurm allocations."""

    hands_out_gpus = False  # each allocation's step shares out its own

    def __init__(self, name: str, settings: dict[str, Any], env: dict[str, str], pool: PoolSettings) -> None:
        self.name = name
        self.pool = pool
        self.held = slurm.allocation_settings(settings, pool.jobs_per_allocation, pool.allocation_time)
        self.env = env  # the jobs' environment: the step does not have the login agent's
        self.queue = SlurmQueue(name, min_poll=PENDING_POLL_SECONDS)
        self.channel: Channel | None = None
        self.folder = ""  # on the login node: the allocations' scripts and logs
        self.job_name = ""
        self.allocations: dict[str, Allocation] = {}  # by Slurm job id, oldest first
        self.asking = 0  # allocations being submitted
        self.waiting = 0  # submit() calls waiting for a slot
        self.durations: list[float] = []  # of the jobs that ended, for expected_seconds
        self.started: dict[str, float] = {}  # job key -> loop time it started
        self.trouble: SourceFailure | None = None  # an allocation that cannot be had: said to one waiter each
        self.change: asyncio.Future[None] | None = None  # set when a slot may have come free
        self.tasks: set[asyncio.Task[Any]] = set()
        self.tender: asyncio.Task[None] | None = None

    async def attach(self, channel: Channel, session: Session) -> None:
        self.channel = channel
        if await self.queue.use(channel.agent):  # the steps ran through the old link
            await self._release_all("the login node's agent was started again")
        self.folder = posixpath.join(channel.home, ".hsm", "slurm", sync.short_hash(session.sweep_dir), "allocations")
        self.job_name = sweep_job_name(session.sweep_dir)
        self.trouble = None

    # -- jobs -------------------------------------------------------------------------------

    async def submit(self, session: Session, job: JobSpec, placement: Placement,
                     job_gpus: Sequence[gpus.Gpu] | None) -> Handle:
        """Start the job on a warm allocation with a free slot that has time for it, once one is."""
        assert job.payload is not None
        while True:
            allocation, reservation = await self._slot()
            slot = allocation.busy[reservation]
            assert allocation.agent is not None
            key = f"a{uuid.uuid4().hex[:16]}"
            request, outcome = (posixpath.join(self.folder, "jobs", f"{key}.{kind}") for kind in ("run", "outcome"))
            try:
                # The job's request and outcome travel as files of the login node's (the compute
                # nodes share them): through srun's I/O a message over 1 KB stalls ~40 ms.
                await self.queue.call("put", request, wire.encode(wire.Run(
                    key, session.id, job.payload, placement.cwd, {**self.env, **allocation.slot_environment(slot)},
                    placement.sweep_dir)))
                await allocation.agent.open_session(session, placement.sys_path, placement.main)
                pid = await allocation.agent.run_filed(key, request, outcome)
            except SourceUnfit:
                raise
            except SourceFailure as error:
                if self.queue.login.broken:  # the login node is out of reach: the source is lost
                    raise
                if not allocation.agent.broken:  # refused by a working agent: every allocation would refuse
                    raise SourceUnfit(f"{allocation.where} refused job {job.label}: {error}") from None
                log.info("%s: %s could not take job %s (%s)", self.name, allocation.where, job.label, error)
                continue  # the allocation ended meanwhile: another one then
            finally:
                allocation.busy.pop(reservation, None)
                self._notify()
            allocation.busy[key] = slot
            allocation.ran += 1
            self.started[key] = asyncio.get_running_loop().time()
            log.info("job %s runs in %s on %s", job.label, allocation.where, self.name)
            return Handle(self.name, key, {"allocation": allocation.job_id, "node": allocation.node, "pid": str(pid)})

    def notices(self, handle: Handle) -> asyncio.Queue[Noticed]:
        told: asyncio.Queue[Noticed] = asyncio.Queue()
        told.put_nowait(Noticed("running", f"in Slurm allocation {handle.names['allocation']} on"
                                           f" {handle.names['node']}"))
        return told

    async def ended(self, handle: Handle) -> AttemptResult:
        """The job's end; its allocation's end is the job's loss. Past `time` it is stopped
        and fails, as Slurm would fail it; cancelling the wait stops it."""
        allocation = self.allocations.get(handle.names["allocation"])
        if allocation is None or allocation.agent is None:
            return AttemptResult(self.name, Outcome.LOST, error=f"Slurm allocation {handle.names['allocation']}"
                                 " had ended", where=f"allocation {handle.names['allocation']}")
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(allocation.agent.finished(handle.key), self.pool.job_limit)
        except asyncio.TimeoutError:
            self._free(allocation, handle.key)
            return AttemptResult(self.name, Outcome.FAILED, where=allocation.where, error=(
                f"the job ran past its time limit (remotes.{self.name}.time: {self.pool.job_time}) and was stopped"))
        except SourceFailure as error:
            self._free(allocation, handle.key)
            return AttemptResult(self.name, Outcome.LOST, error=await self._ending(allocation, str(error)),
                                 where=allocation.where)
        except BaseException:
            self._free(allocation, handle.key)
            raise
        self.durations.append(loop.time() - self.started.pop(handle.key, loop.time()))
        if allocation.devices:  # a process the job left may still hold its GPUs
            self._keep(self._free_when_released(allocation, handle.key))
        else:
            self._free(allocation, handle.key)
        return dataclasses.replace(result, where=allocation.where)

    async def released(self, handle: Handle) -> None:
        allocation = self.allocations.get(handle.names["allocation"])
        if allocation is not None and allocation.agent is not None:
            await allocation.agent.released(handle.key)

    async def _free_when_released(self, allocation: Allocation, key: str) -> None:
        """A slot with GPUs is free once every process of its last job has exited."""
        if allocation.agent is not None:
            await allocation.agent.released(key)
        self._free(allocation, key)

    def _free(self, allocation: Allocation, key: str) -> None:
        self.started.pop(key, None)
        if allocation.busy.pop(key, None) is not None and not allocation.busy:
            allocation.idle_since = asyncio.get_running_loop().time()
        self._notify()

    # -- the pool ---------------------------------------------------------------------------

    async def _slot(self) -> tuple[Allocation, str]:
        """A free slot of a warm allocation that has time for the next job, reserved; more
        allocations are asked for while none is."""
        self.waiting += 1
        try:
            while True:
                if self.trouble is not None:
                    trouble, self.trouble = self.trouble, None
                    raise trouble
                found = self._place()
                if found is not None:
                    return found
                self._grow()
                if self.change is None or self.change.done():
                    self.change = asyncio.get_running_loop().create_future()
                await asyncio.shield(self.change)
        finally:
            self.waiting -= 1

    def _place(self) -> tuple[Allocation, str] | None:
        now = asyncio.get_running_loop().time()
        expected = expected_seconds(self.pool.job_limit, self.durations)
        for allocation in self.allocations.values():  # oldest first: the newest go idle and are released
            slot = allocation.free_slot()
            if not allocation.warm or allocation.draining or slot is None:
                continue
            if not fits(None if allocation.ends_at is None else allocation.ends_at - now, expected):
                if not allocation.ran:  # a fresh one: no allocation will ever do
                    self.trouble = SourceUnfit(
                        f"allocation {allocation.job_id} has {(allocation.ends_at or now) - now:.0f}s, too little for"
                        f" one job of ~{expected:.0f}s (" + (f"time: {self.pool.job_time}" if self.pool.job_time
                                                             else "the mean so far") + "). Fix: set"
                        f" remotes.{self.name}.allocation_time longer than that (the partition's limit allowing)")
                    self._keep(self._release(allocation, "too short for any job"))
                    return None
                log.info("%s: %s has too little time left for a job of ~%.0fs: it takes no more jobs", self.name,
                         allocation.where, expected)
                allocation.draining = True
                continue
            reservation = f"r{uuid.uuid4().hex[:8]}"
            allocation.busy[reservation] = slot
            return allocation, reservation
        return None

    def _grow(self) -> None:
        """Ask for an allocation when the waiting jobs outnumber the slots on their way."""
        coming = self.asking * self.pool.jobs_per_allocation + sum(
            allocation.slots for allocation in self.allocations.values() if allocation.agent is None)
        if self.waiting > coming and len(self.allocations) + self.asking < self.pool.max_allocations:
            self.asking += 1
            self._keep(self._allocate())
        if self.tender is None or self.tender.done():
            self.tender = asyncio.create_task(self._tend(), name=f"allocations-{self.name}")

    async def _allocate(self) -> None:
        """Submit an allocation, wait for Slurm to run it, start its worker agent."""
        tag = f"hsm-alloc-{uuid.uuid4().hex[:16]}"
        options = slurm.sbatch_options(self.job_name, posixpath.join(self.folder, f"{tag}.out"), self.held, tag)
        try:
            job_id = await self.queue.submit("slurm_hold", self.folder, options, tag)
        except SourceFailure as error:
            self.trouble = error
            return
        finally:
            self.asking -= 1
            self._notify()
        allocation = self.allocations[job_id] = Allocation(job_id, self.pool.jobs_per_allocation,
                                                           self.queue.follow(job_id))
        log.info("%s: asked Slurm for allocation %s (%s)", self.name, job_id, slots(allocation.slots))
        try:
            await self._warm_up(allocation)
        except SourceUnfit as refusal:
            self.trouble = refusal
            await self._release(allocation, "")
        except (SourceFailure, asyncio.TimeoutError) as error:
            log.warning("%s: allocation %s could not be used: %s", self.name, job_id, error or "no answer")
            await self._release(allocation, "")
        finally:
            self._notify()

    async def _warm_up(self, allocation: Allocation) -> None:
        """Wait until Slurm runs the allocation, then start its worker agent (its hello)."""
        watched = allocation.watched
        while watched.latest is None or watched.latest.state != "RUNNING":
            notice: asyncio.Future[Any] = asyncio.ensure_future(watched.notices.get())
            try:
                await asyncio.wait({watched.ended, notice}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                notice.cancel()
            if watched.ended.done():
                state = watched.ended.result()
                if state.never_starts:
                    raise SourceUnfit(never_starting(self.name, f"allocation {allocation.job_id}", state, self.held))
                raise SourceFailure(f"it ended {state.state} before it ran")
        state = watched.latest
        loop = asyncio.get_running_loop()
        allocation.node = state.node
        allocation.ends_at = None if state.time_left is None else loop.time() + state.time_left
        assert self.channel is not None and self.queue.agent is not None
        info = self.queue.agent.info
        program = (f"PYTHONPATH={shlex.quote(info['agent_dir'])}${{PYTHONPATH:+:$PYTHONPATH}} exec "
                   + slurm.step_command(allocation.job_id, self.held,
                                        f"{shlex.quote(info['executable'])} -m hsm_core.worker"))
        allocation.spawned = await self.channel.spawn(program)
        agent = AgentClient(self.name, allocation.spawned.reader, allocation.spawned.writer,
                            allocation.spawned.connection_errors, fetch=functools.partial(self.queue.call, "take"))
        try:
            hello = await asyncio.wait_for(agent.start(*self.pool.heartbeat or (None, None)),
                                           AGENT_START_TIMEOUT_SECONDS)
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            raise SourceFailure(f"its worker agent did not start ({type(error).__name__})") from None
        allocation.agent = agent
        allocation.devices = [ident for ident in (hello.get("cuda_visible_devices") or "").split(",") if ident]
        allocation.idle_since = loop.time()
        left = "" if state.time_left is None else f", {state.time_left / 60:.0f} min left"
        log.info("%s: allocation %s runs on %s with a warm worker agent (%s%s)", self.name, allocation.job_id,
                 allocation.node, slots(allocation.slots), left)

    async def _tend(self) -> None:
        """Release what the pool no longer needs: allocations idle past idle_timeout_s, those
        with too little time left once their jobs are done, and those whose agent is gone."""
        loop = asyncio.get_running_loop()
        while self.allocations or self.asking:
            await asyncio.sleep(TEND_SECONDS)
            now = loop.time()
            expected = expected_seconds(self.pool.job_limit, self.durations)
            for allocation in list(self.allocations.values()):
                if allocation.agent is None or allocation.busy:
                    continue
                if allocation.agent.broken:
                    self._keep(self._ending(allocation, allocation.agent.broken))
                elif allocation.draining or not fits(None if allocation.ends_at is None else allocation.ends_at - now,
                                                     expected):
                    await self._release(allocation, "too little time left for another job")
                elif now - allocation.idle_since >= self.pool.idle_timeout_s and not self.waiting:
                    await self._release(allocation, f"idle for {self.pool.idle_timeout_s:g}s")

    def _ending(self, allocation: Allocation, link_error: str) -> asyncio.Task[str]:
        """Why the allocation's worker agent is gone (Slurm's word for the allocation's end,
        once), the allocation then dropped from the pool; said once however many jobs ask."""
        if allocation.ending is None:
            allocation.ending = asyncio.ensure_future(self._end_of(allocation, link_error))
        return allocation.ending

    async def _end_of(self, allocation: Allocation, link_error: str) -> str:
        self.allocations.pop(allocation.job_id, None)
        self._notify()
        state = None
        for _ in range(END_LOOKUPS):  # a cancelled allocation is COMPLETING for a moment
            try:
                found: dict[str, slurm.JobState] = await self.queue.call("slurm_states", [allocation.job_id])
            except SourceFailure:
                break
            state = found.get(allocation.job_id)
            if state is None or not state.active:
                break
            await asyncio.sleep(END_LOOKUP_SECONDS)
        if state is not None and not state.active:
            why = f"Slurm allocation {allocation.job_id} ended {state.state}" + (
                f" ({state.reason})" if state.reason not in ("", "None") else "")
        else:
            why = f"the worker agent of Slurm allocation {allocation.job_id} stopped ({link_error})"
        log.warning("%s: %s; its jobs are lost and run again", self.name, why)
        await self._release(allocation, "")
        return why

    async def _release(self, allocation: Allocation, why: str) -> None:
        """Stop the allocation's agent and end the allocation (scancel)."""
        self.allocations.pop(allocation.job_id, None)
        if why:
            log.info("%s: releasing allocation %s (%s)", self.name, allocation.job_id, why)
        if allocation.agent is not None:
            await allocation.agent.close()
        if allocation.spawned is not None:
            await allocation.spawned.end()
        await self.queue.cancel(allocation.job_id)
        self._notify()

    async def _release_all(self, why: str) -> None:
        await asyncio.gather(*(self._release(allocation, why) for allocation in list(self.allocations.values())))

    def _notify(self) -> None:
        if self.change is not None and not self.change.done():
            self.change.set_result(None)

    def _keep(self, work: Any) -> None:
        """Run `work` in the background, held until it ends (close() cancels what is left)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in [*self.tasks, *([self.tender] if self.tender else [])]:
            task.cancel()
        await asyncio.gather(*self.tasks, *([self.tender] if self.tender else []), return_exceptions=True)
        await self._release_all("the sweep is over")
        await self.queue.close()
