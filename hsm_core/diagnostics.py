"""The CLI's diagnostics, `hsm distributed test`, `health` and `envs`: what works on each
source, how each machine is doing, and the environments built there.

Owns the checks in order (connect, host key, authentication, setup lines, python,
project_dir) and what each says when it fails. Each reaches a machine the way a sweep
does (`sources.bring_up`: the same connection settings, setup lines, env and worker
start), so a source that passes here is one a sweep can use. Must not know jobs or the scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import asyncssh

from hsm_core import env_requirements, probe, slurm, sync
from hsm_core.remote_machine import (
    ENVIRONMENTS_SOURCE,
    HostKeyRefused,
    LoginRefused,
    ProbeFailed,
    Unreachable,
    envs_folder,
    open_connection,
    run_probe,
)
from hsm_core.settings import RemoteSettings, SweepSettings
from hsm_core.sources.bring_up import STEPS, Progress, StepFailed, bring_up


@dataclass
class Check:
    source: str
    name: str
    ok: bool | None  # None: not run, an earlier check failed
    detail: str


CHECKS = (*STEPS, "project_dir")
SLURM_CHECKS = ("slurm", "partition", "sbatch --test-only")


async def check_remote(remote: RemoteSettings, settings: SweepSettings,
                       progress: Progress = lambda _: None) -> list[Check]:
    """Each of CHECKS in order; after the first failure the rest are not checked. A Slurm
    source's login node then gets SLURM_CHECKS (only those when it is this machine).
    `progress` is told how a long step (an environment's build) goes."""
    if remote.slurm_here:
        return slurm_checks(remote, await asyncio.to_thread(probe.slurm_report, *slurm_question(remote)))
    checks = await check_ssh(remote, settings, progress)
    if remote.kind == "slurm" and all(check.ok is not False for check in checks):
        try:
            async with await open_connection(remote, settings) as connection:
                partition, options = slurm_question(remote)
                report = await run_probe(connection, remote, "slurm", partition or "", json.dumps(options))
        except (Unreachable, HostKeyRefused, LoginRefused, ProbeFailed, asyncssh.Error, OSError, ValueError) as error:
            report = {"error": f"the check did not run ({error})"}
        checks += slurm_checks(remote, report)
    return checks


def slurm_question(remote: RemoteSettings) -> tuple[str | None, list[str]]:
    """probe.slurm_report's arguments: the partition, and the options a job (in mode allocation:
    an allocation, sized for its jobs) would be submitted with."""
    settings = remote.sbatch_settings()
    if remote.mode == "allocation":
        settings = slurm.allocation_settings(settings, remote.jobs_per_allocation, remote.allocation_time)
    return settings.get("partition"), slurm.sbatch_options("hsm-test", "/dev/null", settings)


def slurm_checks(remote: RemoteSettings, report: dict[str, Any]) -> list[Check]:
    """What the login node's Slurm says: reachable, the partition, and sbatch's verdict on the options."""
    if "error" in report:
        return [Check(remote.name, "slurm", False, f"{report['error']}. Fix: make `sinfo` work on {remote.host}"
                                                   " (Slurm's commands on PATH after the setup lines)"),
                *(Check(remote.name, name, None, "not checked") for name in SLURM_CHECKS[1:])]
    checks = [Check(remote.name, "slurm", True, f"sinfo lists {', '.join(report['partitions'])}")]
    partition = report["partition"]
    if partition not in report["partitions"]:
        return [*checks, Check(remote.name, "partition", False,
                               f"{partition!r} is not a partition here. Fix: set remotes.{remote.name}.partition to"
                               f" one of {', '.join(report['partitions'])}"),
                Check(remote.name, "sbatch --test-only", None, "not checked")]
    nodes = ", ".join(f"{count} {state}" for state, count in sorted(report["nodes"].items()))
    checks.append(Check(remote.name, "partition", True, f"{partition}: nodes {nodes}; {report['pending']} jobs"
                                                        " pending"))
    accepted, said = report["test_only"]
    last = (said.splitlines() or [""])[-1]
    checks.append(Check(remote.name, "sbatch --test-only", accepted,
                        last if accepted else f"{last}. Fix: correct the Slurm keys of remotes.{remote.name}"
                                              " (partition, time, account, qos, ...)"))
    return checks


async def check_ssh(remote: RemoteSettings, settings: SweepSettings, progress: Progress) -> list[Check]:
    """The machine over SSH: CHECKS in order, brought up as a sweep brings it up."""
    checks: list[Check] = []

    def report(step: str, ok: bool | None, detail: str) -> None:
        checks.append(Check(remote.name, step, ok, detail))

    def failed(name: str, detail: str) -> list[Check]:
        rest = [later for later in CHECKS[CHECKS.index(name) + 1:] if later != "environment" or built]
        return [*checks, Check(remote.name, name, False, detail),
                *(Check(remote.name, later, None, "not checked") for later in rest)]

    try:
        built = env_requirements.described(remote.environment, sync.find_project_root(sync.app_directory()),
                                       f"remotes.{remote.name}.environment")
    except env_requirements.NotDescribable as error:
        return [Check(remote.name, "environment", False, str(error))]
    try:
        machine = await bring_up(remote, settings, report, thorough=True, environment=built, progress=progress)
    except StepFailed as error:
        return failed(error.step, str(error))
    async with machine.connection:
        await machine.agent.close()
        machine.process.close()
        try:
            described = await run_probe(machine.connection, machine.remote, "describe", remote.project_dir)
        except (ProbeFailed, asyncssh.Error, OSError, ValueError) as error:
            return failed("project_dir", f"the check did not run ({error})")
        if described["writable"]:
            return failed("project_dir", f"{remote.project_dir} is not writable: {described['writable']}."
                                         f" Fix: set remotes.{remote.name}.project_dir to a folder you own")
        report("project_dir", True, f"{remote.project_dir} is writable")
    return checks


def check_local(settings: SweepSettings) -> list[Check]:
    found = probe.describe_environment()
    slots = settings.local.max_parallel_jobs
    return [Check("local", "python", True, f"Python {found['python']}, {slots} slot{'s' if slots != 1 else ''}"
                                           " on this machine")]


async def remote_health(remote: RemoteSettings, settings: SweepSettings) -> dict[str, Any]:
    """The probe's health report, or {"error": why} when the machine cannot be reached. A
    Slurm source's report has its partition's nodes and pending jobs under "slurm"."""
    partition, options = slurm_question(remote)
    if remote.slurm_here:
        return {**local_health(), "slurm": await asyncio.to_thread(probe.slurm_report, partition, options)}
    try:
        async with await open_connection(remote, settings) as connection:
            report: dict[str, Any] = await run_probe(connection, remote, "health", remote.project_dir)
            if remote.kind == "slurm":
                report["slurm"] = await run_probe(connection, remote, "slurm", partition or "", json.dumps(options))
        return report
    except (Unreachable, HostKeyRefused, LoginRefused) as error:
        return {"error": str(error)}
    except (ProbeFailed, asyncssh.Error, OSError, ValueError, asyncio.TimeoutError) as error:
        return {"error": f"the probe did not run: {error}"}


async def remote_envs(remote: RemoteSettings, settings: SweepSettings, prune: bool) -> dict[str, Any]:
    """The environments built on the machine ({"envs": [...]}, see environments.listing), after
    removing every one not in use with `prune` ({"removed": [...]} too); or {"error": why}."""
    if remote.slurm_here:
        return {"envs": []}  # its jobs use this machine's Python: nothing is built for it
    remote = dataclasses.replace(remote, python=remote.python or "python3")  # any Python 3 runs the listing
    try:
        async with await open_connection(remote, settings) as connection:
            envs = envs_folder(remote.project_dir)
            removed = await run_probe(connection, remote, "prune", envs, source=ENVIRONMENTS_SOURCE) if prune else []
            listed = await run_probe(connection, remote, "list", envs, source=ENVIRONMENTS_SOURCE)
        return {"envs": listed, "removed": removed}
    except (Unreachable, HostKeyRefused, LoginRefused) as error:
        return {"error": str(error)}
    except (ProbeFailed, asyncssh.Error, OSError, ValueError, asyncio.TimeoutError) as error:
        return {"error": f"the listing did not run: {error}"}


def local_health() -> dict[str, Any]:
    return probe.health(os.getcwd())
