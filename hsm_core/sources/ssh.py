"""A machine reached over SSH (a Channel): one persistent connection, one worker agent, one
SFTP session.

Owns a remote machine's life in a sweep: connecting (through `sources.bring_up`), sending the
project (through `sync`), a job's output dir emptied before it runs and its outputs brought back while it runs and
when it ends. Every job of every batch, every transfer and every status message shares
that one connection (two channels: the agent's and SFTP's), so sshd's MaxSessions and
MaxStartups are never approached. Must not know strategies, retries or time limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from pathlib import Path
from typing import Any

import asyncssh

from hsm_core import env_requirements, files, hydra_job, remote_machine, sync
from hsm_core.console import CONSOLE
from hsm_core.jobs import AttemptResult, JobSpec, Outcome
from hsm_core.settings import RemoteSettings, SweepSettings
from hsm_core.sources.agent import OperationFailed
from hsm_core.sources.base import Session, SourceFailure, SourceUnfit
from hsm_core.sources.bring_up import bring_up
from hsm_core.sources.machine import Channel, Placement, Spawned

log = logging.getLogger(__name__)
logging.getLogger("asyncssh").setLevel(logging.WARNING)  # its INFO lines would flood the sweep's log

CLOSE_TIMEOUT_SECONDS = 5


class SSHChannel(Channel):
    def __init__(self, remote: RemoteSettings, settings: SweepSettings, project: sync.Project) -> None:
        self.name = remote.name
        self.remote = remote
        self.settings = settings
        self.project = project
        self.connection: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.paths: sync.PathMap | None = None
        self.hashes = files.HashCache()  # of pulled outputs here: each pull re-reads only what changed
        self.pull_interval = settings.collect_interval
        self.built: env_requirements.Environment | None = None  # the jobs' environment, once described

    # -- getting ready -------------------------------------------------------------------

    async def open(self, session: Session) -> None:
        fresh = self.agent is None or self.agent.broken
        if fresh:
            await self.close()
            await self._bring_up(session)
        if fresh or self.paths is None or self.paths.local_sweep_dir != session.sweep_dir:
            await self._sync_project(session)  # a new agent leases the snapshot again (nothing is resent)

    def placement(self, session: Session) -> Placement:
        """The project's copy there: the launch dir's counterpart, the sweep dir under
        ~/.hsm/outputs, sys.path entries of the project, the main program's copy (or module)."""
        assert self.paths is not None
        main = session.main
        if main is not None and main.startswith("/"):
            main = self.paths.to_remote(main)
        return Placement(self.paths.remote_cwd, self.paths.remote_sweep_dir,
                         [path for path in map(self.paths.to_remote, session.sys_path) if path], main)

    def where(self) -> str:
        assert self.remote is not None
        return f" (on {self.remote.host})"

    async def spawn(self, program: str) -> Spawned:
        """Another exec channel of the one connection (not a new SSH session handshake)."""
        assert self.connection is not None and self.remote is not None
        try:
            process = await self.connection.create_process(remote_machine.shell_command(self.remote, program),
                                                           encoding=None)
        except remote_machine.CONNECTION_ERRORS as error:
            raise SourceFailure(f"could not start a process on {self.name}: {error}") from None
        forwarding = asyncio.ensure_future(remote_machine.forward_stderr(self.name, process.stderr))

        async def end() -> None:
            with contextlib.suppress(*remote_machine.CONNECTION_ERRORS):
                process.stdin.write_eof()
            try:
                await asyncio.wait_for(process.wait_closed(), CLOSE_TIMEOUT_SECONDS)
            except (asyncio.TimeoutError, *remote_machine.CONNECTION_ERRORS):
                process.close()
            forwarding.cancel()

        return Spawned(process.stdout, process.stdin, remote_machine.CONNECTION_ERRORS, end)

    def environment(self) -> env_requirements.Environment | None:
        """What the jobs need installed there (None: the Python found, as it is)."""
        assert self.remote is not None
        try:
            return env_requirements.described(self.remote.environment, sync.find_project_root(sync.app_directory()),
                                          f"remotes.{self.name}.environment")
        except env_requirements.NotDescribable as error:
            raise SourceUnfit(str(error)) from None

    async def _bring_up(self, session: Session) -> None:
        assert self.remote is not None
        found_before = self.remote.python is not None
        if self.built is None:
            self.built = self.environment()
        machine = await bring_up(self.remote, self.settings, sweep_dir=session.sweep_dir, environment=self.built,
                                 progress=self._show_progress)
        if self.built is not None:
            found_before = True  # the environment's Python, said by the bring-up
        if not found_before:  # found once, then kept for the sweep (reconnections too)
            log.info(f"{self.name}: using the Python at {machine.remote.python} (found; set remotes.{self.name}.python"
                     " to choose another)")
        self.remote = machine.remote
        self.connection, self.sftp, self.home = machine.connection, machine.sftp, machine.home
        self.process, self.agent = machine.process, machine.agent

    def _show_progress(self, text: str) -> None:
        """A long step of the bring-up (an environment's build), at the status line's end."""
        CONSOLE.show_activity(self.name, f"{self.name}: {text}" if text else "")

    async def _sync_project(self, session: Session) -> None:
        assert self.sftp is not None and self.agent is not None and self.remote is not None
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

    async def before_job(self, job: JobSpec) -> None:
        assert self.paths is not None
        await self._call("remove", posixpath.join(self.paths.remote_sweep_dir, job.subdir))  # fencing

    def job_dirs(self, job: JobSpec) -> tuple[str, Path]:
        """The job's output dir there and here."""
        assert self.paths is not None
        return posixpath.join(self.paths.remote_sweep_dir, job.subdir), Path(self.paths.local_sweep_dir) / job.subdir

    async def while_running(self, job: JobSpec) -> AttemptResult | None:
        """A periodic pull; outputs that must not come back end the attempt as failed."""
        remote_job_dir, local_job_dir = self.job_dirs(job)
        try:
            await self._pull(remote_job_dir, local_job_dir, final=False)
        except sync.UnsafeOutput as refusal:
            return AttemptResult(self.name, Outcome.FAILED, error=f"{refusal}")
        except (sync.SyncError, OSError, OperationFailed) as error:  # tried again at the next pull
            log.warning(f"Could not pull the outputs of job #{job.num} from {self.name} yet ({error});"
                        f" trying again in {self.settings.collect_interval:g}s")
        return None

    async def collect(self, job: JobSpec, result: AttemptResult) -> AttemptResult:
        """The final pull of an ended job, while the next job already runs in its slot."""
        assert self.paths is not None
        remote_job_dir, local_job_dir = self.job_dirs(job)
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

