"""A machine reached over SSH: one persistent connection, one worker agent, one SFTP session.

Every job of every batch, every transfer and every status message shares that one
connection (two channels: the agent's and SFTP's), so sshd's MaxSessions and
MaxStartups are never approached. Host keys are always verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import posixpath
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import asyncssh
import cloudpickle
from omegaconf import OmegaConf, read_write

import hsm_core
from hsm_core import files, gpus, remote_python, sync
from hsm_core.health import keepalive_detection_bound
from hsm_core.jobs import AttemptResult, JobSpec, Outcome
from hsm_core.settings import RemoteSettings, SweepSettings
from hsm_core.sources.agent import AgentClient, AgentSource, OperationFailed
from hsm_core.sources.base import BatchContext, SourceFailure, SourceUnfit
from hsm_core.probe import CHECKED_PACKAGES, describe_environment

log = logging.getLogger(__name__)
logging.getLogger("asyncssh").setLevel(logging.WARNING)  # its INFO lines would flood the sweep's log

AGENT_FILES = ("__init__.py", "wire.py", "files.py", "probe.py", "worker.py")
CONNECT_TIMEOUT_SECONDS = 30
CLOSE_TIMEOUT_SECONDS = 5


class Project:
    """The local project that remote jobs run: found and hashed once per sweep."""

    def __init__(self, settings: SweepSettings) -> None:
        self.folder = sync.app_directory()
        self.settings = settings.sync
        self._files: asyncio.Task[tuple[Path, sync.ProjectFiles]] | None = None

    async def files(self) -> tuple[Path, sync.ProjectFiles]:
        """The project's root and the files that travel (the skipped links said once)."""
        if self._files is None:
            self._files = asyncio.ensure_future(asyncio.to_thread(self._scan))
        return await self._files

    def _scan(self) -> tuple[Path, sync.ProjectFiles]:
        root = sync.find_project_root(self.folder)
        found = sync.project_files(root, self.settings)
        if found.secrets_kept:
            log.info(f"Not sent to remote machines (credentials; list them in sync.include to send them):"
                     f" {sync.some(found.secrets_kept)}")
        if found.links_outside:
            log.info(f"Not sent to remote machines (links that point outside the project):"
                     f" {sync.some(found.links_outside)}")
        return root, found


class SSHSource(AgentSource):
    def __init__(self, remote: RemoteSettings, settings: SweepSettings, project: Project) -> None:
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
        self.batch: BatchContext | None = None
        self.hashes = files.HashCache()  # of pulled outputs here: each pull re-reads only what changed

    # -- getting ready -------------------------------------------------------------------

    async def prepare(self, batch: BatchContext) -> None:
        fresh = self.agent is None or self.agent.broken
        if fresh:
            await self.close()
            await self._connect()
            await self._start_agent()
        assert self.agent is not None
        if fresh or self.paths is None or self.paths.local_sweep_dir != batch.sweep_dir:
            await self._sync_project(batch)  # a new agent leases the snapshot again (nothing is resent)
        assert self.paths is not None
        remote_path = [path for path in map(self.paths.to_remote, batch.sys_path) if path]
        try:
            await self.agent.open_session(batch.sid, batch.blob, remote_path)
        except SourceUnfit as refusal:
            raise SourceUnfit(f"{refusal} (on {self.remote.host})") from None
        self.batch = batch
        await self.learn_gpus()

    async def _connect(self) -> None:
        self.connection = await open_connection(self.remote, self.settings)
        try:
            self.sftp = await self.connection.start_sftp_client()
            self.home = await self.sftp.realpath(".")
        except (OSError, asyncssh.Error) as error:
            raise SourceFailure(f"SFTP does not work on {address(self.remote)}: {error}") from None

    async def _start_agent(self) -> None:
        assert self.connection is not None and self.sftp is not None
        if self.remote.python is None:  # found once, then kept for the sweep (reconnections too)
            found = await discover_python(self.connection, self.remote)
            best = remote_python.chosen(found)
            if best is None:
                raise SourceUnfit(no_python_found(self.remote, found))
            log.info(f"{self.name}: using the Python at {best.path} (found; set remotes.{self.name}.python to"
                     " choose another)")
            self.remote = dataclasses.replace(self.remote, python=best.path)
        self.process, self.agent, info = await start_worker(self.connection, self.sftp, self.home, self.remote,
                                                            self.settings)
        problem = version_mismatch(self.remote, info)
        if problem:
            raise SourceFailure(problem)

    async def _sync_project(self, batch: BatchContext) -> None:
        assert self.sftp is not None and self.agent is not None
        try:
            root, project = await self.project.files()
        except sync.SyncError as error:
            raise SourceUnfit(f"{error}") from None
        remote_root = sync.remote_project_folder(self.remote.project_dir, self.home, root)
        await sync.make_private_dirs(self.sftp, remote_root)
        await self._refuse_shared_folder(expand_home(self.remote.project_dir, self.home), "project_dir")
        try:
            snapshot, report = await sync.push_project(self.sftp, self.agent, root, project.tree, remote_root)
        except (sync.SyncError, OperationFailed) as error:
            raise SourceFailure(f"could not send the project: {error}") from None
        log.info(f"Synced {root} to {self.name}:{remote_root} (snapshot {posixpath.basename(snapshot)}): {report}")
        self.paths = sync.PathMap(
            local_project=root,
            remote_project=snapshot,
            local_cwd=batch.cwd,
            local_sweep_dir=batch.sweep_dir,
            remote_outputs=sync.sweep_outputs_folder(self.home, batch.sweep_dir),
        )

    async def _refuse_shared_folder(self, path: str, key: str) -> None:
        """The code jobs run must be the user's alone: owned by them, writable by no one else."""
        assert self.sftp is not None
        owner = (await self.sftp.stat(self.home)).uid
        found = await self.sftp.stat(path)
        mode = (found.permissions or 0) & 0o7777
        own_folder = f"set remotes.{self.name}.{key} to a folder of your own"
        if found.uid != owner:
            problem, fix = "is not owned by the login user", own_folder
        elif mode & 0o022:
            problem, fix = f"is writable by others (mode {mode:o})", f"`chmod go-w {shlex.quote(path)}`, or {own_folder}"
        else:
            return
        raise SourceUnfit(f"remotes.{self.name}.{key} {path} {problem}: someone else could change the code your"
                          f" jobs run. Fix: {fix}")

    # -- running --------------------------------------------------------------------------

    async def run(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None = None) -> AttemptResult:
        if self.agent is None or self.batch is None or self.paths is None:
            raise SourceFailure("run() before prepare()")
        paths = self.paths
        remote_job_dir = posixpath.join(paths.remote_sweep_dir, job.subdir)
        local_job_dir = Path(paths.local_sweep_dir) / job.subdir
        payload = cloudpickle.dumps(self._remote_config(job))
        await self._call("remove", remote_job_dir)  # an earlier attempt's leftovers: fencing
        running = asyncio.ensure_future(self.agent.run(payload, self.batch.sid, paths.remote_cwd,
                                                       gpus.environment(job_gpus)))
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
        try:
            await self._pull(remote_job_dir, local_job_dir, final=True)
        except (sync.SyncError, OSError, OperationFailed) as error:
            return AttemptResult(self.name, Outcome.FAILED, error=(
                f"the job ended ({attempt.outcome.value}) but its outputs could not be brought back:"
                f" {sync.describe_error(error) if isinstance(error, OSError) else error}."
                f" What did not come back is kept at {self.name}:{remote_job_dir}"))
        if attempt.job_return is not None:
            self._localize(attempt.job_return, job, local_job_dir)
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

    def _remote_config(self, job: JobSpec) -> Any:
        """The job's config with its sweep dir and working dir moved to this machine."""
        assert self.paths is not None
        config = copy.deepcopy(job.sweep_config)
        with read_write(config.hydra.sweep), read_write(config.hydra.runtime):
            config.hydra.sweep.dir = self.paths.remote_sweep_dir
            config.hydra.runtime.cwd = self.paths.remote_cwd
        return config

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

    def _localize(self, job_return: Any, job: JobSpec, local_job_dir: Path) -> None:
        """Point the JobReturn (and the job's .hydra/hydra.yaml) at the local copies."""
        assert self.paths is not None
        hydra = job_return.hydra_cfg.hydra
        with read_write(hydra.sweep), read_write(hydra.runtime):
            hydra.runtime.output_dir = str(local_job_dir)
            hydra.runtime.cwd = self.paths.local_cwd
            hydra.sweep.dir = unresolved(job.sweep_config.hydra.sweep, "dir")
        job_return.working_dir = self.paths.to_local(job_return.working_dir)
        if hydra.output_subdir is not None:
            saved = local_job_dir / str(hydra.output_subdir) / "hydra.yaml"
            if saved.exists():
                saved.write_text(OmegaConf.to_yaml(job_return.hydra_cfg))

    async def close(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.connection is not None:
            self.connection.close()
            with contextlib.suppress(Exception):  # a hung peer must not hang the launcher
                await asyncio.wait_for(self.connection.wait_closed(), CLOSE_TIMEOUT_SECONDS)
            self.connection = None
        self.sftp = self.process = None


async def stop(running: asyncio.Future[Any]) -> None:
    """Cancel a job's run and wait until the machine has ended it (TERM, grace, KILL)."""
    running.cancel()
    with contextlib.suppress(BaseException):
        await running


def expand_home(path: str, home: str) -> str:
    return home + path[1:] if path == "~" or path.startswith("~/") else path


async def start_worker(connection: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient, home: str,
                       remote: RemoteSettings, settings: SweepSettings,
                       ) -> tuple[asyncssh.SSHClientProcess[bytes], AgentClient, dict[str, Any]]:
    """Start the worker agent exactly as every sweep does (setup lines, env, interpreter) and
    wait for its hello. `hsm distributed test` calls this too, so it fails whenever a sweep would."""
    agent_dir = await upload_agent(sftp, home)
    python = f"PYTHONPATH={shlex.quote(agent_dir)}${{PYTHONPATH:+:$PYTHONPATH}} exec {python_word(remote)}"
    process = await connection.create_process(shell_command(remote, f"{python} -m hsm_core.worker"), encoding=None)
    agent = AgentClient(remote.name, process.stdout, process.stdin)
    forwarding = asyncio.ensure_future(forward_stderr(remote.name, process.stderr))
    try:
        # The agent gives up on us exactly when keepalive would give up on it.
        silence = keepalive_detection_bound(settings.keepalive_interval, settings.keepalive_count_max)
        info = await asyncio.wait_for(agent.start(settings.keepalive_interval, silence), CONNECT_TIMEOUT_SECONDS)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, SourceFailure):
        await asyncio.sleep(0.2)  # let the error lines arrive
        forwarding.cancel()
        process.close()
        raise SourceFailure(
            f"the worker could not start ({remote.python} -m hsm_core.worker, after the setup"
            f" lines). Fix: check that `ssh {ssh_args(remote)} {shlex.quote(remote.python)} --version` works"
        ) from None
    return process, agent, info


async def forward_stderr(name: str, stream: Any) -> None:
    """The remote jobs' console output, shown in this terminal with the source's name."""
    with contextlib.suppress(asyncssh.Error, OSError):  # the connection's end is reported elsewhere
        async for line in stream:
            if line:
                sys.stderr.write(f"[{name}] {line.decode(errors='replace')}")


async def upload_agent(sftp: asyncssh.SFTPClient, home: str) -> str:
    """Put this version's worker files in ~/.hsm/agent/<hash>/ unless they are there."""
    package = Path(hsm_core.__file__).parent
    contents = {name: (package / name).read_bytes() for name in AGENT_FILES}
    digest = sync.short_hash(*(contents[name].decode() for name in AGENT_FILES))
    agent_dir = posixpath.join(home, ".hsm", "agent", digest)
    if not await sftp.exists(posixpath.join(agent_dir, "hsm_core", "worker.py")):
        staging = f"{agent_dir}.part-{sync.short_hash(str(id(sftp)), str(asyncio.get_running_loop().time()))}"
        await sync.make_private_dirs(sftp, posixpath.join(staging, "hsm_core"))
        for name, content in contents.items():
            async with sftp.open(posixpath.join(staging, "hsm_core", name), "wb") as file:
                await file.write(content)
        with contextlib.suppress(asyncssh.SFTPError):  # another launcher may have won the race
            await sftp.posix_rename(staging, agent_dir)
    return agent_dir


def unresolved(node: Any, key: str) -> Any:
    """A config value as written (interpolations kept), as Hydra keeps it in hydra_cfg."""
    written = OmegaConf.to_container(node, resolve=False)
    assert isinstance(written, dict)
    return written[key]


# -- reaching a machine: shared by the source and by `hsm distributed test/health` ----------


class Unreachable(SourceFailure):
    """No SSH server answered."""


class HostKeyRefused(SourceFailure):
    """The server's key is unknown or changed."""


class LoginRefused(SourceFailure):
    """The server refused our user and key."""


async def open_connection(remote: RemoteSettings, settings: SweepSettings) -> asyncssh.SSHClientConnection:
    """Connect with the remote's settings (else ~/.ssh/config's); host keys always verified."""
    # known_hosts is never passed as None: that would switch host key checking off.
    options: dict[str, Any] = {
        "keepalive_interval": settings.keepalive_interval,
        "keepalive_count_max": settings.keepalive_count_max,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "agent_forwarding": False,
        "kbdint_auth": False,
        "password": None,
    }
    if remote.known_hosts is not None:
        options["known_hosts"] = str(Path(remote.known_hosts).expanduser())
    if remote.ssh_port is not None:
        options["port"] = remote.ssh_port
    if remote.user is not None:
        options["username"] = remote.user
    if remote.ssh_key is not None:
        options["client_keys"] = [readable_key(remote)]
    try:
        return await asyncssh.connect(remote.host, **options)
    except asyncssh.KeyImportError as error:  # a key named by ~/.ssh/config
        raise LoginRefused(f"a private key for {address(remote)} cannot be used: {error}. Fix: load it into"
                           f" your ssh-agent (ssh-add KEY), or set remotes.{remote.name}.ssh_key to a key"
                           " without a passphrase") from None
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyRefused(host_key_advice(remote)) from None
    except asyncssh.PermissionDenied:
        raise LoginRefused(
            f"{address(remote)} refused the login ({remote.user or 'default user'},"
            f" key {remote.ssh_key or 'from ~/.ssh'}). Fix: install the public key with"
            f" `ssh-copy-id {ssh_args(remote)}`, or set remotes.{remote.name}.ssh_key / user"
        ) from None
    except (OSError, asyncio.TimeoutError, asyncssh.Error) as error:
        raise Unreachable(
            f"cannot connect to {address(remote)}: {error or type(error).__name__}."
            f" Fix: check that `ssh {ssh_args(remote)} true` works from this machine"
        ) from None


def readable_key(remote: RemoteSettings) -> str:
    """The ssh_key's path, once it is known to load without a passphrase (none can be asked)."""
    assert remote.ssh_key is not None
    path = str(Path(remote.ssh_key).expanduser())
    key = f"remotes.{remote.name}.ssh_key"
    try:
        asyncssh.read_private_key(path)
    except OSError as error:
        raise LoginRefused(f"{key} {remote.ssh_key} cannot be read: {error.strerror}. Fix: check the path,"
                           f" and that you own the file (chmod 600 {shlex.quote(path)})") from None
    except asyncssh.KeyImportError as error:
        if "passphrase" in str(error).lower():
            raise LoginRefused(f"{key} {remote.ssh_key} is protected by a passphrase, which a sweep cannot ask"
                               f" for. Fix: load it into your ssh-agent (ssh-add {shlex.quote(path)}) and remove"
                               f" {key}, or use a key without a passphrase") from None
        raise LoginRefused(f"{key} {remote.ssh_key} is not a private key ({error}). Fix: point it at the private"
                           " half (not the .pub file)") from None
    return path


def address(remote: RemoteSettings) -> str:
    return f"{remote.host}:{remote.ssh_port or 22}"


def ssh_args(remote: RemoteSettings) -> str:
    """The ssh command line arguments that reach this remote, for fix hints."""
    words = []
    if remote.ssh_port:
        words += ["-p", str(remote.ssh_port)]
    if remote.ssh_key:
        words += ["-i", remote.ssh_key]
    return shlex.join([*words, f"{remote.user}@{remote.host}" if remote.user else remote.host])


def host_key_advice(remote: RemoteSettings) -> str:
    known_hosts = remote.known_hosts or "~/.ssh/known_hosts"
    entry = f"[{remote.host}]:{remote.ssh_port}" if remote.ssh_port not in (None, 22) else remote.host
    scan = shlex.join(["ssh-keyscan", *(["-p", str(remote.ssh_port)] if remote.ssh_port else []), remote.host])
    try:
        listed = asyncssh.read_known_hosts(str(Path(known_hosts).expanduser())).match(remote.host, "", remote.ssh_port)
        known = any(listed[:2])
    except (OSError, ValueError):
        known = False
    if known:
        return (
            f"the host key of {entry} DIFFERS from the one in {known_hosts}; refusing to"
            " connect (the machine was reinstalled, or someone is intercepting). If the change is"
            f" expected: ssh-keygen -R {shlex.quote(entry)} -f {known_hosts} && {scan} >> {known_hosts}"
        )
    return (
        f"the host key of {entry} is not in {known_hosts}; refusing to connect."
        f" Fix: check the key's fingerprint, then: {scan} >> {known_hosts}"
    )


def python_word(remote: RemoteSettings) -> str:
    """The remote interpreter as one shell word (a leading ~/ still means the remote home)."""
    assert remote.python is not None, "discover_python() first"
    return remote_python.shell_word(remote.python)


async def discover_python(connection: asyncssh.SSHClientConnection,
                          remote: RemoteSettings) -> list[remote_python.Candidate]:
    """Every candidate interpreter, tried in one round trip after the setup lines, with what
    keeps it from running jobs (None for those that can)."""
    paths = remote_python.candidates()
    try:
        shown = await connection.run(shell_command(remote, remote_python.script(paths)), input="",
                                     timeout=CONNECT_TIMEOUT_SECONDS * 2)
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
        raise SourceFailure(f"could not look for a Python there: {error}") from None
    return remote_python.judge(paths, str(shown.stdout), lambda info: "; ".join(python_problems(info)) or None)


def no_python_found(remote: RemoteSettings, found: list[remote_python.Candidate]) -> str:
    return (f"no Python there can run the jobs (tried {'; '.join(c.describe() for c in found)}). Fix: set"
            f" remotes.{remote.name}.python to an interpreter with this machine's Python minor and"
            f" {', '.join(CHECKED_PACKAGES)}, or setup lines that activate one")


def shell_command(remote: RemoteSettings, program: str) -> str:
    """The remote's setup lines and env (values quoted), then `program`."""
    lines = [*remote.setup, *(f"export {name}={shlex.quote(value)}" for name, value in remote.env)]
    return "\n".join([*lines, program])


def python_problems(theirs: dict[str, Any]) -> list[str]:
    """What keeps a Python from running this machine's cloudpickled jobs (minor, key packages)."""
    ours = describe_environment()
    problems = []
    if theirs["python"].split(".")[:2] != ours["python"].split(".")[:2]:
        problems.append(f"Python {theirs['python']} (this machine: {ours['python']})")
    for name in CHECKED_PACKAGES:
        if theirs["packages"].get(name) != ours["packages"][name]:
            problems.append(f"{name} {theirs['packages'].get(name) or 'missing'} (this machine: {ours['packages'][name]})")
    return problems


def version_mismatch(remote: RemoteSettings, theirs: dict[str, Any]) -> str | None:
    """Why cloudpickled jobs cannot run there (Python minor or key packages differ), with the fix."""
    problems = python_problems(theirs)
    if not problems:
        return None
    ours = describe_environment()
    minor = ".".join(ours["python"].split(".")[:2])
    installs = [f"{name}=={ours['packages'][name]}" for name in CHECKED_PACKAGES
                if theirs["packages"].get(name) != ours["packages"][name]]
    fixes = []
    if installs:
        fixes.append(f"on {remote.host} run: {shlex.quote(theirs['executable'])} -m pip install "
                     + " ".join(shlex.quote(spec) for spec in installs))
    if problems[0].startswith("Python"):
        fixes.append(f"point remotes.{remote.name}.python at a Python {minor}")
    return f"the remote Python does not match: {', '.join(problems)}. Fix: " + "; ".join(fixes)
