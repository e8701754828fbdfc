"""The example app, run as a user runs it: `python example_app/train.py -m ...`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).parent.parent / "example_app" / "train.py"


def test_plugin_is_discovered_by_hydra(tmp_path: Path) -> None:
    shown = subprocess.run([sys.executable, str(TRAIN), "--info", "plugins"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    assert "HsmDistributedLauncher" in shown.stdout


def test_example_sweep_runs_every_job_with_its_own_output_dir(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(TRAIN), "-m", "hydra/launcher=hsm_distributed", "lr=0.1,0.01,0.001",
         "epochs=3", "hydra.sweep.dir=sweep"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    )
    for num, lr in enumerate([0.1, 0.01, 0.001]):
        job_dir = tmp_path / "sweep" / str(num)
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert metrics["lr"] == lr and metrics["val_loss"] > 0
        assert "final val loss" in (job_dir / "train.log").read_text()
        assert f"lr={lr}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
