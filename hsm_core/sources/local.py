"""This machine's worker agent as a child process, reached through its pipes (a Channel):
for the local source, and for a Slurm cluster whose login node is this machine.

Owns the agent process's life; the conversation with it is `AgentClient`'s. Must not know
how jobs are started (providers), strategies, retries or time limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys

import hsm_core
from hsm_core import remote_machine
from hsm_core.console import CONSOLE, forward_lines
from hsm_core.settings import RemoteSettings
from hsm_core.sources.agent import AgentClient
from hsm_core.sources.base import Session, SourceFailure, SourceUnfit
from hsm_core.sources.machine import Channel, Placement, Spawned

AGENT_EXIT_TIMEOUT_SECONDS = 10.0


class PipeChannel(Channel):
    """An agent on this machine. With `remote` (a localhost Slurm source), it starts as an
    SSH login node's would: after the setup lines and env, with the configured Python."""

    def __init__(self, name: str, remote: RemoteSettings | None = None) -> None:
        self.name = name
        self.remote = remote
        self.home = os.path.expanduser("~")
        self.process: asyncio.subprocess.Process | None = None
        self.forwarding: asyncio.Future[None] | None = None

    def command(self, session: Session) -> list[str]:
        """The agent's command: attached to one an earlier launcher of the sweep left running, if any."""
        attach = remote_machine.agent_socket(self.home, session.sweep_dir, self.name)
        if self.remote is None:  # this very Python
            return [sys.executable, "-m", "hsm_core.worker", "--attach", attach]
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(hsm_core.__file__)))
        python = shlex.quote(self.remote.python or sys.executable)
        program = (f"PYTHONPATH={shlex.quote(package_parent)}${{PYTHONPATH:+:$PYTHONPATH}}"
                   f" exec {python} -m hsm_core.worker --attach {shlex.quote(attach)}")
        return ["/bin/sh", "-c", remote_machine.shell_command(self.remote, program)]

    async def open(self, session: Session) -> None:
        if self.agent is not None and not self.agent.broken:
            return
        await self.close()
        self.process, self.forwarding = await start_child(self.command(session))
        assert self.process.stdin is not None and self.process.stdout is not None
        self.agent = AgentClient(self.name, self.process.stdout, self.process.stdin)
        try:
            info = await self.agent.start()
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            code = await self.process.wait()
            raise SourceFailure(
                f"the worker agent ({' '.join(self.command(session))})"
                f" exited with code {code} before it was ready ({type(error).__name__})"
            ) from None
        problem = remote_machine.version_mismatch(self.remote, info) if self.remote and self.remote.python else None
        if problem:
            raise SourceUnfit(problem)

    def placement(self, session: Session) -> Placement:
        return Placement(session.cwd, None, list(session.sys_path), session.main)

    async def spawn(self, program: str) -> Spawned:
        command = remote_machine.shell_command(self.remote, program) if self.remote is not None else program
        process, forwarding = await start_child(["/bin/sh", "-c", command])
        assert process.stdin is not None and process.stdout is not None
        writer = process.stdin
        return Spawned(process.stdout, writer, (OSError,), lambda: end_child(process, forwarding, writer))

    async def close(self) -> None:
        """Close the agent's stdin: it stops its jobs (TERM, then KILL) and exits."""
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.process is not None:
            await end_child(self.process, self.forwarding)
            self.process = self.forwarding = None


async def start_child(command: list[str]) -> tuple[asyncio.subprocess.Process, asyncio.Future[None] | None]:
    """A worker agent as a child process, and the task that shows its stderr (the jobs'
    console output): inherited, it shows in the launcher's terminal as it is written; on a
    terminal with a status line it goes above that line."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if CONSOLE.on_terminal else None,
        start_new_session=True,  # a closed terminal's SIGHUP is the launcher's to judge, not the agent's
    )
    forwarding = asyncio.ensure_future(forward_lines(process.stderr)) if process.stderr is not None else None
    return process, forwarding


async def end_child(process: asyncio.subprocess.Process, forwarding: asyncio.Future[None] | None,
                    stdin: asyncio.StreamWriter | None = None) -> None:
    """Wait for a child agent's exit (its input closed first, when given), killing it when it
    does not; then show the rest of its output."""
    if stdin is not None:
        with contextlib.suppress(OSError):
            stdin.close()
    try:
        await asyncio.wait_for(process.wait(), AGENT_EXIT_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    if forwarding is not None:  # the agent has exited: the rest of its jobs' output
        with contextlib.suppress(asyncio.TimeoutError):  # unless a stray process holds the pipe
            await asyncio.wait_for(forwarding, AGENT_EXIT_TIMEOUT_SECONDS)
