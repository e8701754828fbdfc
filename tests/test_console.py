"""The terminal's rules, on buffers: output goes above the status line, in whole lines.
(On a real terminal, read back through a terminal emulator: tests/test_journal.py.)"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import struct
import termios

import pytest

from hsm_core.console import CLEAR_LINE, LONGEST_LINE, Console, forward_lines


def test_a_line_is_printed_above_the_status_line_which_is_drawn_again() -> None:
    screen = io.StringIO()
    console = Console(screen)
    console.write("before\n")
    console.show("2/4 done")
    console.write("a job's line\n")
    console.hide()
    console.write("after\n")
    assert screen.getvalue() == (f"before\n{CLEAR_LINE}2/4 done{CLEAR_LINE}a job's line\n2/4 done{CLEAR_LINE}"
                                 "after\n")


@pytest.mark.timeout(10)
def test_forwarded_output_comes_in_whole_prefixed_lines() -> None:
    screen = io.StringIO()

    async def forward() -> None:
        reader = asyncio.StreamReader()
        for chunk in (b"one\ntw", b"o\n", b"x" * (2 * LONGEST_LINE + 10) + b"\n", "caf\u00e9\nlast".encode()):
            reader.feed_data(chunk)
        reader.feed_eof()
        await forward_lines(reader, "[h] ", Console(screen))

    asyncio.run(forward())
    lines = screen.getvalue().split("\n")
    assert lines[:2] == ["[h] one", "[h] two"] and lines[-3:] == ["[h] caf\u00e9", "[h] last", ""]
    long_pieces = lines[2:-3]
    assert all(piece.startswith("[h] ") for piece in long_pieces) and len(long_pieces) >= 2
    assert "".join(piece[4:] for piece in long_pieces) == "x" * (2 * LONGEST_LINE + 10)


def test_the_status_line_is_cut_to_the_terminal_s_width() -> None:
    """A status line that wrapped onto a second row could not be cleared by the next one."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    with os.fdopen(terminal, "w") as stream:
        console = Console(stream)
        console.show("local 2/2 host1 3/3 host2 1/1 | 10/24: 9 completed, 1 failed, 6 running, ETA 00:01:10")
        console.hide()
    drawn = os.read(main, 65536).decode()
    os.close(main)
    assert drawn.replace("\r\n", "\n").split(CLEAR_LINE)[1] == "local 2/2 host1 3/3 host2 1/1 | 10/24: "  # 39 of 40


@pytest.mark.timeout(10)
def test_a_progress_bar_shows_its_newest_state_on_the_status_line_then_as_its_line() -> None:
    screen = io.StringIO()
    console = Console(screen)
    console.show("3/4 done")

    async def forward() -> None:
        reader = asyncio.StreamReader()
        forwarding = asyncio.ensure_future(forward_lines(reader, "[h] ", console))
        for chunk in (b"epoch 1\n\r 10%|#", b"\r 50%|#####", b"\r100%|##########\n", b"done\n"):
            reader.feed_data(chunk)
            await asyncio.sleep(0.01)
        reader.feed_eof()
        await forwarding

    asyncio.run(forward())
    drawn = screen.getvalue()
    assert f"{CLEAR_LINE}3/4 done | [h] 10%|#" in drawn and f"{CLEAR_LINE}3/4 done | [h] 50%|#####" in drawn
    lines = [line.rsplit(CLEAR_LINE, 1)[-1] for line in drawn.split("\n")]
    assert lines[:-1] == ["[h] epoch 1", "[h] 100%|##########", "[h] done"]  # the bar's end, as one line
    assert lines[-1] == "3/4 done"  # the bar's line ended: the status line is the progress alone again
