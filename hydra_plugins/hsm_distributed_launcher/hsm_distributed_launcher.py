"""The Launcher Hydra instantiates: it keeps what setup() gives and delegates launch()."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.hsm_distributed_launcher.config import NODE_PATH


class HsmDistributedLauncher(Launcher):
    def __init__(self, **options: Any) -> None:
        self.options = options
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.engine: Any = None  # hsm_core.engine.Engine, built by the first launch
        self.settings: Any = None  # hsm_core.settings.SweepSettings, read by the first launch
        self.sweep: Any = None  # hsm_core.launch.SweepSoFar: what the sweep's batches share

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context
        from hsm_core.launch import set_up  # heavy imports only once this launcher is chosen

        set_up(hydra_context)

    @staticmethod
    def node_defaults() -> Dict[str, Any]:
        """The defaults of the node the options were composed over (hsm_config.yaml's values
        when Hydra discovered this plugin): a launch tells what the user chose from them."""
        container = OmegaConf.to_container(ConfigStore.instance().load(f"{NODE_PATH}.yaml").node)
        assert isinstance(container, dict)
        return {str(key): value for key, value in container.items()}

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from hsm_core.launch import launch  # heavy imports only once a sweep actually runs

        return launch(self, job_overrides, initial_job_idx)
