"""Fixtures shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import pytest
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, RunMode

import hosts
from hosts import remote_override
from hydra_plugins.hsm_distributed_launcher.hsm_distributed_launcher import HsmDistributedLauncher
from hsm_core import journal

CONF_DIR = Path(__file__).parent / "conf"

Launch = Callable[..., list[list[JobReturn]]]


@pytest.fixture
def launch_jobs(hydra_restore_singletons: Any, tmp_path: Path) -> Launch:
    """Launch batches of jobs with hsm_distributed directly, so failed JobReturns can be inspected.

    (Hydra's sweeper raises at the first failed job; these tests need to see all of them.)
    """

    def launch(
        task: Callable[[Any], Any],
        batches: Sequence[Sequence[Sequence[str]]],
        launcher_overrides: Sequence[str] = (),
    ) -> list[list[JobReturn]]:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            config = hydra.compose_config(
                config_name="config",
                overrides=[
                    "hydra/launcher=hsm_distributed",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    *launcher_overrides,
                ],
                run_mode=RunMode.MULTIRUN,
            )
            HydraConfig.instance().set_config(config)
            context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(config))
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=context, task_function=task, config=config
            )
            results, first = [], 0
            for batch in batches:
                results.append(list(launcher.launch(batch, initial_job_idx=first)))
                first += len(batch)
            cast(HsmDistributedLauncher, launcher).engine.close()
            return results

    return launch


@pytest.fixture(scope="session")
def ssh_hosts() -> Iterator[list[hosts.SshHost]]:
    """Two real sshd hosts on loopback, for the whole test session."""
    hosts.require_components()
    started = hosts.setup_hosts(2)
    yield started
    for host in started:
        host.stop()


@pytest.fixture
def netns_host(ssh_hosts: list[hosts.SshHost]) -> Iterator[hosts.SshHost]:
    """A third host in its own network namespace, with a cable the test can pull."""
    host = hosts.setup_netns_host()
    yield host
    host.stop()
    hosts.teardown_netns()


def ends(sweep_dir: Path) -> list[dict[str, Any]]:
    """The journal's end records: one per attempt that ended."""
    return [record for record in journal.read(sweep_dir) if record["event"] == "end"]


def starts(sweep_dir: Path) -> list[dict[str, Any]]:
    return [record for record in journal.read(sweep_dir) if record["event"] == "start"]


def remotes_only(test_hosts: Sequence[hosts.SshHost], **extra: Any) -> list[str]:
    """Overrides that run every job on the SSH hosts."""
    return ["hydra.launcher.local.enabled=false",
            *(remote_override(host.name, host.source_config(**extra)) for host in test_hosts)]
