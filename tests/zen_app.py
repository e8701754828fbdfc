"""A hydra-zen app, written the way hydra-zen's docs write one: the config is made by
`builds` from a function of this script (so its target is `__main__.model`), and the sweep
is started from Python with `hydra_zen.launch(..., multirun=True)`.

`python zen_app.py SWEEP_DIR [OVERRIDE ...]` prints the sweep's return values as JSON."""

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from hydra_zen import builds, instantiate, launch, make_config


@dataclass
class Made:
    """Returned by the jobs: it comes back as this very class, though the jobs load it as `__mp_main__.Made`."""

    width: int
    depth: int
    module: str


def model(width: int, depth: int = 2) -> Made:
    return Made(width, depth, __name__)


Config = make_config(model=builds(model, width=1, populate_full_signature=True), seed=0)


def task(cfg: Any) -> tuple[Made, int]:
    return instantiate(cfg.model), cfg.seed


if __name__ == "__main__":
    sweep_dir, *overrides = sys.argv[1:]
    (jobs,) = launch(Config, task, multirun=True, version_base="1.3",
                     overrides=["hydra/launcher=hsm_distributed", f"hydra.sweep.dir={sweep_dir}", *overrides])
    print(json.dumps([{**asdict(made), "seed": seed, "same_class": type(made) is Made}
                      for made, seed in (job.return_value for job in jobs)]))
