"""The sweep's journal: `<sweep_dir>/.hsm/journal.jsonl`, one JSON record per event.

Append-only, flushed and fsynced per record, so a crash loses nothing written before
it and the file stays valid JSONL up to its last line. A completed job's JobReturn is
kept beside it (`results/<hash>.pkl`, written before its record), so a resumed sweep
hands sweepers the same return values without running the job again. An observer of the
scheduler's events: must not know the scheduler's internals or the sources.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import cloudpickle
import yaml

from hsm_core import files
from hsm_core.jobs import LAUNCHER_FOLDER, AttemptResult, Handle, JobRecord, Observer, Outcome, StopLaunching
from hsm_core.settings import SweepSettings

FOLDER = LAUNCHER_FOLDER
FILE = "journal.jsonl"
FAILURE_CLASS = {Outcome.FAILED: "task", Outcome.LOST: "infrastructure", Outcome.COMPLETED: None}


# -- the records: one dataclass per kind; a line is `{"event": KIND, "time": ..., fields}` --


@dataclass(frozen=True, kw_only=True)
class Record:
    """One line of the journal. A line that lacks a field without a default is damaged."""

    EVENT: ClassVar[str] = ""
    time: float = 0.0  # when it was written


@dataclass(frozen=True, kw_only=True)
class Launch(Record):
    """A batch of `jobs` jobs numbered from `first`, launched by this command."""

    EVENT = "launch"
    python: str
    command: list[str]
    cwd: str
    sources: list[str] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)  # each source's slots (jobs at once) at launch
    first: int = 0
    jobs: int = 0
    slurm: dict[str, dict[str, str]] = field(default_factory=dict)  # per Slurm source: its login host, job name


@dataclass(frozen=True, kw_only=True)
class LaunchEnd(Record):
    """How the last launched batch ended: `completed`, `interrupted by SIGINT`, ..."""

    EVENT = "launch_end"
    reason: str


@dataclass(frozen=True, kw_only=True)
class AttemptRecord(Record):
    """Of one attempt of a job (`hash`: its key, journal.job_key)."""

    num: int
    overrides: list[str]
    hash: str
    subdir: str
    source: str
    attempt: int


@dataclass(frozen=True, kw_only=True)
class Start(AttemptRecord):
    EVENT = "start"
    start: float
    gpus: list[int] = field(default_factory=list)
    gpu_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Submitted(AttemptRecord):
    """The machine took the attempt: its handle (jobs.Handle), for a later process to find it."""

    EVENT = "submitted"
    key: str
    names: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Adopted(AttemptRecord):
    """A launcher follows again an attempt that outlived a launcher or a link (its handle's key)."""

    EVENT = "adopted"
    key: str


@dataclass(frozen=True, kw_only=True)
class End(AttemptRecord):
    EVENT = "end"
    start: float
    end: float
    status: str  # Outcome's value
    failure_class: str | None  # "task" or "infrastructure"
    cause: str | None
    retrying: bool
    config: str | None = None  # JobSpec.config_hash
    code: str | None = None  # sync.code_fingerprint of the project it ran
    where: str | None = None  # e.g. "Slurm job 12 on node1"
    value: Any = None  # a completed job's return value as JSON (summary_value), for the report


@dataclass(frozen=True, kw_only=True)
class State(AttemptRecord):
    """What the machine's own scheduler says of a running attempt (Slurm: pending, and why)."""

    EVENT = "state"
    state: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class Moved(Record):
    """A completed job's outputs now live in `subdir` (a resumed sweep renumbered it)."""

    EVENT = "moved"
    hash: str
    subdir: str


@dataclass(frozen=True, kw_only=True)
class SourceChange(Record):
    """A source was lost (and reconnects), is back, was quarantined, or left the sweep."""

    EVENT = "source"
    source: str
    change: str
    reason: str = ""


KINDS: dict[str, type[Record]] = {kind.EVENT: kind for kind in (Launch, LaunchEnd, Start, Submitted, Adopted, End,
                                                                State, Moved, SourceChange)}

FIELD_NAMES = {kind: frozenset(item.name for item in fields(kind)) for kind in KINDS.values()}


def parse(entry: Any) -> Record | None:
    """The record a line's JSON object holds; None when it is damaged or of no known kind."""
    kind = KINDS.get(str(entry.get("event"))) if isinstance(entry, dict) else None
    if kind is None:
        return None
    names = FIELD_NAMES[kind]
    try:
        return kind(**{name: value for name, value in entry.items() if name in names})
    except TypeError:  # a field it must have is missing
        return None


def job_key(overrides: Sequence[str], seen: collections.Counter[str]) -> str:
    """The job's key in the journal: its overrides' hash, and `.N` for the N-th job of the sweep
    with the same overrides (`x=1,1`, an adaptive sweeper proposing a point again), so that
    resume tells them apart. `seen` counts the hashes of the sweep's jobs so far, in order."""
    digest = override_hash(overrides)
    seen[digest] += 1
    return digest if seen[digest] == 1 else f"{digest}.{seen[digest] - 1}"


def override_hash(overrides: Sequence[str]) -> str:
    """Stable across runs and job order: the sorted override list, hashed."""
    return hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:16]


def read(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every readable line of the journal as its JSON object (for tools and tests): a damaged
    line (a torn write) is skipped, and never hides the lines after it."""
    return [entry for entry, _ in _lines(sweep_dir)]


def records(sweep_dir: Path) -> list[Record]:
    """Every readable record of the journal, typed."""
    return [record for _, record in _lines(sweep_dir)]


def _lines(sweep_dir: Path) -> list[tuple[dict[str, Any], Record]]:
    path = sweep_dir / FOLDER / FILE
    if not path.exists():
        return []
    found = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        record = parse(entry)
        if record is not None:
            found.append((entry, record))
    return found


def private_folder(path: Path) -> Path:
    """A folder only this user can read: results and control data are pickles, and whoever
    can write them runs code in the launcher."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def cut_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a crash or a full disk mid-write) so the next
    record starts on a line of its own."""
    try:
        with open(path, "rb+") as file:
            data = file.read()
            if data and not data.endswith(b"\n"):
                file.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


class SweepDirBusy(Exception):
    """Another launch holds the sweep dir."""


def claim(sweep_dir: Path) -> int:
    """Lock `<sweep_dir>/.hsm/lock` for this launch (the fd holds the lock; the kernel drops it
    when the process ends, however it ends). SweepDirBusy names the launch that holds it."""
    lock_path = private_folder(sweep_dir / FOLDER) / "lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SweepDirBusy(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return fd


@dataclass
class Completed:
    """A job whose last attempt completed: where its outputs are, and what it ran."""

    subdir: str
    config: str | None  # JobSpec.config_hash (None in journals written before it was kept)
    code: str | None  # sync.code_fingerprint of the project it ran


class Journal(Observer):
    """The sweep's journal as the scheduler's observer, and what a resume reads of it."""

    def __init__(self, sweep_dir: Path, code: str | None = None) -> None:
        self.code = code  # the project's fingerprint for this launch's end records
        self.folder = private_folder(sweep_dir / FOLDER)
        self.path = self.folder / FILE
        self.results = self.folder / "results"
        # What the disk refused (full, over quota), in order: written as soon as it takes them.
        self.unwritten: list[tuple[Path, bytes] | bytes] = []
        cut_torn_tail(self.path)

    def append(self, record: Record, result: tuple[Path, bytes] | None = None) -> None:
        """Write a record (after the result file it refers to). When the disk refuses, both are
        kept here, written with the next record that gets through, and StopLaunching says so."""
        line = json.dumps({"event": record.EVENT, **asdict(record), "time": time.time()}, default=str) + "\n"
        self.unwritten.extend([result, line.encode()] if result else [line.encode()])
        self.write_unwritten()

    def write_unwritten(self) -> None:
        """Write what the disk refused before; StopLaunching when it still refuses."""
        try:
            while self.unwritten:
                entry = self.unwritten[0]
                if isinstance(entry, tuple):
                    files.write_atomically(str(private_folder(entry[0].parent) / entry[0].name), entry[1])
                else:
                    self._write_line(entry)
                self.unwritten.pop(0)
        except OSError as error:
            raise StopLaunching(
                f"the sweep's journal cannot be written ({error.strerror or error}: {self.folder})",
                "Running jobs finish and are recorded once the disk takes them. Fix: free space there, then run"
                " the same command with hydra.launcher.resume=true to run the jobs that did not start") from None

    def _write_line(self, line: bytes) -> None:
        """Append one line whole: a write cut short by the disk is taken back, so the next
        record never continues a torn one."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def sources_used(self, settings: SweepSettings, pythons: dict[str, str] | None = None) -> None:
        """`.hsm/sources.yaml`: the sources as this sweep used them, without secrets (env
        values and setup lines may hold tokens: only their names and count are kept)."""
        sources: dict[str, Any] = {}
        if settings.local.enabled:
            sources["local"] = {"kind": "local", "max_parallel_jobs": settings.local.max_parallel_jobs,
                                **gpu_fields(settings.local)}
        for remote in settings.remotes:
            sources[remote.name] = {
                "kind": remote.kind, "host": remote.host, "user": remote.user, "ssh_port": remote.ssh_port,
                "max_parallel_jobs": remote.max_parallel_jobs,
                "python": remote.python or (pythons or {}).get(remote.name, "(found when it connects)"),
                "project_dir": remote.project_dir, "setup_lines": len(remote.setup),
                "env": [name for name, _ in remote.env], **gpu_fields(remote),
            }
        text = yaml.safe_dump({"strategy": settings.strategy, "sources": sources}, sort_keys=False)
        self.unwritten.append((self.folder / "sources.yaml", text.encode()))
        self.write_unwritten()

    def launched(self, command: Sequence[str], slots: dict[str, int], first: int, jobs: int,
                 slurm: dict[str, dict[str, str]] | None = None) -> None:
        """A batch of `jobs` jobs numbered from `first` on the sources of `slots` (each one's
        slots). `slurm`: for each Slurm source, its login host and the name its Slurm jobs carry."""
        self.append(Launch(python=sys.executable, command=list(command), cwd=os.getcwd(), sources=list(slots),
                           slots=dict(slots), first=first, jobs=jobs, slurm=slurm or {}))

    def launch_ended(self, reason: str) -> None:
        """How the batch ended (a full disk may keep it from being written: it is not kept)."""
        with contextlib.suppress(StopLaunching):
            self.append(LaunchEnd(reason=reason))

    def job_started(self, record: JobRecord, source: str, started: float) -> None:
        self.append(Start(**identity(record), source=source, attempt=len(record.attempts) + 1, start=started,
                          gpus=[gpu.index for gpu in record.gpus], gpu_ids=[gpu.ident for gpu in record.gpus]))

    def job_ended(self, record: JobRecord, attempt: AttemptResult, retrying: bool) -> None:
        result, value = None, None  # a completed job's JobReturn, kept for a resume
        if attempt.outcome is Outcome.COMPLETED and attempt.job_return is not None:
            result = (self.results / f"{record.spec.key}.pkl", cloudpickle.dumps(attempt.job_return))
            value = summary_value(getattr(attempt.job_return, "_return_value", None))
        self.append(End(**identity(record), source=attempt.source, attempt=len(record.attempts),
                        start=attempt.started, end=attempt.ended, status=attempt.outcome.value,
                        failure_class=FAILURE_CLASS[attempt.outcome], cause=attempt.error, retrying=retrying,
                        config=record.spec.config_hash, code=self.code, where=attempt.where, value=value), result)

    def job_submitted(self, record: JobRecord, handle: Handle) -> None:
        self.append(Submitted(**identity(record), source=handle.source, attempt=len(record.attempts) + 1,
                              key=handle.key, names=handle.names))

    def job_adopted(self, record: JobRecord, handle: Handle) -> None:
        self.append(Adopted(**identity(record), source=handle.source, attempt=len(record.attempts) + 1,
                            key=handle.key))

    def job_noticed(self, record: JobRecord, source: str, state: str, detail: str) -> None:
        self.append(State(**identity(record), source=source, attempt=len(record.attempts) + 1, state=state,
                          detail=detail))

    def source_changed(self, source: str, change: str, reason: str) -> None:
        self.append(SourceChange(source=source, change=change, reason=reason))

    def moved(self, digest: str, subdir: str) -> None:
        self.append(Moved(hash=digest, subdir=subdir))

    def completed(self) -> dict[str, Completed]:
        """Every job whose last attempt completed, by key."""
        done: dict[str, Completed] = {}
        for record in records(self.path.parent.parent):
            if isinstance(record, End) and not record.retrying:
                if record.status == Outcome.COMPLETED.value and (self.results / f"{record.hash}.pkl").exists():
                    done[record.hash] = Completed(record.subdir, record.config, record.code)
                else:
                    done.pop(record.hash, None)
            elif isinstance(record, Moved) and record.hash in done:
                done[record.hash].subdir = record.subdir
        return done

    def unfinished(self) -> dict[str, Handle]:
        """By job key, the handle of each job's last attempt that was submitted and has no end,
        of a launch that ended without a record (killed, or its machine gone): it may run on
        where that launcher left it. A launch that recorded its end stopped all it started."""
        found: dict[str, Handle] = {}
        launched: set[str] = set()  # jobs submitted by the launch (batch) the records are at
        for record in records(self.path.parent.parent):
            if isinstance(record, Launch):
                launched = set()
            elif isinstance(record, Submitted):
                found[record.hash] = Handle(record.source, record.key, record.names, since=record.time)
                launched.add(record.hash)
            elif isinstance(record, End):
                found.pop(record.hash, None)
            elif isinstance(record, LaunchEnd):
                for key in launched:
                    found.pop(key, None)
        return found

    def result(self, digest: str) -> Any:
        return cloudpickle.loads((self.results / f"{digest}.pkl").read_bytes())


SUMMARY_KEYS = 32  # at most this many entries of a mapping or sequence return value are kept
SUMMARY_TEXT = 200  # characters of a text return value kept


def summary_value(value: Any, depth: int = 0) -> Any:
    """A return value as the report shows it, in JSON: a number, bool or text as such (NaN and
    infinities as text: JSON has none), a mapping or a short sequence of those as an object
    (nested keys joined by dots, sequence items as [0], [1], ...); None for anything else (a
    model, an array): it is in results/ for whoever needs it."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value[:SUMMARY_TEXT]
    if getattr(value, "shape", None) in ((), (1,)) and callable(getattr(value, "item", None)):
        with contextlib.suppress(Exception):  # a NumPy or torch scalar
            item = value.item()
            if isinstance(item, (bool, int, float)):
                return summary_value(item)
    if depth >= 3:
        return None
    if isinstance(value, collections.abc.Mapping):
        items = [(str(key), item) for key, item in itertools.islice(value.items(), SUMMARY_KEYS)]
    elif isinstance(value, (list, tuple)) and len(value) <= SUMMARY_KEYS:
        items = [(f"[{index}]", item) for index, item in enumerate(value)]
    else:
        return None
    flat: dict[str, Any] = {}
    for key, item in items:
        inner = summary_value(item, depth + 1)
        if isinstance(inner, dict):
            flat.update({f"{key}{'' if name.startswith('[') else '.'}{name}": leaf for name, leaf in inner.items()})
        elif inner is not None:
            flat[key] = inner
    return flat or None


def gpu_fields(source: Any) -> dict[str, Any]:
    if source.gpus is None:
        return {}
    return {"gpus": source.gpus if source.gpus == "auto" else list(source.gpus), "gpus_per_job": source.gpus_per_job,
            "min_free_memory_mb": source.min_free_memory_mb, "stagger_s": source.stagger_s}


def identity(record: JobRecord) -> dict[str, Any]:
    return {"num": record.spec.num, "overrides": record.spec.overrides,
            "hash": record.spec.key, "subdir": record.spec.subdir}


def sweep_status(sweep_dir: Path) -> dict[str, Any]:
    """Every job the journal knows (by key) with its latest state, the numbers of launched
    jobs that never started, totals per source, each source's last change (lost, back,
    quarantined, left), and the command line that resumes the sweep."""
    jobs: dict[str, dict[str, Any]] = {}
    launch: Launch | None = None
    ended: LaunchEnd | None = None  # the last launch's end, when it was recorded
    launched: set[int] = set()
    changes: dict[str, dict[str, Any]] = {}
    for record in records(sweep_dir):
        if isinstance(record, Launch):
            launch, ended = record, None
            launched.update(range(record.first, record.first + record.jobs))
        elif isinstance(record, LaunchEnd):
            ended = record
        elif isinstance(record, SourceChange):
            changes[record.source] = {"change": record.change, "reason": record.reason, "time": record.time}
        elif isinstance(record, State):  # what the machine's scheduler says of a started attempt (Slurm)
            job = jobs.get(record.hash, {})
            if job.get("status") in ("running", "pending", "detached") and job["attempts"] == record.attempt:
                job.update(status=record.state if record.state in ("pending", "detached") else "running",
                           detail=record.detail)
        elif isinstance(record, Submitted) and record.names.get("allocation"):
            job = jobs.get(record.hash, {})
            job["allocation"] = (record.source, record.names["allocation"], record.names.get("node", ""))
        elif isinstance(record, Adopted) and record.hash in jobs:
            jobs[record.hash].update(status="running", detail=f"adopted on {record.source}")
        elif isinstance(record, (Start, End)):
            job = jobs.setdefault(record.hash, {"attempts": 0, "gpus": []})
            job.update(num=record.num, overrides=record.overrides, source=record.source)
            if isinstance(record, Start):
                job.update(attempts=record.attempt, status="running", duration=None, cause=None, gpus=record.gpus,
                           detail=None)
            else:
                job.update(status="retrying" if record.retrying else record.status, cause=record.cause,
                           failure_class=record.failure_class, duration=round(record.end - record.start, 3),
                           attempts=max(job["attempts"], record.attempt))
    per_source: dict[str, dict[str, int]] = {}
    for job in jobs.values():
        tally = per_source.setdefault(job["source"], {"jobs": 0, "completed": 0, "failed": 0, "attempts": 0,
                                                      "running": 0, "detached": 0})
        tally["jobs"] += 1
        tally["attempts"] += job["attempts"]
        if job["status"] == "completed":
            tally["completed"] += 1
        elif job["status"] in ("failed", "lost"):
            tally["failed"] += 1
        elif job["status"] in ("running", "pending"):
            tally["running"] += 1
        elif job["status"] == "detached":  # its machine is out of reach; the job may run on there
            tally["detached"] += 1
    allocations: dict[str, dict[str, dict[str, Any]]] = {}  # source -> Slurm allocation id -> its node and jobs
    for job in jobs.values():
        if "allocation" in job:
            source, allocation, node = job.pop("allocation")
            held = allocations.setdefault(source, {}).setdefault(allocation, {"node": node, "jobs": 0, "running": 0})
            held["jobs"] += 1
            held["running"] += job["status"] == "running"
    return {
        "sweep_dir": str(sweep_dir),
        "jobs": sorted(jobs.values(), key=lambda job: job["num"]),
        "allocations": allocations,
        "never_started": sorted(launched - {job["num"] for job in jobs.values()}),
        "sources": per_source,
        "source_changes": changes,
        "launch_end": {"reason": ended.reason, "time": ended.time} if ended else None,
        "launcher": holder(sweep_dir),
        "resume_command": resume_command(launch, sweep_dir) if launch else None,
        "slurm": launch.slurm if launch else {},
    }


def holder(sweep_dir: Path) -> str | None:
    """The launch that holds the sweep dir now (`pid N on HOST, since ...`), or None."""
    lock_path = sweep_dir / FOLDER / "lock"
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # a shared lock taken here goes with it
    return None


def resume_command(launch: Launch, sweep_dir: Path) -> str:
    """The launch's own command line, with resume on and the sweep dir pinned."""
    words = [launch.python, *launch.command]
    words = [word for word in words if not word.startswith(("hydra.launcher.resume=", "hydra.sweep.dir="))]
    words += ["hydra.launcher.resume=true", f"hydra.sweep.dir={sweep_dir.absolute()}"]
    return f"cd {shlex.quote(launch.cwd)} && {shlex.join(words)}"
