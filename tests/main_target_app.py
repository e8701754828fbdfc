"""A single-file app whose config targets a function of the script itself (`__main__.model`),
as hydra-zen's `builds(model)` writes it: `python main_target_app.py -m ...`, or `python -m main_target_app`."""

import json
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig


class Made(dict[str, Any]):
    """What `model` makes, returned by the job: a class of this script (`__mp_main__.Made` in the
    job) that must unpickle in the launcher, else the job fails and Hydra's sweeper raises."""


def model(width: int) -> Made:
    return Made(width=width, module=__name__)


ConfigStore.instance().store(name="main_target", node={"model": {"_target_": "__main__.model", "width": 1}})


@hydra.main(version_base="1.3", config_path=None, config_name="main_target")
def main(cfg: DictConfig) -> Made:
    made: Made = instantiate(cfg.model)
    (Path(HydraConfig.get().runtime.output_dir) / "made.json").write_text(json.dumps(made))
    return made


if __name__ == "__main__":
    main()
