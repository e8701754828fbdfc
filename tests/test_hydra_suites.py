"""Hydra's own launcher test suites, run against hsm_distributed."""

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from hydra.test_utils.test_utils import integration_test
from omegaconf import OmegaConf
from pytest import fixture, mark

import hosts
from conftest import remotes_only

from hydra_plugins.hsm_distributed_launcher.hsm_distributed_launcher import HsmDistributedLauncher


def test_discovery() -> None:
    assert HsmDistributedLauncher.__name__ in [plugin.__name__ for plugin in Plugins.instance().discover(Launcher)]


@mark.parametrize("launcher_name, overrides", [("hsm_distributed", [])])
class TestLauncher(LauncherTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [("hsm_distributed", ["hydra.sweeper.max_batch_size=2"])])
class TestBatchedSweeper(BatchedSweeperTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=hsm_distributed"])])
class TestIntegration(IntegrationTestSuite):
    pass


# -- the same suites with the local source off: every job runs on the real SSH hosts --------

SCRATCH = Path("/tmp/hsm-suite")
REMOTE_HOME = r"/home/hsm-host[12]"


class TestLauncherOnSSHHosts(LauncherTestSuite):
    @fixture
    def launcher_name(self) -> str:
        return "hsm_distributed"

    @fixture
    def overrides(self, ssh_hosts: list[hosts.SshHost]) -> list[str]:
        return remotes_only(ssh_hosts)


class TestIntegrationOnSSHHosts(IntegrationTestSuite):
    """Hydra's integration suite, adapted where it assumes one shared filesystem.

    The hosts are other users of this machine, so the apps live in a scratch dir they may
    write to (the suite's tasks write their output file by absolute path). A remote job's
    working dir and original cwd are that machine's copies (regexes below): Hydra's
    suite expects the launcher machine's paths there, which only a shared filesystem gives.
    """

    @fixture
    def task_launcher_cfg(self) -> dict[str, Any]:
        return {}

    @fixture
    def extra_flags(self, ssh_hosts: list[hosts.SshHost]) -> list[str]:
        return ["-m", "hydra/launcher=hsm_distributed", *remotes_only(ssh_hosts)]

    def get_test_scratch_dir(self, tmpdir: Path) -> Path:
        if str(tmpdir).startswith(REMOTE_HOME):
            return tmpdir
        scratch = SCRATCH / hashlib.sha256(str(tmpdir).encode()).hexdigest()[:12]
        scratch.mkdir(parents=True, exist_ok=True)
        os.chmod(SCRATCH, 0o777)
        os.chmod(scratch, 0o777)
        return scratch

    def get_test_app_working_dir(self) -> Path:
        return Path(REMOTE_HOME + r"/\.hsm/outputs/[0-9a-f]+")

    def remote_copy_of(self, scratch: Path) -> str:
        return REMOTE_HOME + rf"/\.hsm/projects/{scratch.name}-[0-9a-f]+/snapshots/[0-9a-f]+"

    def test_custom_sweeper_run_workdir(self, tmpdir: Path, task_config: Any, overrides: list[str],
                                        expected_dir: str, task_launcher_cfg: Any, extra_flags: list[str]) -> None:
        """As Hydra's, with the expected dir escaped: dirs like `a_1+b_2` are not regexes."""
        integration_test(
            tmpdir=self.get_test_scratch_dir(tmpdir), task_config=OmegaConf.create(task_config),
            overrides=[*extra_flags, *overrides, "hydra.job.chdir=True"], prints="os.getcwd()",
            expected_outputs=f"{self.get_test_app_working_dir()}/{re.escape(expected_dir)}$",
        )

    # pytest keeps marks in a function attribute it adds at run time.
    test_custom_sweeper_run_workdir.pytestmark = IntegrationTestSuite.test_custom_sweeper_run_workdir.pytestmark  # type: ignore[attr-defined]  # noqa: E501

    def test_get_orig_dir_multirun(self, tmpdir: Path, task_launcher_cfg: Any, extra_flags: list[str]) -> None:
        scratch = self.get_test_scratch_dir(tmpdir)
        integration_test(tmpdir=scratch, task_config=OmegaConf.create(), overrides=extra_flags,
                         prints="hydra.utils.get_original_cwd()", expected_outputs=self.remote_copy_of(scratch) + "$")

    def test_to_absolute_path_multirun(self, tmpdir: Path, task_launcher_cfg: Any, extra_flags: list[str]) -> None:
        scratch = self.get_test_scratch_dir(tmpdir)
        overrides = [*extra_flags, "hydra.job.chdir=True", "hydra.sweep.dir=cli_dir",
                     "hydra.sweep.subdir=cli_dir_${hydra.job.num}"]
        integration_test(
            tmpdir=scratch, task_config=OmegaConf.create(), overrides=overrides,
            prints=["hydra.utils.to_absolute_path('/foo/bar')", "hydra.utils.to_absolute_path('foo/bar')",
                    "os.getcwd()"],
            expected_outputs=["/foo/bar$", self.remote_copy_of(scratch) + "/foo/bar$",
                              str(self.get_test_app_working_dir()) + "/cli_dir/cli_dir_0$"],
        )
