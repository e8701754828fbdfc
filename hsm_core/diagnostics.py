"""The CLI's diagnostics, `hsm distributed test` and `health`: what works on each source,
and how each machine is doing.

Owns the checks in order (connect, host key, authentication, setup lines, python,
project_dir) and what each says when it fails. Each reaches a machine the way a sweep
does (`remote_machine`: the same connection settings, setup lines, env and worker start),
so a source that passes here is one a sweep can use. Must not know jobs or the scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import asyncssh

from hsm_core import probe, remote_python, slurm
from hsm_core.remote_machine import (
    COMMAND_TIMEOUT_SECONDS,
    HostKeyRefused,
    LoginRefused,
    ProbeFailed,
    Unreachable,
    address,
    discover_python,
    no_python_found,
    open_connection,
    run_probe,
    shell_command,
    ssh_args,
    start_worker,
    version_mismatch,
)
from hsm_core.settings import RemoteSettings, SweepSettings
from hsm_core.sources.base import SourceFailure


@dataclass
class Check:
    source: str
    name: str
    ok: bool | None  # None: not run, an earlier check failed
    detail: str


CHECKS = ("connect", "host key", "authentication", "setup lines", "python", "project_dir")
SLURM_CHECKS = ("slurm", "partition", "sbatch --test-only")


async def check_remote(remote: RemoteSettings, settings: SweepSettings) -> list[Check]:
    """Each of CHECKS in order; after the first failure the rest are not checked. A Slurm
    source's login node then gets SLURM_CHECKS (only those when it is this machine)."""
    if remote.slurm_here:
        return slurm_checks(remote, await asyncio.to_thread(probe.slurm_report, *slurm_question(remote)))
    checks = await check_ssh(remote, settings)
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
    """probe.slurm_report's arguments: the partition, and the options a job would be submitted with."""
    settings = remote.sbatch_settings()
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


async def check_ssh(remote: RemoteSettings, settings: SweepSettings) -> list[Check]:
    """The machine over SSH: CHECKS in order."""
    checks: list[Check] = []

    def passed(name: str, detail: str) -> None:
        checks.append(Check(remote.name, name, True, detail))

    def failed(name: str, detail: str) -> list[Check]:
        rest = CHECKS[CHECKS.index(name) + 1:]
        return [*checks, Check(remote.name, name, False, detail),
                *(Check(remote.name, later, None, "not checked") for later in rest)]

    try:
        connection = await open_connection(remote, settings)
    except Unreachable as error:
        return failed("connect", str(error))
    except HostKeyRefused as error:
        passed("connect", address(remote))
        return failed("host key", str(error))
    except LoginRefused as error:
        passed("connect", address(remote))
        passed("host key", "verified")
        return failed("authentication", str(error))
    passed("connect", address(remote))
    passed("host key", f"verified against {remote.known_hosts or '~/.ssh/known_hosts'}")
    passed("authentication", f"as {connection.get_extra_info('username')}")
    async with connection:
        if remote.setup:
            outcome = await connection.run(shell_command(remote, "true"), input="", timeout=COMMAND_TIMEOUT_SECONDS)
            if outcome.exit_status != 0:
                last = (str(outcome.stderr or "").strip().splitlines() or [""])[-1]
                return failed("setup lines", f"exit status {outcome.exit_status} ({last}). Fix: run them by hand"
                                             f" in `ssh {ssh_args(remote)}`; they must not ask for input")
        passed("setup lines", f"{len(remote.setup)} ran without input" if remote.setup else "none")
        if remote.python is None:  # found as a sweep finds it; each candidate shown
            try:
                found = await discover_python(connection, remote)
            except SourceFailure as error:
                return failed("python", str(error))
            best = remote_python.chosen(found)
            for candidate in found:
                taken = candidate is best
                later = best is not None and found.index(candidate) > found.index(best)
                checks.append(Check(remote.name, "python candidate", True if taken else None,
                                    f"{'taken' if taken else 'not needed' if later else 'refused'}:"
                                    f" {candidate.describe()}"))
            if best is None:
                return failed("python", no_python_found(remote, found))
            remote = dataclasses.replace(remote, python=best.path)
        try:  # the worker as a sweep starts it: the same command, a banner or not
            sftp = await connection.start_sftp_client()
            process, agent, worker = await start_worker(connection, sftp, await sftp.realpath("."), remote, settings)
            await agent.close()
            process.close()
        except (SourceFailure, asyncssh.Error, OSError) as error:
            return failed("python", f"{error}")
        mismatch = version_mismatch(remote, worker)
        if mismatch:
            return failed("python", mismatch)
        passed("python", f"{worker['executable']}: Python {worker['python']}, "
                         + ", ".join(f"{name} {version}" for name, version in worker["packages"].items()))
        try:
            described = await run_probe(connection, remote, "describe", remote.project_dir)
        except (ProbeFailed, asyncssh.Error, OSError, ValueError) as error:
            return failed("project_dir", f"the check did not run ({error})")
        if described["writable"]:
            return failed("project_dir", f"{remote.project_dir} is not writable: {described['writable']}."
                                         f" Fix: set remotes.{remote.name}.project_dir to a folder you own")
        passed("project_dir", f"{remote.project_dir} is writable")
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


def local_health() -> dict[str, Any]:
    return probe.health(os.getcwd())
