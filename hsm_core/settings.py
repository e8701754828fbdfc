"""Sweep settings: read from the launcher's config node, validated with messages a user can act on.

Owns the checks of every key and the frozen settings the rest of the engine reads; the
keys and their defaults are `options`'. Must not know files (that is `config_file`),
sources or jobs."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Union

from hsm_core import env_requirements, environments, options
from hsm_core.slurm import FIT_MARGIN_SECONDS, SBATCH_FLAGS, duration as slurm_duration
from hsm_core.strategies import STRATEGIES

LOCAL = "local"
WHEELS = (environments.AUTO, environments.INDEX, environments.SHIP)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")

# The built-in defaults (hsm_core.options): what a key is when neither the command line
# nor hsm_config.yaml sets it.
DEFAULTS: dict[str, Any] = options.defaults(options.LAUNCHER)
REMOTE_DEFAULTS: dict[str, Any] = options.defaults(options.REMOTE)


class ConfigError(Exception):
    """Bad configuration. The message names the key, the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}: {problem}. Fix: {fix}")
        self.key = key


GpuSetting = Union[None, str, tuple[int, ...]]  # None, "auto", or device ids


@dataclass(frozen=True)
class LocalSettings:
    enabled: bool = DEFAULTS["local.enabled"]
    max_parallel_jobs: int = field(default_factory=options.cpu_count)
    gpus: GpuSetting = DEFAULTS["local.gpus"]
    gpus_per_job: int = 0  # 1 when gpus is set, unless given
    min_free_memory_mb: float = DEFAULTS["local.min_free_memory_mb"]  # with gpus: auto, skip GPUs with less free
    stagger_s: float = DEFAULTS["local.stagger_s"]  # at least this long between two job starts here


@dataclass(frozen=True)
class RemoteSettings:
    """One `remotes.NAME` entry. None means: let ~/.ssh/config (or OpenSSH's default) decide."""

    name: str
    host: str
    kind: str = REMOTE_DEFAULTS["kind"]
    user: str | None = None
    ssh_port: int | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None  # None: ~/.ssh/config's UserKnownHostsFile, else ~/.ssh/known_hosts
    max_parallel_jobs: int = REMOTE_DEFAULTS["max_parallel_jobs"]
    enabled: bool = REMOTE_DEFAULTS["enabled"]
    python: str | None = None  # None: found on the machine (remote_python)
    project_dir: str = REMOTE_DEFAULTS["project_dir"]  # remote root; each project gets its own folder in it
    setup: tuple[str, ...] = ()  # shell lines run before the worker starts (conda activate, ...)
    environment: str = DEFAULTS["environment"]  # found, mirror, or a file of the project (env_requirements)
    wheels: str = DEFAULTS["wheels"]  # where the environment's packages come from: index, auto or ship
    env: tuple[tuple[str, str], ...] = ()
    gpus: GpuSetting = None
    gpus_per_job: int = 0
    min_free_memory_mb: float = REMOTE_DEFAULTS["min_free_memory_mb"]
    stagger_s: float = REMOTE_DEFAULTS["stagger_s"]
    weight: float | None = None  # relative capability, for the capability_based strategy
    slurm: tuple[tuple[str, Any], ...] = ()  # partition, time, ...: for kind slurm
    mode: str = REMOTE_DEFAULTS["mode"]  # slurm: per_job, or allocation (warm agents in a pool of allocations)
    jobs_per_allocation: int = REMOTE_DEFAULTS["jobs_per_allocation"]
    max_allocations: int = 1
    idle_timeout_s: float = REMOTE_DEFAULTS["idle_timeout_s"]
    allocation_time: str | None = None  # None: the partition's default

    @property
    def job_slots(self) -> int:
        """Jobs at once: max_parallel_jobs, or what the allocations hold."""
        if self.mode == "allocation":
            return self.max_allocations * self.jobs_per_allocation
        return self.max_parallel_jobs

    @property
    def slurm_here(self) -> bool:
        """A Slurm source whose login node is this machine (`host: localhost`): no SSH, jobs
        write their outputs in place."""
        return self.kind == "slurm" and self.host == "localhost"

    def sbatch_settings(self) -> dict[str, Any]:
        """The Slurm keys (kind slurm), with `gpus_per_job` as Slurm's `gpus` unless `gres` says it."""
        found = dict(self.slurm)
        if self.gpus_per_job and "gres" not in found:
            found["gpus"] = self.gpus_per_job
        return found

    @property
    def capability(self) -> float:
        """The declared weight, else the GPU count (when known before connecting), else 1."""
        if self.weight is not None:
            return self.weight
        return float(len(self.gpus)) if isinstance(self.gpus, tuple) and self.gpus else 1.0


@dataclass(frozen=True)
class SyncSettings:
    """Which files of the local project travel to remote machines."""

    include: tuple[str, ...] = ()  # sent even when a default (secrets, caches) would keep them here
    exclude: tuple[str, ...] = ()  # added to sync.DEFAULT_EXCLUDES


@dataclass(frozen=True)
class SweepSettings:
    strategy: str = DEFAULTS["strategy"]
    max_retries: int = DEFAULTS["max_retries"]
    retry_failed_jobs: int = DEFAULTS["retry_failed_jobs"]
    collect_interval: float = DEFAULTS["collect_interval"]
    keepalive_interval: float = DEFAULTS["keepalive_interval"]
    keepalive_count_max: int = DEFAULTS["keepalive_count_max"]
    resume: bool = DEFAULTS["resume"]
    resume_keeps_changed: bool = False  # resume: keep, not true
    progress_interval: float = DEFAULTS["progress_interval"]
    detach_grace: float = DEFAULTS["detach_grace"]  # 0: agents stop their jobs when the launcher is gone
    report: bool = DEFAULTS["report"]  # rewrite <sweep_dir>/.hsm/report.html as the sweep goes
    env_keep_days: float = DEFAULTS["env_keep_days"]  # built environments unused this long are removed
    local: LocalSettings = field(default_factory=LocalSettings)
    remotes: tuple[RemoteSettings, ...] = ()
    sync: SyncSettings = field(default_factory=SyncSettings)
    ignored: tuple[str, ...] = ()  # keys that were set but that this version does not use, and why


REMOTE_KEYS = tuple(option.key for option in options.REMOTE)
# "enabled": hsm_config.yaml's switch for its whole `distributed:` block.
TOP_KEYS = ("enabled", *dict.fromkeys(option.key.split(".")[0] for option in options.LAUNCHER))
LOCAL_KEYS = tuple(option.key.split(".", 1)[1] for option in options.LAUNCHER if option.key.startswith("local."))


def merge(file_options: Mapping[str, Any], launcher_options: Mapping[str, Any]) -> dict[str, Any]:
    """The file's settings with the launcher's on top: a launcher key set to null is unset."""
    merged = dict(file_options)
    for key, value in launcher_options.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(values: Mapping[str, Any], origin: str = "hydra.launcher") -> SweepSettings:
    """Validate settings (plain containers; null means the default) into SweepSettings."""
    values = {key: value for key, value in values.items() if value is not None}
    _known_keys(values, TOP_KEYS, origin)

    def given(key: str) -> tuple[Any, str]:
        """A top-level key's value (else its default) and its name, for the checks below."""
        return values.get(key, DEFAULTS[key]), f"{origin}.{key}"

    ignored = []
    if values.get("health_check_interval", DEFAULTS["health_check_interval"]) != DEFAULTS["health_check_interval"]:
        ignored.append(f"{origin}.health_check_interval is not used by this version (SSH keepalive detects lost"
                       " machines: see keepalive_interval); it is ignored")
    strategy = values.get("strategy", DEFAULTS["strategy"])
    if strategy not in STRATEGIES:
        raise ConfigError(f"{origin}.strategy", f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    local = _mapping(values.get("local"), f"{origin}.local")
    _known_keys(local, LOCAL_KEYS, f"{origin}.local")
    slots = local.get("max_parallel_jobs")
    environment = _environment(*given("environment"))
    wheels = _wheels(*given("wheels"))
    remotes = tuple(
        _remote(name, _mapping(entry, f"{origin}.remotes.{name}"), f"{origin}.remotes.{name}", environment, wheels)
        for name, entry in _mapping(values.get("remotes"), f"{origin}.remotes").items()
    )
    settings = SweepSettings(
        strategy=strategy,
        max_retries=_count(*given("max_retries"), minimum=0),
        retry_failed_jobs=_count(*given("retry_failed_jobs"), minimum=0),
        collect_interval=_positive_number(*given("collect_interval")),
        keepalive_interval=_positive_number(*given("keepalive_interval")),
        keepalive_count_max=_count(*given("keepalive_count_max"), minimum=1),
        resume=given("resume")[0] == "keep" or as_flag(*given("resume")),
        resume_keeps_changed=given("resume")[0] == "keep",
        progress_interval=_positive_number(*given("progress_interval")),
        detach_grace=_non_negative(*given("detach_grace")),
        report=as_flag(*given("report")),
        env_keep_days=_non_negative(*given("env_keep_days")),
        local=LocalSettings(
            enabled=as_flag(local.get("enabled", DEFAULTS["local.enabled"]), f"{origin}.local.enabled"),
            max_parallel_jobs=(
                options.cpu_count()
                if slots is None
                else _count(slots, f"{origin}.local.max_parallel_jobs", minimum=1)
            ),
            **gpu_settings(local, f"{origin}.local"),
        ),
        remotes=tuple(remote for remote in remotes if remote.enabled),
        sync=_sync(_mapping(values.get("sync"), f"{origin}.sync"), f"{origin}.sync"),
        ignored=tuple(ignored),
    )
    return _only_chosen_sources(settings, values.get("sources"), f"{origin}.sources")


def _only_chosen_sources(settings: SweepSettings, chosen: Any, key: str) -> SweepSettings:
    if chosen is None:
        return settings
    chosen = _texts(chosen, key, example="[local, gpu-box]")
    known = [LOCAL, *(remote.name for remote in settings.remotes)]
    for name in chosen:
        if name not in known:
            raise ConfigError(key, f"no enabled source is named {name!r}{_did_you_mean(name, known)}",
                              f"use some of {', '.join(known)}")
    return SweepSettings(
        **{f.name: getattr(settings, f.name) for f in fields(SweepSettings) if f.name not in ("local", "remotes")},
        local=dataclasses.replace(settings.local, enabled=LOCAL in chosen and settings.local.enabled),
        remotes=tuple(remote for remote in settings.remotes if remote.name in chosen),
    )


def _environment(value: Any, key: str) -> str:
    fix = (f"set found, mirror, or the path of a file of the project ({', '.join(env_requirements.FILE_KINDS)})")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be found, mirror or a file of the project, got {value!r}", fix)
    if value not in ("found", env_requirements.MIRROR) and not env_requirements.is_environment_file(value):
        raise ConfigError(key, f"{value!r} is not found, mirror or an environment file", fix)
    return value


def _wheels(value: Any, key: str) -> str:
    if value not in WHEELS:
        raise ConfigError(key, f"unknown value {value!r}", f"use one of {', '.join(WHEELS)}")
    return str(value)


def _remote(name: str, entry: Mapping[str, Any], key: str, environment: str = DEFAULTS["environment"],
            wheels: str = DEFAULTS["wheels"]) -> RemoteSettings:
    entry = {item: value for item, value in entry.items() if value is not None}
    if not NAME_PATTERN.match(str(name)) or name == LOCAL:
        raise ConfigError(key, f"{name!r} is not a usable source name",
                          "use letters, digits, '.', '_' or '-', not starting with a symbol, and not 'local'")
    _known_keys(entry, REMOTE_KEYS, key)
    kind = entry.get("kind", REMOTE_DEFAULTS["kind"])
    if kind not in ("ssh", "slurm"):
        raise ConfigError(f"{key}.kind", f"unknown kind {kind!r}", "use ssh or slurm")
    slurm = _slurm_settings(entry, key) if kind == "slurm" else ()
    for slurm_key in (*options.SLURM_KEYS, "mode", *options.ALLOCATION_KEYS):
        if kind != "slurm" and entry.get(slurm_key):
            raise ConfigError(f"{key}.{slurm_key}", "is a Slurm key", "set kind: slurm, or remove it")
    max_parallel_jobs = _count(entry.get("max_parallel_jobs", REMOTE_DEFAULTS["max_parallel_jobs"]),
                               f"{key}.max_parallel_jobs", minimum=1)
    pool = _pool_settings(entry, key, dict(slurm), max_parallel_jobs)
    host = entry.get("host")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{key}.host", "missing", "set host to the machine's name, address or ~/.ssh/config alias")
    ssh_key = entry.get("ssh_key")
    if ssh_key is not None and not os.path.isfile(os.path.expanduser(str(ssh_key))):
        raise ConfigError(f"{key}.ssh_key", f"no such file: {ssh_key}",
                          "point it at your private key (e.g. ~/.ssh/id_ed25519), or remove it to use ssh's defaults")
    port = entry.get("ssh_port")
    if port is not None and (_count(port, f"{key}.ssh_port", minimum=1) > 65535):
        raise ConfigError(f"{key}.ssh_port", f"{port} is not a TCP port", "use a number from 1 to 65535")
    setup = entry.get("setup") or ()
    setup = (setup,) if isinstance(setup, str) else _texts(setup, f"{key}.setup", example='["conda activate ml"]')
    env = _mapping(entry.get("env"), f"{key}.env")
    for env_name, value in env.items():
        if not isinstance(env_name, str) or not ENV_NAME.match(env_name):
            raise ConfigError(f"{key}.env.{env_name}", "is not a usable environment variable name",
                              "use letters, digits and '_', not starting with a digit")
        if isinstance(value, (Mapping, list, tuple)):
            raise ConfigError(f"{key}.env.{env_name}", f"must be one value, got a {type(value).__name__}",
                              "write it as text (quote it, e.g. '[1, 2]', to pass brackets literally)")
    return RemoteSettings(
        name=name,
        host=host,
        kind=kind,
        user=_optional_text(entry.get("user"), f"{key}.user"),
        ssh_port=port,
        ssh_key=ssh_key,
        known_hosts=_optional_text(entry.get("known_hosts"), f"{key}.known_hosts"),
        max_parallel_jobs=max_parallel_jobs,
        enabled=as_flag(entry.get("enabled", REMOTE_DEFAULTS["enabled"]), f"{key}.enabled"),
        python=_optional_text(entry.get("python"), f"{key}.python"),
        project_dir=str(entry.get("project_dir") or REMOTE_DEFAULTS["project_dir"]),
        setup=tuple(setup),
        environment=_local_cluster_environment(_environment(entry["environment"], f"{key}.environment"), kind, host,
                                               key) if "environment" in entry
        else "found" if kind == "slurm" and host == "localhost" else environment,
        wheels=_wheels(entry["wheels"], f"{key}.wheels") if "wheels" in entry else wheels,
        env=tuple((name, env_text(value)) for name, value in env.items()),
        **(slurm_gpu_settings(entry, key) if kind == "slurm" else gpu_settings(entry, key)),
        weight=None if entry.get("weight") is None else _positive_number(entry["weight"], f"{key}.weight"),
        slurm=slurm,
        **pool,
    )


def _pool_settings(entry: Mapping[str, Any], key: str, slurm: dict[str, Any], max_parallel_jobs: int,
                   ) -> dict[str, Any]:
    """`mode` and, for mode allocation, how the pool of allocations is sized and kept."""
    mode = entry.get("mode", REMOTE_DEFAULTS["mode"])
    if mode not in options.MODES:
        raise ConfigError(f"{key}.mode", f"unknown mode {mode!r}", f"use one of {', '.join(options.MODES)}")
    if mode != "allocation":
        for name in options.ALLOCATION_KEYS:
            if entry.get(name) is not None:
                raise ConfigError(f"{key}.{name}", "is for mode: allocation", "set mode: allocation, or remove it")
        return {"mode": mode}
    per_allocation = _count(entry.get("jobs_per_allocation", REMOTE_DEFAULTS["jobs_per_allocation"]),
                            f"{key}.jobs_per_allocation", minimum=1)
    allocations = entry.get("max_allocations")
    for name in ("time", "allocation_time"):
        value = slurm.get("time") if name == "time" else entry.get(name)
        if value is not None and _slurm_duration(value) is None:
            raise ConfigError(f"{key}.{name}", f"{value!r} is not a Slurm time limit",
                              "write minutes (30), hours:minutes:seconds (2:00:00) or days-hours (1-0)")
    job_limit, allocation_limit = _slurm_duration(slurm.get("time")), _slurm_duration(entry.get("allocation_time"))
    if job_limit is not None and allocation_limit is not None and allocation_limit < job_limit + FIT_MARGIN_SECONDS:
        raise ConfigError(f"{key}.allocation_time", f"{entry['allocation_time']} leaves no room for a job of time:"
                          f" {slurm['time']}", "make allocation_time longer than time (each job's limit)")
    if slurm.get("mem") is not None and not re.fullmatch(r"\d+[KMGTkmgt]?B?", str(slurm["mem"])):
        raise ConfigError(f"{key}.mem", f"{slurm['mem']!r} is not an amount of memory",
                          "write e.g. 8G (an allocation asks for jobs_per_allocation times it)")
    return {
        "mode": mode,
        "jobs_per_allocation": per_allocation,
        "max_allocations": -(-max_parallel_jobs // per_allocation) if allocations is None
        else _count(allocations, f"{key}.max_allocations", minimum=1),
        "idle_timeout_s": _non_negative(entry.get("idle_timeout_s", REMOTE_DEFAULTS["idle_timeout_s"]),
                                        f"{key}.idle_timeout_s"),
        "allocation_time": None if entry.get("allocation_time") is None else str(entry["allocation_time"]),
    }


def _slurm_duration(value: Any) -> float | None:
    """Seconds in a Slurm time limit; None when it is not one (or says no limit)."""
    if value is None:
        return None
    try:
        return slurm_duration(str(value))
    except ValueError:
        return None


def _local_cluster_environment(environment: str, kind: str, host: str, key: str) -> str:
    """A cluster whose login node is this machine runs with this machine's Python (one that
    inherits the top-level environment simply does)."""
    if environment != "found" and kind == "slurm" and host == "localhost":
        raise ConfigError(f"{key}.environment", f"{environment} is not built for a cluster whose login node is this"
                          " machine (host: localhost): its jobs use this machine's Python",
                          "set environment: found for it")
    return environment


def _slurm_settings(entry: Mapping[str, Any], key: str) -> tuple[tuple[str, Any], ...]:
    """The Slurm keys of a `kind: slurm` entry, each one `sbatch` word (they become `#SBATCH` lines)."""
    found: list[tuple[str, Any]] = []
    for name, flag in SBATCH_FLAGS.items():
        if name == "cpus_per_task" and name in entry:
            found.append((name, _count(entry[name], f"{key}.{name}", minimum=1)))
        elif name in entry:
            value = str(entry[name])
            if not value or any(character.isspace() for character in value):
                raise ConfigError(f"{key}.{name}", f"{value!r} is not one word", f"write it as sbatch takes {flag}")
            found.append((name, value))
    arguments = _texts(entry.get("sbatch_args") or [], f"{key}.sbatch_args", example="[--constraint=a100]")
    for argument in arguments:
        if not argument.startswith("-") or "\n" in argument:
            raise ConfigError(f"{key}.sbatch_args", f"{argument!r} is not an sbatch option",
                              "write one option per item, e.g. --constraint=a100")
    if arguments:
        found.append(("sbatch_args", tuple(arguments)))
    return tuple(found)


def gpu_settings(entry: Mapping[str, Any], key: str) -> dict[str, Any]:
    """gpus (a count, a list of device ids, or auto), gpus_per_job, min_free_memory_mb, stagger_s."""
    gpus = entry.get("gpus")
    if gpus is None or gpus == "auto":
        devices: GpuSetting = gpus
    elif isinstance(gpus, int) and not isinstance(gpus, bool):
        devices = tuple(range(_count(gpus, f"{key}.gpus", minimum=0)))
    elif isinstance(gpus, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in gpus) and len(set(gpus)) == len(gpus):
        devices = tuple(gpus)
    else:
        raise ConfigError(f"{key}.gpus", f"must be a count, a list of distinct device ids, or auto; got {gpus!r}",
                          "write e.g. 2, [0, 2, 3] or auto")
    per_job = entry.get("gpus_per_job")
    per_job = (1 if devices else 0) if per_job is None else _count(per_job, f"{key}.gpus_per_job", minimum=0)
    if per_job and not devices:
        raise ConfigError(f"{key}.gpus_per_job", f"is {per_job} but no GPUs are set", "set gpus too (e.g. gpus: auto)")
    if isinstance(devices, tuple) and per_job > len(devices):
        raise ConfigError(f"{key}.gpus_per_job", f"is {per_job}, more than the {len(devices)} GPUs set",
                          f"use at most {len(devices)}, or list more gpus")
    memory = entry.get("min_free_memory_mb", REMOTE_DEFAULTS["min_free_memory_mb"])
    if memory and devices != "auto":
        raise ConfigError(f"{key}.min_free_memory_mb", "needs gpus: auto (free memory is read from nvidia-smi)",
                          "set gpus: auto, or remove min_free_memory_mb")
    return {
        "gpus": devices,
        "gpus_per_job": per_job,
        "min_free_memory_mb": _non_negative(memory, f"{key}.min_free_memory_mb"),
        "stagger_s": _non_negative(entry.get("stagger_s", REMOTE_DEFAULTS["stagger_s"]), f"{key}.stagger_s"),
    }


def slurm_gpu_settings(entry: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Slurm hands out the GPUs: `gpus_per_job` asks each job's for them (`--gpus`), and the
    login node's own GPUs, if any, are none of the jobs' (never read)."""
    for name in ("gpus", "min_free_memory_mb"):
        if entry.get(name):
            raise ConfigError(f"{key}.{name}", "is not for a Slurm source (Slurm hands out the GPUs)",
                              "remove it; gpus_per_job (or gres) asks Slurm for each job's GPUs")
    return {
        "gpus": None,
        "gpus_per_job": _count(entry.get("gpus_per_job", 0), f"{key}.gpus_per_job", minimum=0),
        "min_free_memory_mb": 0.0,
        "stagger_s": _non_negative(entry.get("stagger_s", REMOTE_DEFAULTS["stagger_s"]), f"{key}.stagger_s"),
    }


def _non_negative(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(key, f"must be a number >= 0, got {value!r}", "set 0 or a positive number")
    return float(value)


def _sync(entry: Mapping[str, Any], key: str) -> SyncSettings:
    for unknown in sorted(set(entry) - {"include", "exclude"}):
        raise ConfigError(f"{key}.{unknown}", "unknown key", "use include and exclude (lists of glob patterns)")
    return SyncSettings(
        include=_texts(entry.get("include") or [], f"{key}.include", example='[".env.example", "data/*.csv"]'),
        exclude=_texts(entry.get("exclude") or [], f"{key}.exclude", example='["data", "*.ckpt"]'),
    )


def env_text(value: Any) -> str:
    """An env value as the process will see it (YAML's booleans as true/false, not True/False)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_flag(value: Any, key: str) -> bool:
    """YAML's ways of saying yes and no (true/yes/on/1, false/no/off/0), any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(key, f"must be true or false, got {value!r}", "set true or false (yes/no and on/off work too)")


def _texts(value: Any, key: str, example: str) -> tuple[str, ...]:
    """A list of strings; one string alone is refused (it is almost always a missing [ ])."""
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    if isinstance(value, str):
        raise ConfigError(key, f"must be a list, got the text {value!r}", f"write it as a list, e.g. {example}")
    raise ConfigError(key, f"must be a list of texts, got {value!r}", f"write it as a list, e.g. {example}")


def _known_keys(entry: Mapping[str, Any], known: tuple[str, ...], key: str) -> None:
    for unknown in sorted(set(entry) - set(known)):
        raise ConfigError(f"{key}.{unknown}", f"unknown key{_did_you_mean(unknown, known)}",
                          f"remove it; known keys: {', '.join(known)}")


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}", "write it as key: value lines")
    return value


def _count(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"must be a whole number >= {minimum}, got {value!r}", f"set it to {minimum} or more")
    return value


def _positive_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(key, f"must be a number > 0, got {value!r}", "set a positive number")
    return float(value)



def _optional_text(value: Any, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(key, f"must be text, got {value!r}", "quote it")
    return value


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
