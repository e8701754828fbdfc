"""The launcher's config node, registered as `hydra/launcher=hsm_distributed`.

Kept import-light: Hydra imports this module during plugin discovery of every app.

Every key that hsm_config.yaml can also set defaults to `${hsm:KEY,CONFIG_FILE}`: the
file's value, else the built-in default. So `--cfg hydra -p hydra.launcher --resolve`
shows the values a sweep will use, and a key given on the command line still wins.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def _setting(key: str, config_file: Optional[str] = None) -> Any:
    from hsm_core.config_file import effective_value  # only when a value is read

    return effective_value(key, config_file)


if not OmegaConf.has_resolver("hsm"):
    OmegaConf.register_new_resolver("hsm", _setting)


def _from_file(key: str, depth: int = 1) -> str:
    return "${hsm:%s,${%sconfig_file}}" % (key, "." * depth)


@dataclass
class LocalSourceConf:
    enabled: Optional[bool] = _from_file("local.enabled", 2)  # true
    max_parallel_jobs: Optional[int] = _from_file("local.max_parallel_jobs", 2)  # the CPU count
    # this machine's GPUs for the jobs: a count, a list of device ids, or auto (nvidia-smi)
    gpus: Any = _from_file("local.gpus", 2)  # none
    gpus_per_job: Optional[int] = _from_file("local.gpus_per_job", 2)  # 1 when gpus is set
    # with gpus: auto, GPUs with less free memory (another user's job) wait until they free up
    min_free_memory_mb: Optional[float] = _from_file("local.min_free_memory_mb", 2)  # 0
    # at least this many seconds between two job starts here
    stagger_s: Optional[float] = _from_file("local.stagger_s", 2)  # 0


@dataclass
class SyncConf:
    # glob patterns of project files to send even when excluded by default (secrets, caches)
    include: Optional[List[str]] = _from_file("sync.include", 2)  # []
    # patterns never sent, added to the defaults (.git, venvs, caches, outputs, secrets, ...)
    exclude: Optional[List[str]] = _from_file("sync.exclude", 2)  # []


@dataclass
class HsmDistributedLauncherConf:
    _target_: str = (
        "hydra_plugins.hsm_distributed_launcher.hsm_distributed_launcher.HsmDistributedLauncher"
    )
    # path of hsm_config.yaml; null: ./hsm_config.yaml, then ./sweeps/hsm_config.yaml, else none
    config_file: Optional[str] = None
    # names of the sources this sweep may use; null: every enabled source
    sources: Optional[List[str]] = None
    # round_robin, least_loaded or capability_based
    strategy: Optional[str] = _from_file("strategy")  # round_robin
    # re-dispatches of a job lost to the infrastructure (machine, connection, killed worker)
    max_retries: Optional[int] = _from_file("max_retries")  # 3
    # re-runs of a job whose task raised
    retry_failed_jobs: Optional[int] = _from_file("retry_failed_jobs")  # 0
    # seconds between pulls of a long remote job's outputs
    collect_interval: Optional[float] = _from_file("collect_interval")  # 300
    # not used by this version (keepalive detects lost machines); a value other than 60 is warned about
    health_check_interval: Optional[float] = _from_file("health_check_interval")  # 60
    # SSH keepalive: a silent host is declared lost after interval * (count_max + 1) seconds
    keepalive_interval: Optional[float] = _from_file("keepalive_interval")  # 15
    keepalive_count_max: Optional[int] = _from_file("keepalive_count_max")  # 3
    # skip jobs this sweep dir's journal records as completed
    resume: Optional[bool] = _from_file("resume")  # false
    # seconds between progress summaries in the log
    progress_interval: Optional[float] = _from_file("progress_interval")  # 30
    local: LocalSourceConf = field(default_factory=LocalSourceConf)
    # NAME: {kind, host, user, ssh_port, ssh_key, ...}: see the README (merged with hsm_config.yaml's)
    remotes: Dict[str, Any] = field(default_factory=dict)
    # which files of the local project travel to remote machines
    sync: SyncConf = field(default_factory=SyncConf)


ConfigStore.instance().store(
    group="hydra/launcher",
    name="hsm_distributed",
    node=HsmDistributedLauncherConf,
    provider="hsm_distributed_launcher",
)
