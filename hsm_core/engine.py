"""The engine a sweep keeps across its batches: one event loop, the sources, the scheduler,
and the sweep dirs this launch holds.

Owns the loop's life and the signals: SIGINT or SIGTERM cancels the batch, which stops
every job on every source before the launcher exits; SIGHUP (the terminal went away) does
not: the sweep goes on, printing to `<sweep_dir>/.hsm/launcher.log`. Kept from batch to batch, so
connections and warm worker agents stay up. Must not know Hydra or which kinds of
source it holds (the composition root, `launch`, builds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from hsm_core import journal
from hsm_core.console import CONSOLE
from hsm_core.jobs import LAUNCHER_FOLDER, LAUNCHER_LOG, Handle, JobRecord, JobSpec, Observer
from hsm_core.scheduler import Scheduler
from hsm_core.sources.base import ComputeSource, Session

log = logging.getLogger(__name__)


class Periodic(Protocol):
    """Something that acts every so often while a batch runs (the progress summary, the report)."""

    def start(self) -> None:
        """Begin, from inside the batch's event loop."""

    def finish(self) -> None:
        """The batch has ended: stop."""


class Interrupted(SystemExit):
    """SIGINT or SIGTERM stopped the sweep (every running job was stopped); exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.why = f"interrupted by {signal.Signals(signum).name}"


class Engine:
    def __init__(self, sources: list[ComputeSource], scheduler: Scheduler) -> None:
        self.sources = sources
        self.scheduler = scheduler
        self.loop = asyncio.new_event_loop()
        self.claims: dict[Path, int] = {}  # sweep dir -> the fd that holds its lock
        self.hangup: tuple[Any, Any] | None = None  # SIGHUP's handler: this sweep's and the one before

    def run_batch(self, session: Session, jobs: Iterable[JobSpec], observers: Sequence[Observer],
                  periodic: Sequence[Periodic], adopt: Sequence[tuple[JobSpec, Handle]] = ()) -> list[JobRecord]:
        """Run the batch (adopting `adopt`'s attempts), `periodic` ticking while it runs; SIGINT
        or SIGTERM stops every job, then ends the launcher."""

        async def run() -> list[JobRecord]:
            for each in periodic:
                each.start()
            try:
                return await self.scheduler.run(session, jobs, observers, adopt)
            finally:
                for each in periodic:
                    each.finish()

        task = self.loop.create_task(run())
        received: list[int] = []

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        handled = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.loop.add_signal_handler(signum, stop, signum)
                handled.append(signum)
            except (RuntimeError, ValueError):  # not the main thread: the caller owns signals
                pass
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not received:
                raise
            name = signal.Signals(received[0]).name
            log.error(f"Interrupted by {name}: every running job was stopped")
            raise Interrupted(received[0]) from None
        finally:
            for signum in handled:
                self.loop.remove_signal_handler(signum)

    def claim(self, sweep_dir: Path) -> None:
        """Hold the sweep dir for this launch: a second launch into it is refused
        (journal.SweepDirBusy), not merged."""
        key = sweep_dir.absolute()
        if key not in self.claims:
            self.claims[key] = journal.claim(key)
            if self.hangup is None:
                self.hangup = outlive_terminal(key / LAUNCHER_FOLDER / LAUNCHER_LOG)

    def close(self) -> None:
        for fd in self.claims.values():
            os.close(fd)
        self.claims.clear()
        if self.hangup is not None:  # for a notebook, or a script's next sweep: as it was (unless replaced since)
            ours, before = self.hangup
            with contextlib.suppress(ValueError):
                if signal.getsignal(signal.SIGHUP) is ours:
                    signal.signal(signal.SIGHUP, before)
            self.hangup = None
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self._close_sources())
        self.loop.close()

    async def _close_sources(self) -> None:
        await asyncio.gather(*(source.close() for source in self.sources))
        await self.scheduler.close()


def outlive_terminal(log_path: Path) -> tuple[Any, Any] | None:
    """A closed terminal (SIGHUP: an SSH session dropped, a terminal window closed) does not
    end the sweep: what the launcher would print goes on in `log_path`. Returns the handler
    and the one it replaced (None when it could not: not the main thread)."""

    def hung_up(*_: Any) -> None:
        CONSOLE.leave_terminal(str(log_path))
        log.warning(f"The terminal closed (SIGHUP): the sweep goes on, and its log goes on in {log_path};"
                    " Ctrl-C (SIGINT) or SIGTERM still stop it")

    try:
        return hung_up, signal.signal(signal.SIGHUP, hung_up)
    except ValueError:  # not the main thread: the caller owns signals
        return None
