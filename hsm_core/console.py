"""The launcher's terminal: one live status line at the bottom, everything else above it.

While the status line shows, whatever else the launcher prints (the jobs' forwarded
output, log lines of any logger that writes to this terminal) first clears it and then
draws it again below, as tqdm's `write` does, so no line is ever written into another.
Off a terminal there is no status line and this is plain writing."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, TextIO

CLEAR_LINE = "\r\033[K"
LONGEST_LINE = 64 * 1024  # a longer run of output without a newline is shown in pieces


class Console:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.given_stream = stream  # None: sys.stderr as it is at each write, as print() does
        self.progress = ""  # what the sweep's progress says
        self.activities: dict[str, str] = {}  # a line a job is still drawing, per stream; the last is newest
        self.status = ""  # the line as drawn, "" while none is
        self.lock = threading.RLock()  # a logger may write from another thread; SIGHUP's handler mid-write
        self.adopted: list[tuple[logging.StreamHandler[Any], Any]] | None = None  # None: not looked for yet

    @property
    def stream(self) -> TextIO:
        return self.given_stream or sys.stderr

    @property
    def on_terminal(self) -> bool:
        return self.stream.isatty()

    def show(self, progress: str) -> None:
        """Draw (or redraw) the status line."""
        if self.adopted is None:  # outside the lock: setStream takes each handler's own lock
            self.adopted = self._adopt_log_handlers()
        with self.lock:
            self.progress = progress
            self._draw()

    def show_activity(self, source: str, text: str) -> None:
        """A line a job's output is still drawing (a progress bar): at the status line's end
        while it is the newest, until `text` is empty (its line ended)."""
        with self.lock:
            self.activities.pop(source, None)
            if text:
                self.activities[source] = text
            if self.status:
                self._draw()

    def hide(self) -> None:
        """Clear the status line for good (until the next `show`)."""
        with self.lock:
            if self.status:
                self.stream.write(CLEAR_LINE)
                self.stream.flush()
            self.status = self.progress = ""
            self.activities.clear()
        for handler, stream in self.adopted or []:
            handler.setStream(stream)
        self.adopted = None

    def leave_terminal(self, log_path: str) -> None:
        """The terminal went away (SIGHUP): from now on stdout and stderr (fds 1 and 2, so the
        local jobs' forwarded output too) append to `log_path`, and no status line is drawn."""
        with self.lock:
            try:
                fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError:  # no room for it: the journal still keeps every job's record
                fd = os.open(os.devnull, os.O_WRONLY)
            for target in (1, 2):
                os.dup2(fd, target)
            os.close(fd)
            self.status = self.progress = ""
            self.activities.clear()
        for handler, stream in self.adopted or []:
            handler.setStream(stream)
        self.adopted = None

    def write(self, text: str, stream: TextIO | None = None) -> None:
        """Whole lines, printed above the status line (on `stream`, default this one's)."""
        target = stream or self.stream
        with self.lock:
            if self.status:
                self.stream.write(CLEAR_LINE)
                self.stream.flush()
            target.write(text)
            target.flush()
            if self.status:
                self.stream.write(self.status)
                self.stream.flush()

    def _draw(self) -> None:
        newest = next(reversed(self.activities.values()), "")
        self.status = self._fitted(f"{self.progress} | {newest}" if newest else self.progress)
        with contextlib.suppress(OSError):  # the terminal is going away (its SIGHUP follows)
            self.stream.write(CLEAR_LINE + self.status)
            self.stream.flush()

    def _fitted(self, status: str) -> str:
        """Cut to the terminal's width: a line that wrapped could not be cleared."""
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return status
        return status[: width - 1] if width > 1 else status  # 0: a terminal that does not know its width

    def _adopt_log_handlers(self) -> list[tuple[logging.StreamHandler[Any], Any]]:
        """Route every log handler that writes to this terminal through `write`; returns
        each with the stream it had."""
        try:
            terminal = os.path.realpath(os.ttyname(self.stream.fileno()))
        except (AttributeError, OSError, ValueError):  # not a real terminal (a test's buffer)
            return []
        loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                          if isinstance(logger, logging.Logger))]
        return [(handler, handler.setStream(_Above(self, handler.stream)))
                for handler in {handler for logger in loggers for handler in logger.handlers}
                if isinstance(handler, logging.StreamHandler) and writes_to(handler.stream, terminal)]


def writes_to(stream: Any, terminal: str) -> bool:
    try:
        return stream.isatty() and os.path.realpath(os.ttyname(stream.fileno())) == terminal
    except (AttributeError, OSError, ValueError):
        return False


class _Above:
    """A log handler's stream whose writes go above the status line."""

    def __init__(self, console: Console, stream: TextIO) -> None:
        self.console = console
        self.stream = stream

    def write(self, text: str) -> None:
        self.console.write(text, self.stream)

    def flush(self) -> None:
        self.stream.flush()


CONSOLE = Console()


async def forward_lines(reader: Any, prefix: str = "", console: Console = CONSOLE) -> None:
    """A byte stream (a job's console output), shown line by line above the status line,
    each line with `prefix` (a remote machine's `[name] `). A line that a progress bar keeps
    redrawing (tqdm's `\\r`) shows its newest state at the status line's end meanwhile, and
    that state as the line when it ends. Returns at the stream's end."""
    pending = b""
    while chunk := await reader.read(LONGEST_LINE):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if b"\r" in pending:  # only the newest state of a redrawn line matters
            pending = b"\r" + drawn(pending)
        if len(pending) >= LONGEST_LINE:
            lines.append(pending)
            pending = b""
        if lines:
            console.write("".join(f"{prefix}{drawn(line).decode(errors='replace')}\n" for line in lines))
        console.show_activity(prefix, f"{prefix}{drawn(pending).decode(errors='replace').strip()}"
                              if pending.strip() else "")
    if pending:
        console.write(f"{prefix}{drawn(pending).decode(errors='replace')}\n")
        console.show_activity(prefix, "")


def drawn(line: bytes) -> bytes:
    """What a terminal shows of a line redrawn with carriage returns: its last non-blank state."""
    if b"\r" not in line:
        return line
    states = [state for state in line.split(b"\r") if state.strip()]
    return states[-1] if states else b""
