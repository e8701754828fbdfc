"""SSH sources against real OpenSSH hosts: placement, outputs, data as data, refusals, sync."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra.core.utils import JobStatus

import hosts
import tasks
from conftest import Launch, ends, remote_override, remotes_only, starts
from hsm_core.sync import sweep_outputs_folder
from test_local_source import VERBATIM_VALUES, hydra_quoted

SWEEP_APP = Path(__file__).parent / "sweep_app.py"


def run_sweep(cwd: Path, *overrides: str, app: Path = SWEEP_APP, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """`python app -m hydra/launcher=hsm_distributed ...` as a user runs it; returns its output."""
    return subprocess.run(
        [sys.executable, str(app), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep", *overrides],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=300,
    )


def leftover_outputs(test_hosts: list[hosts.SshHost], sweep_dir: Path) -> list[Path]:
    """Job dirs of this sweep still on the hosts."""
    return [path for host in test_hosts
            for path in Path(sweep_outputs_folder(str(host.home), str(sweep_dir))).glob("*/*")]


def test_sweep_over_local_and_two_hosts(launch_jobs: Launch, ssh_hosts: list[hosts.SshHost],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    [returns] = launch_jobs(
        tasks.who_runs,
        [[[f"x={x}", "+sleep=0.5"] for x in range(12)]],
        ["hydra.launcher.local.max_parallel_jobs=1",
         *(remote_override(host.name, host.source_config()) for host in ssh_hosts)],
    )
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 12
    values = [r.return_value for r in returns]
    assert [x for x, _ in values] == list(range(12))
    runners = [user for _, user in values]
    assert {"root", "hsm-host1", "hsm-host2"} <= set(runners), runners
    for job_return, user in zip(returns, runners, strict=True):
        job_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        assert job_dir.parent == Path(returns[0].hydra_cfg.hydra.runtime.output_dir).parent
        assert (job_dir / "who.txt").read_text() == user
        assert {p.name for p in (job_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        assert (job_dir / f"{job_return.hydra_cfg.hydra.job.name}.log").exists()
        assert "/home/hsm-host" not in (job_dir / ".hydra" / "hydra.yaml").read_text()
        assert job_return.working_dir == str(Path.cwd())
    sweep_dir = Path(returns[0].hydra_cfg.hydra.runtime.output_dir).parent
    assert leftover_outputs(ssh_hosts, sweep_dir) == []  # remote copies go once pulled and verified
    assert "Error importing" not in capsys.readouterr().err  # Hydra's plugin discovery in remote jobs


def test_a_failing_remote_task_s_traceback_is_in_its_local_log(launch_jobs: Launch,
                                                              ssh_hosts: list[hosts.SshHost]) -> None:
    [returns] = launch_jobs(tasks.fail_on_two, [[["x=1"], ["x=2"]]], remotes_only(ssh_hosts[:1]))
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED]
    with pytest.raises(Exception, match="ValueError: job 2 fails on purpose"):
        returns[1].return_value
    hydra_cfg = returns[1].hydra_cfg.hydra
    job_log = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
    assert 'raise ValueError("job 2 fails on purpose")' in job_log.read_text()


def test_override_values_reach_remote_tasks_verbatim(launch_jobs: Launch, ssh_hosts: list[hosts.SshHost]) -> None:
    [returns] = launch_jobs(
        tasks.echo_value, [[[f"+value={hydra_quoted(v)}"] for v in VERBATIM_VALUES]], remotes_only(ssh_hosts)
    )
    assert [r.return_value for r in returns] == VERBATIM_VALUES
    assert not Path("/tmp/hsm-pwned").exists() and not Path("/tmp/hsm-redirect").exists()
    for host in ssh_hosts:
        assert not (host.home / "hsm-pwned").exists()


def test_a_changed_host_key_refuses_only_that_host(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    host1, host2 = ssh_hosts
    impostor = tmp_path / "impostor_key"
    hosts.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor))
    known_hosts = tmp_path / "known_hosts"
    key_type, key_data = impostor.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{host2.port} {key_type} {key_data}\n")
    shown = run_sweep(
        tmp_path, "task=who_runs", "x=1,2,3", "hydra.launcher.local.enabled=false",
        remote_override("host1", host1.source_config()),
        remote_override("host2", host2.source_config(known_hosts=str(known_hosts))),
    )
    assert shown.returncode == 0, shown.stderr
    refusal = f"Source host2 is out of this sweep: the host key of [127.0.0.1]:{host2.port} DIFFERS"
    assert refusal in shown.stdout
    assert f"ssh-keygen -R '[127.0.0.1]:{host2.port}' -f {known_hosts}" in shown.stdout
    assert [(tmp_path / "sweep" / str(n) / "who.txt").read_text() for n in range(3)] == ["hsm-host1"] * 3


def test_an_unknown_host_key_is_refused_with_a_fix_that_works_on_a_new_machine(
        tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    """No ~/.ssh at all (a fresh account): the line the refusal gives, pasted into a shell, lets the sweep run."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    config = ssh_hosts[0].source_config()
    del config["known_hosts"]  # ~/.ssh/known_hosts, the default
    sweep = ["x=1", "hydra.launcher.local.enabled=false", remote_override("host1", config)]
    shown = run_sweep(tmp_path, *sweep, env=env)
    assert shown.returncode == 1
    assert "No compute source can run jobs. host1: the host key of [127.0.0.1]:" in shown.stderr
    assert "Traceback" not in shown.stderr
    fix = shown.stderr.split("check the key's fingerprint, then: ", 1)[1].splitlines()[0]
    assert fix == f"mkdir -p ~/.ssh && ssh-keyscan -p {ssh_hosts[0].port} 127.0.0.1 >> ~/.ssh/known_hosts"
    subprocess.run(fix, shell=True, env=env, check=True, capture_output=True, timeout=60)
    assert run_sweep(tmp_path, *sweep, env=env).returncode == 0


def test_a_host_missing_cloudpickle_is_left_out_with_its_fix(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    host1, host2 = ssh_hosts
    bare_python = hosts.host_python_env_without_cloudpickle()
    shown = run_sweep(
        tmp_path, "task=who_runs", "x=1,2", "hydra.launcher.local.enabled=false",
        remote_override("host1", host1.source_config(python=str(bare_python))),
        remote_override("host2", host2.source_config()),
    )
    assert shown.returncode == 0, shown.stderr
    version = tasks_version("cloudpickle")
    assert (f"Source host1 is out of this sweep: the remote Python does not match: cloudpickle missing"
            f" (this machine: {version}). Fix: on 127.0.0.1 run: {bare_python} -m pip install cloudpickle=={version}"
            ) in shown.stdout
    assert [(tmp_path / "sweep" / str(n) / "who.txt").read_text() for n in range(2)] == ["hsm-host2"] * 2


def tasks_version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


PROJECT_APP = '''
import hydra
import helper

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    with open(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir + "/answer.txt", "w") as f:
        f.write(helper.answer())

if __name__ == "__main__":
    main()
'''


def make_project(folder: Path, answer: str) -> Path:
    (folder / "conf").mkdir(parents=True)
    (folder / "pyproject.toml").write_text("[project]\nname = 'proj'\nversion = '0'\n")
    (folder / "app.py").write_text(PROJECT_APP)
    (folder / "helper.py").write_text(f"def answer():\n    return {answer!r}\n")
    (folder / "conf" / "config.yaml").write_text("x: 0\n")
    (folder / "notes.txt").write_text("not code, but part of the project\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ignored by the sync\n")
    return folder


SYNCED = re.compile(r"Synced (\S+) to host1:(\S+) \(snapshot \w+\): (\d+) files? sent \((\d+) bytes\), (\d+) unchanged,"
                    r" (\d+) old snapshots? removed")


def sync_line(output: str) -> tuple[str, ...]:
    match = SYNCED.search(output)
    assert match, output
    return match.groups()


def test_a_second_sweep_sends_only_the_changed_file(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    project = make_project(tmp_path / "first" / "proj", answer="one")
    only_host1 = remotes_only(ssh_hosts[:1])

    first = run_sweep(project, "x=1,2", *only_host1, app=project / "app.py")
    assert first.returncode == 0, first.stderr
    _, remote_copy, sent, _, unchanged, _ = sync_line(first.stdout)
    assert (sent, unchanged) == ("5", "0")  # pyproject.toml app.py helper.py conf/config.yaml notes.txt

    (project / "helper.py").write_text("def answer():\n    return 'two'\n")
    second = run_sweep(project, "x=1,2", *only_host1, "hydra.sweep.dir=sweep2", app=project / "app.py")
    assert second.returncode == 0, second.stderr
    assert sync_line(second.stdout)[1:] == (remote_copy, "1", "31", "4", "1")  # the first launch's snapshot goes
    assert (project / "sweep2" / "0" / "answer.txt").read_text() == "two"  # the code as it was at launch

    namesake = make_project(tmp_path / "second" / "proj", answer="other")
    third = run_sweep(namesake, "x=1", *only_host1, app=namesake / "app.py")
    assert third.returncode == 0, third.stderr
    assert sync_line(third.stdout)[1] != remote_copy
    assert (namesake / "sweep" / "0" / "answer.txt").read_text() == "other"


WORKING_DIRECTORY_APP = """
import os
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base='1.3', config_path=None, config_name=None)
def main(cfg):
    if HydraConfig.get().job.chdir:
        seen = os.path.basename(os.getcwd())  # the job's own dir
    else:
        with open('data/input.txt') as data:  # relative to where the app was launched
            seen = data.read()
    with open(os.path.join(HydraConfig.get().runtime.output_dir, 'out.txt'), 'w') as out:
        out.write(f'{cfg.x} {seen}')
    if cfg.relative:
        with open('rel.txt', 'w') as relative:
            relative.write(str(cfg.x))

if __name__ == '__main__':
    main()
"""


def test_hydra_working_directory_modes_on_a_remote(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    """chdir=true: the job runs in its output dir and relative writes come back; chdir=false:
    it runs in the project copy (relative reads work), output_dir writes come back and a
    relative write fails with the fix instead of vanishing; output_subdir=null: no .hydra."""
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "data" / "input.txt").write_text("project")
    (project / "pyproject.toml").write_text("")
    (project / "app.py").write_text(WORKING_DIRECTORY_APP)

    def sweep(name: str, *overrides: str) -> subprocess.CompletedProcess[str]:
        return run_sweep(project, f"hydra.sweep.dir={name}", "+x=1,2", *overrides, *remotes_only(ssh_hosts[:1]),
                         app=project / "app.py")

    def outputs(name: str, *files: str) -> list[list[str | None]]:
        return [[path.read_text() if path.is_file() else None for path in (project / name / str(num) / file
                                                                          for file in files)] for num in (0, 1)]

    moved = sweep("moved", "hydra.job.chdir=true", "+relative=true")
    assert moved.returncode == 0, moved.stderr
    assert outputs("moved", "out.txt", "rel.txt", ".hydra/config.yaml")[0][:2] == ["1 0", "1"]
    assert outputs("moved", "out.txt", "rel.txt")[1] == ["2 1", "2"]
    assert all(row[2] for row in outputs("moved", "out.txt", "rel.txt", ".hydra/config.yaml"))

    kept = sweep("kept", "hydra.job.chdir=false", "+relative=false")
    assert kept.returncode == 0, kept.stderr
    assert outputs("kept", "out.txt", "rel.txt") == [["1 project", None], ["2 project", None]]

    stray = sweep("stray", "hydra.job.chdir=false", "+relative=true")
    assert [record["status"] for record in ends(project / "stray")] == ["failed", "failed"]
    assert "PermissionError: [Errno 13] Permission denied: 'rel.txt'" in stray.stderr, stray.stderr
    assert "failed on host1 after" in stray.stdout and "(Cannot write 'rel.txt': the job's working directory" \
        " here is this machine's read-only copy of the project (hydra.job.chdir=false), so nothing written there" \
        " would come back. Fix: write into HydraConfig.get().runtime.output_dir" in stray.stdout, stray.stdout
    assert outputs("stray", "out.txt") == [["1 project"], ["2 project"]]  # what it wrote before still came back
    assert not list(Path(ssh_hosts[0].home, ".hsm", "projects").glob("*/snapshots/*/rel.txt"))

    bare = sweep("bare", "hydra.output_subdir=null", "+relative=false")
    assert bare.returncode == 0, bare.stderr
    assert outputs("bare", "out.txt", ".hydra/config.yaml") == [["1 project", None], ["2 project", None]]
    assert (project / "bare" / "0" / "app.log").is_file()


def test_ssh_config_aliases_and_proxyjump_are_honoured(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    """host: an alias of ~/.ssh/config; its HostName, Port, User, IdentityFile and ProxyJump apply."""
    host1, host2 = ssh_hosts
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(f"""
Host lab-gateway
    HostName 127.0.0.1
    Port {host1.port}
    User {host1.user}
Host lab-node
    HostName 127.0.0.1
    Port {host2.port}
    User {host2.user}
    ProxyJump lab-gateway
Host *
    IdentityFile {hosts.BASE / 'client_key'}
    UserKnownHostsFile {hosts.BASE / 'known_hosts'}
""")
    python = str(hosts.host_python_env())
    shown = run_sweep(
        tmp_path, "task=who_runs", "x=1,2", "hydra.launcher.local.enabled=false",
        remote_override("gateway", {"host": "lab-gateway", "python": python}),
        env={**os.environ, "HOME": str(home)},
    )
    assert shown.returncode == 0, shown.stderr
    assert [(tmp_path / "sweep" / str(n) / "who.txt").read_text() for n in range(2)] == ["hsm-host1"] * 2
    jumped = run_sweep(
        tmp_path, "task=who_runs", "x=1", "hydra.launcher.local.enabled=false", "hydra.sweep.dir=jumped",
        remote_override("node", {"host": "lab-node", "python": python}),
        env={**os.environ, "HOME": str(home)},
    )
    assert jumped.returncode == 0, jumped.stderr
    assert (tmp_path / "jumped" / "0" / "who.txt").read_text() == "hsm-host2"
    assert "Accepted publickey for hsm-host2" in (host2.directory / "sshd.log").read_text()


def test_setup_lines_and_env_reach_the_remote_job(launch_jobs: Launch, ssh_hosts: list[hosts.SshHost]) -> None:
    tricky = "spaces, $(touch /tmp/hsm-pwned) and 'quotes'"
    [returns] = launch_jobs(
        tasks.environment, [[["+names=[FROM_SETUP,HSM_TRICKY]"]]],
        remotes_only(ssh_hosts[:1], setup=["FROM_SETUP=yes", "export FROM_SETUP"], env={"HSM_TRICKY": tricky}),
    )
    assert returns[0].return_value == {"FROM_SETUP": "yes", "HSM_TRICKY": tricky}
    assert not Path("/tmp/hsm-pwned").exists()


def test_a_long_job_s_outputs_arrive_while_it_runs(launch_jobs: Launch, ssh_hosts: list[hosts.SshHost],
                                                   tmp_path: Path) -> None:
    seen_early: list[str] = []

    def watch() -> None:
        progress = tmp_path / "sweep" / "0" / "progress.txt"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen_early:
            if progress.exists():
                seen_early.append(progress.read_text())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    [returns] = launch_jobs(tasks.slow_with_progress, [[["+seconds=4"]]],
                            [*remotes_only(ssh_hosts[:1]), "hydra.launcher.collect_interval=0.5"])
    watcher.join()
    assert seen_early == ["started"]
    assert returns[0].return_value == "done"
    assert (tmp_path / "sweep" / "0" / "progress.txt").read_text() == "finished"


@pytest.mark.parametrize("strategy", ["round_robin", "least_loaded", "capability_based"])
def test_each_strategy_completes_a_sweep(launch_jobs: Launch, ssh_hosts: list[hosts.SshHost], strategy: str) -> None:
    [returns] = launch_jobs(
        tasks.who_runs, [[[f"x={x}", "+sleep=0.3"] for x in range(8)]],
        [f"hydra.launcher.strategy={strategy}", "hydra.launcher.local.max_parallel_jobs=1",
         remote_override("host1", ssh_hosts[0].source_config(weight=3)),
         remote_override("host2", ssh_hosts[1].source_config())],
    )
    assert [r.return_value[0] for r in returns] == list(range(8))


def test_more_jobs_at_once_than_sshd_sessions_share_one_connection(launch_jobs: Launch,
                                                                   ssh_hosts: list[hosts.SshHost]) -> None:
    """12 slots on one host (sshd's MaxSessions is 10): one login, every job completes."""
    log = ssh_hosts[0].directory / "sshd.log"
    logins_before = log.read_text().count("Accepted publickey")
    [returns] = launch_jobs(tasks.sleep_and_time, [[[f"x={x}", "+sleep=5"] for x in range(12)]],
                            remotes_only(ssh_hosts[:1], max_parallel_jobs=12))
    assert [r.return_value for r in returns] == list(range(12))
    times = [json.loads((Path(r.hydra_cfg.hydra.runtime.output_dir) / "times.json").read_text()) for r in returns]
    assert max(t["start"] for t in times) < min(t["end"] for t in times)  # at one moment all twelve ran
    assert log.read_text().count("Accepted publickey") - logins_before == 1


def test_a_slot_takes_the_next_job_while_the_last_one_s_outputs_come_back(launch_jobs: Launch,
                                                                          ssh_hosts: list[hosts.SshHost],
                                                                          tmp_path: Path) -> None:
    """One slot: job 1 starts while job 0's 512 MiB output is still being pulled."""
    [returns] = launch_jobs(tasks.big_sparse_output, [[["x=0", "+gigabytes=0.5"], ["x=1", "+gigabytes=0"]]],
                            remotes_only(ssh_hosts[:1], max_parallel_jobs=1))
    assert [r.return_value for r in returns] == [0, 1]
    assert (tmp_path / "sweep" / "0" / "big.bin").stat().st_size == 512 * 1024**2
    second_started = next(r["time"] for r in starts(tmp_path / "sweep") if r["num"] == 1)
    first_ended = next(r["time"] for r in ends(tmp_path / "sweep") if r["num"] == 0)
    assert second_started < first_ended


MAIN_TARGET_APP = Path(__file__).parent / "main_target_app.py"


@pytest.mark.parametrize("where", ["local", "ssh"])
@pytest.mark.parametrize("run_as", ["script", "module"])
def test_main_targets_resolve_in_jobs(tmp_path: Path, ssh_hosts: list[hosts.SshHost], where: str,
                                      run_as: str) -> None:
    """`_target_: __main__.model` resolves in every job, as with Hydra's own launcher, whether
    the app runs as a script or as `python -m`, on this machine or a remote one."""
    program = [str(MAIN_TARGET_APP)] if run_as == "script" else ["-m", MAIN_TARGET_APP.stem]
    sources = remotes_only(ssh_hosts[:1]) if where == "ssh" else []
    run = subprocess.run([sys.executable, *program, "-m", "hydra/launcher=hsm_distributed", "model.width=2,3",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", *sources],
                         cwd=MAIN_TARGET_APP.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    module = "__mp_main__" if run_as == "script" else MAIN_TARGET_APP.stem
    for num, width in enumerate((2, 3)):
        assert json.loads((tmp_path / "sweep" / str(num) / "made.json").read_text()) == {"width": width,
                                                                                        "module": module}


ZEN_APP = Path(__file__).parent / "zen_app.py"


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_a_hydra_zen_app_launches_its_sweep_here_and_remotely(tmp_path: Path, ssh_hosts: list[hosts.SshHost],
                                                             where: str) -> None:
    """`hydra_zen.launch(Config, task, multirun=True, overrides=["hydra/launcher=hsm_distributed"])`
    with a `builds` config of a function of the script (`__main__.model`): each job's value comes back."""
    sources = remotes_only(ssh_hosts[:1]) if where == "ssh" else []
    run = subprocess.run([sys.executable, str(ZEN_APP), str(tmp_path / "sweep"), "model.width=2,3", "seed=5",
                          *sources], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    returned = json.loads(run.stdout.splitlines()[-1])
    assert returned == [{"width": width, "depth": 2, "module": "__mp_main__", "seed": 5, "same_class": True}
                        for width in (2, 3)]
    expected_source = "host1" if where == "ssh" else "local"
    assert {record["source"] for record in ends(tmp_path / "sweep")} == {expected_source}


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_hydra_callbacks_run_in_each_job_s_process(tmp_path: Path, ssh_hosts: list[hosts.SshHost], where: str) -> None:
    """on_job_start/on_job_end in each job's process, here or remote (their files come back
    with its outputs); on_multirun_start and on_multirun_end once each, in the launcher."""
    run = run_sweep(tmp_path, "x=1,2,3", "+hydra.callbacks.mark._target_=tasks.MarkCallback",
                    *(remotes_only(ssh_hosts[:1]) if where == "ssh" else []))
    assert run.returncode == 0, run.stderr
    for num in range(3):
        job_dir = tmp_path / "sweep" / str(num)
        assert (job_dir / "callback-start").read_text().isdigit()
        assert (job_dir / "callback-end").read_text() == "COMPLETED"
    marks = (tmp_path / "sweep" / "callback-multirun").read_text().split()
    assert marks[0::2] == ["start", "end"] and marks[1] == marks[3]  # once each, in the same process
    assert marks[1] not in {(tmp_path / "sweep" / str(num) / "callback-start").read_text() for num in range(3)}
    assert not list(Path(sweep_outputs_folder(str(ssh_hosts[0].home), str(tmp_path / "sweep"))).glob("callback-*"))


INTERACTIVE_APP = """
import json, sys
from hydra_zen import builds, instantiate, launch, make_config

def model(width: int) -> dict:
    return {"width": width, "made_in": __name__}

BIG = bytes(20_000_000)

def size() -> int:  # a function that takes a big global along: not sent
    return len(BIG)

Config = make_config(model=builds(model, width=1))

def task(cfg):
    return instantiate(cfg.model)

(jobs,) = launch(Config, task, multirun=True, version_base="1.3",
                 overrides=["hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep", "model.width=2,3",
                            *sys.argv[1:]])
print(json.dumps([job.return_value for job in jobs]))
"""


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_an_interactive_session_s_main_targets_resolve_in_jobs(tmp_path: Path, ssh_hosts: list[hosts.SshHost],
                                                             where: str) -> None:
    """A notebook or `python -` has no file the jobs could load: its functions travel by value,
    so `builds(model)` of a function typed in there (`_target_: __main__.model`) resolves;
    one that would take 20 MB of data along stays behind, with a line."""
    sources = remotes_only(ssh_hosts[:1]) if where == "ssh" else []
    run = subprocess.run([sys.executable, "-", *sources], input=INTERACTIVE_APP, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == [{"width": 2, "made_in": "__main__"},
                                                       {"width": 3, "made_in": "__main__"}]
    assert "could not be loaded" not in run.stderr
    assert "__main__.size stays here: with what it uses it is over 8 MiB" in run.stdout, run.stdout
    assert {record["source"] for record in ends(tmp_path / "sweep")} == {"host1" if where == "ssh" else "local"}


BIG_GLOBAL_APP = """
import resource, sys
from hydra_zen import launch, make_config

BIG = b"x" * (int(sys.argv[1]) << 20)  # written: resident

def size() -> int:  # takes BIG along: left behind, without being pickled whole first
    return len(BIG)

def task(cfg):
    return cfg.x

launch(make_config(x=0), task, multirun=True, version_base="1.3",
       overrides=["hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep", "x=1,2"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
"""


def test_a_notebook_function_with_a_big_global_costs_no_second_copy(tmp_path: Path) -> None:
    """300 MiB of notebook data: the launcher's peak memory grows by that, not twice that."""
    def peak_mib(big_mib: int) -> int:
        run = subprocess.run([sys.executable, "-", str(big_mib)], input=BIG_GLOBAL_APP, cwd=tmp_path / str(big_mib),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return int(run.stdout.splitlines()[-1])

    for big_mib in (0, 300):
        (tmp_path / str(big_mib)).mkdir()
    grown = peak_mib(300) - peak_mib(0)
    print(f"peak memory grew by {grown} MiB for 300 MiB of data")
    assert grown < 450
