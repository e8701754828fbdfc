"""A sweep of jobs that do nothing, to measure what the launcher itself holds per job.

At the end of the sweep, PeakRss writes the launcher process's peak RSS (VmHWM, in KiB)
to the file named by `rss_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PeakRss(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        status = Path("/proc/self/status").read_text()
        peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
        Path(str(config.rss_file)).write_text(peak)


@hydra.main(version_base="1.3", config_path="noop_conf", config_name="config")
def main(cfg: DictConfig) -> int:
    return int(cfg.x)


if __name__ == "__main__":
    main()
