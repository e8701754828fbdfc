"""Hydra's job contract: what travels to a machine loads there without this plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import HydraContext, RunMode

import tasks
from conftest import CONF_DIR
from hsm_core import hydra_job

# Run in a fresh interpreter that cannot import the launcher plugin (as on a remote machine
# that has Hydra and cloudpickle but not hsm-distributed), then unpickle what was sent.
LOAD_WITHOUT_PLUGIN = """
import sys, importlib.abc
class NoPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("hydra_plugins.hsm_distributed_launcher"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)")
sys.meta_path.insert(0, NoPlugin())
import cloudpickle
session = cloudpickle.load(open(sys.argv[1], "rb"))
config = cloudpickle.load(open(sys.argv[2], "rb"))
print(type(session[1]).__name__, config.hydra.job.num, config.hydra.launcher.strategy)
"""


def test_the_session_and_a_job_load_on_a_machine_without_the_plugin(hydra_restore_singletons: Any,
                                                                     tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        config = hydra.compose_config(config_name="config", run_mode=RunMode.MULTIRUN,
                                      overrides=["hydra/launcher=hsm_distributed", f"hydra.sweep.dir={tmp_path}"])
        HydraConfig.instance().set_config(config)  # as during a launch: a typed launcher node in it
        context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(config))
        (tmp_path / "session").write_bytes(hydra_job.session_blob(context, tasks.square))
        [job] = hydra_job.compose_jobs(config, hydra.config_loader, [["x=3"]], initial_job_idx=7, keys=["k"])
    assert job.compose_error is None and job.payload is not None
    (tmp_path / "job").write_bytes(job.payload)
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PLUGIN, str(tmp_path / "session"),
                             str(tmp_path / "job")], capture_output=True, text=True, timeout=60,
                            cwd=Path(tasks.__file__).parent)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["function", "7", "round_robin"]


def test_a_job_id_is_its_name_and_number() -> None:
    assert hydra_job.job_id("train", 12) == "train_12"
