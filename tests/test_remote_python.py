"""Finding the remote Python when a source names none: one round trip over every candidate."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

import hosts
import tasks
from conftest import Launch, remote_override
from hosts import SshHost
from hsm_core import remote_python

SWEEP_APP = Path(__file__).parent / "sweep_app.py"


def test_the_candidates_come_in_the_documented_order() -> None:
    assert remote_python.candidates("/opt/conda/envs/ml/bin/python", ["ml"]) == [
        "/opt/conda/envs/ml/bin/python", "~/miniconda3/envs/ml/bin/python", "~/anaconda3/envs/ml/bin/python",
        "~/mambaforge/envs/ml/bin/python", "~/.conda/envs/ml/bin/python", "~/.venvs/ml/bin/python",
        "~/venvs/ml/bin/python", "~/.virtualenvs/ml/bin/python", "PATH:python", "PATH:python3"]
    assert remote_python.env_names("/home/me/projects/demo/.venv") == ["demo"]  # a project's .venv: its folder
    assert remote_python.env_names("/home/me/miniconda3/envs/ml") == ["ml"]


@pytest.fixture
def conda_like_env(ssh_hosts: list[SshHost]) -> Iterator[tuple[SshHost, Path]]:
    """host2 with the right interpreter in ~/miniconda3/envs/NAME (NAME: this environment's name)
    while its python3 on PATH lacks Hydra."""
    host = ssh_hosts[1]
    [name] = remote_python.env_names()
    envs = host.home / "miniconda3" / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    (envs / name).unlink(missing_ok=True)
    (envs / name).symlink_to(hosts.host_python_env().parent.parent)
    shutil.chown(host.home / "miniconda3", host.user)
    shutil.chown(envs, host.user)
    yield host, host.home / "miniconda3" / "envs" / name / "bin" / "python"
    shutil.rmtree(host.home / "miniconda3")


def test_a_python_in_a_conda_like_env_is_found_and_used(launch_jobs: Launch, conda_like_env: tuple[SshHost, Path],
                                                       tmp_path: Path) -> None:
    host, expected = conda_like_env
    config = host.source_config()
    del config["python"]
    [returns] = launch_jobs(tasks.who_runs, [[["x=1"], ["x=2"]]],
                            ["hydra.launcher.local.enabled=false", remote_override(host.name, config)])
    assert [r.return_value for r in returns] == [[1, host.user], [2, host.user]]
    recorded = yaml.safe_load((tmp_path / "sweep" / ".hsm" / "sources.yaml").read_text())
    assert recorded["sources"][host.name]["python"] == str(expected)


def test_test_shows_each_candidate_and_why(conda_like_env: tuple[SshHost, Path], tmp_path: Path) -> None:
    host, expected = conda_like_env
    config = host.source_config()
    del config["python"]
    (tmp_path / "hsm_config.yaml").write_text(yaml.safe_dump({"distributed": {"remotes": {host.name: config}}}))
    shown = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "test", host.name], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    print(shown.stdout)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = [line for line in shown.stdout.splitlines() if "python candidate" in line]
    assert f"refused: {sys.executable}: not found" in rows[0]
    [taken] = [row for row in rows if "taken:" in row]
    assert f"= {expected}: matches this machine" in taken and "miniconda3/envs/" in taken
    assert "not needed: PATH:python3 = /usr/bin/python3: cloudpickle missing" in rows[-1]  # tried, all in one go
    assert f"{expected}: Python" in shown.stdout  # the worker started with the found interpreter


def test_no_usable_python_is_one_line_listing_the_candidates(ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    config = ssh_hosts[0].source_config()
    del config["python"]  # host1 has only /usr/bin/python3, without Hydra
    shown = subprocess.run(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "x=1", "hydra.sweep.dir=sweep",
         "hydra.launcher.local.enabled=false", remote_override("host1", config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 1
    assert "host1: no Python there can run the jobs (tried " in shown.stderr
    assert "PATH:python3 = /usr/bin/python3: cloudpickle missing" in shown.stderr
    assert "Fix: set remotes.host1.environment: mirror" in shown.stderr
    assert "Traceback" not in shown.stderr
