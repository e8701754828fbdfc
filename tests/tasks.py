"""Task functions the tests launch. Module-level, so the worker imports them by reference."""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def square(cfg: DictConfig) -> int:
    return cfg.x * cfg.x


def echo_value(cfg: DictConfig) -> Any:
    return cfg.value


def fail_on_two(cfg: DictConfig) -> int:
    if cfg.x == 2:
        raise ValueError("job 2 fails on purpose")
    return cfg.x


def unpicklable_on_one(cfg: DictConfig) -> Any:
    return threading.Lock() if cfg.x == 1 else cfg.x


def exit_hard(cfg: DictConfig) -> None:
    os._exit(3)


def segfault(cfg: DictConfig) -> None:
    ctypes.string_at(0)


def sleep_and_time(cfg: DictConfig) -> int:
    """Sleeps cfg.sleep seconds; records start and end times in the job's output dir."""
    started = time.time()
    time.sleep(cfg.sleep)
    times = {"start": started, "end": time.time(), "pid": os.getpid()}
    (output_dir() / "times.json").write_text(json.dumps(times))
    return cfg.x


def wait_to_be_killed(cfg: DictConfig) -> str:
    """First attempt: announce the pid in cfg.marker_dir and wait; later attempts return at once."""
    marker_dir = Path(cfg.marker_dir)
    with open(marker_dir / "invocations", "a") as file:
        file.write(f"{os.getpid()}\n")
    pid_file = marker_dir / "pid"
    if pid_file.exists():
        return "second attempt"
    pid_file.write_text(str(os.getpid()))
    time.sleep(60)
    return "not killed"


def who_runs(cfg: DictConfig) -> list[Any]:
    """Returns [x, the user running the job]; the same goes to who.txt in the output dir."""
    time.sleep(cfg.get("sleep", 0))
    user = pwd.getpwuid(os.getuid()).pw_name
    (output_dir() / "who.txt").write_text(user)
    return [cfg.x, user]


def environment(cfg: DictConfig) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in cfg.names}


def slow_with_progress(cfg: DictConfig) -> str:
    """Writes progress.txt at once, sleeps cfg.seconds, then marks it finished."""
    progress = output_dir() / "progress.txt"
    progress.write_text("started")
    time.sleep(cfg.seconds)
    progress.write_text("finished")
    return "done"


def chatty(cfg: DictConfig) -> int:
    """Prints three lines, one every cfg.pause seconds (stdout and stderr), then fails when x == cfg.fail."""
    for line in range(3):
        print(f"job {cfg.x} says {line}", file=sys.stderr if line == 1 else sys.stdout, flush=True)
        time.sleep(cfg.pause)
    if cfg.x == cfg.get("fail"):
        raise ValueError(f"job {cfg.x} fails")
    return cfg.x


def fenced_work(cfg: DictConfig) -> list[Any]:
    """Marks its attempt in the output dir, sleeps (cfg.sleep, or cfg.sleep[x] for a list),
    and returns [x, the user running it]. A job dir must end with exactly one attempt mark."""
    user = pwd.getpwuid(os.getuid()).pw_name
    (output_dir() / f"attempt-{user}-{os.getpid()}.txt").write_text("")
    time.sleep(cfg.sleep[cfg.x] if isinstance(cfg.sleep, ListConfig) else cfg.sleep)
    (output_dir() / "who.txt").write_text(user)
    return [cfg.x, user]


def counted(cfg: DictConfig) -> int:
    """Appends x to cfg.log (one line per invocation); x == cfg.fail_once fails the first time."""
    with open(cfg.log, "a") as log:
        log.write(f"{cfg.x}\n")
    marker = Path(cfg.log).with_suffix(f".failed-{cfg.x}")
    if cfg.x == cfg.get("fail_once") and not marker.exists():
        marker.write_text("")
        raise RuntimeError(f"job {cfg.x} fails the first time")
    time.sleep(cfg.get("sleep", 0))
    return cfg.x * 10


def held_trial(cfg: DictConfig) -> float:
    """An objective, (x - 1)^2, that appends its job num to cfg.log; job num cfg.hold waits
    until the file cfg.release exists (so a test can interrupt a sweep in the middle of it)."""
    num = HydraConfig.get().job.num
    with open(cfg.log, "a") as log:
        log.write(f"{num}\n")
    while num == cfg.hold and not Path(cfg.release).exists():
        time.sleep(0.1)
    return float((cfg.x - 1) ** 2)


def killed_once(cfg: DictConfig) -> int:
    """x == 1 raises; x == 2 is killed by SIGKILL on its first attempt (lost, then retried);
    each sleeps cfg.sleep (0) seconds first."""
    time.sleep(cfg.get("sleep", 0))
    if cfg.x == 1:
        raise ValueError("x=1 always fails")
    marker = Path(cfg.marker_dir) / f"killed-{cfg.x}"
    if cfg.x == 2 and not marker.exists():
        marker.write_text("")
        os.kill(os.getpid(), signal.SIGKILL)
    return cfg.x


class MarkCallback(Callback):
    """Marks each job's output dir at job start and end, and the sweep dir at multirun start and end."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(config.hydra.runtime.output_dir) / "callback-start").write_text(str(os.getpid()))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        (Path(config.hydra.runtime.output_dir) / "callback-end").write_text(job_return.status.name)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.mark_sweep(config, "start")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.mark_sweep(config, "end")

    @staticmethod
    def mark_sweep(config: DictConfig, event: str) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        with open(Path(config.hydra.sweep.dir) / "callback-multirun", "a") as marks:
            marks.write(f"{event} {os.getpid()}\n")


def rewrite_checkpoint(cfg: DictConfig) -> int:
    """Rewrites a checkpoint the way trainers do (write ckpt.tmp, rename it over ckpt.pt) in a
    tight loop for cfg.seconds; marks its attempt. Returns the number of checkpoints written."""
    folder = output_dir()
    (folder / f"attempt-{os.getpid()}.txt").write_text("")
    written, deadline = 0, time.monotonic() + cfg.seconds
    while time.monotonic() < deadline:
        written += 1
        (folder / "ckpt.tmp").write_text(f"checkpoint {written}\n" * 1000)
        os.replace(folder / "ckpt.tmp", folder / "ckpt.pt")
    (folder / "final.txt").write_text(str(written))
    return written


def big_sparse_output(cfg: DictConfig) -> int:
    """Leaves a sparse file of cfg.gigabytes GiB in its output dir (cheap to make, slow to hash)."""
    with open(output_dir() / "big.bin", "wb") as file:
        file.truncate(int(cfg.gigabytes * 1024**3))
    time.sleep(cfg.get("sleep", 0))
    return cfg.x


def project_files_seen(cfg: DictConfig) -> list[str]:
    """The files of the project copy the job runs in (its working dir), caches aside."""
    root = Path(HydraConfig.get().runtime.cwd)
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts)


def privileged_looking_output(cfg: DictConfig) -> str:
    """Writes a file with setuid and world-writable bits set."""
    path = output_dir() / "tool.sh"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o4777)
    return oct(path.stat().st_mode & 0o7777)


def gpu_job(cfg: DictConfig) -> dict[str, Any]:
    """Sleeps cfg.sleep; returns (and saves) the GPUs it saw, its user and its start and end times."""
    started = time.time()
    time.sleep(cfg.get("sleep", 0))
    seen = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "hsm": os.environ.get("HSM_GPUS"),
            "user": pwd.getpwuid(os.getuid()).pw_name, "start": started, "end": time.time()}
    (output_dir() / "gpu.json").write_text(json.dumps(seen))
    return seen


def leave_a_child(cfg: DictConfig) -> dict[str, Any]:
    """x == 0 leaves a process behind in its group that lives cfg.linger seconds, then writes
    its end time to cfg.marker; every job returns its start time and GPUs at once."""
    if cfg.x == 0:
        import subprocess
        import sys

        program = f"import time; time.sleep({cfg.linger}); open({cfg.marker!r}, 'w').write(str(time.time()))"
        subprocess.Popen([sys.executable, "-c", program])
    return {"start": time.time(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def launcher_strategy(cfg: DictConfig) -> str:
    """The strategy in the job's own copy of the launcher node (it must resolve wherever the job
    runs), returned and written to strategy.txt."""
    strategy = str(HydraConfig.get().launcher.strategy)
    (output_dir() / "strategy.txt").write_text(strategy)
    return strategy


def job_num(cfg: DictConfig) -> int:
    """Writes its job num to num.txt and returns it; job cfg.fail_num fails while the file cfg.flag exists."""
    num = HydraConfig.get().job.num
    (output_dir() / "num.txt").write_text(str(num))
    if num == cfg.fail_num and Path(cfg.flag).exists():
        raise RuntimeError(f"job {num} fails while {cfg.flag} exists")
    return int(num)


def environment_and_python(cfg: DictConfig) -> dict[str, str | None]:
    """environment(), and the interpreter the job runs with."""
    return {**environment(cfg), "python": sys.executable}


def starve_the_agent_of_processes(cfg: DictConfig) -> list[int]:
    """x == 0 lowers its worker agent's RLIMIT_NPROC to 1 (the agent process alone: the kernel
    then refuses it every fork and thread); every job returns [x, its agent's pid]."""
    import resource

    guard = os.getppid()
    with open(f"/proc/{guard}/stat") as stat:
        agent = int(stat.read().rsplit(")", 1)[1].split()[1])  # the guard's parent
    if cfg.x == 0:
        _, hard = resource.prlimit(agent, resource.RLIMIT_NPROC)
        resource.prlimit(agent, resource.RLIMIT_NPROC, (1, hard))
    return [cfg.x, agent]


def write_then_wait(cfg: DictConfig) -> str:
    """Writes cfg.name (a path inside its output dir) and waits cfg.sleep seconds, so a pull
    sees it while the job still runs."""
    target = output_dir() / cfg.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("written by the job")
    time.sleep(cfg.sleep)
    return str(cfg.name)


def patient(cfg: DictConfig) -> int:
    """Appends `start X PID` to cfg.log, prints a line every 0.5 s for cfg.sleep seconds (a job
    whose console may have gone) or until the file cfg.release exists, writes result.txt in its
    output dir, appends `end X`; returns x * 10."""
    with open(cfg.log, "a") as log:
        log.write(f"start {cfg.x} {os.getpid()}\n")
    deadline = time.monotonic() + cfg.sleep
    while time.monotonic() < deadline and not ("release" in cfg and os.path.exists(cfg.release)):
        print(f"job {cfg.x} still working", flush=True)
        time.sleep(0.5)
    (output_dir() / "result.txt").write_text(str(cfg.x * 10))
    with open(cfg.log, "a") as log:
        log.write(f"end {cfg.x}\n")
    return cfg.x * 10
