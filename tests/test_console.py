"""The terminal's rules, on buffers: output goes above the status line, in whole lines.
(On a real terminal, read back through a terminal emulator: tests/test_journal.py.)"""

from __future__ import annotations

import asyncio
import io

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
