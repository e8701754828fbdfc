"""The launcher's composition root: one batch of a Hydra sweep, from Hydra's launch() call
to the JobReturns it returns.

Builds the engine (sources and scheduler) at the sweep's first batch, then for each batch
wires the pieces together: the sweep dir's claim and journal, the jobs composed by
`hydra_job`, resume, progress, and the conversion of each job's record to a JobReturn.
It decides nothing itself; each decision lives in the module named for it. The launcher
plugin calls `launch()` and nothing else.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from hydra.types import HydraContext
from omegaconf import OmegaConf

from hsm_core import config_file, gpus, hydra_job, journal as journals, report as reports, resume, sync
from hsm_core.composition import hydra_overrides_as_written, remember_compositions
from hsm_core.console import CONSOLE
from hsm_core.breaker import RetryPolicy
from hsm_core.engine import Engine, Interrupted, Periodic
from hsm_core.jobs import Handle, JobSpec, StopLaunching
from hsm_core.journal import Journal
from hsm_core.progress import Progress
from hsm_core.report import ReportWriter
from hsm_core.remote_machine import keepalive_detection_bound
from hsm_core.scheduler import NoUsableSource, Scheduler
from hsm_core.settings import LOCAL, ConfigError, RemoteSettings, SweepSettings
from hsm_core.sources.base import ComputeSource, Session
from hsm_core.sources.local import PipeChannel
from hsm_core.sources.allocations import AllocationProvider, PoolSettings
from hsm_core.sources.machine import ForkProvider, MachineSource, Provider
from hsm_core.sources.slurm import SlurmProvider, sweep_job_name
from hsm_core.sources.ssh import SSHChannel
from hsm_core.strategies import STRATEGIES

log = logging.getLogger(__name__)


class LauncherError(CompactHydraException):
    """Shown by Hydra as its message alone: bad settings, or no source can run jobs."""


@dataclass
class SweepSoFar:
    """What the batches of one sweep share (Hydra keeps one launcher per sweep)."""

    progress: Progress  # counts across batches, one summary at the end
    journal: Journal  # records the disk refused wait here for the next batch
    override_counts: collections.Counter[str] = field(default_factory=collections.Counter)  # journal.job_key
    job_dirs: hydra_job.JobDirs = field(default_factory=hydra_job.JobDirs)
    report: ReportWriter | None = None  # hydra.launcher.report=true


def set_up(hydra_context: HydraContext) -> None:
    """The launcher's setup(), before the sweeper writes anything: a sweep that a job process
    starts while it loads the app's main program is refused, and compositions are kept."""
    if hydra_job.loading_main:
        raise LauncherError("the app starts a sweep when its main program is loaded; start it under"
                            " `if __name__ == \"__main__\":`")
    remember_compositions(hydra_context.config_loader)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    if launcher.engine is None:
        settings = read_settings(launcher.options, launcher.node_defaults(), named_launcher_keys(launcher.config))
        launcher.engine, launcher.settings = build_engine(settings), settings
        weakref.finalize(launcher, launcher.engine.close)
    engine: Engine = launcher.engine
    settings = launcher.settings

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        engine.claim(sweep_dir)
    except journals.SweepDirBusy as holder:
        raise LauncherError(f"another launch is using the sweep dir {sweep_dir.absolute()} ({holder}). Fix: wait"
                            " for it to end, or give this one its own hydra.sweep.dir") from None
    if launcher.sweep is None:  # what the sweep's batches share
        planned = planned_jobs(launcher.config, launcher.hydra_context.config_loader)
        launcher.sweep = SweepSoFar(Progress(planned, live=CONSOLE.on_terminal,
                                             summary_every=settings.progress_interval),
                                    Journal(sweep_dir, sync.code_fingerprint(settings.sync)))
        if settings.report:
            launcher.sweep.report = ReportWriter(sweep_dir, settings.progress_interval)
            weakref.finalize(launcher, launcher.sweep.report.close)
            log.info(f"The sweep's report page, rewritten every {settings.progress_interval:g} s and at the end:"
                     f" {reports.report_path(sweep_dir).absolute().as_uri()}")
    sweep: SweepSoFar = launcher.sweep
    journal = sweep.journal
    slurm = {source.name: {"host": source.remote.host, "job_name": sweep_job_name(str(sweep_dir.absolute()))}
             for source in engine.sources
             if isinstance(source, MachineSource) and isinstance(source.provider, (SlurmProvider, AllocationProvider))
             and source.remote}
    try:
        journal.launched(sys.argv, {source.name: source.slots for source in engine.sources}, initial_job_idx,
                         len(job_overrides), slurm)
        journal.sources_used(settings)
    except StopLaunching as full:
        engine.scheduler.stop_launching(full)
    sources = ", ".join(f"{source.name} ({source.slots} slot{'s' if source.slots > 1 else ''})"
                        for source in engine.sources)
    log.info(f"hsm_distributed is launching {len(job_overrides)} jobs on {sources} ({settings.strategy})")
    log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
    for index, overrides in enumerate(job_overrides):
        log.info(f"\t#{initial_job_idx + index} : {' '.join(filter_overrides(overrides))}")

    blob = hydra_job.session_blob(launcher.hydra_context, launcher.task_function)
    session = Session(
        id=hashlib.sha256(blob).hexdigest()[:16],
        blob=blob,
        sys_path=tuple(sys.path),
        cwd=os.getcwd(),
        sweep_dir=str(sweep_dir.absolute()),
        main=hydra_job.main_program(),
    )
    hydra_job.answer_to_main_names(session.main)
    keys = [journals.job_key(overrides, sweep.override_counts) for overrides in job_overrides]
    jobs: Iterable[JobSpec] = sweep.job_dirs.claimed(hydra_job.compose_jobs(
        launcher.config, launcher.hydra_context.config_loader, job_overrides, initial_job_idx, keys))
    restored: dict[int, JobReturn] = {}
    adopt: list[tuple[JobSpec, Handle]] = []
    if settings.resume:  # composed up front: restored jobs' dirs may have to move
        specs = list(jobs)
        composed = [spec for spec in specs if spec.compose_error is None]
        unfinished = journal.unfinished()  # attempts that may run on where a launcher that is gone left them
        restored = resume.restore(journal, sweep_dir.absolute(), composed, settings.resume_keeps_changed,
                                  running=set(unfinished))
        adopt = [(spec, unfinished[spec.key]) for spec in composed
                 if spec.key in unfinished and spec.index not in restored]
        log.info(f"Resuming: {len(restored)} of {len(specs)} jobs completed earlier (journal);"
                 + (f" {len(adopt)} may still run where an earlier launch left them (adopted if so);" if adopt else "")
                 + f" running the other {len(specs) - len(restored) - len(adopt)}")
        held = {spec.index for spec, _ in adopt}
        jobs = [spec for spec in specs if spec.index not in restored and spec.index not in held]
    progress = sweep.progress
    progress.begin_batch(len(job_overrides) - len(restored), len(restored),
                         [(source.name, source.slots) for source in engine.sources])
    periodic: list[Periodic] = [progress, *([sweep.report] if sweep.report else [])]
    try:
        # The Compactor first: the journal then keeps each result as compacted (~3 KB).
        records = engine.run_batch(session, jobs, [hydra_job.Compactor(), journal, progress], periodic, adopt)
    except NoUsableSource as error:
        ended(sweep, "no source could run jobs")
        raise LauncherError(str(error)) from None
    except Interrupted as stop:
        ended(sweep, stop.why)
        raise
    ended(sweep, "completed")
    try:
        journal.sources_used(settings, {source.name: source.remote.python for source in engine.sources
                                        if isinstance(source, MachineSource) and isinstance(source.channel, SSHChannel)
                                        and source.remote and source.remote.python})
    except StopLaunching:
        log.error(f"{len(journal.unwritten)} records of the journal could not be written (the disk refused them):"
                  " they are written if a later batch of this sweep gets through; else a resume runs their jobs"
                  " again")
    returns = {record.spec.index: hydra_job.to_job_return(record) for record in records}
    returns.update(restored)
    return [returns[index] for index in range(len(job_overrides))]


def ended(sweep: SweepSoFar, reason: str) -> None:
    """Record how the batch ended, and show it on the report page."""
    sweep.journal.launch_ended(reason)
    if sweep.report:
        sweep.report.write_now()


def planned_jobs(config: Any, config_loader: Any) -> int | None:
    """The jobs the sweep will run, when the sweeper says (Optuna's and Nevergrad's
    `n_trials`/`budget`) or they follow from the command line (Hydra's basic sweeper in
    batches of `max_batch_size`); None for a sweeper that hands over its batches unannounced."""
    sweeper = config.hydra.get("sweeper") or {}
    for key in ("n_trials", "budget"):
        value = sweeper.get(key)
        if isinstance(value, int) and value > 0:
            return value
    basic = sweeper.get("_target_") == f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
    if basic and sweeper.get("max_batch_size"):
        arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(
            [*arguments, *config.hydra.overrides.task])
        return len(BasicSweeper.split_arguments(overrides, None)[0])  # as the sweeper splits them
    return None


def named_launcher_keys(config: Any) -> list[str]:
    """The launcher keys the command line sets (`hydra.launcher.local.enabled=false` names
    `local.enabled`), whatever their value."""
    prefix = "hydra.launcher."
    keys = (override.partition("=")[0].lstrip("~+") for override in hydra_overrides_as_written(config))
    return [key.removeprefix(prefix) for key in keys if key.startswith(prefix)]


def read_settings(options: dict[str, Any], node_defaults: dict[str, Any], named: list[str]) -> SweepSettings:
    """The sweep's settings: what the user chose in the launcher's config (a config file of theirs,
    the command line) over hsm_config.yaml's values, over the defaults."""
    plain = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
             for key, value in options.items()}
    try:
        settings = config_file.sweep_settings(config_file.chosen_by_user(plain, node_defaults, named), Path.cwd())
    except ConfigError as error:
        raise LauncherError(str(error)) from None
    for warning in settings.ignored:
        log.warning(warning)
    return settings


def build_sources(settings: SweepSettings) -> list[MachineSource]:
    """One source per machine the settings name: a channel that reaches its agent (a pipe here,
    SSH there) and a provider of its jobs (processes the agent forks, or Slurm jobs)."""
    sources = []
    if settings.local.enabled:
        sources.append(MachineSource(LOCAL, settings.local.max_parallel_jobs, 1.0, gpus.GpuPlan.of(settings.local),
                                     PipeChannel(LOCAL), ForkProvider(), settings.detach_grace))
    project = sync.Project(settings.sync)
    for remote in settings.remotes:
        channel = PipeChannel(remote.name, remote) if remote.slurm_here else SSHChannel(remote, settings, project)
        plan = gpus.GpuPlan() if remote.slurm_here else gpus.GpuPlan.of(remote)
        sources.append(MachineSource(remote.name, remote.job_slots, remote.capability, plan, channel,
                                     job_provider(remote, settings), settings.detach_grace))
    return sources


def job_provider(remote: RemoteSettings, settings: SweepSettings) -> Provider:
    """Where a remote's jobs run: processes its agent forks, one Slurm job each, or warm
    agents in a pool of Slurm allocations."""
    if remote.kind != "slurm":
        return ForkProvider()
    if remote.mode == "per_job":
        return SlurmProvider(remote.name, remote.sbatch_settings(), dict(remote.env))
    silence = keepalive_detection_bound(settings.keepalive_interval, settings.keepalive_count_max)
    pool = PoolSettings(remote.max_allocations, remote.jobs_per_allocation, remote.idle_timeout_s,
                        remote.allocation_time, remote.sbatch_settings().get("time"),
                        (settings.keepalive_interval, silence))
    return AllocationProvider(remote.name, remote.sbatch_settings(), dict(remote.env), pool)


def build_engine(settings: SweepSettings) -> Engine:
    """The sources the settings name, and the scheduler that shares them out."""
    sources: list[ComputeSource] = list(build_sources(settings))
    scheduler = Scheduler(
        sources,
        STRATEGIES[settings.strategy],
        max_retries=settings.max_retries,
        retry_failed_jobs=settings.retry_failed_jobs,
        reset_outputs=hydra_job.clear_job_dir,
        # Out for good only when unreachable for longer than keepalive takes to call a host lost,
        # or than its jobs may run on there without the launcher (detach_grace).
        policy=RetryPolicy(quarantine_after_s=max(settings.detach_grace, keepalive_detection_bound(
            settings.keepalive_interval, settings.keepalive_count_max))),
        detach=settings.detach_grace > 0,
    )
    return Engine(sources, scheduler)
