"""One batch of a Hydra sweep: compose its jobs, schedule them, hand back JobReturns.

This is the only module of hsm_core that knows Hydra's launcher contract; the
launcher plugin calls `launch()` and nothing else.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import os
import shutil
import signal
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hsm_core import config_file, journal as journals, resume
from hsm_core.jobs import JobRecord, JobSpec, Outcome
from hsm_core.journal import Journal
from hsm_core.progress import Progress
from hsm_core.scheduler import NoUsableSource, Observer, Scheduler
from hsm_core.settings import LOCAL, ConfigError, SweepSettings
from hsm_core.sources.base import BatchContext, ComputeSource
from hsm_core.sources.local import LocalSource
from hsm_core.sources.ssh import Project, SSHSource
from hsm_core.strategies import STRATEGIES

log = logging.getLogger(__name__)


class LauncherError(CompactHydraException):
    """Shown by Hydra as its message alone: bad settings, or no source can run jobs."""


class JobFailedError(CompactHydraException):
    """A job's failure as its JobReturn carries it: the worker's traceback, or every attempt's cause."""


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    if launcher.engine is None:
        launcher.engine = Engine(read_settings(launcher.options))
        weakref.finalize(launcher, launcher.engine.close)
    engine: Engine = launcher.engine

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    engine.claim(sweep_dir)
    journal = Journal(sweep_dir)
    journal.launched(sys.argv, [source.name for source in engine.sources], len(job_overrides))
    journal.sources_used(engine.settings)
    sources = ", ".join(f"{source.name} ({source.slots} slot{'s' if source.slots > 1 else ''})" for source in engine.sources)
    log.info(f"hsm_distributed is launching {len(job_overrides)} jobs on {sources} ({engine.settings.strategy})")
    log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
    for index, overrides in enumerate(job_overrides):
        log.info(f"\t#{initial_job_idx + index} : {' '.join(filter_overrides(overrides))}")

    blob = cloudpickle.dumps((job_context(launcher.hydra_context), launcher.task_function, job_singletons()))
    batch = BatchContext(
        sid=hashlib.sha256(blob).hexdigest()[:16],
        blob=blob,
        sys_path=tuple(sys.path),
        cwd=os.getcwd(),
        sweep_dir=str(sweep_dir.absolute()),
    )
    jobs: Iterable[JobSpec] = compose_jobs(launcher, job_overrides, initial_job_idx)
    restored: dict[int, JobReturn] = {}
    if engine.settings.resume:  # composed up front: restored jobs' dirs may have to move
        specs = list(jobs)
        restored = resume.restore(journal, sweep_dir.absolute(), [s for s in specs if s.compose_error is None])
        log.info(f"Resuming: {len(restored)} of {len(specs)} jobs completed earlier (journal);"
                 f" running the other {len(specs) - len(restored)}")
        jobs = [spec for spec in specs if spec.index not in restored]
    progress = Progress(len(job_overrides) - len(restored), [(s.name, s.slots) for s in engine.sources],
                        live=sys.stderr.isatty(), summary_every=engine.settings.progress_interval)
    try:
        records = engine.run_batch(batch, jobs, [journal, progress], progress)
    except NoUsableSource as error:
        raise LauncherError(str(error)) from None
    journal.sources_used(engine.settings, {source.name: source.remote.python for source in engine.sources
                                           if isinstance(source, SSHSource) and source.remote.python})
    returns = {record.spec.index: to_job_return(record) for record in records}
    returns.update(restored)
    return [returns[index] for index in range(len(job_overrides))]


def job_context(hydra_context: HydraContext) -> HydraContext:
    """What run_job needs of the context: the callbacks. The config loader (local search
    paths, maybe plugins this machine alone has) stays here, where jobs are composed."""
    return HydraContext(config_loader=None, callbacks=hydra_context.callbacks)  # type: ignore[arg-type]


def job_singletons() -> Any:
    """Hydra's global state for the jobs, without what only composition uses (the ConfigStore
    and GlobalHydra): composition is done, and both hold nodes of plugins that a remote
    machine may not have installed (the launcher's own `hsm` resolver included)."""
    state = Singleton.get_state()
    state["instances"].pop(ConfigStore, None)
    state["instances"].pop(GlobalHydra, None)
    state["omegaconf_resolvers"].pop("hsm", None)  # the launcher node's defaults: resolved here
    return state


def read_settings(options: dict[str, Any]) -> SweepSettings:
    plain = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
             for key, value in options.items()}
    try:
        settings = config_file.sweep_settings(plain, Path.cwd())
    except ConfigError as error:
        raise LauncherError(str(error)) from None
    for warning in settings.ignored:
        log.warning(warning)
    return settings


class RememberedCompositions:
    """Stands in for a config loader's load_sweep_config and keeps what it composes.

    Hydra's sweepers compose every job of a batch once to validate it, and drop the
    result, right before calling launch() ("this repeats work the launcher will do", says
    Hydra). The launcher takes those configs instead of composing each job a second time
    (~0.1 s of CPU a job). At most LIMIT are kept, each handed out once.
    """

    LIMIT = 256

    def __init__(self, compose: Callable[..., DictConfig]) -> None:
        self.compose = compose
        self.kept: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        config = self.compose(master_config, sweep_overrides)
        if len(self.kept) < self.LIMIT:
            self.kept[(id(master_config), tuple(sweep_overrides))] = config
        return config

    def take(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        kept = self.kept.pop((id(master_config), tuple(sweep_overrides)), None)
        return kept if kept is not None else self.compose(master_config, sweep_overrides)


def remember_compositions(config_loader: Any) -> None:
    """Called by the launcher's setup(), before the sweeper validates its first batch."""
    if not isinstance(config_loader.load_sweep_config, RememberedCompositions):
        config_loader.load_sweep_config = RememberedCompositions(config_loader.load_sweep_config)


def compose_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Iterator[JobSpec]:
    """Compose each job's sweep config in the parent, lazily: one job at a time, as needed."""
    loader = launcher.hydra_context.config_loader
    compose = getattr(loader.load_sweep_config, "take", loader.load_sweep_config)
    # The launcher's values, resolved once per batch: its `${hsm:...}` defaults read this
    # machine's hsm_config.yaml (~7 ms), the same for every job.
    launcher_values = plain_values(launcher.config.hydra.launcher, resolve=True)
    for index, overrides in enumerate(job_overrides):
        num = initial_job_idx + index
        spec = JobSpec(index=index, num=num, overrides=list(overrides))
        try:
            sweep_config = compose(launcher.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
                sweep_config.hydra.job.num = num
            untype_plugin_nodes(sweep_config, launcher_values)
            HydraConfig.instance().set_config(sweep_config)  # the subdir may use ${hydra:...}
            spec.subdir = checked_subdir(str(OmegaConf.select(sweep_config, "hydra.sweep.subdir")))
            spec.sweep_config = sweep_config
            spec.payload = cloudpickle.dumps(sweep_config)
        except Exception as error:  # this job's overrides do not compose; its siblings may
            spec.compose_error = describe(error)
        yield spec


def checked_subdir(subdir: str) -> str:
    """hydra.sweep.subdir as a folder strictly inside the sweep dir: a job's dir is emptied
    before a retry, so one that is the sweep dir itself, or outside it, is refused first."""
    normal = os.path.normpath(subdir)
    if os.path.isabs(normal) or normal == "." or normal == ".." or normal.startswith("../"):
        raise ValueError(f"hydra.sweep.subdir is {subdir!r}, which is not a folder inside hydra.sweep.dir."
                         " Fix: make it name one folder per job, e.g. ${hydra.job.num}")
    return normal


def clear_job_dir(spec: JobSpec) -> None:
    """Before a retry: remove what a given-up attempt left, so the dir holds one attempt's output."""
    if spec.sweep_config is not None:
        job_dir = Path(str(spec.sweep_config.hydra.sweep.dir)) / spec.subdir
        shutil.rmtree(job_dir, ignore_errors=True)


def untype_plugin_nodes(sweep_config: DictConfig, launcher_values: Any) -> None:
    """Make hydra.launcher and hydra.sweeper plain mappings: their dataclasses belong to
    plugins (this one included) that the machine running the job need not have."""
    hydra = sweep_config.hydra
    with read_write(hydra), open_dict(hydra):
        hydra.launcher = OmegaConf.create(launcher_values)
        if OmegaConf.is_config(hydra.sweeper):
            hydra.sweeper = OmegaConf.create(plain_values(hydra.sweeper, resolve=False))


def plain_values(node: Any, resolve: bool) -> Any:
    """A plugin node as plain data; enums as names (Optuna's Direction is a class the remote lacks)."""
    return OmegaConf.to_container(node, resolve=resolve, enum_to_str=True) if OmegaConf.is_config(node) else node


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if error.__cause__ is not None:
        text += f"\n  caused by {type(error.__cause__).__name__}: {error.__cause__}"
    return text


def to_job_return(record: JobRecord) -> JobReturn:
    """The JobReturn Hydra expects; a failure carries a message saying what happened."""
    final = record.final
    assert final is not None
    job_return = final.job_return if final.job_return is not None else stand_in_return(record.spec)
    if final.outcome is Outcome.COMPLETED:
        return job_return
    job_return.status = JobStatus.FAILED
    job_return.return_value = JobFailedError(failure_message(record))
    return job_return


def stand_in_return(spec: JobSpec) -> JobReturn:
    """For a job that produced no JobReturn of its own (never ran, or its process died)."""
    job_return = JobReturn(overrides=spec.overrides)
    if isinstance(spec.sweep_config, DictConfig):
        job_return.hydra_cfg = spec.sweep_config
        task_cfg = copy.deepcopy(spec.sweep_config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        job_return.cfg = task_cfg
        job_return.task_name = spec.sweep_config.hydra.job.name
    return job_return


def failure_message(record: JobRecord) -> str:
    final = record.final
    assert final is not None
    if final.outcome is Outcome.FAILED and len(record.attempts) == 1:
        return f"Job {record.spec.label} failed on {final.source}:\n{(final.error or '').rstrip()}"
    count = len(record.attempts)
    lines = [f"Job {record.spec.label} did not complete after {count} attempt{'s' if count > 1 else ''}:"]
    for number, attempt in enumerate(record.attempts, 1):
        lines.append(f"  attempt {number} on {attempt.source}: {attempt.outcome.value}: {(attempt.error or '').rstrip()}")
    return "\n".join(lines)


class Engine:
    """An event loop and the sources, kept across the batches of a sweep (agents stay warm)."""

    def __init__(self, settings: SweepSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.claims: dict[Path, int] = {}  # sweep dir -> the fd that holds its lock
        self.sources: list[ComputeSource] = []
        if settings.local.enabled:
            self.sources.append(LocalSource(LOCAL, settings.local))
        if settings.remotes:
            project = Project(settings)
            self.sources += [SSHSource(remote, settings, project) for remote in settings.remotes]
        self.scheduler = Scheduler(
            self.sources,
            STRATEGIES[settings.strategy],
            max_retries=settings.max_retries,
            retry_failed_jobs=settings.retry_failed_jobs,
            reset_outputs=clear_job_dir,
        )

    def run_batch(self, batch: BatchContext, jobs: Iterable[JobSpec], observers: Sequence[Observer],
                  progress: Progress) -> list[JobRecord]:
        """Run the batch; SIGINT or SIGTERM stops every job, then ends the launcher."""

        async def run() -> list[JobRecord]:
            progress.start()
            try:
                return await self.scheduler.run(batch, jobs, observers)
            finally:
                progress.finish()

        task = self.loop.create_task(run())
        received: list[int] = []

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        handled = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.loop.add_signal_handler(signum, stop, signum)
                handled.append(signum)
            except (RuntimeError, ValueError):  # not the main thread: the caller owns signals
                pass
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not received:
                raise
            name = signal.Signals(received[0]).name
            log.error(f"Interrupted by {name}: every running job was stopped")
            raise SystemExit(128 + received[0]) from None
        finally:
            for signum in handled:
                self.loop.remove_signal_handler(signum)

    def claim(self, sweep_dir: Path) -> None:
        """Hold the sweep dir for this launch: a second launch into it is refused, not merged."""
        key = sweep_dir.absolute()
        if key in self.claims:
            return
        try:
            self.claims[key] = journals.claim(key)
        except journals.SweepDirBusy as holder:
            raise LauncherError(f"another launch is using the sweep dir {key} ({holder}). Fix: wait for it to end,"
                                " or give this one its own hydra.sweep.dir") from None

    def close(self) -> None:
        for fd in self.claims.values():
            os.close(fd)
        self.claims.clear()
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self._close_sources())
        self.loop.close()

    async def _close_sources(self) -> None:
        await asyncio.gather(*(source.close() for source in self.sources))
