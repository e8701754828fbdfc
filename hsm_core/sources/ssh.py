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
import contextlib
import functools
import logging
import posixpath
from pathlib import Path
from typing import Any, Sequence

import asyncssh

from hsm_core import files, gpus, hydra_job, remote_machine, sync
from hsm_core.jobs import AttemptResult, JobSpec, Outcome
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

    async def run(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None = None) -> AttemptResult:
        if self.agent is None or self.session is None or self.paths is None:
            raise SourceFailure("run() before prepare()")
        assert job.payload is not None
        paths = self.paths
        remote_job_dir = posixpath.join(paths.remote_sweep_dir, job.subdir)
        local_job_dir = Path(paths.local_sweep_dir) / job.subdir
        await self._call("remove", remote_job_dir)  # an earlier attempt's leftovers: fencing
        running = asyncio.ensure_future(self._run_there(job, job_gpus))
        try:
            while not running.done():
                await asyncio.wait({running}, timeout=self.settings.collect_interval)
                if not running.done():
                    await self._pull_while_running(job, remote_job_dir, local_job_dir)
        except sync.UnsafeOutput as refusal:
            await stop(running)  # the job ends before its attempt does: never one left running
            return AttemptResult(self.name, Outcome.FAILED, error=f"{refusal}")
        except asyncio.CancelledError:
            await stop(running)
            raise
        attempt = running.result()
        attempt.collect = functools.partial(self._bring_back, job, attempt, remote_job_dir, local_job_dir)
        return attempt

    async def _run_there(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None) -> AttemptResult:
        """Run the job on the machine and wait for its end (its outputs are the caller's)."""
        assert self.agent is not None and self.session is not None and self.paths is not None
        assert job.payload is not None
        return await self.agent.run(self.session, job.payload, self.paths.remote_cwd, gpus.environment(job_gpus),
                                    self.paths.remote_sweep_dir)

    async def _bring_back(self, job: JobSpec, attempt: AttemptResult, remote_job_dir: str,
                          local_job_dir: Path) -> AttemptResult:
        """The final pull of an ended job, while the next job already runs in its slot."""
        assert self.paths is not None
        attempt.collect = None
        try:
            await self._pull(remote_job_dir, local_job_dir, final=True)
        except (sync.SyncError, OSError, OperationFailed) as error:
            return AttemptResult(self.name, Outcome.FAILED, released=attempt.released, error=(
                f"the job ended ({attempt.outcome.value}) but its outputs could not be brought back:"
                f" {sync.describe_error(error) if isinstance(error, OSError) else error}."
                f" What did not come back is kept at {self.name}:{remote_job_dir}"))
        if attempt.job_return is not None:
            hydra_job.localize(attempt.job_return, job, local_job_dir, self.paths.local_cwd, self.paths.to_local)
        return attempt

    async def _pull_while_running(self, job: JobSpec, remote_dir: str, local_dir: Path) -> None:
        """A periodic pull. Its failures are retried at the next one; the job goes on."""
        try:
            await self._pull(remote_dir, local_dir, final=False)
        except sync.UnsafeOutput:
            raise
        except (sync.SyncError, OSError, OperationFailed) as error:
            log.warning(f"Could not pull the outputs of job #{job.num} from {self.name} yet ({error});"
                        f" trying again in {self.settings.collect_interval:g}s")

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


async def stop(running: asyncio.Future[Any]) -> None:
    """Cancel a job's run and wait until the machine has ended it (TERM, grace, KILL). A lost
    connection ends it too: the agent stops its jobs when its link goes."""
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError, SourceFailure):
        await running
