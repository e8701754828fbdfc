"""Slurm as the login node's worker agent drives it: the batch script a job is submitted
with, Slurm's commands for many jobs at once, and what Slurm's states mean for an attempt.

Travels with the agent (stdlib only). A job reaches its compute node as data: a folder
holding its request, which `batch_job` reads; the script names only that folder, the
agent's Python and its files, and the user's `#SBATCH` options, never an override.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import time
from dataclasses import dataclass

# Slurm's end states, by whose fault the attempt ended (the launcher retries the second kind).
TASK_STATES = {"FAILED", "OUT_OF_MEMORY", "TIMEOUT", "DEADLINE"}
INFRASTRUCTURE_STATES = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "CANCELLED", "REVOKED"}
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
# squeue's pending reasons that only a change of the job's options ends.
NEVER_STARTING_REASONS = {"PartitionTimeLimit", "PartitionNodeLimit", "PartitionConfig", "BadConstraints",
                          "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSMaxWallDurationPerJobLimit",
                          "AssocMaxWallDurationPerJobLimit", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob"}
# What sbatch says when the cluster takes no more jobs for now (a submit limit, a busy slurmctld).
TEMPORARY_REFUSALS = ("MaxSubmitJob", "submit limit", "temporarily unable to accept", "Socket timed out",
                      "Unable to contact slurm controller", "did not answer within")
COMMAND_TIMEOUT_SECONDS = 60.0
# The Slurm keys of a `kind: slurm` source, one sbatch word each, and the option each becomes
# (`sbatch_args`, whole options, aside; `gpus` is not a key: gpus_per_job becomes it).
SBATCH_FLAGS = {"partition": "--partition", "time": "--time", "cpus_per_task": "--cpus-per-task", "mem": "--mem",
                "gres": "--gres", "account": "--account", "qos": "--qos"}
LOOKUPS_AFTER_A_TIMEOUT = 3  # squeue calls, a second apart, for the job of an sbatch that did not answer
MIN_POLL_SECONDS, MAX_POLL_SECONDS = 1.0, 15.0  # between two squeue calls of a source (poll_delay)
SQUEUE_FORMAT = "%i|%T|%N|%r|%L"  # id, state, node, reason, time left
# The Slurm keys an allocation asks for once per job it runs at a time (allocation_settings).
PER_JOB_AMOUNTS = ("cpus_per_task", "mem", "gres", "gpus")
NO_LIMIT = ("UNLIMITED", "NOT_SET", "INVALID", "")
FIT_MARGIN_SECONDS = 5.0  # time an allocation must have left beyond a job's expected duration


@dataclass(frozen=True)
class JobState:
    state: str  # Slurm's word: PENDING, RUNNING, COMPLETED, TIMEOUT, ...
    node: str  # where it runs or ran ("" while pending)
    reason: str  # why it waits or ended ("None" when nothing to say)
    time_left: float | None = None  # seconds until Slurm ends it (None: no limit, or not running)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def never_starts(self) -> bool:
        """Pending for a reason no wait ends (a limit of the partition, an unknown account)."""
        return self.state == "PENDING" and self.reason in NEVER_STARTING_REASONS


def batch_script(options: list[str], python: str, agent_dir: str, folder: str, session: str) -> str:
    """The script `sbatch` runs: `#SBATCH` lines (each option one line, e.g. `--time=10`),
    then the agent's own Python running the job from its folder (wire.AttemptFiles)."""
    directives = [f"#SBATCH {option}" for option in options]
    return "\n".join([
        "#!/bin/sh",
        *directives,
        "# The job travels as data: its config and settings are in the files below.",
        f"export PYTHONPATH={shlex.quote(agent_dir)}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"exec {shlex.quote(python)} -m hsm_core.batch_job {shlex.quote(folder)} {shlex.quote(session)}",
        "",
    ])


def hold_script(options: list[str]) -> str:
    """The script of an allocation: it only holds its resources; the launcher starts a worker
    agent in it (step_command) and ends it with scancel."""
    return "\n".join([
        "#!/bin/sh",
        *(f"#SBATCH {option}" for option in options),
        "# An allocation of hsm-distributed: a worker agent runs in it as a job step (srun --overlap).",
        "exec sleep 2147483647",
        "",
    ])


def allocation_settings(settings: dict[str, object], jobs: int, time: str | None) -> dict[str, object]:
    """The Slurm keys of an allocation that runs `jobs` jobs at a time: each job's amounts
    (CPUs, memory, GPUs) times `jobs`, and the allocation's own time limit (None: the
    partition's default)."""
    held = {key: value for key, value in settings.items() if key != "time"}
    for key in PER_JOB_AMOUNTS:
        if held.get(key) is not None:
            held[key] = scaled(key, held[key], jobs)
    if time is not None:
        held["time"] = time
    return held


def scaled(key: str, value: object, factor: int) -> object:
    """An amount of one job's times `factor`: `4` CPUs, `8G` of memory, `gpu:a100:1` (each
    comma-separated gres; no count is one), `2` GPUs (or `a100:2`)."""
    if key == "cpus_per_task":
        return int(value) * factor  # type: ignore[call-overload]
    if key == "mem":
        number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
        return f"{int(number) * factor}{unit}"
    amounts = []
    for item in str(value).split(","):
        parts = item.split(":")
        if parts[-1].isdigit() and (len(parts) > 1 or key == "gpus"):
            parts[-1] = str(int(parts[-1]) * factor)
        else:
            parts.append(str(factor))
        amounts.append(":".join(parts))
    return ",".join(amounts)


def step_command(job_id: str, held: dict[str, object], program: str) -> str:
    """`program` (a shell command word list) as a step of allocation `job_id` that shares its
    resources (`--overlap`), its stdin and stdout unbuffered: the worker agent's link."""
    options = [f"--jobid={job_id}", "--overlap", "--unbuffered", "--nodes=1", "--ntasks=1", "--quiet"]
    for key, flag in {"cpus_per_task": "--cpus-per-task", "gres": "--gres", "gpus": "--gpus"}.items():
        if held.get(key) is not None:
            options.append(f"{flag}={held[key]}")
    return f"srun {shlex.join(options)} {program}"


def duration(text: str) -> float | None:
    """Seconds in one of Slurm's time words (`--time`, squeue's %L): minutes, minutes:seconds,
    hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds; None
    for none (UNLIMITED, NOT_SET)."""
    text = text.strip()
    if text.upper() in NO_LIMIT:
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(part) for part in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = ([0] + parts if len(parts) < 3 else parts) if len(parts) > 1 else (0, parts[0], 0)
    return float(((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds)


def time_left(text: str) -> float | None:
    """squeue's %L in seconds; None when it says no limit, or something unforeseen."""
    try:
        return duration(text)
    except ValueError:
        return None


def sbatch_options(name: str, log_path: str, settings: dict[str, object], tag: str = "") -> list[str]:
    """The `#SBATCH` options of one job: its name, log and tag (the comment it is found by when
    sbatch does not answer), never requeued by Slurm (a lost job is the launcher's to re-run,
    once), then the source's Slurm keys."""
    options = [f"--job-name={name}", f"--output={log_path}", "--open-mode=append", "--no-requeue"]
    options += [f"--comment={tag}"] if tag else []
    for key, flag in {**SBATCH_FLAGS, "gpus": "--gpus"}.items():
        if settings.get(key) is not None:
            options.append(f"{flag}={settings[key]}")
    options += [str(argument) for argument in settings.get("sbatch_args") or []]  # type: ignore[attr-defined]
    return options


def refused_for_now(message: str) -> bool:
    """Whether an sbatch refusal ends by waiting (a QOS/association submit limit, slurmctld busy)."""
    return any(words.lower() in message.lower() for words in TEMPORARY_REFUSALS)


def poll_delay(ages: list[float], shortest: float | None = None) -> float:
    """Seconds until the next squeue of jobs submitted `ages` seconds ago: every `shortest`
    seconds (MIN_POLL_SECONDS) while the youngest is new, then a tenth of its age, at most
    MAX_POLL_SECONDS (as submitit's watcher backs off: a long job's end is seen a little
    later, and slurmctld is spared)."""
    floor = MIN_POLL_SECONDS if shortest is None else shortest
    return min(MAX_POLL_SECONDS, max(floor, min(ages, default=0.0) / 10))


def parse_squeue(output: str) -> dict[str, JobState]:
    """`squeue -h -t all -o SQUEUE_FORMAT` lines, by job id."""
    found = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            job_id, state, node, reason, left = parts
            found[job_id] = JobState(state.split()[0], node, reason,
                                     time_left(left) if state.startswith("RUNNING") else None)
    return found


def run(command: list[str]) -> str:
    """Run one of Slurm's commands here; its stderr is the error."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
                          stdin=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def submit(script_path: str, tag: str) -> str:
    """Submit a batch script whose job carries `tag` as its comment; its Slurm job id. An
    sbatch that does not answer may still have submitted it: then it is looked up by its tag."""
    try:
        return run(["sbatch", "--parsable", script_path]).strip().split(";")[0]
    except subprocess.TimeoutExpired:
        for _ in range(LOOKUPS_AFTER_A_TIMEOUT):
            with contextlib.suppress(subprocess.TimeoutExpired, RuntimeError):  # slurmctld still busy
                lines = run(["squeue", "--me", "-h", "-t", "all", "-o", "%i|%k"]).split()
                found = [line.split("|")[0] for line in lines if line.split("|")[-1] == tag]
                if found:
                    return found[0]
            time.sleep(1.0)
        raise RuntimeError(f"sbatch did not answer within {COMMAND_TIMEOUT_SECONDS:.0f} s, and no job of it is"
                           " queued") from None


def states(job_ids: list[str]) -> dict[str, JobState]:
    """The states of many jobs in one call. A job Slurm has forgotten (ended a while ago) is absent."""
    if not job_ids:
        return {}
    try:
        output = run(["squeue", "--me", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT])
    except RuntimeError as error:
        if "Invalid job id" not in str(error):
            raise
        output = ""  # every id forgotten
    return parse_squeue(output)


def cancel(job_ids: list[str]) -> None:
    """Cancel many jobs in one call (ids Slurm has forgotten are no error)."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS,
                       stdin=subprocess.DEVNULL)
