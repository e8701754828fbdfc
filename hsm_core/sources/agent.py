"""The launcher's side of a worker agent (`hsm_core.worker`), over any pair of byte streams.

Owns the conversation with one agent: requests and their replies, a job's run from Run
to Finished and Released, the heartbeat, and what a broken connection means for the
calls in flight. Local sources talk to the agent through a subprocess's pipes, SSH
sources through an SSH channel; both use AgentClient, so both behave the same. Must not
know how the streams were opened (that is the source's) or Hydra's job contract beyond
reading a job's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import uuid
from typing import Any, Awaitable, Callable, Protocol, Sequence

from hsm_core import hydra_job, wire
from hsm_core.jobs import AttemptResult, classify_death
from hsm_core.sources.base import Session, SourceFailure, SourceUnfit

log = logging.getLogger(__name__)

# How long a cancelled job may take to report its end (the agent's TERM grace included).
CANCEL_TIMEOUT_SECONDS = 15.0
# How long closing waits for the agent to have taken its Shutdown and exited.
SHUTDOWN_TIMEOUT_SECONDS = 5.0
# What a login shell may print before the agent starts (banners, motd) before we give up.
MAX_PREAMBLE_BYTES = 1 << 20


class ByteReader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...

    async def read(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


class CorruptFrame(Exception):
    pass


class OperationFailed(Exception):
    """The agent could not do what was asked (its reply says why); the connection is fine."""


class AgentClient:
    def __init__(self, name: str, reader: ByteReader, writer: ByteWriter,
                 connection_errors: tuple[type[BaseException], ...] = (OSError,),
                 fetch: Callable[[str], Awaitable[bytes | None]] | None = None) -> None:
        self.name = name
        self.fetch = fetch  # reads (and removes) a file the agent left its outcome in (RunFiled)
        self.reader = reader
        self.writer = writer
        self.connection_errors = connection_errors  # what the streams raise when the link ends
        self.unsent_errors: tuple[type[BaseException], ...] = (SourceFailure, *connection_errors)
        self.info: dict[str, Any] = {}
        self.sessions: set[str] = set()  # ids of the sessions the agent has loaded
        self.pending: dict[str, asyncio.Future[Any]] = {}  # call id or job key -> its Reply or Finished
        self.starts: dict[str, asyncio.Future[int]] = {}  # job key -> its pid, once the agent has started it
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
        hello = await self._read_frame()
        if not isinstance(hello, wire.Hello):
            raise SourceFailure(f"the worker agent sent {type(hello).__name__} instead of Hello")
        self.info = hello.info
        self.background.append(asyncio.create_task(self._read_loop(), name=f"hsm-agent-{self.name}"))
        if heartbeat is not None and silence_limit is not None:
            await self._send(wire.Watch(silence_limit))
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
        with contextlib.suppress(SourceFailure, *self.connection_errors):  # the read loop reports the end
            while not self.broken:
                await asyncio.sleep(interval)
                await self._send(wire.Ping())

    async def _read_frame(self) -> wire.FromAgent:
        header = await self._read_exactly(wire.HEADER.size)
        (length,) = wire.HEADER.unpack(header)
        body = await self._read_exactly(length)
        try:
            return wire.decode(body)
        except Exception as error:  # unpickling bad bytes can raise almost anything
            raise CorruptFrame(f"{type(error).__name__}: {error}") from None

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._read_frame()
                self._dispatch(message)
        except CorruptFrame as error:  # nothing further from this agent can be trusted
            self._break(f"the worker agent sent an unreadable message: {error}")
        except asyncio.IncompleteReadError:
            self._break("the connection to the worker agent was closed")
        except self.connection_errors as error:  # a reset, keepalive giving up, ...
            self._break(f"the connection to the worker agent was lost: {error or type(error).__name__}")
        except Exception as error:  # a bug here: said as one, and the agent is not trusted further
            log.exception("%s: reading the worker agent's messages failed", self.name)
            self._break(f"the launcher could not handle a message of the worker agent ({error!r})")

    def _dispatch(self, message: wire.FromAgent) -> None:
        match message:
            case wire.Started(key, pid):
                started = self.starts.pop(key, None)
                if started is not None and not started.done():
                    started.set_result(pid)
            case wire.Released(key):
                release = self.releases.pop(key, None)
                if release is not None and not release.done():
                    release.set_result(None)
            case wire.Finished(key):
                self._settle(key, result=message)
            case wire.Rejected(key, reason):
                finished = self.pending.pop(key, None)
                if finished is not None:
                    finished.cancel()  # it will never come
                self.releases.pop(key, None)
                started = self.starts.pop(key, None)
                if started is not None and not started.done():
                    started.set_exception(SourceFailure(reason))
            case wire.Reply(call_id, True, value):
                self._settle(call_id, result=value)
            case wire.Reply(call_id, False, why):
                self._settle(call_id, error=OperationFailed(why))
            case _:
                raise CorruptFrame(f"unexpected {type(message).__name__} after Hello")

    def _settle(self, key: str, result: Any = None, error: Exception | None = None) -> None:
        """Complete the call waiting for `key`; a late answer to a call given up on is dropped."""
        future = self.pending.get(key)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _break(self, reason: str) -> None:
        self.broken = reason
        for future in [*self.pending.values(), *self.starts.values()]:
            if not future.done():
                future.set_exception(SourceFailure(reason))
        self.starts.clear()
        for release in self.releases.values():  # the agent is gone, and took its jobs' groups along
            if not release.done():
                release.set_result(None)
        self.releases.clear()

    async def _send(self, message: wire.ToAgent) -> None:
        if self.broken:
            raise SourceFailure(self.broken)
        self.writer.write(wire.encode(message))
        await self.writer.drain()

    async def open_session(self, session: Session, sys_path: Sequence[str], main: str | None = None) -> None:
        """Send a batch's shared part, once per agent. SourceUnfit when the machine cannot
        load the task (a package missing there): no job of the batch can run on it."""
        if session.id in self.sessions:
            return
        try:
            await self._request(lambda call_id: wire.OpenSession(call_id, session.id, session.blob, list(sys_path),
                                                                 main))
        except OperationFailed as refusal:
            raise SourceUnfit(str(refusal)) from None
        self.sessions.add(session.id)

    async def call(self, operation: str, *args: Any) -> Any:
        """Run one of the agent's file operations (the agent's op_* methods) and return its value."""
        return await self._request(lambda call_id: wire.Call(call_id, operation, args))

    async def _request(self, message: Callable[[str], wire.ToAgent]) -> Any:
        """Send the message made for a new call id; return the value of the agent's Reply."""
        call_id = next(self.keys)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        try:
            await self._send(message(call_id))
            return await future
        finally:
            self.pending.pop(call_id, None)

    async def submit(self, session: Session, payload: bytes, cwd: str, env: dict[str, str],
                     sweep_dir: str | None = None) -> tuple[str, int]:
        """Start one job (its cloudpickled sweep config, with `env` added, placed in `sweep_dir`
        when given); its key and pid once the agent has started it. SourceFailure when the
        agent cannot start it (it says why)."""
        key = f"a{uuid.uuid4().hex[:16]}"  # the attempt's name, unique beyond this connection
        return key, await self._follow(key, wire.Run(key, session.id, payload, cwd, env, sweep_dir))

    async def run_filed(self, key: str, request: str, outcome: str) -> int:
        """Start the job whose Run (with `key`) is in the file `request`, its outcome to be
        left in `outcome` (wire.RunFiled); its pid once started."""
        return await self._follow(key, wire.RunFiled(key, request, outcome))

    async def adopt(self, key: str) -> int:
        """Follow a job an earlier launcher started on this agent (it outlived that launcher);
        its pid (0: it has ended already). SourceFailure when the agent has no such job."""
        return await self._follow(key, wire.Adopt(key))

    async def _follow(self, key: str, request: wire.ToAgent) -> int:
        """Send the request that starts (or adopts) the job `key`; its pid once the agent says
        Started, its end and release then awaited through finished() and released()."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[wire.Finished] = loop.create_future()
        self.pending[key], self.releases[key] = finished, loop.create_future()
        started = self.starts[key] = loop.create_future()
        try:
            await self._send(request)
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            await self._stop(key, finished)
            raise
        except BaseException:
            self.pending.pop(key, None)
            self.releases.pop(key, None)
            raise
        finally:
            self.starts.pop(key, None)

    async def detachable(self, grace: float) -> None:
        """Have the agent keep its jobs running for `grace` seconds once this launcher is gone."""
        await self._send(wire.Detachable(grace))

    def forget(self, key: str) -> None:
        """The job's outcome is recorded: the agent may drop the copy it keeps (Detachable)."""
        if not self.broken:
            with contextlib.suppress(*self.connection_errors):
                self.writer.write(wire.encode(wire.Forget(key)))

    async def finished(self, key: str) -> AttemptResult:
        """Wait for a started job's end; cancelling the wait stops the job."""
        future = self.pending[key]
        try:
            finished = await asyncio.shield(future)
        except asyncio.CancelledError:
            await self._stop(key, future)
            raise
        finally:
            self.pending.pop(key, None)
        if finished.outcome_file is not None and self.fetch is not None:
            finished = dataclasses.replace(finished, result=await self.fetch(finished.outcome_file))
        return self._to_attempt(finished)

    async def released(self, key: str) -> None:
        """Wait until every process of an ended job has exited (or the agent is gone)."""
        release = self.releases.get(key)
        if release is not None:
            await release

    async def _stop(self, key: str, future: asyncio.Future[wire.Finished]) -> None:
        """Ask the agent to end the job and wait until it has (TERM, grace, KILL)."""
        try:
            await self._send(wire.Cancel(key))
            await asyncio.wait_for(future, CANCEL_TIMEOUT_SECONDS)
        except self.unsent_errors as error:  # the agent ends its jobs itself when the link ends
            log.info("%s: the cancel of job %s did not reach the worker agent (%s)", self.name, key, error)
        except asyncio.TimeoutError:
            log.warning("%s: a cancelled job did not report its end within %gs", self.name, CANCEL_TIMEOUT_SECONDS)

    def _to_attempt(self, finished: wire.Finished) -> AttemptResult:
        if finished.result is None:
            outcome, cause = classify_death(finished.exit_code, finished.signum)
            return AttemptResult(self.name, outcome, error=cause)
        outcome, job_return, error = hydra_job.decode_outcome(finished.result)
        return AttemptResult(self.name, outcome, job_return=job_return, error=error)

    async def close(self) -> None:
        """Tell the agent to stop everything and exit, and wait (briefly) until it has: closing
        the link at once could drop the Shutdown on the way (an SSH channel's unsent data), and
        a detachable agent that missed it would wait for a launcher to come back."""
        with contextlib.suppress(*self.connection_errors):  # already gone: nothing to close
            if not self.broken and self.background:
                self.writer.write(wire.encode(wire.Shutdown()))
                self.writer.write_eof()
                with contextlib.suppress(asyncio.TimeoutError):  # its read loop ends when the agent has exited
                    await asyncio.wait_for(asyncio.shield(self.background[0]), SHUTDOWN_TIMEOUT_SECONDS)
            self.writer.close()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
