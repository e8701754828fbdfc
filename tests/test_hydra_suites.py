"""Hydra's own launcher test suites, run against hsm_distributed."""

from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from pytest import mark

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
