"""A Slurm cluster's jobs (a Provider): each sweep job is one Slurm job.

The worker agent on the login node (reached through any channel: this machine's pipes with
`host: localhost`, else SSH with the project copy and outputs) submits, watches and
cancels them. Owns: an attempt's folder (wire.AttemptFiles) and its submission, one
batched poll of Slurm's states per source (never one call per job), one batched `scancel`
when jobs are cancelled, and what Slurm's end states mean for an attempt. Must not know
the channel, strategies, retries or time limits (a job's `time` is Slurm's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from hsm_core import gpus, hydra_job, slurm, sync, wire
from hsm_core.jobs import AttemptResult, Handle, JobSpec, Noticed, Outcome
from hsm_core.sources.agent import AgentClient, OperationFailed
from hsm_core.sources.base import Session, SourceFailure, SourceUnfit
from hsm_core.sources.machine import Channel, Placement, Provider

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 2000  # of a failed job's Slurm log, in its error
SUBMIT_RETRY_SECONDS, MAX_SUBMIT_RETRY_SECONDS = 5.0, 60.0  # back-off while Slurm takes no more jobs


def sweep_job_name(sweep_dir: str) -> str:
    """The Slurm job name of every job of a sweep: `squeue --name`/`scancel --name` find them all."""
    return f"hsm-{sync.short_hash(sweep_dir)}"


@dataclass
class Watched:
    """A submitted Slurm job whose end the launcher waits for."""

    ended: asyncio.Future[slurm.JobState]
    submitted: float  # loop time, for the poll's back-off
    notices: asyncio.Queue[Noticed] = field(default_factory=asyncio.Queue)  # each new state, for watch()
    told: slurm.JobState | None = None  # its state as last told (time left aside)
    latest: slurm.JobState | None = None  # as squeue last said it


class SlurmQueue:
    """Slurm's queue through a login node's agent, for one source: submissions that wait out
    a refusal that waiting ends, one squeue for every job followed (more seldom as they
    age), one scancel for the jobs cancelled at one moment."""

    def __init__(self, name: str, min_poll: float | None = None) -> None:
        self.name = name
        self.min_poll = min_poll  # seconds between two squeue calls while a job is new (slurm.poll_delay)
        self.agent: AgentClient | None = None
        self.watched: dict[str, Watched] = {}  # by Slurm job id
        self.poller: asyncio.Task[None] | None = None
        self.cancelling: set[str] = set()
        self.sending: asyncio.Task[None] | None = None  # the scancel that will take `cancelling`

    @property
    def login(self) -> AgentClient:
        """The login node's agent."""
        if self.agent is None:
            raise SourceFailure(f"{self.name}: the Slurm queue is used before prepare()")
        return self.agent

    async def use(self, agent: AgentClient | None) -> bool:
        """Work through `agent`; True when it is a new one (what the old one followed is lost with it)."""
        if agent is self.agent:
            return False
        await self.close()
        self.agent, self.watched = agent, {}
        return True

    async def submit(self, operation: str, *args: Any) -> str:
        """sbatch by the login agent's `operation`; a refusal that ends by waiting (a submit
        limit, slurmctld busy) is waited out, with back-off."""
        delay = SUBMIT_RETRY_SECONDS
        while True:
            try:
                job_id: str = await self.login.call(operation, *args)
                return job_id
            except OperationFailed as error:
                if not slurm.refused_for_now(str(error)):
                    raise SourceFailure(f"{operation} failed on {self.name}'s login node: {error}. Fix: correct"
                                        f" the Slurm keys of remotes.{self.name}; `hsm distributed test {self.name}`"
                                        " checks them") from None
                log.warning("%s: Slurm takes no more jobs for now (%s); submitting again in %.0fs", self.name,
                            str(error).strip().splitlines()[-1], delay)
            await asyncio.sleep(delay)
            delay = min(MAX_SUBMIT_RETRY_SECONDS, delay * 2)

    async def call(self, operation: str, *args: Any) -> Any:
        try:
            return await self.login.call(operation, *args)
        except OperationFailed as error:
            raise SourceFailure(f"{operation} failed on {self.name}'s login node: {error}") from None

    def follow(self, job_id: str) -> Watched:
        """Have the poller follow the job."""
        loop = asyncio.get_running_loop()
        watched = self.watched[job_id] = Watched(loop.create_future(), loop.time())
        if self.poller is None or self.poller.done():
            self.poller = asyncio.create_task(self._poll(), name=f"slurm-poll-{self.name}")
        return watched

    async def _poll(self) -> None:
        """One squeue for every job still waited for, more seldom as they age (slurm.poll_delay)."""
        loop = asyncio.get_running_loop()
        while waiting := [job_id for job_id, watched in self.watched.items() if not watched.ended.done()]:
            await asyncio.sleep(slurm.poll_delay([loop.time() - self.watched[job_id].submitted for job_id in waiting],
                                                 self.min_poll))
            job_ids = [job_id for job_id in waiting if job_id in self.watched]  # not cancelled meanwhile
            try:
                found: dict[str, slurm.JobState] = await self.call("slurm_states", job_ids)
            except SourceFailure as error:
                if not self.login.broken:
                    log.warning("%s: could not read Slurm's queue (%s); trying again", self.name, error)
                    continue
                for lost in self.watched.values():
                    if not lost.ended.done():
                        lost.ended.set_exception(SourceFailure(f"{self.name}: {self.login.broken}"))
                return
            for job_id in job_ids:
                state = found.get(job_id, slurm.JobState("UNKNOWN", "", "Slurm no longer knows the job"))
                watched = self.watched.get(job_id)  # None: cancelled while squeue ran
                if watched is None or watched.ended.done():
                    continue
                watched.latest = state
                if state.active and not state.never_starts:
                    self._tell(job_id, watched, state)
                else:
                    watched.ended.set_result(state)

    def _tell(self, job_id: str, watched: Watched, state: slurm.JobState) -> None:
        """Say a job's new state: pending (and Slurm's reason), or running (and where)."""
        said = dataclasses.replace(state, time_left=None)
        if said == watched.told:
            return
        watched.told = said
        if state.state == "PENDING":
            detail = f"Slurm job {job_id} pending" + (f" ({state.reason})" if state.reason not in ("", "None") else "")
        else:
            detail = f"Slurm job {job_id} {state.state.lower()}" + (f" on {state.node}" if state.node else "")
        watched.notices.put_nowait(Noticed(state.state.lower(), detail))

    async def cancel(self, job_id: str) -> None:
        """Cancel the job; the cancels of one moment (Ctrl-C) go out as one scancel."""
        self.watched.pop(job_id, None)
        self.cancelling.add(job_id)
        if self.sending is None:
            self.sending = asyncio.create_task(self._send_cancels(), name=f"slurm-cancel-{self.name}")
        with contextlib.suppress(Exception):
            await asyncio.shield(self.sending)

    async def _send_cancels(self) -> None:
        await asyncio.sleep(0)  # every job cancelled at this moment has added its id
        job_ids, self.cancelling, self.sending = sorted(self.cancelling), set(), None
        try:
            await self.login.call("slurm_cancel", job_ids)
        except Exception as error:  # the agent scancels its jobs itself when the link ends
            log.info("%s: scancel %s did not reach the login node (%s)", self.name, " ".join(job_ids), error)

    async def close(self) -> None:
        """Stop following jobs."""
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
            self.poller = None


class SlurmProvider(Provider):
    """Jobs as Slurm jobs, submitted, watched and cancelled through the login node's agent
    (whatever channel reaches it)."""

    hands_out_gpus = False  # Slurm does

    def __init__(self, name: str, settings: dict[str, Any], env: dict[str, str]) -> None:
        self.name = name
        self.settings = settings  # the sbatch keys (RemoteSettings.sbatch_settings)
        self.env = env  # the jobs' environment: a Slurm job does not inherit the agent's
        self.queue = SlurmQueue(name)
        self.folder = ""  # on the login node, seen by the compute nodes: attempts' folders, sessions
        self.job_name = ""
        self.sessions: set[str] = set()

    async def attach(self, channel: Channel, session: Session) -> None:
        if await self.queue.use(channel.agent):
            self.sessions = set()
        self.folder = posixpath.join(channel.home, ".hsm", "slurm", sync.short_hash(session.sweep_dir))
        self.job_name = sweep_job_name(session.sweep_dir)

    async def submit(self, session: Session, job: JobSpec, placement: Placement,
                     job_gpus: Sequence[gpus.Gpu] | None) -> Handle:
        """Write the attempt's folder and submit it; its handle names the Slurm job and the folder."""
        assert job.payload is not None
        tag = f"hsm-{job.num}-{uuid.uuid4().hex[:16]}"  # the attempt's folder, and its Slurm comment
        files = wire.AttemptFiles(posixpath.join(self.folder, "jobs", tag),
                                  posixpath.join(self.folder, "sessions", session.id))
        if session.id not in self.sessions:
            opening = wire.OpenSession("", session.id, session.blob, placement.sys_path, placement.main)
            await self.queue.call("put", files.session, wire.encode(opening))
            self.sessions.add(session.id)
        await self.queue.call("put", files.request, wire.encode(wire.Run(tag, session.id, job.payload, placement.cwd,
                                                                          self.env, placement.sweep_dir)))
        options = slurm.sbatch_options(self.job_name, files.log, self.settings, tag)
        job_id = await self.queue.submit("slurm_submit", files, options, tag)
        log.info("job %s is Slurm job %s on %s", job.label, job_id, self.name)
        handle = Handle(self.name, tag, {"slurm_id": job_id, "folder": files.folder, "session": files.session,
                                         "job": job.label})
        self.queue.follow(job_id)
        return handle

    async def adopt(self, handle: Handle) -> bool:
        """Follow a Slurm job an earlier process submitted (its handle from the journal)."""
        self.queue.follow(handle.names["slurm_id"])
        return True

    def notices(self, handle: Handle) -> asyncio.Queue[Noticed]:
        return self.queue.watched[handle.names["slurm_id"]].notices

    async def ended(self, handle: Handle) -> AttemptResult:
        """Wait for the Slurm job's end and read its outcome; cancelling the wait scancels it."""
        job_id, label = handle.names["slurm_id"], handle.names["job"]
        files = wire.AttemptFiles(handle.names["folder"], handle.names["session"])
        try:
            state = await self.queue.watched[job_id].ended
        except asyncio.CancelledError:
            await self.queue.cancel(job_id)
            raise
        finally:
            self.queue.watched.pop(job_id, None)
        if state.never_starts:
            await self.queue.cancel(job_id)
            raise SourceUnfit(never_starting(self.name, f"job {label} (Slurm job {job_id})", state, self.settings))
        outcome = await self.queue.call("take", files.outcome)
        where = f"Slurm job {job_id}" + (f" on {state.node}" if state.node else "")
        if outcome is not None:
            kind, job_return, error = hydra_job.decode_outcome(outcome)
            await self.queue.call("remove", files.folder)  # what is left of a failed one is kept, for its log
            return AttemptResult(self.name, kind, job_return=job_return, error=error, where=where)
        ended = f"{where} ended {state.state}" + (f" ({state.reason})" if state.reason not in ("", "None") else "")
        if state.state == "UNKNOWN":  # gone from squeue: given up on here, so it must not run on there
            await self.queue.cancel(job_id)
        if state.state in slurm.INFRASTRUCTURE_STATES or state.state == "UNKNOWN":
            return AttemptResult(self.name, Outcome.LOST, error=ended, where=where)
        tail = await self.queue.call("tail", files.log, LOG_TAIL_BYTES)
        if state.state == "TIMEOUT":
            ended += f": it ran past its time limit (remotes.{self.name}.time: {self.settings.get('time')})"
        return AttemptResult(self.name, Outcome.FAILED, where=where, error=ended + f". Its Slurm log is {files.log}"
                             + (f"; it ends with:\n{tail}" if tail.strip() else ""))

    async def close(self) -> None:
        await self.queue.close()


def never_starting(name: str, what: str, state: slurm.JobState, settings: dict[str, Any]) -> str:
    """Why Slurm will never start `what`, and the fix."""
    return (f"Slurm keeps {what} pending for {state.reason}, which no wait ends. Fix: change remotes.{name}'s Slurm"
            " keys" + (f" (time: {settings.get('time')} is over the partition's limit; `sinfo -o '%P %l'` shows the"
                       " limits)" if state.reason == "PartitionTimeLimit" else ""))
