"""The launcher's config node, registered as `hydra/launcher=hsm_distributed`.

Kept import-light: Hydra imports this module during plugin discovery of every app.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


# Every null below means: the value in hsm_config.yaml, else the default in the comment.
# (Keys given here win over the file.)


@dataclass
class LocalSourceConf:
    enabled: Optional[bool] = None  # true
    max_parallel_jobs: Optional[int] = None  # the number of CPUs of this machine


@dataclass
class SyncConf:
    # glob patterns of project files to send to remote machines; empty: every file not excluded
    include: Optional[List[str]] = None
    # patterns added to the defaults (.git, venvs, caches, outputs, multirun, ...)
    exclude: Optional[List[str]] = None


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
    strategy: Optional[str] = None  # round_robin
    # re-dispatches of a job lost to the infrastructure (machine, connection, killed worker)
    max_retries: Optional[int] = None  # 3
    # re-runs of a job whose task raised
    retry_failed_jobs: Optional[int] = None  # 0
    # seconds between pulls of a long remote job's outputs
    collect_interval: Optional[float] = None  # 300
    # seconds between health checks of each source
    health_check_interval: Optional[float] = None  # 60
    # SSH keepalive: a silent host is declared lost after interval * (count_max + 1) seconds
    keepalive_interval: Optional[float] = None  # 15
    keepalive_count_max: Optional[int] = None  # 3
    # skip jobs this sweep dir's journal records as completed
    resume: Optional[bool] = None  # false
    # seconds between progress summaries in the log
    progress_interval: Optional[float] = None  # 30
    local: LocalSourceConf = field(default_factory=LocalSourceConf)
    # NAME: {kind, host, user, ssh_port, ssh_key, ...}: see the README
    remotes: Dict[str, Any] = field(default_factory=dict)
    # which files of the local project travel to remote machines
    sync: SyncConf = field(default_factory=SyncConf)


ConfigStore.instance().store(
    group="hydra/launcher",
    name="hsm_distributed",
    node=HsmDistributedLauncherConf,
    provider="hsm_distributed_launcher",
)
