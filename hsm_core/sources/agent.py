"""The launcher's side of a worker agent (`hsm_core.worker`), over any pair of byte streams.

Local sources talk to the agent through a subprocess's pipes, SSH sources through an
SSH channel; both use AgentClient, so both behave the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import cloudpickle

from hsm_core import wire
from hsm_core.jobs import AttemptResult, Outcome, classify_death
from hsm_core.sources.base import ComputeSource, SourceFailure, SourceUnfit

log = logging.getLogger(__name__)

# How long a cancelled job may take to report its end (the agent's TERM grace included).
CANCEL_TIMEOUT_SECONDS = 15.0
# What a login shell may print before the agent starts (banners, motd) before we give up.
MAX_PREAMBLE_BYTES = 1 << 20


class ByteReader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...

    async def read(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class CorruptFrame(Exception):
    pass


class OperationFailed(Exception):
    """The agent could not do what was asked (its reply says why); the connection is fine."""


@dataclass
class Finished:
    result: bytes | None
    exit_code: int | None
    signum: int | None


class AgentClient:
    def __init__(self, name: str, reader: ByteReader, writer: ByteWriter) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.info: dict[str, Any] = {}
        self.sessions: set[str] = set()
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.pids: dict[str, int] = {}
        self.releases: dict[str, asyncio.Future[None]] = {}  # job key -> its process group is gone
        self.keys = (f"k{n}" for n in itertools.count())
        self.broken: str | None = None
        self.background: list[asyncio.Task[None]] = []
        self.unread = b""  # read past the start marker, not yet consumed

    async def start(self, heartbeat: float | None = None, silence_limit: float | None = None) -> dict[str, Any]:
        """Wait for the agent's hello and start listening; returns what the agent reported.

        With a heartbeat, the launcher pings every `heartbeat` seconds and the agent stops
        its jobs if it hears nothing for `silence_limit` seconds: the remote half of the
        dead man's switch, for links that hang rather than close.
        """
        preamble = await self._skip_preamble()
        if preamble.strip():
            log.info("%s printed this before the worker started (ignored): %s", self.name,
                     preamble.decode(errors="replace").strip()[:300])
        message = await self._read_frame()
        if message[0] != "hello":
            raise SourceFailure(f"the worker agent said {message[0]!r} instead of hello")
        self.info = message[1]
        self.background.append(asyncio.create_task(self._read_loop(), name=f"hsm-agent-{self.name}"))
        if heartbeat is not None and silence_limit is not None:
            await self._send("watch", silence_limit)
            self.background.append(asyncio.create_task(self._ping(heartbeat), name=f"hsm-ping-{self.name}"))
        return self.info

    async def _skip_preamble(self) -> bytes:
        """Read up to the agent's start marker; return what came before it (a login shell's
        banner, a setup line's output)."""
        seen = b""
        while True:
            found = seen.find(wire.START_MARKER)
            if found >= 0:
                self.unread = seen[found + len(wire.START_MARKER):]
                return seen[:found]
            if len(seen) > MAX_PREAMBLE_BYTES:
                raise SourceFailure(f"the worker agent did not start: {len(seen)} bytes of other output came first")
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise asyncio.IncompleteReadError(seen, None)
            seen += chunk

    async def _read_exactly(self, count: int) -> bytes:
        """readexactly, after the bytes read past the start marker."""
        if not self.unread:
            return await self.reader.readexactly(count)
        taken, self.unread = self.unread[:count], self.unread[count:]
        if len(taken) < count:
            taken += await self.reader.readexactly(count - len(taken))
        return taken

    async def _ping(self, interval: float) -> None:
        with contextlib.suppress(SourceFailure, ConnectionError, OSError):
            while not self.broken:
                await asyncio.sleep(interval)
                await self._send("ping")

    async def _read_frame(self) -> tuple[Any, ...]:
        header = await self._read_exactly(wire.HEADER.size)
        (length,) = wire.HEADER.unpack(header)
        body = await self._read_exactly(length)
        try:
            return wire.decode(body)
        except Exception as error:
            raise CorruptFrame(str(error)) from None

    async def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(await self._read_frame())
        except CorruptFrame as error:  # nothing further from this agent can be trusted
            self._break(f"the worker agent sent an unreadable message: {error}")
        except asyncio.IncompleteReadError:
            self._break("the connection to the worker agent was closed")
        except Exception as error:  # OSError, asyncssh.ConnectionLost (keepalive), ...
            self._break(f"the connection to the worker agent was lost: {error or type(error).__name__}")

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind, key = message[0], message[1]
        future = self.pending.get(key)
        if kind == "started":
            self.pids[key] = message[2]
        elif kind == "released":
            release = self.releases.pop(key, None)
            if release is not None and not release.done():
                release.set_result(None)
        elif future is None or future.done():
            return
        elif kind == "finished":
            future.set_result(Finished(*message[2:5]))
        elif kind == "rejected":
            future.set_exception(SourceFailure(message[2]))
        elif kind == "reply" and message[2]:
            future.set_result(message[3])
        elif kind == "reply":
            future.set_exception(OperationFailed(message[3]))

    def _break(self, reason: str) -> None:
        self.broken = reason
        for future in self.pending.values():
            if not future.done():
                future.set_exception(SourceFailure(reason))
        for release in self.releases.values():  # the agent is gone, and took its jobs' groups along
            if not release.done():
                release.set_result(None)
        self.releases.clear()

    async def _send(self, *message: Any) -> None:
        if self.broken:
            raise SourceFailure(self.broken)
        self.writer.write(wire.encode(message))
        await self.writer.drain()

    async def open_session(self, sid: str, blob: bytes, sys_path: Sequence[str]) -> None:
        """Send a batch's shared part, once per agent. SourceUnfit when the machine cannot
        load the task (a package missing there): no job of the batch can run on it."""
        if sid in self.sessions:
            return
        try:
            await self._request("session", sid, blob, list(sys_path))
        except OperationFailed as refusal:
            raise SourceUnfit(str(refusal)) from None
        self.sessions.add(sid)

    async def call(self, operation: str, *args: Any) -> Any:
        """Run one of the agent's file operations (the agent's op_* methods) and return its value."""
        return await self._request("call", operation, args)

    async def _request(self, kind: str, *arguments: Any) -> Any:
        """Send a message that the agent answers with a reply; return the reply's value."""
        call_id = next(self.keys)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        try:
            await self._send(kind, call_id, *arguments)
            return await future
        finally:
            self.pending.pop(call_id, None)

    async def run(self, payload: bytes, sid: str, cwd: str, env: dict[str, str]) -> AttemptResult:
        """Run one job (its cloudpickled sweep config, with `env` added) and wait for its end.
        The result's `released` completes once every process of the job has exited."""
        key = next(self.keys)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Finished] = loop.create_future()
        self.pending[key] = future
        released = self.releases[key] = loop.create_future()
        try:
            await self._send("run", key, sid, payload, cwd, env)
            finished = await asyncio.shield(future)
        except asyncio.CancelledError:
            await self._stop(key, future)
            raise
        finally:
            self.pending.pop(key, None)
            self.pids.pop(key, None)
        attempt = self._to_attempt(finished)
        attempt.released = released
        return attempt

    async def _stop(self, key: str, future: asyncio.Future[Finished]) -> None:
        """Ask the agent to end the job and wait until it has (TERM, grace, KILL)."""
        with contextlib.suppress(Exception):
            await self._send("cancel", key)
            await asyncio.wait_for(future, CANCEL_TIMEOUT_SECONDS)

    def _to_attempt(self, finished: Finished) -> AttemptResult:
        if finished.result is None:
            outcome, cause = classify_death(finished.exit_code, finished.signum)
            return AttemptResult(self.name, outcome, error=cause)
        try:
            outcome = cloudpickle.loads(finished.result)
        except Exception as unreadable:  # e.g. a return value whose class cannot be imported here
            return AttemptResult(
                self.name,
                Outcome.FAILED,
                error=f"the job's result could not be unpickled by the launcher: {unreadable!r}",
            )
        job_return, error = outcome["job_return"], outcome["error"]
        completed = error is None and job_return is not None and job_return.status.name == "COMPLETED"
        return AttemptResult(
            self.name,
            Outcome.COMPLETED if completed else Outcome.FAILED,
            job_return=job_return,
            error=None if error is None else error.get("traceback"),
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)


class AgentSource(ComputeSource):
    """A source whose machine runs a worker agent (this machine, or one over SSH)."""

    agent: AgentClient | None = None

    async def read_gpus(self) -> list[dict[str, Any]]:
        if self.agent is None:
            raise SourceFailure("read_gpus() before prepare()")
        found = await self.agent.call("gpus")
        if isinstance(found, dict):
            raise SourceUnfit(f"gpus: auto, but {found['error']}. Fix: run nvidia-smi there, or list the gpus")
        return found
