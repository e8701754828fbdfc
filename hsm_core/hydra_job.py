"""Hydra's job contract, both halves: what a launcher owes Hydra for each job, and what a
job process owes the launcher.

Owns: composing a job's config and its id, the session every job of a batch shares,
placing a job on another machine (`place`) and bringing its JobReturn back (`localize`),
renumbering a resumed job, the job's `.hydra/hydra.yaml`, the stand-in JobReturn of a
job that never ran, and running one job in its process (`run_in_job_process`) with the
outcome file it leaves. Must not know sources, the scheduler or the wire: a source hands
a job's payload over as is, and never re-pickles or re-maps it.

Travels to remote machines with the worker (it imports only Hydra, OmegaConf,
cloudpickle and the stdlib-only `files` and `jobs`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import pickle
import shutil
import sys
import traceback
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.basecontainer import BaseContainer

from hsm_core import files
from hsm_core.jobs import LAUNCHER_FOLDER, AttemptResult, JobRecord, JobSpec, Observer, Outcome

log = logging.getLogger(__name__)
MAX_INTERACTIVE_BYTES = 8 * 1024 * 1024  # one function of a notebook, with what it uses, sent to the jobs


class JobFailedError(CompactHydraException):
    """A job's failure as its JobReturn carries it: the worker's traceback, or every attempt's cause."""


def job_id(name: str, num: int) -> str:
    """hydra.job.id as Hydra's own launchers set it."""
    return f"{name}_{num}"


# -- the session: what every job of a batch shares ---------------------------------------


@dataclass
class SessionContents:
    """What a session's blob holds, as a job process uses it."""

    hydra_context: HydraContext
    task_function: Callable[[Any], Any]
    singleton_state: Any


def session_blob(hydra_context: HydraContext, task_function: Callable[[Any], Any]) -> bytes:
    """The session, cloudpickled once per batch (it is sent once per machine)."""
    # run_job needs the callbacks of the context. The config loader (local search paths,
    # maybe plugins this machine alone has) stays here, where jobs are composed.
    context = HydraContext(config_loader=None, callbacks=hydra_context.callbacks)  # type: ignore[arg-type]
    return cloudpickle.dumps((context, task_function, job_singletons(), interactive_main()))


def job_singletons() -> Any:
    """Hydra's global state for the jobs, as Singleton.get_state() shapes it, without what only
    composition uses (the ConfigStore, GlobalHydra and its config loader with every config
    it keeps) and without HydraConfig (each job sets its own): they hold typed nodes of
    plugins a remote machine need not have (this launcher's own included), and copying
    them cost seconds. Not deep-copied: the caller pickles it at once."""
    left_out = (ConfigStore, GlobalHydra, HydraConfig, Plugins)  # Plugins: as get_state() does
    return {
        "instances": {kind: instance for kind, instance in Singleton._instances.items() if kind not in left_out},
        "omegaconf_resolvers": dict(BaseContainer._resolvers),
    }


def main_program() -> str | None:
    """The launcher's main program as job processes must import it: the module name of a
    `python -m pkg.train` run, else the script's absolute path (None: an interactive run,
    whose functions travel in the session instead: interactive_main)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    path = getattr(main, "__file__", None)  # `<stdin>` for `python -`
    return os.path.abspath(path) if path and os.path.isfile(path) else None


def answer_to_main_names(main: str | None) -> None:
    """In the launcher: the name job processes load the main program under (`__mp_main__`,
    or the `-m` module's) is this process's `__main__`, so a result of a class the app
    defines unpickles here as that very class (not a second copy, or an import error)."""
    if main:
        sys.modules.setdefault("__mp_main__" if main.startswith("/") else main, sys.modules["__main__"])


def adopt_main(main: str | None) -> None:
    """Make the user's main program this process's `__main__`, as multiprocessing's spawn
    does: a script runs as `__mp_main__` (so its `if __name__ == "__main__":` block does not),
    a `-m` module is imported; then `_target_: __main__.fn` and objects pickled by reference
    to `__main__` resolve in the jobs. If it cannot be loaded, say why and go on: only such
    references fail then, with Hydra's own message."""
    global loading_main
    if not main:
        return
    argv, sys.argv = sys.argv, [main, "--help"]  # a script without the guard shows its help, runs nothing
    loading_main = True
    try:
        if main.startswith("/"):
            spec = importlib.util.spec_from_file_location("__mp_main__", main)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["__mp_main__"] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(main)
    except BaseException as failure:  # whatever the user's top-level code raises
        sys.modules.pop("__mp_main__", None)
        why = ("it runs the app when loaded: call it under `if __name__ == \"__main__\":`"
               if isinstance(failure, SystemExit) else f"{type(failure).__name__}: {failure}")
        print(f"The app's main program ({main}) could not be loaded as __main__ here ({why});"
              " `__main__.` targets will not resolve in its jobs", file=sys.stderr)
        return
    finally:
        sys.argv, loading_main = argv, False
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


# True while a job process loads the main program: a sweep it starts then (a script that
# calls hydra_zen.launch at top level) is refused, as multiprocessing refuses a process
# started while the main module is bootstrapping.
loading_main = False


def interactive_main() -> dict[str, bytes]:
    """The functions and classes of an interactive launcher (a notebook, `python -`), which
    has no file the jobs could load, each pickled by value: so `_target_: __main__.fn`
    (hydra-zen's `builds(fn)` in a notebook) resolves in the jobs. Empty for a script or a
    module. One that cannot be pickled, or would carry more than MAX_INTERACTIVE_BYTES (a
    function that uses a big global array takes the array along), stays behind, with a line."""
    main = sys.modules.get("__main__")
    if main is None or main_program() is not None:
        return {}
    found = {}
    for name, value in list(vars(main).items()):
        if not ((inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == "__main__"):
            continue
        try:
            found[name] = pickled_within(value, MAX_INTERACTIVE_BYTES)
        except TooBig:
            log.warning(f"__main__.{name} stays here: with what it uses it is over {MAX_INTERACTIVE_BYTES >> 20} MiB;"
                        " pass big data to your jobs as files or configs, not as globals of the notebook")
        except Exception as failure:  # a job that needs it fails saying it cannot find it
            log.warning(f"__main__.{name} stays here: it cannot be pickled ({type(failure).__name__}: {failure})")
    return found


class TooBig(Exception):
    """A pickle went past its limit (pickled_within)."""


class _BoundedBuffer(io.BytesIO):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > self.limit:
            raise TooBig()
        return super().write(data)


def pickled_within(value: Any, limit: int) -> bytes:
    """cloudpickle's bytes of `value`, stopped as soon as they pass `limit` (TooBig): a function
    of a notebook that uses a 400 MiB global is not pickled whole only to be left behind."""
    buffer = _BoundedBuffer(limit)
    cloudpickle.CloudPickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(value)
    return buffer.getvalue()


def load_session(blob: bytes) -> SessionContents:
    """The session on the machine that runs the jobs; raises what the user's imports raise.
    An interactive launcher's functions become this process's `__main__` (see interactive_main)."""
    hydra_context, task_function, singleton_state, interactive = cloudpickle.loads(blob)
    if interactive:
        module = types.ModuleType("__mp_main__")
        for name, pickled in interactive.items():
            try:
                setattr(module, name, cloudpickle.loads(pickled))
            except Exception as failure:  # what it imports is missing here: only jobs that need it fail
                print(f"__main__.{name} could not be loaded here ({type(failure).__name__}: {failure}); jobs that"
                      f" use it will fail. Fix: install what it imports in this machine's Python ({sys.executable})",
                      file=sys.stderr)
        sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    return SessionContents(hydra_context, task_function, singleton_state)


def install_session(session: SessionContents) -> None:
    """Put the session's Hydra globals in place (a forked job inherits them ready)."""
    setup_globals()
    Singleton.set_state(session.singleton_state)


# -- composing the jobs of a batch (in the launcher) --------------------------------------


def compose_jobs(config: DictConfig, config_loader: Any, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int, keys: Sequence[str]) -> Iterator[JobSpec]:
    """Compose each job's sweep config, lazily: one job at a time, as the scheduler needs them
    (through composition.Compositions once the launcher's setup() installed it). `keys`: each
    job's key in the journal (journal.job_key)."""
    compose = getattr(config_loader.load_sweep_config, "take", config_loader.load_sweep_config)
    # The plugins' nodes as plain data, once per batch: both are the same for every job that
    # does not override them (the launcher's resolved here, where any interpolation a user's
    # launcher config holds means what it meant when the sweep started).
    launcher_node = OmegaConf.create(plain_values(config.hydra.launcher, resolve=True))
    sweeper_node = OmegaConf.create(plain_values(config.hydra.sweeper, resolve=False))
    for index, overrides in enumerate(job_overrides):
        num = initial_job_idx + index
        spec = JobSpec(index=index, num=num, overrides=list(overrides), key=keys[index])
        try:
            sweep_config = compose(config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = job_id(sweep_config.hydra.job.name, num)
                sweep_config.hydra.job.num = num
            own_sweeper = any(line.lstrip("+~").startswith(("hydra.sweeper", "hydra/sweeper")) for line in overrides)
            untype_plugin_nodes(sweep_config, launcher_node,
                                OmegaConf.create(plain_values(sweep_config.hydra.sweeper, resolve=False))
                                if own_sweeper else sweeper_node)
            written = OmegaConf.to_container(sweep_config.hydra.sweep, resolve=False)
            assert isinstance(written, dict)
            if "${hydra:" in f"{written}":  # its dir or subdir asks HydraConfig (~20 ms): set it
                HydraConfig.instance().set_config(sweep_config)
            spec.subdir = checked_subdir(str(OmegaConf.select(sweep_config, "hydra.sweep.subdir")))
            spec.job_dir = str(Path(str(sweep_config.hydra.sweep.dir)) / spec.subdir)
            spec.written_sweep_dir = written["dir"]
            spec.payload = cloudpickle.dumps(sweep_config)
            spec.config_hash = config_hash(sweep_config)
        except Exception as error:  # this job's overrides do not compose; its siblings may
            spec.compose_error = describe(error)
        yield spec


ONE_FOLDER_PER_JOB = "Fix: make it name one folder per job, e.g. ${hydra.job.num}"


def config_hash(sweep_config: DictConfig) -> str:
    """A hash of the job's own config (Hydra's keys aside: its run dirs and numbers change when
    a sweep is resumed in another order), as written (interpolations unresolved)."""
    task = OmegaConf.to_container(sweep_config, resolve=False)
    assert isinstance(task, dict)
    task.pop("hydra", None)
    return hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checked_subdir(subdir: str) -> str:
    """hydra.sweep.subdir as a folder strictly inside the sweep dir and outside the launcher's
    own `.hsm`: a job's dir is emptied before a retry, so any other is refused first."""
    normal = os.path.normpath(subdir)
    if os.path.isabs(normal) or normal == "." or normal == ".." or normal.startswith("../"):
        raise ValueError(f"hydra.sweep.subdir is {subdir!r}, which is not a folder inside hydra.sweep.dir. "
                         + ONE_FOLDER_PER_JOB)
    if normal.split("/")[0] == LAUNCHER_FOLDER:
        raise ValueError(f"hydra.sweep.subdir is {subdir!r}, inside the launcher's own {LAUNCHER_FOLDER}"
                         f" folder. {ONE_FOLDER_PER_JOB}")
    return normal


class JobDirs:
    """The job dirs of a sweep so far. A job whose dir is another job's, or inside or around
    another's, fails before it runs: their outputs would mix, and a retry empties its dir."""

    def __init__(self) -> None:
        self.owners: dict[str, int] = {}  # job dir -> its job's num
        self.around: dict[str, int] = {}  # every folder that holds a job dir -> that job's num

    def claimed(self, specs: Iterator[JobSpec]) -> Iterator[JobSpec]:
        for spec in specs:
            if spec.compose_error is None:
                self._claim(spec)
            yield spec

    def _claim(self, spec: JobSpec) -> None:
        parts = spec.subdir.split("/")
        folders = ["/".join(parts[:end]) for end in range(1, len(parts))]
        other = self.owners.get(spec.subdir, self.around.get(spec.subdir))
        other = next((self.owners[folder] for folder in folders if folder in self.owners), other)
        if other is not None:
            spec.compose_error = (f"hydra.sweep.subdir is {spec.subdir!r} for job #{spec.num}, which would mix its"
                                  f" outputs with job #{other}'s. {ONE_FOLDER_PER_JOB}")
            spec.payload = None
            return
        self.owners[spec.subdir] = spec.num
        self.around.update((folder, spec.num) for folder in folders)


def untype_plugin_nodes(sweep_config: DictConfig, launcher: DictConfig, sweeper: DictConfig) -> None:
    """Make hydra.launcher and hydra.sweeper plain mappings (`launcher` and `sweeper`, made by
    plain_values): their dataclasses belong to plugins (this one included) that the machine
    running the job need not have."""
    hydra = sweep_config.hydra
    with read_write(hydra), open_dict(hydra):
        hydra.launcher = launcher
        hydra.sweeper = sweeper


def plain_values(node: Any, resolve: bool) -> Any:
    """A plugin node as plain data; enums as names (Optuna's Direction is a class the remote lacks)."""
    return OmegaConf.to_container(node, resolve=resolve, enum_to_str=True) if OmegaConf.is_config(node) else node


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if error.__cause__ is not None:
        text += f"\n  caused by {type(error.__cause__).__name__}: {error.__cause__}"
    return text


def clear_job_dir(spec: JobSpec) -> None:
    """Before a retry: remove what a given-up attempt left, so the dir holds one attempt's output."""
    if spec.job_dir:
        shutil.rmtree(spec.job_dir, ignore_errors=True)


# -- another machine: there and back ------------------------------------------------------


def place(sweep_config: DictConfig, sweep_dir: str, cwd: str) -> None:
    """Put a job on the machine that runs it: its sweep dir and working dir are that machine's."""
    with read_write(sweep_config.hydra.sweep), read_write(sweep_config.hydra.runtime):
        sweep_config.hydra.sweep.dir = sweep_dir
        sweep_config.hydra.runtime.cwd = cwd


def localize(job_return: JobReturn, spec: JobSpec, local_job_dir: Path, local_cwd: str,
             to_local: Callable[[str], str]) -> None:
    """The reverse of `place`, once the outputs are here: the JobReturn (and the job's saved
    hydra.yaml) name the local copies and the sweep dir as the user wrote it."""
    hydra = hydra_node(job_return)
    with read_write(hydra.sweep), read_write(hydra.runtime):
        hydra.runtime.output_dir = str(local_job_dir)
        hydra.runtime.cwd = local_cwd
        hydra.sweep.dir = spec.written_sweep_dir
    if job_return.working_dir is not None:
        job_return.working_dir = to_local(job_return.working_dir)
    save_hydra_yaml(job_return, local_job_dir)


def hydra_node(job_return: JobReturn) -> DictConfig:
    """The `hydra` node of a JobReturn that run_job built (it always has one)."""
    assert job_return.hydra_cfg is not None
    hydra: DictConfig = job_return.hydra_cfg.hydra
    return hydra


def save_hydra_yaml(job_return: JobReturn, local_job_dir: Path) -> None:
    """Rewrite the job's saved hydra.yaml from its JobReturn, when the job saved one."""
    output_subdir = hydra_node(job_return).output_subdir
    if output_subdir is None:
        return
    saved = local_job_dir / str(output_subdir) / "hydra.yaml"
    if saved.exists():
        files.write_atomically(str(saved), OmegaConf.to_yaml(job_return.hydra_cfg).encode(),
                               saved.stat().st_mode & 0o777)


def renumbered(job_return: JobReturn, spec: JobSpec, sweep_dir: Path) -> JobReturn:
    """A stored JobReturn as this run numbers the job (num, id, output dir, overrides)."""
    job_return = copy.copy(job_return)
    job_return.overrides = spec.overrides
    hydra = hydra_node(job_return)
    output_dir = str(sweep_dir / spec.subdir)
    with read_write(hydra.job), read_write(hydra.runtime):
        if job_return.working_dir == hydra.runtime.output_dir:
            job_return.working_dir = output_dir
        hydra.job.num = spec.num
        hydra.job.id = job_id(hydra.job.name, spec.num)
        hydra.runtime.output_dir = output_dir
    save_hydra_yaml(job_return, sweep_dir / spec.subdir)
    return job_return


# -- what Hydra gets back ------------------------------------------------------------------


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
    if spec.payload is not None:
        sweep_config = cloudpickle.loads(spec.payload)
        job_return.hydra_cfg = sweep_config
        task_cfg = copy.deepcopy(sweep_config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        job_return.cfg = task_cfg
        job_return.task_name = sweep_config.hydra.job.name
    return job_return


def failure_message(record: JobRecord) -> str:
    final = record.final
    assert final is not None
    if final.outcome is Outcome.FAILED and len(record.attempts) == 1:
        return f"Job {record.spec.label} failed on {final.source}:\n{(final.error or '').rstrip()}"
    count = len(record.attempts)
    lines = [f"Job {record.spec.label} did not complete after {count} attempt{'s' if count > 1 else ''}:"]
    for number, attempt in enumerate(record.attempts, 1):
        cause = (attempt.error or "").rstrip()
        lines.append(f"  attempt {number} on {attempt.source}: {attempt.outcome.value}: {cause}")
    return "\n".join(lines)


# -- keeping a sweep small ------------------------------------------------------------------


def _packed(index: int) -> Any:
    """One of the two configs a CompactJobReturn keeps packed, as a read-write attribute."""

    def get(job_return: CompactJobReturn) -> Any:
        return job_return._expanded()[index]

    def put(job_return: CompactJobReturn, value: Any) -> None:
        job_return._expanded()[index] = value

    return property(get, put)


class CompactJobReturn(JobReturn):
    """A JobReturn whose two configs stay compressed until one is read (~3 KB instead of
    ~150 KB a job): a sweep of 10,000 jobs hands Hydra 10,000 of them at its end, and
    sweepers read only `status` and `return_value`. Reading `cfg` or `hydra_cfg` expands
    both, for good."""

    def __init__(self, full: JobReturn) -> None:
        self._packed: bytes | None = None
        self._configs: list[Any] = [None, None]
        super().__init__(overrides=full.overrides, working_dir=full.working_dir, task_name=full.task_name,
                         status=full.status, _return_value=full._return_value)
        self._packed = zlib.compress(cloudpickle.dumps((full.cfg, full.hydra_cfg)), 1)

    def _expanded(self) -> list[Any]:
        if self._packed is not None:
            self._configs, self._packed = list(pickle.loads(zlib.decompress(self._packed))), None
        return self._configs

    cfg = _packed(0)
    hydra_cfg = _packed(1)


class Compactor(Observer):
    """Observes the scheduler: once a job is settled, its JobReturn is compacted and its
    payload dropped (kept only to build the stand-in of a job that left no JobReturn)."""

    def job_ended(self, record: JobRecord, attempt: AttemptResult, retrying: bool) -> None:
        if retrying:
            return
        if attempt.job_return is not None:
            attempt.job_return = CompactJobReturn(attempt.job_return)
            record.spec.payload = None


# -- inside the job process ------------------------------------------------------------------


@dataclass
class JobOutcome:
    """What a job process leaves for its agent, and the agent sends on as bytes."""

    job_return: JobReturn | None
    error: str | None  # the traceback, as text: the exception's class may not exist elsewhere


def run_in_job_process(session: SessionContents, payload: bytes, cwd: str, sweep_dir: str | None,
                       outcome_path: str) -> int:
    """Run one job with Hydra's run_job and write its JobOutcome atomically to outcome_path."""
    error: dict[str, str] = {}
    job_return = None
    try:
        os.chdir(cwd)
        sweep_config = cloudpickle.loads(payload)
        if sweep_dir is not None:
            place(sweep_config, sweep_dir, cwd)
        job_return = run_job(
            hydra_context=session.hydra_context,
            task_function=reporting_failures(session.task_function, error),
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except BaseException as failure:  # outside the task: Hydra itself, a callback, sys.exit
        error.setdefault("traceback", "".join(traceback.format_exception(failure)))
    if job_return is not None and job_return.status is JobStatus.FAILED:
        job_return.return_value = None  # the exception travels as text
    # Read back by the agent of this same boot: no fsync needed.
    files.write_atomically(outcome_path, encode_outcome(job_return, error.get("traceback")), durable=False)
    return 0


def reporting_failures(task_function: Callable[[Any], Any], error: dict[str, str]) -> Callable[[Any], Any]:
    """Wrap the task so its traceback is kept as text and written to the job's log."""

    @functools.wraps(task_function)
    def task(cfg: Any) -> Any:
        try:
            return task_function(cfg)
        except BaseException as failure:
            frames = failure.__traceback__.tb_next if failure.__traceback__ else None
            text = "".join(traceback.format_exception(type(failure), failure, frames)) + project_copy_hint(failure)
            error["traceback"] = text
            log.error("The task raised an exception:\n%s", text.rstrip())
            raise

    return task


def project_copy_hint(failure: BaseException) -> str:
    """The fix for a write into the working directory on a remote machine, where (with
    hydra.job.chdir=false) it is the read-only copy of the project, so nothing written there
    would come back."""
    if not isinstance(failure, PermissionError) or not isinstance(failure.filename, (str, bytes)):
        return ""
    cwd, name = os.getcwd(), os.fsdecode(failure.filename)
    if os.path.commonpath([os.path.abspath(name), cwd]) != cwd or os.access(cwd, os.W_OK):
        return ""
    return (f"Cannot write {name!r}: the job's working directory here is this"
            " machine's read-only copy of the project (hydra.job.chdir=false), so nothing written there would"
            " come back. Fix: write into HydraConfig.get().runtime.output_dir (it comes back) and caches to an"
            " absolute path, or set hydra.job.chdir=true\n")


def encode_outcome(job_return: JobReturn | None, error: str | None) -> bytes:
    """Pickle the outcome; a return value that cannot be pickled becomes the job's failure."""
    try:
        return cloudpickle.dumps(JobOutcome(job_return, error))
    except Exception as failure:
        assert job_return is not None  # only a return value can fail to pickle
        value = getattr(job_return, "_return_value", None)
        job_return.return_value = None
        job_return.status = JobStatus.FAILED
        return cloudpickle.dumps(JobOutcome(job_return, (
            f"The task's return value (of type {type(value).__name__}) cannot be pickled,"
            f" so it cannot be sent back: {failure!r}. Return plain data (numbers,"
            " strings, lists, dicts) and save other objects in the job's output dir.")))


def decode_outcome(data: bytes) -> tuple[Outcome, JobReturn | None, str | None]:
    """The launcher's reading of a job's outcome: COMPLETED or FAILED, the JobReturn, the error."""
    try:
        outcome: JobOutcome = cloudpickle.loads(data)
    except Exception as unreadable:  # e.g. a return value whose class cannot be imported here
        return Outcome.FAILED, None, f"the job's result could not be unpickled by the launcher: {unreadable!r}"
    job_return = outcome.job_return
    completed = outcome.error is None and job_return is not None and job_return.status is JobStatus.COMPLETED
    return (Outcome.COMPLETED if completed else Outcome.FAILED), job_return, outcome.error
