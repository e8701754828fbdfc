"""What a machine has: its Python and packages, and its health right now.

Stdlib only and self-contained: `hsm distributed test/health` run this file's source on
a remote machine as `python - MODE [PROJECT_DIR]` (the program arrives on stdin), and the
worker agent imports it. It prints one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any, Callable

CHECKED_PACKAGES = ("cloudpickle", "hydra-core", "omegaconf")
GPU_QUERY = "index,name,utilization.gpu,memory.used,memory.total"


def describe_environment() -> dict[str, Any]:
    """The facts the launcher checks before trusting this machine with jobs."""
    packages: dict[str, str | None] = {}
    for name in CHECKED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "pid": os.getpid(),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "executable": sys.executable,
        "packages": packages,
    }


def writable(folder: str) -> str | None:
    """None when `folder` can be created and written to, else why not. Nothing is created:
    the launcher makes its folders private (0700) itself."""
    nearest = os.path.expanduser(folder)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        return f"{nearest} is not a folder"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"PermissionError: {nearest} is not writable"
    return None


def health(folder: str) -> dict[str, Any]:
    """Load, free memory, free disk where projects go, GPUs, and hsm jobs running."""
    with open("/proc/meminfo") as meminfo:
        memory = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    existing = os.path.expanduser(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return {
        "load": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "memory_free": memory.get("MemAvailable", memory.get("MemFree", 0)),
        "memory_total": memory.get("MemTotal", 0),
        "disk_free": shutil.disk_usage(existing).free,
        "gpus": gpus(),
        "hsm_jobs": hsm_jobs(),
    }


def gpus() -> list[dict[str, Any]] | dict[str, str] | None:
    """For `health`: one entry per GPU; None when there is no nvidia-smi; {"error": why}
    when it fails or prints what it cannot measure ("[N/A]", a driver error)."""
    return nvidia_smi(GPU_QUERY, lambda index, name, utilization, used, total: {
        "index": int(index), "name": name, "utilization": float(utilization),
        "memory_used_mib": float(used), "memory_total_mib": float(total)})


INVENTORY_QUERY = "index,uuid,memory.used,memory.total"


def gpu_inventory() -> list[dict[str, Any]] | dict[str, str]:
    """The GPUs a sweep can hand out, by UUID, with their memory use ([] without nvidia-smi)."""
    return nvidia_smi(INVENTORY_QUERY, lambda index, uuid, used, total: {
        "index": int(index), "uuid": uuid, "memory_used": float(used), "memory_total": float(total)}) or []


def nvidia_smi(query: str, row: Callable[..., dict[str, Any]]) -> list[dict[str, Any]] | dict[str, str] | None:
    """nvidia-smi's answer to `query`, one `row(*fields)` per GPU; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        shown = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"nvidia-smi did not run: {error}"}
    if shown.returncode != 0:
        last = (shown.stdout.strip() or shown.stderr.strip() or "no output").splitlines()[-1]
        return {"error": f"nvidia-smi failed: {last}"}
    found = []
    for line in shown.stdout.strip().splitlines():
        try:
            found.append(row(*(part.strip() for part in line.split(","))))
        except (ValueError, TypeError):
            return {"error": f"nvidia-smi printed {line.strip()!r}"}
    return found


def hsm_jobs() -> int:
    """Jobs of hsm workers running here: the job guards (a group leader whose parent is an agent)."""
    commands, parents, groups = {}, {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                commands[int(entry)] = file.read()
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            parents[int(entry)], groups[int(entry)] = int(fields[1]), int(fields[2])
        except OSError:
            continue
    worker = b"hsm_core.worker"
    return sum(1 for pid, command in commands.items()
               if worker in command and groups[pid] == pid and worker in commands.get(parents[pid], b""))


def slurm_report(partition: str | None, sbatch_options: list[str]) -> dict[str, Any]:
    """A Slurm login node as `test` and `health` see it: the partitions sinfo lists, the
    chosen one's nodes by state and pending jobs, and whether sbatch would take a job with
    these options (`--test-only`: nothing is submitted). {"error": ...} when sinfo fails."""
    def run(*command: str) -> tuple[bool, str]:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as error:
            return False, str(error)
        return done.returncode == 0, (done.stdout + done.stderr).strip()

    ok, listed = run("sinfo", "-h", "-o", "%P")
    if not ok:
        return {"error": f"sinfo: {listed}"}
    partitions = sorted(set(listed.split()))
    default = next((name.rstrip("*") for name in partitions if name.endswith("*")), None)
    chosen = partition or default
    names = [name.rstrip("*") for name in partitions]
    report: dict[str, Any] = {"partitions": names, "default": default, "partition": chosen, "nodes": {},
                              "pending": None}
    if chosen in names:
        _, nodes = run("sinfo", "-h", "-p", chosen, "-o", "%T %D")
        for line in nodes.splitlines():
            state, count = line.split()
            report["nodes"][state.rstrip("*~#")] = report["nodes"].get(state.rstrip("*~#"), 0) + int(count)
        _, pending = run("squeue", "-h", "-p", chosen, "-t", "PD", "-o", "%i")
        report["pending"] = len(pending.split())
    report["test_only"] = run("sbatch", "--test-only", *sbatch_options, "--wrap", "true")
    return report


def main(arguments: list[str]) -> dict[str, Any]:
    mode = arguments[0]
    if mode == "describe":
        report = describe_environment()
        report["writable"] = writable(arguments[1])
        return report
    if mode == "health":
        return health(arguments[1])
    if mode == "describe-python":
        return describe_environment()
    if mode == "slurm":
        return slurm_report(arguments[1] or None, json.loads(arguments[2]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
