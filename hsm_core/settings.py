"""Sweep settings: read from the launcher's config node, validated with messages a user can act on."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from hsm_core.strategies import STRATEGIES

LOCAL = "local"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SLURM_KEYS = ("partition", "time", "cpus_per_task", "mem", "gres", "sbatch_args")


class ConfigError(Exception):
    """Bad configuration. The message names the key, the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}: {problem}. Fix: {fix}")
        self.key = key


@dataclass(frozen=True)
class LocalSettings:
    enabled: bool = True
    max_parallel_jobs: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass(frozen=True)
class RemoteSettings:
    """One `remotes.NAME` entry. None means: let ~/.ssh/config (or OpenSSH's default) decide."""

    name: str
    host: str
    kind: str = "ssh"
    user: str | None = None
    ssh_port: int | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None  # None: ~/.ssh/config's UserKnownHostsFile, else ~/.ssh/known_hosts
    max_parallel_jobs: int = 1
    enabled: bool = True
    python: str = "python3"
    project_dir: str = "~/.hsm/projects"  # remote root; each project gets its own folder in it
    setup: tuple[str, ...] = ()  # shell lines run before the worker starts (conda activate, ...)
    env: tuple[tuple[str, str], ...] = ()
    gpus: int | None = None
    gpus_per_job: int | None = None
    weight: float | None = None  # relative capability, for the capability_based strategy
    slurm: tuple[tuple[str, Any], ...] = ()  # partition, time, ...: for kind slurm

    @property
    def capability(self) -> float:
        """The declared weight, else the GPU count, else 1."""
        if self.weight is not None:
            return self.weight
        return float(self.gpus) if self.gpus else 1.0


@dataclass(frozen=True)
class SyncSettings:
    """Which files of the local project travel to remote machines."""

    include: tuple[str, ...] = ()  # empty: every file not excluded
    exclude: tuple[str, ...] = ()  # added to sync.DEFAULT_EXCLUDES


@dataclass(frozen=True)
class SweepSettings:
    strategy: str = "round_robin"
    max_retries: int = 3
    retry_failed_jobs: int = 0
    collect_interval: float = 300.0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    resume: bool = False
    progress_interval: float = 30.0
    local: LocalSettings = field(default_factory=LocalSettings)
    remotes: tuple[RemoteSettings, ...] = ()
    sync: SyncSettings = field(default_factory=SyncSettings)


REMOTE_KEYS = tuple(f.name for f in fields(RemoteSettings) if f.name not in ("name", "slurm")) + SLURM_KEYS
TOP_KEYS = (
    "enabled", "config_file", "sources", "strategy", "max_retries", "retry_failed_jobs", "collect_interval",
    "health_check_interval", "keepalive_interval", "keepalive_count_max", "resume", "progress_interval", "local",
    "remotes", "sync",
)
LOCAL_KEYS = ("enabled", "max_parallel_jobs")


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


def load_settings(options: Mapping[str, Any], origin: str = "hydra.launcher") -> SweepSettings:
    """Validate settings (plain containers; null means the default) into SweepSettings."""
    options = {key: value for key, value in options.items() if value is not None}
    _known_keys(options, TOP_KEYS, origin)
    strategy = options.get("strategy", "round_robin")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{origin}.strategy", f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    local = _mapping(options.get("local"), f"{origin}.local")
    _known_keys(local, LOCAL_KEYS, f"{origin}.local")
    slots = local.get("max_parallel_jobs")
    remotes = tuple(
        _remote(name, _mapping(entry, f"{origin}.remotes.{name}"), f"{origin}.remotes.{name}")
        for name, entry in _mapping(options.get("remotes"), f"{origin}.remotes").items()
    )
    settings = SweepSettings(
        strategy=strategy,
        max_retries=_count(options.get("max_retries", 3), f"{origin}.max_retries", minimum=0),
        retry_failed_jobs=_count(options.get("retry_failed_jobs", 0), f"{origin}.retry_failed_jobs", minimum=0),
        collect_interval=_positive_number(options.get("collect_interval", 300), f"{origin}.collect_interval"),
        keepalive_interval=_positive_number(options.get("keepalive_interval", 15), f"{origin}.keepalive_interval"),
        keepalive_count_max=_count(options.get("keepalive_count_max", 3), f"{origin}.keepalive_count_max", minimum=1),
        resume=_flag(options.get("resume", False), f"{origin}.resume"),
        progress_interval=_positive_number(options.get("progress_interval", 30), f"{origin}.progress_interval"),
        local=LocalSettings(
            enabled=local.get("enabled") is not False,
            max_parallel_jobs=(
                LocalSettings().max_parallel_jobs
                if slots is None
                else _count(slots, f"{origin}.local.max_parallel_jobs", minimum=1)
            ),
        ),
        remotes=tuple(remote for remote in remotes if remote.enabled),
        sync=_sync(_mapping(options.get("sync"), f"{origin}.sync"), f"{origin}.sync"),
    )
    return _only_chosen_sources(settings, options.get("sources"), f"{origin}.sources")


def _only_chosen_sources(settings: SweepSettings, chosen: Any, key: str) -> SweepSettings:
    if chosen is None:
        return settings
    known = [LOCAL, *(remote.name for remote in settings.remotes)]
    for name in chosen:
        if name not in known:
            raise ConfigError(key, f"no enabled source is named {name!r}{_did_you_mean(name, known)}",
                              f"use some of {', '.join(known)}")
    return SweepSettings(
        **{f.name: getattr(settings, f.name) for f in fields(SweepSettings) if f.name not in ("local", "remotes")},
        local=LocalSettings(LOCAL in chosen and settings.local.enabled, settings.local.max_parallel_jobs),
        remotes=tuple(remote for remote in settings.remotes if remote.name in chosen),
    )


def _remote(name: str, entry: Mapping[str, Any], key: str) -> RemoteSettings:
    entry = {item: value for item, value in entry.items() if value is not None}
    if not NAME_PATTERN.match(str(name)) or name == LOCAL:
        raise ConfigError(key, f"{name!r} is not a usable source name",
                          "use letters, digits, '.', '_' or '-', not starting with a symbol, and not 'local'")
    _known_keys(entry, REMOTE_KEYS, key)
    kind = entry.get("kind", "ssh")
    if kind not in ("ssh", "slurm"):
        raise ConfigError(f"{key}.kind", f"unknown kind {kind!r}", "use ssh or slurm")
    if kind == "slurm":
        raise ConfigError(f"{key}.kind", "Slurm sources are not supported by this version yet", "use kind: ssh")
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
    env = _mapping(entry.get("env"), f"{key}.env")
    return RemoteSettings(
        name=name,
        host=host,
        kind=kind,
        user=_optional_text(entry.get("user"), f"{key}.user"),
        ssh_port=port,
        ssh_key=ssh_key,
        known_hosts=_optional_text(entry.get("known_hosts"), f"{key}.known_hosts"),
        max_parallel_jobs=_count(entry.get("max_parallel_jobs", 1), f"{key}.max_parallel_jobs", minimum=1),
        enabled=bool(entry.get("enabled", True)),
        python=str(entry.get("python") or "python3"),
        project_dir=str(entry.get("project_dir") or "~/.hsm/projects"),
        setup=(setup,) if isinstance(setup, str) else tuple(str(line) for line in setup),
        env=tuple((str(name), str(value)) for name, value in env.items()),
        gpus=None if entry.get("gpus") is None else _count(entry["gpus"], f"{key}.gpus", minimum=0),
        gpus_per_job=None if entry.get("gpus_per_job") is None else _count(entry["gpus_per_job"], f"{key}.gpus_per_job", minimum=0),
        weight=None if entry.get("weight") is None else _positive_number(entry["weight"], f"{key}.weight"),
        slurm=tuple((name, entry[name]) for name in SLURM_KEYS if name in entry),
    )


def _sync(entry: Mapping[str, Any], key: str) -> SyncSettings:
    for unknown in sorted(set(entry) - {"include", "exclude"}):
        raise ConfigError(f"{key}.{unknown}", "unknown key", "use include and exclude (lists of glob patterns)")
    return SyncSettings(
        include=tuple(str(p) for p in entry.get("include") or ()),
        exclude=tuple(str(p) for p in entry.get("exclude") or ()),
    )


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}", "set true or false")
    return value


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
