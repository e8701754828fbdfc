"""The framing between the launcher and a worker agent: length-prefixed pickles.

Stdlib only: this module travels to remote machines with the worker. Frames carry
plain tuples of str/int/bytes; user objects inside them are cloudpickled bytes, so
the agent can route a message without importing anything of the user's.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

HEADER = struct.Struct("!Q")
# Written by the agent right before its first frame: whatever a login shell or a setup
# line printed to stdout before the agent started comes before it, and is skipped.
START_MARKER = b"\n\x00hsm-agent-frames-follow\x00\n"
PROTOCOL = 4


def encode(message: tuple[Any, ...]) -> bytes:
    """One frame: 8-byte big-endian length, then the pickled message."""
    body = pickle.dumps(message, protocol=PROTOCOL)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> tuple[Any, ...]:
    message = pickle.loads(body)
    if not isinstance(message, tuple) or not message:
        raise ValueError(f"malformed frame: {type(message).__name__}")
    return message


class FrameBuffer:
    """Accumulates bytes read from a pipe and yields the complete frames in them."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[Any, ...]]:
        self._data += chunk
        frames = []
        while len(self._data) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._data)
            end = HEADER.size + length
            if len(self._data) < end:
                break
            frames.append(decode(bytes(self._data[HEADER.size : end])))
            del self._data[:end]
        return frames
