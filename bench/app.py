"""The benchmark's app: each job sleeps `sleep` seconds and returns x.

Each job appends "START END" (its wall-clock times) to `times_file`, one short line with
O_APPEND, so the time to the first job and the makespan are known. At the end of the
sweep (in the launcher's process, whichever launcher), a callback writes that process's
peak RSS (VmHWM, KiB) to `rss_file`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PeakRss(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.rss_file:
            status = Path("/proc/self/status").read_text()
            peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
            Path(str(config.rss_file)).write_text(peak)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> int:
    started = time.time()
    if cfg.sleep:
        time.sleep(float(cfg.sleep))
    if cfg.times_file:
        fd = os.open(str(cfg.times_file), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{started} {time.time()}\n".encode())
        os.close(fd)
    return int(cfg.x)


if __name__ == "__main__":
    main()
