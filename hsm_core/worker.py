"""The worker agent: runs on a target machine and forks one isolated process per job.

Four rooms: the Agent's message loop (hears the launcher and its silence), the
JobSupervisor (each job in its own process group, led by a guard that ends the group
when the agent dies; TERM then KILL on cancel or shutdown), the FileService (file work in
threads, so the loop always hears the launcher) and the SlurmService (a login node's
submissions, remembered until the agent exits). Must not know Hydra's job contract
(`hydra_job` runs the job inside the forked process) or sources.

`python -m hsm_core.worker` speaks `hsm_core.wire`'s messages on stdin/stdout: it writes
wire.START_MARKER, then a Hello, then answers what the launcher sends. It imports Hydra
once and loads a batch's session once, so each job costs a fork, not an interpreter.

Only the standard library, Hydra and cloudpickle are imported: this file and AGENT_FILES
(`remote_machine.py`) are all of the project that a remote machine needs.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

if __package__ in (None, ""):  # run as a plain file on a remote machine
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsm_core import files, slurm, wire
from hsm_core.probe import describe_environment, gpu_inventory

KILL_GRACE_SECONDS = 5.0
LINGER_POLL_SECONDS = 0.25  # how often a finished job's leftover processes are looked for
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once here, not in every job's guard


@dataclass
class RunningJob:
    key: str
    outcome_path: str
    kill_at: float | None = None  # when TERM was sent: the moment KILL follows
    killed: bool = False


Send = Callable[[wire.FromAgent], None]


class Agent:
    """The message loop: hears the launcher (and its silence), hands each message to the room
    that serves it (JobSupervisor, FileService, SlurmService), and stops them all when the
    launcher is gone."""

    def __init__(self, proto_in: int, proto_out: int) -> None:
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.frames = wire.FrameBuffer()
        self.stopping = False
        self.silence_limit: float | None = None  # set by "watch": stop when the launcher is silent longer
        self.last_heard = time.monotonic()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        os.set_blocking(self.wake_read, False)
        self.selector = selectors.DefaultSelector()
        self.send_lock = threading.Lock()  # replies of file work come from other threads
        self.jobs = JobSupervisor(self.send, self._leave_agent)
        self.slurm = SlurmService()
        self.operations = {name.removeprefix("op_"): getattr(service, name)
                           for service in (FileService(), self.slurm) for name in dir(service)
                           if name.startswith("op_")}

    # -- plumbing -------------------------------------------------------------------

    def send(self, message: wire.FromAgent) -> None:
        self.write(wire.encode(message))

    def write(self, raw: bytes) -> None:
        data = memoryview(raw)
        with self.send_lock:
            while data:
                written = os.write(self.proto_out, data)
                data = data[written:]

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides; it tells us
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_stop_signal)
        signal.set_wakeup_fd(self.wake_write)

    def _on_stop_signal(self, *_: Any) -> None:
        self.stopping = True

    def serve(self) -> None:
        self.install_signals()
        self.selector.register(self.proto_in, selectors.EVENT_READ, "proto")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        info = describe_environment()
        info["scratch"] = self.jobs.scratch
        self.write(wire.START_MARKER)
        self.send(wire.Hello(info))
        try:
            while not self.stopping:
                for selected, _ in self.selector.select(timeout=self._next_timeout()):
                    if selected.data == "wake":
                        self._drain_wakeups()
                    elif not self._read_messages():
                        self.stopping = True  # stdin closed: the launcher or its connection is gone
                self.jobs.tend()
                if self._launcher_silent():
                    self.stopping = True  # a hung link: a dead man's switch
        except BrokenPipeError:
            pass  # the launcher is gone: stop everything below
        finally:
            self.slurm.shutdown()
            self.jobs.shutdown()

    def _launcher_silent(self) -> bool:
        """No frame for longer than the limit, though we could have read one: bytes that
        arrived while the agent was busy are not silence."""
        if not self.silence_limit or time.monotonic() - self.last_heard <= self.silence_limit:
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
        chunk = os.read(self.proto_in, 1 << 20)
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
        for fd in (self.proto_out, self.wake_read, self.wake_write):
            os.close(fd)
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
        agent_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        script = slurm.batch_script(options, sys.executable, agent_dir, attempt.folder, attempt.session)
        files.write_atomically(attempt.script, script.encode())
        job_id = slurm.submit(attempt.script, tag)
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

    def start_job(self, run: wire.Run) -> None:
        if run.session_id not in self.sessions:
            self.send(wire.Rejected(run.key, self.broken_sessions.get(run.session_id,
                                                                      f"unknown session {run.session_id}")))
            return
        outcome_path = os.path.join(self.scratch, f"{run.key}.result")
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
        self.running[pid] = RunningJob(run.key, outcome_path)
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
        result = None
        if os.path.exists(job.outcome_path):
            with open(job.outcome_path, "rb") as file:
                result = file.read()
            os.unlink(job.outcome_path)
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        self.send(wire.Finished(job.key, result, exit_code, signum))

    def _release_gone_groups(self) -> None:
        """Say when a finished job's last process has exited: a child it left behind (a data
        loader, a server) still holds its GPUs until then."""
        if not self.lingering:
            return
        alive = live_process_groups()
        for pgid in [pgid for pgid in self.lingering if pgid not in alive]:
            self.send(wire.Released(self.lingering.pop(pgid)))

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


def main() -> None:
    proto_out = os.dup(1)
    os.dup2(2, 1)  # stray prints (and every job's console output) go to stderr
    Agent(proto_in=0, proto_out=proto_out).serve()


if __name__ == "__main__":
    main()
