"""A machine reached over SSH as a compute source: one persistent connection, one worker
agent, one SFTP session.

Owns a remote machine's life in a sweep: connecting (through `remote_machine`), sending the
project (through `sync`), running a job and bringing its outputs back while it runs and
when it ends. Every job of every batch, every transfer and every status message shares
that one connection (two channels: the agent's and SFTP's), so sshd's MaxSessions and
MaxStartups are never approached. Must not know strategies, retries or time limits.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from pathlib import Path
from typing import Any, Sequence

import asyncssh

from hsm_core import files, gpus, hydra_job, remote_machine, sync
from hsm_core.jobs import AttemptResult, Handle, JobSpec, Outcome
from hsm_core.settings import RemoteSettings, SweepSettings
from hsm_core.sources.agent import AgentClient, AgentSource, OperationFailed
from hsm_core.sources.base import Session, SourceFailure, SourceUnfit
from hsm_core.sources.bring_up import bring_up

log = logging.getLogger(__name__)
logging.getLogger("asyncssh").setLevel(logging.WARNING)  # its INFO lines would flood the sweep's log

CLOSE_TIMEOUT_SECONDS = 5


class SSHSource(AgentSource):
    def __init__(self, remote: RemoteSettings, settings: SweepSettings, project: sync.Project) -> None:
        super().__init__(remote.name, remote.max_parallel_jobs, remote.capability, gpus.GpuPlan.of(remote))
        self.remote = remote
        self.settings = settings
        self.project = project
        self.connection: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.agent: AgentClient | None = None
        self.home = ""
        self.paths: sync.PathMap | None = None
        self.session: Session | None = None
        self.hashes = files.HashCache()  # of pulled outputs here: each pull re-reads only what changed
        self.attempt_jobs: dict[str, JobSpec] = {}  # by handle key: the job each running attempt runs
        self.pull_interval = settings.collect_interval

    # -- getting ready -------------------------------------------------------------------

    async def prepare(self, session: Session) -> None:
        fresh = self.agent is None or self.agent.broken
        if fresh:
            await self.close()
            await self._bring_up()
        assert self.agent is not None
        if fresh or self.paths is None or self.paths.local_sweep_dir != session.sweep_dir:
            await self._sync_project(session)  # a new agent leases the snapshot again (nothing is resent)
        assert self.paths is not None
        remote_path = [path for path in map(self.paths.to_remote, session.sys_path) if path]
        try:
            await self.agent.open_session(session, remote_path, self.remote_main(session))
        except SourceUnfit as refusal:
            raise SourceUnfit(f"{refusal} (on {self.remote.host})") from None
        self.session = session
        await self.learn_gpus()

    def remote_main(self, session: Session) -> str | None:
        """The main program on the machine: a script's copy in the project, or a module's name."""
        assert self.paths is not None
        if session.main is None or not session.main.startswith("/"):
            return session.main
        return self.paths.to_remote(session.main)

    async def _bring_up(self) -> None:
        found_before = self.remote.python is not None
        machine = await bring_up(self.remote, self.settings)
        if not found_before:  # found once, then kept for the sweep (reconnections too)
            log.info(f"{self.name}: using the Python at {machine.remote.python} (found; set remotes.{self.name}.python"
                     " to choose another)")
        self.remote = machine.remote
        self.connection, self.sftp, self.home = machine.connection, machine.sftp, machine.home
        self.process, self.agent = machine.process, machine.agent

    async def _sync_project(self, session: Session) -> None:
        assert self.sftp is not None and self.agent is not None
        try:
            root, project = await self.project.listing()
        except sync.SyncError as error:
            raise SourceUnfit(f"{error}") from None
        remote_root = sync.remote_project_folder(self.remote.project_dir, self.home, root)
        await sync.make_private_dirs(self.sftp, remote_root)
        try:
            await remote_machine.refuse_shared_folder(
                self.sftp, self.home, sync.expand_home(self.remote.project_dir, self.home),
                f"remotes.{self.name}.project_dir ", f"set remotes.{self.name}.project_dir to a folder of your own")
        except remote_machine.MachineRefused as refusal:
            raise SourceUnfit(str(refusal)) from None
        try:
            snapshot, report = await sync.push_project(self.sftp, self.agent, root, project.tree, remote_root)
        except (sync.SyncError, OperationFailed) as error:
            raise SourceFailure(f"could not send the project: {error}") from None
        log.info(f"Synced {root} to {self.name}:{remote_root} (snapshot {posixpath.basename(snapshot)}): {report}")
        self.paths = sync.PathMap(
            local_project=root,
            remote_project=snapshot,
            local_cwd=session.cwd,
            local_sweep_dir=session.sweep_dir,
            remote_outputs=sync.sweep_outputs_folder(self.home, session.sweep_dir),
        )

    # -- running --------------------------------------------------------------------------

    async def submit(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None = None) -> Handle:
        if self.agent is None or self.session is None or self.paths is None:
            raise SourceFailure("submit() before prepare()")
        assert job.payload is not None
        await self._call("remove", posixpath.join(self.paths.remote_sweep_dir, job.subdir))  # fencing
        handle = await self.submit_there(job, job_gpus)
        self.attempt_jobs[handle.key] = job
        return handle

    async def submit_there(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None) -> Handle:
        """Start the job on the machine (its outputs are the caller's)."""
        assert self.agent is not None and self.session is not None and self.paths is not None
        assert job.payload is not None
        key, pid = await self.agent.submit(self.session, job.payload, self.paths.remote_cwd,
                                           gpus.environment(job_gpus), self.paths.remote_sweep_dir)
        return Handle(self.name, key, {"pid": str(pid)})

    def job_dirs(self, handle: Handle) -> tuple[JobSpec, str, Path]:
        """The attempt's job, and its output dir there and here."""
        assert self.paths is not None
        job = self.attempt_jobs[handle.key]
        remote_job_dir = posixpath.join(self.paths.remote_sweep_dir, job.subdir)
        return job, remote_job_dir, Path(self.paths.local_sweep_dir) / job.subdir

    async def while_running(self, handle: Handle) -> AttemptResult | None:
        """A periodic pull; outputs that must not come back end the attempt as failed."""
        job, remote_job_dir, local_job_dir = self.job_dirs(handle)
        try:
            await self._pull(remote_job_dir, local_job_dir, final=False)
        except sync.UnsafeOutput as refusal:
            return AttemptResult(self.name, Outcome.FAILED, error=f"{refusal}")
        except (sync.SyncError, OSError, OperationFailed) as error:  # tried again at the next pull
            log.warning(f"Could not pull the outputs of job #{job.num} from {self.name} yet ({error});"
                        f" trying again in {self.settings.collect_interval:g}s")
        return None

    async def collect(self, handle: Handle, result: AttemptResult) -> AttemptResult:
        """The final pull of an ended job, while the next job already runs in its slot."""
        assert self.paths is not None
        job, remote_job_dir, local_job_dir = self.job_dirs(handle)
        del self.attempt_jobs[handle.key]
        try:
            await self._pull(remote_job_dir, local_job_dir, final=True)
        except (sync.SyncError, OSError, OperationFailed) as error:
            return AttemptResult(self.name, Outcome.FAILED, where=result.where, error=(
                f"the job ended ({result.outcome.value}) but its outputs could not be brought back:"
                f" {sync.describe_error(error) if isinstance(error, OSError) else error}."
                f" What did not come back is kept at {self.name}:{remote_job_dir}"))
        if result.job_return is not None:
            hydra_job.localize(result.job_return, job, local_job_dir, self.paths.local_cwd, self.paths.to_local)
        return result

    async def _call(self, operation: str, *args: Any) -> Any:
        """A file operation on the machine; its failure there is the source's failure."""
        assert self.agent is not None
        try:
            return await self.agent.call(operation, *args)
        except OperationFailed as error:
            raise SourceFailure(f"{operation} failed on {self.name}: {error}") from None

    async def _pull(self, remote_dir: str, local_dir: Path, final: bool) -> None:
        """Outputs down. A broken connection is the source's failure (SourceFailure); what
        goes wrong with the files themselves is raised as it is, for the caller to judge."""
        assert self.sftp is not None and self.agent is not None
        try:
            await sync.pull_outputs(self.sftp, self.agent, remote_dir, local_dir, self.hashes, final)
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.ChannelOpenError) as error:
            raise SourceFailure(f"the connection was lost while bringing back {remote_dir}: {error}") from None
        except asyncssh.SFTPError as error:
            raise sync.SyncError(f"SFTP: {error.reason}") from None

    async def close(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.connection is not None:
            self.connection.close()
            try:
                await asyncio.wait_for(self.connection.wait_closed(), CLOSE_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:  # a hung peer must not hang the launcher
                log.info(f"{self.name}: the connection did not close within {CLOSE_TIMEOUT_SECONDS}s; left behind")
            except remote_machine.CONNECTION_ERRORS as error:
                log.debug(f"{self.name}: closing the connection: {error!r}")
            self.connection = None
        self.sftp = self.process = None

