"""A Hydra app for tests that run sweeps as a user would: `python sweep_app.py -m task=NAME ...`."""

import hydra
from omegaconf import DictConfig

import tasks


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> object:
    return getattr(tasks, cfg.task)(cfg)


if __name__ == "__main__":
    main()
