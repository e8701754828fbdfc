"""The protocol between the launcher and a worker agent: typed messages in length-prefixed pickles.

Owns every message either side may send, and the framing. Knows nothing of jobs,
Hydra or sources. Stdlib only: this module travels to remote machines with the worker.
User objects never appear in a message as objects, only as cloudpickled bytes, so the
agent can route a message without importing anything of the user's. Adding a message
is one dataclass here and one `case` on each side.
"""

from __future__ import annotations

import pickle
import posixpath
import struct
from dataclasses import dataclass, field
from typing import Any, Union

HEADER = struct.Struct("!Q")
# Written by the agent right before its first frame: whatever a login shell or a setup
# line printed to stdout before the agent started comes before it, and is skipped.
START_MARKER = b"\n\x00hsm-agent-frames-follow\x00\n"
PROTOCOL = 4


# -- launcher -> agent ------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSession:
    """What every job of a batch shares, sent once per agent; answered by a Reply."""

    call_id: str
    session_id: str  # content hash of blob
    blob: bytes  # cloudpickled (hydra_context, task_function, Singleton state)
    sys_path: list[str]
    main: str | None = None  # the user's main program on this machine (hydra_job.adopt_main)


@dataclass(frozen=True)
class Run:
    """Run one job: its config exactly as composed, placed on this machine by `placement`."""

    key: str
    session_id: str
    payload: bytes  # the cloudpickled sweep config
    cwd: str  # where the job starts
    env: dict[str, str] = field(default_factory=dict)  # added to the job's environment (its GPUs)
    sweep_dir: str | None = None  # this machine's hydra.sweep.dir; None: the config's own


@dataclass(frozen=True)
class RunFiled:
    """Run the job whose Run message (its key: `key`) is in the file `request`, its outcome left
    in the file `outcome` (its Finished then carries no bytes): for a link on which a message
    over a kilobyte stalls (srun's step I/O waits ~40 ms for a TCP acknowledgement), with a
    filesystem the launcher reaches through another agent."""

    key: str
    request: str
    outcome: str


@dataclass(frozen=True)
class Cancel:
    key: str


@dataclass(frozen=True)
class Call:
    """File work (the agent's op_* methods), done in a thread; answered by a Reply."""

    call_id: str
    operation: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Watch:
    """Stop every job when the launcher is silent longer than this (a hung link)."""

    silence_limit: float


@dataclass(frozen=True)
class Ping:
    """The launcher's heartbeat, sent while Watch is on."""


@dataclass(frozen=True)
class Detachable:
    """When the launcher is gone, keep the jobs running for `grace` seconds (start none, keep
    their outcomes) and let a later launcher attach; without it, stop them at once."""

    grace: float


@dataclass(frozen=True)
class Adopt:
    """Follow a job an earlier launcher started here: Started (then Finished and Released as
    they come, at once if it has ended), or Rejected when this agent has no such job."""

    key: str


@dataclass(frozen=True)
class Forget:
    """The launcher has recorded the job's outcome: the agent need not keep it any more."""

    key: str


@dataclass(frozen=True)
class Shutdown:
    """The launcher is done (or stopping everything): stop every job and exit, detachable or not."""


# -- agent -> launcher ------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    info: dict[str, Any]  # probe.describe_environment() and the agent's scratch dir


@dataclass(frozen=True)
class Reply:
    call_id: str
    ok: bool
    value: Any  # the operation's value, or why it failed (text)


@dataclass(frozen=True)
class Started:
    key: str
    pid: int


@dataclass(frozen=True)
class Rejected:
    """The job could not start: its session is not loaded here."""

    key: str
    reason: str


@dataclass(frozen=True)
class Finished:
    key: str
    result: bytes | None  # the job's outcome as hydra_job.write_outcome wrote it; None: it died first
    exit_code: int | None
    signum: int | None
    outcome_file: str | None = None  # RunFiled: where the outcome is (None: it died first)


@dataclass(frozen=True)
class Released:
    """The job's whole process group is gone (so are its GPUs' users)."""

    key: str


ToAgent = Union[OpenSession, Run, RunFiled, Cancel, Call, Watch, Ping, Detachable, Adopt, Forget, Shutdown]
FromAgent = Union[Hello, Reply, Started, Rejected, Finished, Released]
MESSAGES = (OpenSession, Run, RunFiled, Cancel, Call, Watch, Ping, Detachable, Adopt, Forget, Shutdown, Hello, Reply,
            Started, Rejected, Finished, Released)


def encode(message: ToAgent | FromAgent) -> bytes:
    """One frame: 8-byte big-endian length, then the pickled message."""
    body = pickle.dumps(message, protocol=PROTOCOL)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    message = pickle.loads(body)
    if not isinstance(message, MESSAGES):
        raise ValueError(f"malformed frame: {type(message).__name__}")
    return message


def read_message(path: str) -> Any:
    """The message a file holds as one frame (AttemptFiles)."""
    with open(path, "rb") as file:
        return decode(file.read()[HEADER.size:])


@dataclass(frozen=True)
class AttemptFiles:
    """Every file of one attempt run from a folder of its own (a Slurm job), as submitit's
    JobPaths names them: its run request (a Run frame) and its session's (an OpenSession
    frame, shared by the batch's attempts), its batch script, its log, and its outcome, which
    stays until the launcher takes it."""

    folder: str
    session: str

    @property
    def request(self) -> str:
        return posixpath.join(self.folder, "run")

    @property
    def script(self) -> str:
        return posixpath.join(self.folder, "job.sh")

    @property
    def log(self) -> str:
        return posixpath.join(self.folder, "slurm.out")

    @property
    def outcome(self) -> str:
        return posixpath.join(self.folder, "outcome")


class FrameBuffer:
    """Accumulates bytes read from a pipe and yields the complete messages in them."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[Any]:
        self._data += chunk
        messages = []
        while len(self._data) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._data)
            end = HEADER.size + length
            if len(self._data) < end:
                break
            messages.append(decode(bytes(self._data[HEADER.size : end])))
            del self._data[:end]
        return messages
