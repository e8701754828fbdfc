"""The local machine as a compute source: one worker agent as a child process.

Owns the agent process's life; the conversation with it is `AgentClient`'s. Must not know
strategies, retries or time limits."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from typing import Any, Sequence

from hsm_core import gpus
from hsm_core.console import CONSOLE, forward_lines
from hsm_core.jobs import Handle, JobSpec
from hsm_core.sources.agent import AgentClient, AgentSource
from hsm_core.sources.base import Session, SourceFailure

AGENT_EXIT_TIMEOUT_SECONDS = 10.0


class LocalSource(AgentSource):
    def __init__(self, name: str, slots: int, gpu: gpus.GpuPlan, weight: float = 1.0) -> None:
        super().__init__(name, slots, weight, gpu)
        self.process: asyncio.subprocess.Process | None = None
        self.agent: AgentClient | None = None
        self.session: Session | None = None
        self.forwarding: asyncio.Future[None] | None = None
        self.agent_info: dict[str, Any] = {}  # the agent's hello: its Python and packages

    async def prepare(self, session: Session) -> None:
        if self.agent is None or self.agent.broken:
            await self._start_agent()
        assert self.agent is not None
        await self.agent.open_session(session, session.sys_path, session.main)
        self.session = session
        await self.learn_gpus()

    async def _start_agent(self) -> None:
        await self.close()
        # The jobs' console output is the agent's stderr. Inherited, it shows in the launcher's
        # terminal as it is written; on a terminal with a status line it goes above that line.
        self.process = await asyncio.create_subprocess_exec(
            *self.agent_command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if CONSOLE.on_terminal else None,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        if self.process.stderr is not None:
            self.forwarding = asyncio.ensure_future(forward_lines(self.process.stderr))
        self.agent = AgentClient(self.name, self.process.stdout, self.process.stdin)
        try:
            self.agent_info = await self.agent.start()
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            code = await self.process.wait()
            raise SourceFailure(
                f"the worker agent ({' '.join(self.agent_command())})"
                f" exited with code {code} before it was ready ({type(error).__name__})"
            ) from None

    def agent_command(self) -> list[str]:
        """How the agent starts: this very Python."""
        return [sys.executable, "-m", "hsm_core.worker"]

    async def submit(self, job: JobSpec, job_gpus: Sequence[gpus.Gpu] | None = None) -> Handle:
        if self.agent is None or self.session is None:
            raise SourceFailure("submit() before prepare()")
        assert job.payload is not None
        key, pid = await self.agent.submit(self.session, job.payload, self.session.cwd, gpus.environment(job_gpus))
        return Handle(self.name, key, {"pid": str(pid)})

    async def close(self) -> None:
        """Close the agent's stdin: it stops its jobs (TERM, then KILL) and exits."""
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), AGENT_EXIT_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
            self.process = None
        if self.forwarding is not None:  # the agent has exited: the rest of its jobs' output
            with contextlib.suppress(asyncio.TimeoutError):  # unless a stray process holds the pipe
                await asyncio.wait_for(self.forwarding, AGENT_EXIT_TIMEOUT_SECONDS)
            self.forwarding = None
