"""`hsm distributed ...` and hsm_config.yaml, as a user drives them, against the real hosts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

import hosts
from hosts import SshHost
from conftest import remote_override

from hsm_core import config_file, files, options

HSM = [sys.executable, "-m", "hsm_core.cli"]
SWEEP_APP = Path(__file__).parent / "sweep_app.py"
FAKE_NVIDIA_SMI = """#!/bin/sh
echo "0, Fake GPU, 40, 1024, 16384"
echo "1, Fake GPU, 60, 3072, 16384"
"""
BROKEN_NVIDIA_SMI = """#!/bin/sh
echo "0, Fake GPU, [N/A], [N/A], 16384"
"""


def hsm(cwd: Path, *arguments: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)} if home else None
    return subprocess.run([*HSM, "distributed", *arguments], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120)


def user_home(tmp_path: Path) -> Path:
    """A HOME whose ~/.ssh/known_hosts knows the test hosts: what `add` relies on by default."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(hosts.BASE / "known_hosts", home / ".ssh" / "known_hosts")
    return home


def add_host(cwd: Path, host: SshHost, home: Path) -> subprocess.CompletedProcess[str]:
    return hsm(cwd, "add", host.name, host.address, "--user", host.user, "--port", str(host.port),
               "--key", str(hosts.BASE / "client_key"), "--max-jobs", "2", "--python",
               str(hosts.host_python_env()), home=home)


def test_init_add_list_test_health_remove(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    home = user_home(tmp_path)
    settings = tmp_path / "hsm_config.yaml"
    settings.write_text("# the lab's settings\nproject: demo  # keep me\n")

    created = hsm(tmp_path, "init")
    assert created.returncode == 0 and "added the `distributed:` block" in created.stdout
    assert settings.read_text().startswith("# the lab's settings\nproject: demo  # keep me\n")
    assert "nothing changed" in hsm(tmp_path, "init").stdout

    for host in ssh_hosts:
        added = add_host(tmp_path, host, home)
        assert added.returncode == 0, added.stderr
    assert "# keep me" in settings.read_text()  # comments survive the edits
    listed = hsm(tmp_path, "list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "KIND", "HOST", "SLOTS", "ENABLED"]
    assert [line.split() for line in listed[2:]] == [["host1", "ssh", "127.0.0.1", "2", "yes"],
                                                    ["host2", "ssh", "127.0.0.1", "2", "yes"]]

    tested = hsm(tmp_path, "test", "--all", home=home)
    assert tested.returncode == 0, tested.stdout
    for host in ssh_hosts:
        for check in ("connect", "host key", "authentication", "setup lines", "python", "project_dir"):
            assert any(line.split()[0] == host.name and f" {check} " in line and " ok " in line
                       for line in tested.stdout.splitlines()), (host.name, check, tested.stdout)

    host2 = ssh_hosts[1]
    host2.stop()
    try:
        down = hsm(tmp_path, "test", "host1", "host2", home=home)
        assert down.returncode == 1
        assert f"host2   connect         FAIL    cannot connect to 127.0.0.1:{host2.port}" in down.stdout
        assert "check that `ssh -p" in down.stdout and "Traceback" not in down.stdout + down.stderr
        unhealthy = hsm(tmp_path, "health", "host2", home=home)
        assert unhealthy.returncode == 1 and "cannot connect" in unhealthy.stdout
    finally:
        host2.start()

    fake_bin = hosts.BASE / "fakebin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake_bin / "nvidia-smi").chmod(0o755)
    yaml = YAML()
    document = yaml.load(settings)
    document["distributed"]["remotes"]["host1"]["env"] = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    yaml.dump(document, settings)
    healthy = hsm(tmp_path, "health", "--all", home=home)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    rows = {line.split()[0]: line for line in healthy.stdout.splitlines()[1:]}
    assert set(rows) == {"local", "host1", "host2"}
    assert "2x Fake GPU (50% busy, 4.0/32.0G)" in rows["host1"]
    assert " none " in rows["host2"] and " yes " in rows["host2"]
    (fake_bin / "nvidia-smi").write_text(BROKEN_NVIDIA_SMI)
    unknown = hsm(tmp_path, "health", "host1", home=home)
    assert unknown.returncode == 0 and "Traceback" not in unknown.stdout + unknown.stderr
    assert "unknown (nvidia-smi printed '0, Fake GPU, [N/A], [N/A], 16384')" in unknown.stdout

    assert hsm(tmp_path, "remove", "host2").returncode == 0
    assert [line.split()[0] for line in hsm(tmp_path, "list").stdout.splitlines()[1:]] == ["local", "host1"]
    refused = hsm(tmp_path, "remove", "local")
    assert refused.returncode == 2 and "cannot be removed" in refused.stderr


def test_health_watch_refreshes_until_ctrl_c(tmp_path: Path) -> None:
    hsm(tmp_path, "init")
    watching = subprocess.Popen([*HSM, "distributed", "health", "--watch", "--refresh", "0.2"], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    watching.send_signal(signal.SIGINT)
    output, _ = watching.communicate(timeout=10)
    assert watching.returncode == 0
    assert output.count("SOURCE  REACHABLE") >= 2


BAD_FILES = [
    ("remotes:\n    gpu1: {host: a, max_parrallel_jobs: 2}",
     "distributed.remotes.gpu1.max_parrallel_jobs: unknown key (did you mean 'max_parallel_jobs'?)"),
    ("strategy: fastest", "distributed.strategy: unknown strategy 'fastest'. Fix: use one of round_robin"),
    ("local: {max_parallel_jobs: 0}", "distributed.local.max_parallel_jobs: must be a whole number >= 1, got 0"),
    ("remotes:\n    gpu1: {host: a, ssh_key: /no/such/key}", "distributed.remotes.gpu1.ssh_key: no such file"),
    ("remotes:\n    gpu1: {host: a}\n    gpu1: {host: b}", 'line 4: not valid YAML (found duplicate key "gpu1"'),
    ("remotes:\n    bad name: {host: a}", "distributed.remotes.bad name: 'bad name' is not a usable source name"),
    ("remotes:\n    gpu1: {host: a, ssh_port: 70000}", "distributed.remotes.gpu1.ssh_port: 70000 is not a TCP port"),
    ("stratgy: least_loaded", "distributed.stratgy: unknown key (did you mean 'strategy'?)"),
    ("sources: local", "distributed.sources: must be a list, got the text 'local'. Fix: write it as a list"),
    ("remotes:\n    gpu1: {host: a, setup: {conda: activate}}",
     "distributed.remotes.gpu1.setup: must be a list of texts"),
    ("remotes:\n    gpu1: {host: a, env: {PATHS: [a, b]}}",
     "distributed.remotes.gpu1.env.PATHS: must be one value, got a list"),
    ("remotes:\n    gpu1: {host: a, env: {2FAST: x}}",
     "distributed.remotes.gpu1.env.2FAST: is not a usable environment"),
    ("remotes:\n    gpu1: {host: a, partition: gpu}", "distributed.remotes.gpu1.partition: is a Slurm key"),
    ("remotes:\n    hpc: {host: a, kind: slurm, partition: 'gpu a100'}",
     "distributed.remotes.hpc.partition: 'gpu a100' is not one word"),
    ("remotes:\n    hpc: {host: a, kind: slurm, sbatch_args: [constraint=a100]}",
     "distributed.remotes.hpc.sbatch_args: 'constraint=a100' is not an sbatch option"),
    ("remotes:\n    hpc: {host: a, kind: pbs}", "distributed.remotes.hpc.kind: unknown kind 'pbs'"),
    ("local: {enabled: maybe}", "distributed.local.enabled: must be true or false, got 'maybe'"),
    ("sync: {exclude: data}", "distributed.sync.exclude: must be a list, got the text 'data'"),
]


@pytest.mark.parametrize("word, enabled", [("no", False), ("off", False), ("false", False), ("0", False),
                                           ("yes", True), ("on", True), ("true", True), ("1", True)])
def test_yaml_words_for_yes_and_no_are_read_as_written(tmp_path: Path, word: str, enabled: bool) -> None:
    (tmp_path / "hsm_config.yaml").write_text(
        f"distributed:\n  remotes:\n    gpu1: {{host: a, enabled: {word}}}\n  local: {{enabled: {word}}}\n")
    listed = hsm(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[-1] for line in listed.stdout.splitlines()[1:]}
    assert rows == {"local": "yes" if enabled else "no", "gpu1": "yes" if enabled else "no"}


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_bad_config_is_one_line_for_the_cli_and_the_launcher(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "hsm_config.yaml"
    path.write_text(f"distributed:\n  {content}\n")
    listed = hsm(tmp_path, "list")
    assert listed.returncode == 2
    assert listed.stderr.startswith(f"hsm: {path}: ") and message in listed.stderr, listed.stderr
    assert "Fix:" in listed.stderr and "Traceback" not in listed.stderr
    swept = subprocess.run([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "x=1,2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert swept.returncode == 1
    assert f"{path}: " in swept.stderr and message in swept.stderr and "Traceback" not in swept.stderr


def test_bad_launcher_keys_are_one_line_too(tmp_path: Path) -> None:
    swept = subprocess.run([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "x=1,2",
                            "hydra.launcher.sources=[local,gpu9]"], cwd=tmp_path, capture_output=True, text=True)
    assert swept.returncode == 1
    assert "hydra.launcher.sources: no enabled source is named 'gpu9'. Fix: use some of local" in swept.stderr
    assert "Traceback" not in swept.stderr


def test_the_launcher_reads_the_file_and_its_own_keys_win(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "hsm_config.yaml").write_text(
        "distributed:\n  strategy: capability_based\n  local: {max_parallel_jobs: 3}\n")
    from_file = subprocess.run([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "x=1,2"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "launching 2 jobs on local (3 slots) (capability_based)" in from_file.stdout, from_file.stderr
    overridden = subprocess.run(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "x=1,2",
         "hydra.launcher.strategy=least_loaded", "hydra.launcher.local.max_parallel_jobs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "launching 2 jobs on local (1 slot) (least_loaded)" in overridden.stdout, overridden.stderr


def test_a_failed_write_leaves_the_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hsm_config.yaml"
    config_file.initialize(path)
    before = path.read_text()
    document = config_file.read(path)
    document["distributed"]["remotes"] = {"gpu1": {"host": "a"}}

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        config_file.write(path, document)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["hsm_config.yaml"]  # no temp file left behind


def test_health_counts_the_hsm_jobs_running_on_a_host(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    home = user_home(tmp_path)
    hsm(tmp_path, "init")
    add_host(tmp_path, ssh_hosts[0], home)
    sweep = subprocess.Popen([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "task=who_runs",
                              "x=1,2", "+sleep=8", "hydra.launcher.local.enabled=false", "hydra.sweep.dir=sweep"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ,
                                                                                                   "HOME": str(home)})
    try:
        assert hosts.wait_until(lambda: len(ssh_hosts[0].job_processes()) >= 5, 60)  # agent + 2 x (guard, job)
        rows = hsm(tmp_path, "health", "host1", home=home).stdout.splitlines()
        assert rows[1].split()[6] == "2", rows
    finally:
        sweep.wait(timeout=120)
    assert sweep.returncode == 0


def test_a_passphrase_key_is_one_line_not_a_traceback(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    home = user_home(tmp_path)
    locked_key = tmp_path / "locked_key"
    hosts.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked_key))
    hsm(tmp_path, "init")
    host = ssh_hosts[0]
    assert hsm(tmp_path, "add", "host1", host.address, "--user", host.user, "--port", str(host.port),
               "--key", str(locked_key)).returncode == 0
    tested = hsm(tmp_path, "test", "host1", home=home)
    assert tested.returncode == 1 and "Traceback" not in tested.stdout + tested.stderr
    assert f"remotes.host1.ssh_key {locked_key} is protected by a passphrase" in tested.stdout
    assert f"ssh-add {locked_key}" in tested.stdout


def test_test_starts_the_worker_as_a_sweep_does_on_a_chatty_host(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    home = user_home(tmp_path)
    hsm(tmp_path, "init")
    add_host(tmp_path, ssh_hosts[1], home)  # host2: its login shell prints a banner
    tested = hsm(tmp_path, "test", "host2", home=home)
    assert tested.returncode == 0, tested.stdout
    assert f"{hosts.host_python_env()}: Python" in tested.stdout


def test_a_project_dir_others_can_write_is_refused(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    shared = Path("/tmp/hsm-shared-projects")
    shared.mkdir(exist_ok=True)
    shutil.chown(shared, ssh_hosts[0].user)
    shared.chmod(0o777)
    swept = subprocess.run(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "task=who_runs", "x=1",
         "hydra.sweep.dir=sweep", "hydra.launcher.local.enabled=false",
         remote_override("host1", ssh_hosts[0].source_config(project_dir=str(shared)))],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert swept.returncode == 1
    assert (f"No compute source can run jobs. host1: remotes.host1.project_dir {shared} is writable by others"
            f" (mode 777)") in swept.stderr, swept.stderr
    assert "chmod go-w" in swept.stderr and "Traceback" not in swept.stderr


def test_the_readme_tables_are_the_options_table() -> None:
    """The README's reference tables are hsm_core.options, rendered: one source of defaults."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in options.TABLES:
        assert options.readme_block(name) in readme, f"README's {name} table is stale: run python -m hsm_core.options"
