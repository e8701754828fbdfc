"""The launcher's config node: its values come from where a user expects (their configs and
command line, over hsm_config.yaml, over the defaults), `--cfg` shows them, and nothing a
job saves needs this plugin to be read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import hosts
from conftest import ends, remote_override
from hsm_core import config_file, options, settings
from hydra_plugins.hsm_distributed_launcher.config import HsmDistributedLauncherConf

SWEEP_APP = Path(__file__).parent / "sweep_app.py"


def run_app(cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    ran = subprocess.run([sys.executable, str(SWEEP_APP), *arguments], cwd=cwd, capture_output=True, text=True,
                         timeout=180)
    assert ran.returncode == 0, ran.stderr[-4000:]
    return ran


def shown_launcher_node(cwd: Path, *arguments: str) -> dict[str, str]:
    """`--cfg hydra -p hydra.launcher --resolve`, as `key: value` pairs (nested keys by their last name)."""
    shown = run_app(cwd, *arguments, "--cfg", "hydra", "-p", "hydra.launcher", "--resolve")
    return dict(line.strip().split(": ", 1) for line in shown.stdout.splitlines() if ": " in line)


def test_the_launcher_node_shows_the_values_a_sweep_will_use(tmp_path: Path) -> None:
    (tmp_path / "hsm_config.yaml").write_text("distributed:\n  strategy: least_loaded\n  local: {enabled: no}\n"
                                             "  health_check_interval: 10\n")
    values = shown_launcher_node(tmp_path, "hydra/launcher=hsm_distributed", "hydra.launcher.max_retries=7")
    assert values["strategy"] == "least_loaded" and values["max_retries"] == "7"  # the file's, the command line's
    assert values["collect_interval"] == "300.0" and values["enabled"] == "false"
    assert values["max_parallel_jobs"] == str(os.cpu_count())
    unset = [key for key, value in values.items() if value == "null"]
    assert unset == ["config_file", "sources", "gpus", "gpus_per_job"]
    swept = run_app(tmp_path, "-m", "hydra/launcher=hsm_distributed", "x=1", "hydra.launcher.local.enabled=true")
    assert "health_check_interval is not used by this version" in swept.stdout
    assert "(least_loaded)" in swept.stdout


def test_the_launcher_node_and_validation_share_the_options_defaults() -> None:
    node = OmegaConf.structured(HsmDistributedLauncherConf)
    for option in options.LAUNCHER:
        written: Any = OmegaConf.to_container(node, resolve=False)
        for part in option.key.split("."):
            written = written[part]
        assert written == option.default_value(), option.key  # no hsm_config.yaml where the tests run
    assert set(settings.TOP_KEYS) - {"enabled"} == {option.key.split(".")[0] for option in options.LAUNCHER}
    validated = settings.load_settings({})  # nothing set: every key is its default
    table = options.defaults(options.LAUNCHER)
    for key in ("strategy", "max_retries", "retry_failed_jobs", "collect_interval", "keepalive_interval",
                "keepalive_count_max", "resume", "progress_interval"):
        assert getattr(validated, key) == table[key], key
    assert validated.local.max_parallel_jobs == (os.cpu_count() or 1)
    assert (validated.local.enabled, validated.local.stagger_s) == (table["local.enabled"], table["local.stagger_s"])
    remote = settings.load_settings({"remotes": {"box": {"host": "box"}}}).remotes[0]
    remote_table = options.defaults(options.REMOTE)
    for key in ("kind", "max_parallel_jobs", "enabled", "project_dir", "min_free_memory_mb", "stagger_s"):
        assert getattr(remote, key) == remote_table[key], key


def test_a_launcher_group_file_and_the_command_line_win_over_hsm_config_yaml(tmp_path: Path) -> None:
    """The precedence of any Hydra config: the file only replaces the node's built-in defaults."""
    (tmp_path / "hsm_config.yaml").write_text("distributed:\n  strategy: least_loaded\n  progress_interval: 7\n"
                                             "  local: {max_parallel_jobs: 1}\n")
    group = tmp_path / "my_conf" / "hydra" / "launcher"
    group.mkdir(parents=True)
    # round_robin is the built-in default: chosen here on purpose, it must still win.
    (group / "mine.yaml").write_text("defaults: [hsm_distributed]\nstrategy: round_robin\nmax_retries: 5\n")
    mine = ["-cd", str(tmp_path / "my_conf"), "hydra/launcher=mine"]
    values = shown_launcher_node(tmp_path, *mine)
    assert (values["strategy"], values["max_retries"]) == ("round_robin", "5")  # the group file's
    assert (values["progress_interval"], values["max_parallel_jobs"]) == ("7.0", "1")  # hsm_config.yaml's
    swept = run_app(tmp_path, "-m", *mine, "x=1,2")
    assert "launching 2 jobs on local (1 slot) (round_robin)" in swept.stdout
    swept = run_app(tmp_path, "-m", *mine, "x=1,2", "hydra.launcher.local.max_parallel_jobs=2",
                    "hydra.launcher.strategy=least_loaded")
    assert "launching 2 jobs on local (2 slots) (least_loaded)" in swept.stdout


def test_config_file_names_the_file_a_launch_reads(tmp_path: Path) -> None:
    """`hydra.launcher.config_file` is read at launch, over the node's defaults (from ./hsm_config.yaml)."""
    (tmp_path / "hsm_config.yaml").write_text("distributed:\n  strategy: least_loaded\n")
    (tmp_path / "other.yaml").write_text("distributed:\n  strategy: capability_based\n"
                                         "  local: {max_parallel_jobs: 3}\n")
    other = ["-m", "hydra/launcher=hsm_distributed", "hydra.launcher.config_file=other.yaml", "x=1"]
    assert "on local (3 slots) (capability_based)" in run_app(tmp_path, *other).stdout
    # Named on the command line, a value wins even where it equals the node's default.
    chosen = run_app(tmp_path, *other, "hydra.launcher.strategy=least_loaded").stdout
    assert "on local (3 slots) (least_loaded)" in chosen


def test_a_key_is_the_users_when_set_to_another_value_or_named_on_the_command_line() -> None:
    node = {"strategy": "least_loaded", "max_retries": 3, "local": {"enabled": True, "max_parallel_jobs": 4},
            "sync": {"include": [], "exclude": []}}
    composed = {"config_file": "x.yaml", "sources": None, "strategy": "least_loaded", "max_retries": 5,
                "local": {"enabled": True, "max_parallel_jobs": 4}, "sync": {"include": [], "exclude": ["data"]},
                "remotes": {"box": {"host": "box"}}, "stratgy": "typo"}
    assert config_file.chosen_by_user(composed, node, []) == {
        "config_file": "x.yaml", "sources": None, "max_retries": 5, "local": {}, "sync": {"exclude": ["data"]},
        "remotes": {"box": {"host": "box"}}, "stratgy": "typo"}  # a key validation must still see stays
    named = config_file.chosen_by_user(composed, node, ["strategy", "local"])
    assert named["strategy"] == "least_loaded" and named["local"] == {"enabled": True, "max_parallel_jobs": 4}


def test_what_a_job_saves_needs_nothing_of_this_plugin(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    """Each job's .hydra files and the sweep's multirun.yaml load and resolve with a Python that
    has Hydra but not this plugin (the test hosts' own), locally and for a job that ran remotely;
    the job's own copy of the node resolves where it runs."""
    (tmp_path / "hsm_config.yaml").write_text("distributed:\n  strategy: least_loaded\n")
    remote = remote_override("host1", ssh_hosts[0].source_config())
    for sweep, where in (("here", ["hydra.launcher.remotes={}"]), ("there", ["hydra.launcher.local.enabled=false",
                                                                              remote])):
        run_app(tmp_path, "-m", "hydra/launcher=hsm_distributed", "task=launcher_strategy", "x=1,2",
                f"hydra.sweep.dir={sweep}", *where)
        assert {record["source"] for record in ends(tmp_path / sweep)} == ({"local"} if sweep == "here" else {"host1"})
    saved = sorted(str(path) for pattern in ("*/*/.hydra/*.yaml", "*/multirun.yaml")
                   for path in tmp_path.glob(pattern))
    assert len(saved) == 2 * 2 * 3 + 2
    reader = """
import sys
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf
setup_globals()  # Hydra's own resolvers (now, hydra), as any Hydra app has them
for path in sys.argv[1:]:
    config = OmegaConf.load(path)
    OmegaConf.resolve(config)
    if path.endswith(("hydra.yaml", "multirun.yaml")):
        assert config.hydra.launcher.strategy == "least_loaded", path
try:
    import hydra_plugins.hsm_distributed_launcher
except ImportError:
    print("read", len(sys.argv) - 1, "files without the plugin")
"""
    read = subprocess.run([str(hosts.host_python_env()), "-c", reader, *saved], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert read.stdout.strip() == f"read {len(saved)} files without the plugin", read.stderr
    for path in saved:
        assert "${hsm" not in Path(path).read_text(), path
    seen = {(tmp_path / sweep / str(num) / "strategy.txt").read_text() for sweep in ("here", "there") for num in (0, 1)}
    assert seen == {"least_loaded"}


def test_a_hydra_override_that_names_the_job_num_composes(tmp_path: Path) -> None:
    """`hydra.sweep.subdir=run_${hydra.job.num}` on the command line: the launcher reads Hydra's
    overrides as written (resolving them failed every job: no job num is set yet)."""
    run_app(tmp_path, "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
            "hydra.sweep.subdir=run_${hydra.job.num}", "x=1,2")
    assert sorted(path.name for path in (tmp_path / "sweep").glob("run_*")) == ["run_0", "run_1"]
