"""The example app, run as a user runs it: `python example_app/train.py -m ...`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import hosts

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


def test_a_launcher_config_composed_from_hsm_distributed(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    """conf/hydra/launcher/lab.yaml extends hsm_distributed with the lab's own machine."""
    app = tmp_path / "app"
    shutil.copytree(TRAIN.parent, app)
    host = ssh_hosts[0]
    lab = {"defaults": ["hsm_distributed"], "strategy": "least_loaded", "local": {"enabled": False},
           "remotes": {"workstation": host.source_config()}}
    (app / "conf" / "hydra" / "launcher" / "lab.yaml").write_text(yaml.safe_dump(lab))
    shown = subprocess.run(
        [sys.executable, str(app / "train.py"), "-m", "hydra/launcher=lab", "lr=0.1,0.01", "epochs=2",
         "hydra.sweep.dir=sweep"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    assert "launching 2 jobs on workstation (2 slots) (least_loaded)" in shown.stdout
    assert all((tmp_path / "sweep" / str(num) / "metrics.json").exists() for num in range(2))


def test_the_shipped_lab_config_runs_on_a_fresh_machine(tmp_path: Path) -> None:
    """example_app's own lab.yaml: its remote is switched off, so it runs locally."""
    shown = subprocess.run([sys.executable, str(TRAIN), "-m", "hydra/launcher=lab", "lr=0.1,0.01", "epochs=1",
                            "hydra.sweep.dir=sweep"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "launching 2 jobs on local (2 slots) (least_loaded)" in shown.stdout
