"""The worker agent: runs on a target machine and forks one isolated process per job.

Five rooms: the Agent's message loop (hears the launcher and its silence, and with
Detachable outlives it: a later launcher attaches through a Unix socket), the
JobSupervisor (each job in its own process group, led by a guard that ends the group
when the agent dies; TERM then KILL on cancel or shutdown), the FileService (file work in
threads, so the loop always hears the launcher), the SlurmService (a login node's
submissions, remembered until the agent exits) and the OutputRelay (the jobs' console
output, which must never write into a closed connection). Must not know Hydra's job contract
(`hydra_job` runs the job inside the forked process) or sources.

`python -m hsm_core.worker [--attach SOCKET]` speaks `hsm_core.wire`'s messages on
stdin/stdout: it writes wire.START_MARKER, then a Hello, then answers what the launcher
sends. With --attach, when an agent an earlier launcher left running listens at SOCKET,
the process is only a bridge between its stdin/stdout and that agent. It imports Hydra
once and loads a batch's session once, so each job costs a fork, not an interpreter.

Only the standard library, Hydra and cloudpickle are imported: this file and AGENT_FILES
(`remote_machine.py`) are all of the project that a remote machine needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

if __package__ in (None, ""):  # run as a plain file on a remote machine
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsm_core import environments, files, slurm, wire
from hsm_core.probe import describe_environment, gpu_inventory

KILL_GRACE_SECONDS = 5.0
LINGER_POLL_SECONDS = 0.25  # how often a finished job's leftover processes are looked for
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once here, not in every job's guard
AGENT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds this hsm_core


@dataclass
class RunningJob:
    key: str
    outcome_path: str
    kill_at: float | None = None  # when TERM was sent: the moment KILL follows
    killed: bool = False
    filed: bool = False  # RunFiled: the outcome stays in its file, for the launcher to fetch


Send = Callable[[wire.FromAgent], None]


class Agent:
    """The message loop: hears the launcher (and its silence), hands each message to the room
    that serves it (JobSupervisor, FileService, SlurmService), and stops them all when the
    launcher is gone."""

    def __init__(self, proto_in: int, proto_out: int, attach_path: str | None = None) -> None:
        self.proto_in: int | None = proto_in  # None while detached: no launcher
        self.proto_out: int | None = proto_out
        self.frames = wire.FrameBuffer()
        self.stopping = False
        self.attach_path = attach_path  # where a later launcher finds this agent, once it is detachable
        self.grace = 0.0  # Detachable: how long jobs outlive the launcher
        self.listener: socket.socket | None = None
        self.link: socket.socket | None = None  # the launcher's connection, when it came through the socket
        self.detached_at: float | None = None  # monotonic time the launcher was lost (while detached)
        self.link_broken = False  # a write failed, or SIGHUP: the launcher is gone
        self.grace_expired = False  # then the agent's log (its jobs' output meanwhile) is kept
        self.output: OutputRelay | None = None
        self.info: dict[str, Any] = {}
        self.silence_limit: float | None = None  # set by "watch": stop when the launcher is silent longer
        self.last_heard = time.monotonic()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        os.set_blocking(self.wake_read, False)
        self.selector = selectors.DefaultSelector()
        self.send_lock = threading.Lock()  # the link's: replies of file work come from other threads
        self.abandoned: list[socket.socket | int] = []  # links dropped while a write was stuck on them
        self.place: int | None = None  # the lock that says an agent lives at attach_path
        self.jobs = JobSupervisor(self.send, self._leave_agent)
        self.slurm = SlurmService()
        self.operations = {name.removeprefix("op_"): getattr(service, name)
                           for service in (FileService(), self.slurm) for name in dir(service)
                           if name.startswith("op_")}

    # -- plumbing -------------------------------------------------------------------

    def send(self, message: wire.FromAgent) -> None:
        self.write(wire.encode(message))

    def write(self, raw: bytes) -> None:
        """Write to the launcher; a link that broke is said once to the loop (a message sent
        while there is no launcher is dropped: what matters is kept, see JobSupervisor.kept)."""
        data = memoryview(raw)
        lock = self.send_lock  # the link's own: one dropped meanwhile takes no more bytes
        with lock:
            out = self.proto_out
            try:
                while data and out is not None and lock is self.send_lock:
                    data = data[os.write(out, data):]
            except OSError:
                self._on_hangup()

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides; it tells us
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        signal.set_wakeup_fd(self.wake_write)

    def _on_stop_signal(self, *_: Any) -> None:
        self.stopping = True

    def _on_hangup(self, *_: Any) -> None:
        self.link_broken = True
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_write, b"!")

    def serve(self) -> None:
        self.install_signals()
        assert self.proto_in is not None
        self.selector.register(self.proto_in, selectors.EVENT_READ, "proto")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        self.info = describe_environment()
        self.info["scratch"] = self.jobs.scratch
        self.info["agent_dir"] = AGENT_DIR  # with info["executable"]: how to start another agent here
        self.info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # a Slurm step's GPUs
        self.write(wire.START_MARKER)
        self.send(wire.Hello(self.info))
        try:
            while not self.stopping:
                for selected, _ in self.selector.select(timeout=self._next_timeout()):
                    if selected.data == "wake":
                        self._drain_wakeups()
                    elif selected.data == "listen":
                        self._attach()
                    elif selected.fd == self.proto_in and not self._read_messages():
                        self._lose_launcher("its connection closed")
                self.jobs.tend()
                if self.link_broken:
                    self._lose_launcher("its connection broke")
                elif self._launcher_silent():
                    self._lose_launcher(f"it was silent for {self.silence_limit:g}s")  # a hung link
                if self.detached_at is not None and time.monotonic() >= self.detached_at + self.grace:
                    say(f"no launcher came back within detach_grace ({self.grace:g}s): stopping the jobs")
                    self.stopping = self.grace_expired = True
        finally:
            self.slurm.shutdown()
            self.jobs.shutdown()
            self._stop_listening()

    # -- outliving the launcher (Detachable) -----------------------------------------------

    def _lose_launcher(self, why: str) -> None:
        """The launcher is gone: detach when it may come back (the jobs run on, nothing new
        starts, outcomes are kept), else stop everything (the dead man's switch)."""
        self.link_broken = False
        if not self.grace or self.listener is None:
            self.stopping = True
            return
        self._drop_link()
        if self.detached_at is None:
            self.detached_at = time.monotonic()
            if self.output is not None:
                self.output.divert()
            say(f"the launcher is gone ({why}): {len(self.jobs.running)} jobs run on; a launcher with"
                f" resume=true attaches within {self.grace:g}s (detach_grace), else they are stopped")

    def _drop_link(self) -> None:
        """Let go of the launcher's link. A write stuck on a hung link keeps its lock and its
        descriptor (left open, so its number is not reused under it); the next link gets a
        lock of its own."""
        lock = self.send_lock
        writable = lock.acquire(timeout=1.0)
        try:
            if self.proto_in is not None:
                self.selector.unregister(self.proto_in)
            if self.link is not None:
                if writable:
                    self.link.close()
                else:
                    self.abandoned.append(self.link)
            else:  # the first launcher's pipes: fd 0 stays taken (forked jobs replace it with /dev/null)
                if not writable and self.proto_out is not None:
                    self.abandoned.append(self.proto_out)
                for fd in (self.proto_in, self.proto_out if writable else None):
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                if devnull != 0:
                    os.dup2(devnull, 0)
                    os.close(devnull)
            self.link = self.proto_in = self.proto_out = None
            self.send_lock = threading.Lock()
            self.frames = wire.FrameBuffer()
            self.silence_limit = None
        finally:
            if writable:
                lock.release()

    def _listen(self, grace: float) -> None:
        """Be findable at attach_path (a socket only this user reaches) from now on."""
        assert self.attach_path is not None
        base = self.attach_path.removesuffix(".sock")
        try:
            files.private_dirs(os.path.dirname(self.attach_path))
            self.place = os.open(base + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self.place, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this agent lives
            except BlockingIOError:
                os.close(self.place)
                self.place = None
                say(f"another agent of this sweep is found at {self.attach_path}: this one's jobs stop when the"
                    " launcher is gone")
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.attach_path)  # an agent that died without removing it (no one answered there)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(self.attach_path)
            listener.listen(8)
        except OSError as error:
            say(f"cannot listen at {self.attach_path} ({error}): the jobs stop when the launcher is gone")
            return
        self.listener, self.grace = listener, grace
        self.selector.register(listener, selectors.EVENT_READ, "listen")
        self.output = OutputRelay(base + ".log")

    def _attach(self) -> None:
        """A launcher (through a bridge) takes this agent over; one still attached is presumed gone."""
        assert self.listener is not None
        try:
            link, _ = self.listener.accept()
        except OSError:
            return
        self._drop_link()
        link.setblocking(True)
        with self.send_lock:
            self.link, self.proto_in, self.proto_out = link, link.fileno(), link.fileno()
        self.selector.register(self.proto_in, selectors.EVENT_READ, "proto")
        self.last_heard, self.detached_at = time.monotonic(), None
        say(f"a launcher attached ({len(self.jobs.running)} jobs running, {len(self.jobs.kept)} outcomes kept)")
        self.write(wire.START_MARKER)
        self.send(wire.Hello(self.info))

    def _stop_listening(self) -> None:
        """Remove the socket, and the log unless no launcher came back to read what it says."""
        if self.listener is not None and self.attach_path:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.attach_path)
            with contextlib.suppress(OSError):
                os.unlink(self.attach_path.removesuffix(".sock") + ".lock")
            if not self.grace_expired and self.output is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.output.log_path)
            self.listener = None

    def _launcher_silent(self) -> bool:
        """No frame for longer than the limit, though we could have read one: bytes that
        arrived while the agent was busy are not silence."""
        if self.proto_in is None or not self.silence_limit or time.monotonic() - self.last_heard <= self.silence_limit:
            return False
        waiting = selectors.DefaultSelector()
        waiting.register(self.proto_in, selectors.EVENT_READ)
        try:
            return not waiting.select(timeout=0)
        finally:
            waiting.close()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def _read_messages(self) -> bool:
        assert self.proto_in is not None
        try:
            chunk = os.read(self.proto_in, 1 << 20)
        except OSError:  # a reset link
            return False
        if not chunk:
            return False
        self.last_heard = time.monotonic()
        for message in self.frames.feed(chunk):
            self.handle(message)
        return True

    def _next_timeout(self) -> float | None:
        deadlines = self.jobs.deadlines()
        if self.silence_limit:
            deadlines.append(self.last_heard + self.silence_limit + 0.01)
        if self.detached_at is not None:
            deadlines.append(self.detached_at + self.grace)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _leave_agent(self) -> None:
        """In a forked child: drop the agent's signal handlers and file descriptors."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        for fd in (None if self.link else self.proto_out, self.wake_read, self.wake_write):
            if fd is not None:
                os.close(fd)
        for held in (self.listener, self.link, *self.abandoned, self.place):  # a socket object closes its own fd
            if isinstance(held, int):
                os.close(held)
            elif held is not None:
                held.close()
        if self.output is not None:
            self.output.leave()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

    # -- messages -------------------------------------------------------------------

    def handle(self, message: wire.ToAgent) -> None:
        match message:
            case wire.OpenSession():
                self.jobs.open_session(message)
            case wire.Run():
                self.jobs.start_job(message)
            case wire.RunFiled(key, request, outcome):
                self.jobs.start_filed_job(key, request, outcome)
            case wire.Cancel(key):
                self.jobs.cancel(key)
            case wire.Call():
                try:
                    threading.Thread(target=self.answer, args=(message,), daemon=True).start()
                except RuntimeError:  # no thread to be had (a process limit): answer here, late but whole
                    self.answer(message)
            case wire.Watch(silence_limit):
                self.silence_limit = silence_limit
            case wire.Ping():
                pass
            case wire.Detachable(grace):
                if grace > 0 and self.listener is None and self.attach_path:
                    self._listen(grace)
                    self.jobs.keep_outcomes = self.listener is not None
                elif self.listener is not None:
                    self.grace = grace
            case wire.Adopt(key):
                self.jobs.adopt(key)
            case wire.Forget(key):
                self.jobs.forget(key)
            case wire.Shutdown():
                self.stopping = True
            case _:
                raise ValueError(f"unexpected message {type(message).__name__}")

    def answer(self, call: wire.Call) -> None:
        try:
            value = self.operations[call.operation](*call.args)
        except Exception as failure:
            self.send(wire.Reply(call.call_id, False, f"{type(failure).__name__}: {failure}"))
        else:
            self.send(wire.Reply(call.call_id, True, value))


class FileService:
    """File work the launcher asks for (`call`: op_NAME); each call runs in a thread of its own."""

    def __init__(self) -> None:
        self.hashes = files.HashCache()
        self.leases: list[int] = []  # snapshots this agent's jobs run (files.build_snapshot)

    def op_tree(self, root: str) -> files.Tree:
        return self.hashes.tree(root)

    def op_remove(self, path: str) -> bool:
        return files.remove_tree(path)

    def op_remove_verified(self, root: str, verified: files.Tree) -> list[str]:
        return files.remove_verified(root, verified, self.hashes)

    def op_gpus(self) -> list[dict[str, Any]] | dict[str, str]:
        return gpu_inventory()

    def op_put(self, path: str, data: bytes) -> None:
        """Write a file (its folder made private when new)."""
        files.private_dirs(os.path.dirname(path))
        files.write_atomically(path, data)

    def op_take(self, path: str) -> bytes | None:
        """A file's bytes, and the file removed; None when there is none."""
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        os.unlink(path)
        return data

    def op_tail(self, path: str, size: int) -> str:
        """The last `size` bytes of a text file ("" when there is none)."""
        try:
            with open(path, "rb") as file:
                file.seek(max(0, os.fstat(file.fileno()).st_size - size))
                return file.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def op_missing_objects(self, root: str, names: list[str]) -> list[str]:
        return files.missing_objects(root, names)

    def op_settle_object(self, partial: str, target: str) -> bool:
        return files.settle_object(partial, target)

    def op_snapshot(self, root: str, snapshot: str, project: dict[str, str]) -> tuple[str, int]:
        """Build (or reuse) the launch's snapshot, lease it, drop unused ones: (path, removed)."""
        path, lease = files.build_snapshot(root, snapshot, project)
        self.leases.append(lease)
        return path, files.remove_unused(root, keep=snapshot)


class SlurmService:
    """Slurm through this login node (`call`: op_slurm_*): every job it submits is remembered,
    and scancelled when the agent exits (an ended one: a no-op), so nothing the launcher
    gave up on keeps running."""

    def __init__(self) -> None:
        self.submitted: set[str] = set()

    def op_slurm_submit(self, attempt: wire.AttemptFiles, options: list[str], tag: str) -> str:
        """Submit the attempt in its folder with this agent's Python and files; its Slurm id."""
        script = slurm.batch_script(options, sys.executable, AGENT_DIR, attempt.folder, attempt.session)
        files.write_atomically(attempt.script, script.encode())
        job_id = slurm.submit(attempt.script, tag)
        self.submitted.add(job_id)
        return job_id

    def op_slurm_hold(self, folder: str, options: list[str], tag: str) -> str:
        """Submit an allocation (slurm.hold_script) whose script is kept in `folder`; its Slurm id."""
        files.private_dirs(folder)
        script = os.path.join(folder, f"{tag}.sh")
        files.write_atomically(script, slurm.hold_script(options).encode())
        job_id = slurm.submit(script, tag)
        self.submitted.add(job_id)
        return job_id

    def op_slurm_states(self, job_ids: list[str]) -> dict[str, slurm.JobState]:
        return slurm.states(job_ids)

    def op_slurm_cancel(self, job_ids: list[str]) -> None:
        slurm.cancel(job_ids)

    def shutdown(self) -> None:
        if self.submitted:
            slurm.cancel(sorted(self.submitted))


class JobSupervisor:
    """The processes of this machine's jobs: sessions loaded once, one forked guard per job
    leading its own process group, TERM then KILL on cancel or shutdown, each job's end and
    the moment its last process is gone reported (`send`)."""

    def __init__(self, send: Send, leave_agent: Callable[[], None]) -> None:
        self.send = send
        self.leave_agent = leave_agent  # in a forked child: let go of the agent's descriptors
        self.sessions: dict[str, Any] = {}  # session id -> hydra_job.SessionContents
        self.broken_sessions: dict[str, str] = {}  # session id -> why it could not be loaded
        self.active_session: str | None = None
        self.main: str | None = None  # the user's main program, made this process's __main__
        self.running: dict[int, RunningJob] = {}
        self.lingering: dict[int, str] = {}  # process group of a finished job -> key, while members live
        self.keep_outcomes = False  # detachable: each Finished is kept until the launcher has recorded it
        self.kept: dict[str, wire.Finished] = {}  # by key, until Forget
        self.released: set[str] = set()  # kept jobs whose last process has exited
        self.scratch = tempfile.mkdtemp(prefix="hsm-agent-")

    def open_session(self, message: wire.OpenSession) -> None:
        """Load a batch's task and Hydra state; the reply says whether this machine can run it."""
        try:
            self.sessions[message.session_id] = enter_session(message, self.main)
            self.main = message.main  # adopted once per agent: jobs inherit it
        except BaseException as failure:  # anything the user's imports raise
            traceback.print_exc()  # the detail goes to the launcher's terminal
            self.broken_sessions[message.session_id] = (
                f"the task could not be loaded here ({type(failure).__name__}: {failure}). Fix: install"
                f" what it imports in this machine's Python ({sys.executable}), or keep it in the project folder"
            )
            self.send(wire.Reply(message.call_id, False, self.broken_sessions[message.session_id]))
            return
        self.send(wire.Reply(message.call_id, True, None))

    def activate(self, session_id: str) -> None:
        """Put the session's Hydra globals in place, so forked jobs inherit them ready."""
        if self.active_session != session_id:
            from hsm_core import hydra_job

            hydra_job.install_session(self.sessions[session_id])
            self.active_session = session_id

    def start_filed_job(self, key: str, request: str, outcome: str) -> None:
        """Start the job whose Run is in the file `request` (removed once read)."""
        try:
            run = wire.read_message(request)
            os.unlink(request)
        except (OSError, EOFError, ValueError) as error:
            self.send(wire.Rejected(key, f"the job's request {request} cannot be read here ({error}); the login"
                                         " node's ~/.hsm must be on a filesystem this node shares"))
            return
        self.start_job(run, outcome)

    def start_job(self, run: wire.Run, filed_outcome: str | None = None) -> None:
        """Fork the job's guard; its outcome goes to `filed_outcome` when given (RunFiled),
        else into the Finished message."""
        if run.session_id not in self.sessions:
            self.send(wire.Rejected(run.key, self.broken_sessions.get(run.session_id,
                                                                      f"unknown session {run.session_id}")))
            return
        outcome_path = filed_outcome or os.path.join(self.scratch, f"{run.key}.result")
        self.activate(run.session_id)
        session = self.sessions[run.session_id]
        agent_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as error:  # out of processes or memory: this job cannot start here, others may
            self.send(wire.Rejected(run.key, f"the job could not be started here (fork failed: {error}); the machine"
                                             " is out of processes or memory"))
            return
        if pid == 0:
            code = 1
            try:
                self.leave_agent()
                code = guard_job(agent_pid, lambda: run_job(session, run, outcome_path))
            finally:
                os._exit(code)
        self.running[pid] = RunningJob(run.key, outcome_path, filed=filed_outcome is not None)
        self.send(wire.Started(run.key, pid))

    def cancel(self, key: str) -> None:
        for pid, job in self.running.items():
            if job.key == key and job.kill_at is None:
                signal_group(pid, signal.SIGTERM)
                job.kill_at = time.monotonic() + KILL_GRACE_SECONDS

    def deadlines(self) -> list[float]:
        """When the supervisor must look again: a KILL due, leftover processes to look for."""
        due = [job.kill_at for job in self.running.values() if job.kill_at and not job.killed]
        if self.lingering:
            due.append(time.monotonic() + LINGER_POLL_SECONDS)
        return due

    def tend(self) -> None:
        """After each wake-up: report ended jobs and gone groups, KILL what outlived its grace."""
        self._reap()
        self._release_gone_groups()
        self._escalate_kills()

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.running.pop(pid, None)
            if job is not None:
                self._report_finished(job, status)
                self.lingering[pid] = job.key  # the guard led the job's group: pgid == its pid

    def _report_finished(self, job: RunningJob, status: int) -> None:
        result, outcome_file = None, None
        if job.filed:
            outcome_file = job.outcome_path if os.path.exists(job.outcome_path) else None
        elif os.path.exists(job.outcome_path):
            with open(job.outcome_path, "rb") as file:
                result = file.read()
            os.unlink(job.outcome_path)
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        finished = wire.Finished(job.key, result, exit_code, signum, outcome_file)
        if self.keep_outcomes:
            self.kept[job.key] = finished
        self.send(finished)

    def _release_gone_groups(self) -> None:
        """Say when a finished job's last process has exited: a child it left behind (a data
        loader, a server) still holds its GPUs until then."""
        if not self.lingering:
            return
        alive = live_process_groups()
        for pgid in [pgid for pgid in self.lingering if pgid not in alive]:
            key = self.lingering.pop(pgid)
            if key in self.kept:
                self.released.add(key)
            self.send(wire.Released(key))

    def adopt(self, key: str) -> None:
        """Tell a launcher that came back about a job: running (Started), or ended while it was
        away (Started, then its kept Finished, then Released if its processes are gone)."""
        running = [pid for pid, job in self.running.items() if job.key == key]
        if running:
            self.send(wire.Started(key, running[0]))
        elif key in self.kept:
            self.send(wire.Started(key, 0))
            self.send(self.kept[key])
            if key in self.released:
                self.send(wire.Released(key))
        else:
            self.send(wire.Rejected(key, "this machine's agent has no such job (it ran under an agent that has"
                                         " exited, or its outcome was already recorded)"))

    def forget(self, key: str) -> None:
        self.kept.pop(key, None)
        self.released.discard(key)

    def _escalate_kills(self) -> None:
        now = time.monotonic()
        for pid, job in self.running.items():
            if job.kill_at is not None and job.kill_at <= now and not job.killed:
                signal_group(pid, signal.SIGKILL)
                job.killed = True

    def shutdown(self) -> None:
        """Stop every job (TERM, grace, KILL), and what finished jobs left running, and remove
        the scratch dir; nobody listens any more."""
        for pgid in self.lingering:
            signal_group(pgid, signal.SIGTERM)
        for pid in self.running:
            signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while self.running and time.monotonic() < deadline:
            self._forget_exited(block=False)
            time.sleep(0.02)
        for pid in [*self.running, *self.lingering]:
            signal_group(pid, signal.SIGKILL)
        while self.running:
            self._forget_exited(block=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _forget_exited(self, block: bool) -> None:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.running.clear()
            return
        self.running.pop(pid, None)


# -- the job's guard: the process group leader between the agent and the job -------------


def enter_session(message: wire.OpenSession, adopted_main: str | None = None) -> Any:
    """Ready this process for a session's jobs: the user's modules found where the launcher
    found them, its main program adopted (unless it is `adopted_main`), the task and Hydra's
    state loaded (hydra_job.SessionContents)."""
    from hsm_core import hydra_job

    for entry in reversed(message.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if message.main != adopted_main:
        hydra_job.adopt_main(message.main)
    return hydra_job.load_session(message.blob)


def run_job(session: Any, run: wire.Run, outcome_path: str) -> int:
    """In the job's own process, its session installed: its environment (its own GPUs), then
    the job as Hydra runs it; its outcome is left at `outcome_path`."""
    from hsm_core import hydra_job

    os.environ.update(run.env)
    return hydra_job.run_in_job_process(session, run.payload, run.cwd, run.sweep_dir, outcome_path)


def guard_job(agent_pid: int, run: Callable[[], int]) -> int:
    """Lead a new process group, run the job in a child, and mirror how that child ended.

    The guard is the job's dead man's switch: when the agent dies (even by SIGKILL) the
    kernel sends the guard SIGTERM (PR_SET_PDEATHSIG), and the guard ends the whole
    group, the job's own subprocesses included: TERM, then KILL after the grace period.
    """
    os.setsid()
    guard_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            die_with_parent(signal.SIGKILL)
            if os.getppid() != guard_pid:
                return code
            code = run()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def end_group(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the TERM below reaches the guard too
        signal_group(guard_pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and not has_exited(pid):
            time.sleep(0.05)
        signal_group(guard_pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, end_group)
    signal.signal(signal.SIGHUP, end_group)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != agent_pid:  # the agent died before the switch was armed
        end_group()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end the way the job ended
    return os.WEXITSTATUS(status)


def has_exited(pid: int) -> bool:
    """Whether the child has ended, without reaping it (its status is still to be read)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def die_with_parent(signum: int) -> None:
    """Ask Linux to send `signum` to this process when its parent dies."""
    pr_set_pdeathsig = 1
    LIBC.prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def live_process_groups() -> set[int]:
    """The process group of every process on this machine."""
    groups = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    groups.add(int(file.read().rsplit(")", 1)[1].split()[2]))
            except (OSError, IndexError, ValueError):
                continue
    return groups


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class OutputRelay:
    """The console output of the agent and its jobs (fds 1 and 2) through a pipe the agent
    drains: into the launcher's stream while the launcher is there, into a log file on this
    machine once it is gone, so a job's print never meets a closed connection (EPIPE would
    end the job) or a hung one (a full pipe would stall it)."""

    CHUNK = 512  # at most what a stream that polls writable takes without blocking

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.sink = os.dup(2)
        self.diverted = False
        self.lock = threading.Lock()
        self.source, writer = os.pipe()
        os.dup2(writer, 1)
        os.dup2(writer, 2)
        os.close(writer)
        threading.Thread(target=self._drain, name="hsm-output", daemon=True).start()

    def _drain(self) -> None:
        while chunk := os.read(self.source, 1 << 16):
            view = memoryview(chunk)
            while view:
                with self.lock:
                    sink = self.sink
                try:
                    if select.select([], [sink], [], 0.5)[1]:
                        view = view[os.write(sink, view[:self.CHUNK]):]
                except OSError:
                    self.divert()

    def divert(self) -> None:
        """From now on, into the log file (the launcher's stream is gone)."""
        with self.lock:
            if self.diverted:
                return
            log = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            old, self.sink, self.diverted = self.sink, log, True
        os.close(old)

    def leave(self) -> None:
        """In a forked child: let go of the relay's ends (the child writes into fds 1 and 2)."""
        for fd in (self.source, self.sink):
            with contextlib.suppress(OSError):
                os.close(fd)


def say(text: str) -> None:
    """A line of the agent's own, where its jobs' output goes (the launcher, or the agent's log)."""
    print(f"hsm agent {os.getpid()} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {text}", file=sys.stderr, flush=True)


def connect(path: str) -> socket.socket | None:
    """A connection to the agent listening at `path`; None when none does (no socket there, or
    one its agent left behind). A busy agent is given a few seconds to accept."""
    deadline = time.monotonic() + 5.0
    while True:
        link = socket.socket(socket.AF_UNIX)
        try:
            link.connect(path)
            return link
        except (FileNotFoundError, ConnectionRefusedError):
            link.close()
            return None
        except OSError:  # its backlog is full (EAGAIN): it is alive
            link.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def bridge(path: str) -> bool:
    """Join this process's stdin and stdout to the agent listening at `path` (one an earlier
    launcher left running) until either side closes; False when no agent listens there."""
    link = connect(path)
    if link is None:
        return False
    pairs = {0: link.fileno(), link.fileno(): 1}
    waiting = selectors.DefaultSelector()
    for fd in pairs:
        waiting.register(fd, selectors.EVENT_READ)
    while pairs:
        for selected, _ in waiting.select():
            try:
                chunk = os.read(selected.fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:  # the launcher went (the agent then detaches again), or the agent ended
                link.close()
                return True
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(pairs[selected.fd], view):]
            except OSError:
                link.close()
                return True
    return True


def main() -> None:
    attach_path = sys.argv[2] if sys.argv[1:2] == ["--attach"] and len(sys.argv) > 2 else None
    if attach_path and bridge(attach_path):
        return
    proto_out = os.dup(1)
    os.dup2(2, 1)  # stray prints (and every job's console output) go to stderr
    environments.hold()  # a built env this agent runs from is not pruned while it runs
    Agent(proto_in=0, proto_out=proto_out, attach_path=attach_path).serve()


if __name__ == "__main__":
    main()
