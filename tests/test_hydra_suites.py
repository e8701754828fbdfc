"""Hydra's own launcher test suites, run against hsm_distributed."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite
from hydra.test_utils.test_utils import integration_test
from omegaconf import OmegaConf
from pytest import fixture

import hosts
from conftest import remotes_only

from hydra_plugins.hsm_distributed_launcher.hsm_distributed_launcher import HsmDistributedLauncher


def test_discovery() -> None:
    assert HsmDistributedLauncher.__name__ in [plugin.__name__ for plugin in Plugins.instance().discover(Launcher)]


# Hydra's suites as a user's repo runs them: a test module of its own, in a fresh pytest with
# no conftest of ours, so nothing this project's tests set up can hide what users would meet
# (Hydra's fixtures restore its global state after each test, OmegaConf's resolvers included).
USERS_TEST_MODULE = """
from pathlib import Path

from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite, IntegrationTestSuite, LauncherTestSuite)
from omegaconf import OmegaConf
from pytest import mark

OVERRIDES = {overrides!r}


@mark.parametrize("launcher_name, overrides", [("hsm_distributed", OVERRIDES)])
class TestLauncher(LauncherTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [("hsm_distributed", ["hydra.sweeper.max_batch_size=2", *OVERRIDES])])
class TestBatchedSweeper(BatchedSweeperTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags", [({{}}, ["-m", "hydra/launcher=hsm_distributed", *OVERRIDES])])
class TestIntegration(IntegrationTestSuite):
    pass


def test_two_sweeps_with_the_resolvers_cleared_between(hydra_sweep_runner, tmpdir):
    for sweep_number in range(2):
        sweep = hydra_sweep_runner(
            calling_file=None, calling_module="hydra.test_utils.a_module", task_function=lambda cfg: cfg.bar * 2,
            config_path="configs", config_name="compose.yaml",
            overrides=["hydra/launcher=hsm_distributed", *OVERRIDES, "bar=1,2"],
            temp_dir=Path(tmpdir) / str(sweep_number))
        with sweep:
            assert [job.return_value for job in sweep.returns[0]] == [2, 4]
        OmegaConf.clear_resolvers()
"""


def run_users_suites(directory: Path, overrides: list[str], *pytest_args: str) -> tuple[int, str]:
    """pytest over USERS_TEST_MODULE in `directory` (its own rootdir): the passed count, and the summary."""
    module = directory / "test_users_app.py"
    module.write_text(USERS_TEST_MODULE.format(overrides=overrides))
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, str(module)],
                         cwd=directory, capture_output=True, text=True, timeout=420)
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    assert ran.returncode == 0 and passed, ran.stdout[-6000:] + ran.stderr[-3000:]
    return int(passed.group(1)), summary


def test_hydra_suites_pass_in_a_users_repo(tmp_path: Path) -> None:
    passed, summary = run_users_suites(tmp_path, [])
    assert passed == 9 + 1 + 11 + 1 and "skipped" not in summary, summary


def test_hydra_launcher_suite_passes_over_ssh_in_a_users_repo(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    passed, summary = run_users_suites(tmp_path, remotes_only(ssh_hosts), "-k", "TestLauncher or resolvers")
    assert passed == 9 + 1 and "skipped" not in summary, summary


# -- Hydra's integration suite with the local source off: every job runs on the real SSH hosts --

SCRATCH = Path("/tmp/hsm-suite")
REMOTE_HOME = r"/home/hsm-host[12]"


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
