"""Bringing a remote machine up for jobs, the one way: connect (host key verified, login),
its setup lines, its Python (configured, else found), the agent's files, the agent started
and heard from. The SSH and Slurm login-node sources and `hsm distributed test` all go
through it, so a machine that passes the test is one a sweep can use.

Each step is reported as it passes; the first that fails raises StepFailed naming it
(StepUnfit when no wait would help). Must not know jobs, projects or the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import asyncssh

from hsm_core import env_requirements, environments, remote_machine, remote_python
from hsm_core.env_requirements import Environment
from hsm_core.jobs import LAUNCHER_FOLDER
from hsm_core.remote_machine import CONNECTION_ERRORS, MachineRefused
from hsm_core.settings import RemoteSettings, SweepSettings
from hsm_core.sources.agent import AgentClient
from hsm_core.sources.base import SourceFailure, SourceUnfit

STEPS = ("connect", "host key", "authentication", "setup lines", "python", "environment")
ENVIRONMENT_BUILD_TIMEOUT_SECONDS = 3600

log = logging.getLogger(__name__)
Report = Callable[[str, "bool | None", str], None]  # (step, passed or None for a mere note, detail)
Progress = Callable[[str], None]  # how far a long step is, for a status line ("" when it is over)


class StepFailed(SourceFailure):
    """A step of the bring-up failed; `step` names it (one of STEPS)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step = step


class StepUnfit(StepFailed, SourceUnfit):
    """A step failed for a cause only the user can change (no Python there can run jobs)."""


@dataclass
class Machine:
    """A machine brought up: one connection, its SFTP session, and the agent running there."""

    remote: RemoteSettings  # its Python settled (found, when it was not configured)
    connection: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient
    home: str
    process: asyncssh.SSHClientProcess[bytes]
    agent: AgentClient
    info: dict[str, Any]  # the agent's hello: its Python and packages


async def bring_up(remote: RemoteSettings, settings: SweepSettings, report: Report = lambda *_: None,
                   thorough: bool = False, sweep_dir: str | None = None,
                   environment: Environment | None = None, progress: Progress = lambda _: None) -> Machine:
    """Every step, in order. `thorough` runs the setup lines on their own first, so that their
    failure is named as theirs (`hsm distributed test`); a sweep spares that round trip. With
    the sweep's `sweep_dir`, an agent an earlier launcher of that sweep left running there is
    attached to (remote_machine.agent_socket) instead of starting a new one, and the build log
    of the `environment` (built there from the Python found, or reused) is kept in it."""
    connection = await _connect(remote, settings, report)
    try:
        if thorough:
            await _check_setup_lines(connection, remote)
        report("setup lines", True, f"{len(remote.setup)} ran without input" if remote.setup else "none")
        remote = await _settle_python(connection, remote, report, packages=environment is None)
        try:
            sftp = await connection.start_sftp_client()
            home = await sftp.realpath(".")
        except (OSError, asyncssh.Error) as error:
            raise StepFailed("python", f"SFTP does not work on {remote_machine.address(remote)}: {error}") from None
        agent_dir = await _upload_agent(sftp, home)
        if environment is not None:
            remote = await _settle_environment(connection, sftp, home, remote, agent_dir, environment, report,
                                               progress, sweep_dir, settings.env_keep_days)
        attach = remote_machine.agent_socket(home, sweep_dir, remote.name) if sweep_dir else None
        process, agent, info = await _start_agent(connection, agent_dir, remote, settings, attach)
        mismatch = remote_machine.version_mismatch(remote, info)
        if mismatch:
            await agent.close()
            process.close()
            raise StepFailed("python", mismatch)
        report("python", True, f"{info['executable']}: Python {info['python']}, "
                               + ", ".join(f"{name} {version}" for name, version in info["packages"].items()))
        return Machine(remote, connection, sftp, home, process, agent, info)
    except BaseException:
        connection.close()
        raise


async def _connect(remote: RemoteSettings, settings: SweepSettings, report: Report) -> asyncssh.SSHClientConnection:
    address = remote_machine.address(remote)
    try:
        connection = await remote_machine.open_connection(remote, settings)
    except remote_machine.Unreachable as error:
        raise StepFailed("connect", str(error)) from None
    except remote_machine.HostKeyRefused as error:
        report("connect", True, address)
        raise StepFailed("host key", str(error)) from None
    except remote_machine.LoginRefused as error:
        report("connect", True, address)
        report("host key", True, "verified")
        raise StepFailed("authentication", str(error)) from None
    report("connect", True, address)
    report("host key", True, f"verified against {remote.known_hosts or '~/.ssh/known_hosts'}")
    report("authentication", True, f"as {connection.get_extra_info('username')}")
    return connection


async def _check_setup_lines(connection: asyncssh.SSHClientConnection, remote: RemoteSettings) -> None:
    if not remote.setup:
        return
    outcome = await connection.run(remote_machine.shell_command(remote, "true"), input="",
                                   timeout=remote_machine.COMMAND_TIMEOUT_SECONDS)
    if outcome.exit_status != 0:
        last = (str(outcome.stderr or "").strip().splitlines() or [""])[-1]
        raise StepFailed("setup lines", f"exit status {outcome.exit_status} ({last}). Fix: run them by hand in"
                                        f" `ssh {remote_machine.ssh_args(remote)}`; they must not ask for input")


async def _settle_python(connection: asyncssh.SSHClientConnection, remote: RemoteSettings,
                         report: Report, packages: bool = True) -> RemoteSettings:
    """The remote with its Python: the configured one, else the best found (each candidate
    reported), found in one round trip after the setup lines; without `packages` (an
    environment is built from it) its Python minor alone must match."""
    if remote.python is not None:
        return remote
    try:
        found = await remote_machine.discover_python(connection, remote, packages)
    except MachineRefused as error:
        raise StepFailed("python", str(error)) from None
    best = remote_python.chosen(found)
    for candidate in found:
        taken = candidate is best
        later = best is not None and found.index(candidate) > found.index(best)
        report("python candidate", True if taken else None,
               f"{'taken' if taken else 'not needed' if later else 'refused'}: {candidate.describe()}")
    if best is None:
        raise StepUnfit("python", remote_machine.no_python_found(remote, found))
    return dataclasses.replace(remote, python=best.path)


async def _upload_agent(sftp: asyncssh.SFTPClient, home: str) -> str:
    """The worker's files there (remote_machine.upload_agent); their folder."""
    try:
        return await remote_machine.upload_agent(sftp, home)
    except MachineRefused as error:
        raise StepUnfit("python", str(error)) from None
    except (OSError, asyncssh.Error) as error:
        raise StepFailed("python", f"could not send the worker's files: {error}") from None


async def _settle_environment(connection: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient, home: str,
                              remote: RemoteSettings, agent_dir: str, environment: Environment,
                              report: Report, progress: Progress, sweep_dir: str | None,
                              keep_days: float) -> RemoteSettings:
    """The remote with the environment's Python: built there from its Python (once: a second
    launch waits for the first's build), or reused; from wheels sent from here when the
    machine asks for them (`wheels`: ship, or auto and no index reachable there; always for
    distributions only this machine has). The build log comes back into the sweep dir."""
    digest = environment.digest()
    try:
        envs = remote_machine.envs_folder(remote.project_dir, home)
        await remote_machine.place_requirements(sftp, home, envs, digest, environment.requirements_text())
    except MachineRefused as refusal:
        raise StepUnfit("environment", str(refusal)) from None
    except (OSError, asyncssh.Error) as error:
        raise StepFailed("environment", f"could not send the requirements: {error}") from None
    source = environments.SHIP if environment.built_here else remote.wheels
    build = functools.partial(_build_there, connection, remote, agent_dir, envs, digest, keep_days,
                              environment=environment, progress=progress)
    outcome = await build(source)
    if outcome.get("needs_wheels"):
        why = ("no package index answers there" if source == environments.AUTO else
               f"{', '.join(pin for pin, _ in environment.built_here)} exist only here" if environment.built_here
               else f"remotes.{remote.name}.wheels is ship")
        if outcome["machine"] != platform.machine():
            raise StepUnfit("environment", f"it needs wheels sent ({why}), but it is {outcome['machine']} and this"
                                           f" machine {platform.machine()}. Fix: build the environment on a machine"
                                           f" like it, or use environment: found with a Python you prepared there")
        report("environment", None, f"{why}: sending wheels from here")
        log.info(f"{remote.name}: {why}: its environment is built from wheels sent from here")
        folder = await _send_wheels(sftp, home, environments.wheels_folder(envs), environment, remote.name, why)
        outcome = await build(folder)
    if "log" in outcome:
        await _keep_build_log(sftp, str(outcome["log"]), sweep_dir, remote.name)
    if "error" in outcome:
        raise StepUnfit("environment", f"its environment ({environment.origin}) could not be built; the build log"
                                       f" ends with:\n{outcome['error']}\nThe whole log: {remote.name}:"
                                       f"{outcome.get('log', envs)}")
    how = (f"built in {outcome['seconds']:.0f}s by {outcome['installer']}" if outcome["built"] else
           f"reused (waited {outcome['seconds']:.0f}s for another launch's build)" if outcome["seconds"] else "reused")
    report("environment", True, f"{environment.origin} {digest}: {how}, {outcome['size'] / 1024**2:.0f}M")
    log.info(f"{remote.name}: the jobs' environment ({environment.origin}, {digest}) was {how}"
             + (f"; removed {len(outcome['removed'])} unused for {keep_days:g} days (env_keep_days)"
                if outcome.get("removed") else ""))
    return dataclasses.replace(remote, python=str(outcome["python"]))


async def _build_there(connection: asyncssh.SSHClientConnection, remote: RemoteSettings, agent_dir: str, envs: str,
                       digest: str, keep_days: float, source: str, environment: Environment,
                       progress: Progress) -> dict[str, Any]:
    """`python -m hsm_core.environments build` there, its progress told as it comes; its
    outcome (see environments.build)."""
    program = (f"PYTHONPATH={shlex.quote(agent_dir)} exec {remote_machine.python_word(remote)} -m"
               f" hsm_core.environments build {shlex.quote(envs)} {shlex.quote(digest)} {keep_days:g}"
               f" {shlex.quote(source)}")
    said: list[dict[str, Any]] = []

    async def follow(process: asyncssh.SSHClientProcess[str]) -> str:
        async for line in process.stdout:
            if not line.startswith("{"):
                continue  # a login banner, say
            message = json.loads(line)
            if message.get("waiting"):
                log.info(f"{remote.name}: another launch is building this environment ({environment.origin},"
                         f" {digest}) there; waiting for it")
            elif "progress" in message:
                if not said:
                    log.info(f"{remote.name}: building the jobs' environment ({environment.origin}, {digest}) there;"
                             " the other sources run jobs meanwhile")
                progress(f"building environment: {message['progress']}")
            said.append(message)
        return str(await process.stderr.read())

    try:
        async with connection.create_process(remote_machine.shell_command(remote, program),
                                             stdin=asyncssh.DEVNULL) as process:
            stderr = await asyncio.wait_for(follow(process), ENVIRONMENT_BUILD_TIMEOUT_SECONDS)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
        raise StepFailed("environment", f"the build of its environment ({environment.origin}) did not finish"
                                        f" ({error or type(error).__name__}). Fix: run `hsm distributed test"
                                        f" {remote.name}` to see the build; its log is in ~/.hsm/envs there") from None
    finally:
        progress("")
    outcome = said[-1] if said else {}
    if not {"python", "error", "needs_wheels"} & set(outcome):  # the build itself broke: its Python says why
        outcome = {"error": stderr.strip()[-2000:] or f"the build exited with status {process.exit_status}"}
    return outcome


async def _send_wheels(sftp: asyncssh.SFTPClient, home: str, folder: str, environment: Environment, name: str,
                       why: str) -> str:
    """The environment's wheels, made here once (env_requirements.wheelhouse), into
    `folder` there (~/.hsm/wheels; those already there are not sent again); that folder."""
    try:
        local, made = await asyncio.to_thread(env_requirements.wheelhouse, environment)
    except env_requirements.NotDescribable as error:
        raise StepUnfit("environment", f"it needs wheels sent ({why}), but {error}") from None
    try:
        sent = await remote_machine.send_missing(sftp, home, sorted(local.glob("*.whl")), folder)
    except MachineRefused as refusal:
        raise StepUnfit("environment", str(refusal)) from None
    except (OSError, asyncssh.Error) as error:
        raise StepFailed("environment", f"could not send the wheels: {error}") from None
    log.info(f"{name}: sent {sent} wheels from {local} ({'made now' if made else 'made earlier'});"
             f" the others were there")
    return folder


async def _keep_build_log(sftp: asyncssh.SFTPClient, path: str, sweep_dir: str | None, name: str) -> None:
    """The environment's build log, into <sweep_dir>/.hsm/ (a copy: it stays there too)."""
    if not sweep_dir:
        return
    local = Path(sweep_dir) / LAUNCHER_FOLDER / f"environment-{name}.log"
    with contextlib.suppress(OSError, asyncssh.Error):
        local.parent.mkdir(parents=True, exist_ok=True)
        await sftp.get(path, str(local))


async def _start_agent(connection: asyncssh.SSHClientConnection, agent_dir: str, remote: RemoteSettings,
                       settings: SweepSettings, attach: str | None,
                       ) -> tuple[asyncssh.SSHClientProcess[bytes], AgentClient, dict[str, Any]]:
    """Start the worker agent exactly as every sweep does (setup lines, env, interpreter) and
    wait for its hello."""
    python = remote_machine.python_word(remote)
    program = f"PYTHONPATH={shlex.quote(agent_dir)}${{PYTHONPATH:+:$PYTHONPATH}} exec {python} -m hsm_core.worker"
    if attach:
        program += f" --attach {shlex.quote(attach)}"
    process = await connection.create_process(remote_machine.shell_command(remote, program), encoding=None)
    agent = AgentClient(remote.name, process.stdout, process.stdin, CONNECTION_ERRORS)
    forwarding = asyncio.ensure_future(remote_machine.forward_stderr(remote.name, process.stderr))
    try:
        # The agent gives up on us exactly when keepalive would give up on it.
        silence = remote_machine.keepalive_detection_bound(settings.keepalive_interval, settings.keepalive_count_max)
        info = await asyncio.wait_for(agent.start(settings.keepalive_interval, silence),
                                      remote_machine.CONNECT_TIMEOUT_SECONDS)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, SourceFailure, *CONNECTION_ERRORS):
        await asyncio.sleep(0.2)  # let the error lines arrive
        forwarding.cancel()
        with contextlib.suppress(*CONNECTION_ERRORS):
            process.close()
        raise StepFailed("python", f"the worker could not start ({remote.python} -m hsm_core.worker, after the"
                                   f" setup lines). Fix: check that `ssh {remote_machine.ssh_args(remote)} {python}"
                                   " --version` works") from None
    return process, agent, info
