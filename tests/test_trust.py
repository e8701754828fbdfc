"""Ordinary conditions of real sweeps: rewritten checkpoints, large outputs, two sweeps of one
project, secrets and links in the project, hostile output names, a chatty login shell, a
host that lacks a package. Real sshd hosts unless a test checks pure logic."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import re
import shutil
import stat
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
from hosts import SshHost, wait_until
from hsm_core import files, journal, sync
from hsm_core.settings import SyncSettings
from hsm_core.sources.agent import AgentClient

SWEEP_APP = Path(__file__).parent / "sweep_app.py"


# -- 1. a failed pull never leaves a job running ------------------------------------------


def test_a_checkpoint_rewritten_in_a_tight_loop_is_pulled_and_the_job_runs_once(
        launch_jobs: Launch, ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    [returns] = launch_jobs(tasks.rewrite_checkpoint, [[["+seconds=5"]]],
                            [*remotes_only(ssh_hosts[:1]), "hydra.launcher.collect_interval=1"])
    assert returns[0].status is JobStatus.COMPLETED, returns[0]._return_value
    written = returns[0].return_value
    job_dir = tmp_path / "sweep" / "0"
    assert len(list(job_dir.glob("attempt-*.txt"))) == 1  # one attempt ran, start to end
    assert (job_dir / "final.txt").read_text() == str(written)
    assert (job_dir / "ckpt.pt").read_text() == f"checkpoint {written}\n" * 1000  # the last one
    assert not list(job_dir.glob("*.hsm-part")) and not (job_dir / "ckpt.tmp").exists()
    assert [r["status"] for r in ends(tmp_path / "sweep")] == ["completed"]
    assert len(starts(tmp_path / "sweep")) == 1


# -- 2. a slow operation never kills a host's jobs ------------------------------------------


def test_the_agent_hashing_a_large_tree_still_hears_the_launcher(tmp_path: Path) -> None:
    """A worker agent with a 0.5 s silence limit hashes 3 GiB (seconds of work) for the
    launcher: it answers, and stays up for the next request."""
    big = tmp_path / "outputs"
    big.mkdir()
    with open(big / "big.bin", "wb") as file:
        file.truncate(3 * 1024**3)

    async def scenario() -> tuple[float, dict, list]:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "hsm_core.worker",
                                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdin is not None
        agent = AgentClient("probe", process.stdout, process.stdin)
        try:
            await agent.start(heartbeat=0.1, silence_limit=0.5)
            began = time.monotonic()
            tree = await asyncio.wait_for(agent.call("tree", str(big)), 120)
            took = time.monotonic() - began
            again = await asyncio.wait_for(agent.call("tree", str(tmp_path / "missing")), 10)
            return took, tree, again
        finally:
            await agent.close()
            await process.wait()

    took, tree, again = asyncio.run(scenario())
    print(f"hashing 3 GiB took {took:.1f} s against a 0.5 s silence limit")
    assert took > 0.5  # the work outlasted the silence limit: the test would catch a blocked loop
    assert tree["big.bin"][0] == 3 * 1024**3
    assert again == {}


def test_a_multi_gigabyte_output_does_not_stop_the_other_jobs_of_its_host(
        launch_jobs: Launch, ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    [returns] = launch_jobs(
        tasks.big_sparse_output,
        [[["x=0", "+gigabytes=2", "+sleep=1"], ["x=1", "+gigabytes=0", "+sleep=6"]]],
        [*remotes_only(ssh_hosts[:1]), "hydra.launcher.keepalive_interval=1", "hydra.launcher.keepalive_count_max=3",
         "hydra.launcher.collect_interval=1"],
    )
    assert [r.return_value for r in returns] == [0, 1]
    assert (tmp_path / "sweep" / "0" / "big.bin").stat().st_size == 2 * 1024**3
    assert [r["status"] for r in ends(tmp_path / "sweep")] == ["completed", "completed"]  # nothing lost


# -- 3. concurrent sweeps of one project -----------------------------------------------------


SLOW_APP = '''
import time
import hydra
import helper

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    time.sleep(cfg.sleep)
    out = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    with open(out + "/answer.txt", "w") as f:
        f.write(helper.answer())

if __name__ == "__main__":
    main()
'''


def start_app(project: Path, *overrides: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(project / "app.py"), "-m", "hydra/launcher=hsm_distributed",
                             *overrides], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_sweeps_of_one_project_each_run_their_own_code(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'proj'\nversion = '0'\n")
    (project / "app.py").write_text(SLOW_APP)
    (project / "helper.py").write_text("def answer():\n    return 'A'\n")
    only_host1 = remotes_only(ssh_hosts[:1], max_parallel_jobs=4)
    first = start_app(project, "+x=1,2", "+sleep=6", "hydra.sweep.dir=sweepA", *only_host1)
    assert wait_until(lambda: len(starts(project / "sweepA")) == 2, 60), "sweep A did not start"
    (project / "helper.py").write_text("def answer():\n    return 'B'\n")
    same_dir = start_app(project, "+x=1", "+sleep=0", "hydra.sweep.dir=sweepA", *only_host1)
    refused = same_dir.communicate(timeout=120)[0]
    second = start_app(project, "+x=1,2", "+sleep=0", "hydra.sweep.dir=sweepB", *only_host1)
    out_b = second.communicate(timeout=180)[0]
    out_a = first.communicate(timeout=180)[0]
    assert first.returncode == 0 and second.returncode == 0, out_a + out_b
    assert first.poll() is not None and "another launch is using the sweep dir" in refused
    assert same_dir.returncode == 1 and "Traceback" not in refused
    assert [(project / "sweepA" / str(n) / "answer.txt").read_text() for n in (0, 1)] == ["A", "A"]
    assert [(project / "sweepB" / str(n) / "answer.txt").read_text() for n in (0, 1)] == ["B", "B"]
    assert len(ends(project / "sweepA")) == 2  # the refused launch added nothing to A's journal


# -- 4. secrets and links do not travel ---------------------------------------------------------


LISTING_APP = """
import pathlib, hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    root = pathlib.Path(HydraConfig.get().runtime.cwd)
    seen = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    (pathlib.Path(HydraConfig.get().runtime.output_dir) / "seen.txt").write_text(" ".join(seen))

if __name__ == "__main__":
    main()
"""


def test_secrets_and_outside_links_stay_here(ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / ".aws").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / "app.py").write_text(LISTING_APP)
    for secret in (".env", ".env.local", "id_rsa", "server.pem", "credentials.json", ".aws/config"):
        (project / secret).write_text("secret")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the project's")
    (project / "linked.txt").symlink_to(outside)
    (project / "alias.py").symlink_to(project / "app.py")

    def sweep(sweep_dir: str, *extra: str) -> str:
        shown = subprocess.run([sys.executable, str(project / "app.py"), "-m", "hydra/launcher=hsm_distributed",
                                "+x=1", f"hydra.sweep.dir={sweep_dir}", *remotes_only(ssh_hosts[:1]), *extra],
                               cwd=project, capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        return shown.stdout

    log = sweep("plain")
    assert (project / "plain" / "0" / "seen.txt").read_text() == "alias.py app.py pyproject.toml"
    assert "Not sent to remote machines (links that point outside the project): linked.txt ->" in log
    assert "Not sent to remote machines (credentials; list them in sync.include to send them): .aws" in log
    sweep("included", "hydra.launcher.sync.include=[.env]")
    assert (project / "included" / "0" / "seen.txt").read_text() == ".env alias.py app.py pyproject.toml"


def test_a_home_directory_project_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".git").mkdir()
    (tmp_path / "code").mkdir()
    with pytest.raises(sync.SyncError, match="would be your home directory"):
        sync.find_project_root(tmp_path / "code")


def test_python_environments_in_the_project_never_travel(tmp_path: Path) -> None:
    """A venv or conda env of any name inside the project stays here (the bench once made one
    and every sweep sent its 1,200 files)."""
    for folder, marker in (("tools/py311", "pyvenv.cfg"), ("envs/conda-ml", "conda-meta/history")):
        (tmp_path / folder / "lib").mkdir(parents=True)
        (tmp_path / folder / "lib" / "site.py").write_text("")
        (tmp_path / folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / marker).write_text("")
    (tmp_path / "tools" / "helper.py").write_text("")
    (tmp_path / "train.py").write_text("")
    assert sorted(sync.project_files(tmp_path, SyncSettings()).tree) == ["tools/helper.py", "train.py"]


def test_a_project_scan_cut_short_by_a_batchs_end_is_done_again_for_the_next(tmp_path: Path) -> None:
    """An adaptive sweeper's batch can end (its loop closed, its tasks cancelled) while an SSH
    source still scans the project: the next batch scans it again instead of failing the sweep
    with CancelledError (found with a project of 1,200 files and Optuna)."""
    (tmp_path / "train.py").write_text("")
    project = sync.Project(SyncSettings())
    project.folder = tmp_path

    async def batch_ending_during_the_scan() -> None:
        asyncio.ensure_future(project.listing())
        await asyncio.sleep(0)

    asyncio.run(batch_ending_during_the_scan())
    assert project._listing is not None and project._listing.cancelled()
    root, found = asyncio.run(project.listing())
    assert root == tmp_path and list(found.tree) == ["train.py"]


def test_which_files_travel_is_pure_logic(tmp_path: Path) -> None:
    rule = sync.FileRule(SyncSettings(include=(".env.example", "data/keep.csv"), exclude=("*.ckpt",)))
    assert not rule.sends(".env") and rule.sends(".env.example") and not rule.sends("a/.ssh")
    assert rule.sends("src/model.py") and not rule.sends("model.ckpt") and not rule.sends(".venv/x.py")
    assert rule.enters("data") and rule.sends("data/keep.csv")
    assert rule.keeps_secret(".env") and not rule.keeps_secret("model.ckpt")


# -- 5. outputs come back inside the job's dir only ---------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape.txt", "a/../../escape.txt", "a//b", "./x"])
def test_output_names_that_leave_the_job_dir_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(sync.UnsafeOutput):
        sync.inside(tmp_path / "job", name)


def test_an_output_through_a_local_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "sub").symlink_to(tmp_path)
    with pytest.raises(sync.UnsafeOutput, match="through a link"):
        sync.inside(tmp_path / "job", "sub/file.txt")
    assert sync.inside(tmp_path / "job", "deep/file.txt") == tmp_path / "job" / "deep" / "file.txt"


def test_an_output_that_would_land_through_a_local_link_fails_its_job_while_it_runs(
        launch_jobs: Launch, ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    """The local job dir holds a link `sub` to a folder outside it; the remote job writes
    sub/file.txt and keeps running: the pull refuses it, the job is stopped and fails with
    that refusal, and nothing lands outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "sub").symlink_to(outside)
    began = time.monotonic()
    [returns] = launch_jobs(tasks.write_then_wait, [[["+name=sub/file.txt", "+sleep=60"]]],
                            [*remotes_only(ssh_hosts[:1]), "hydra.launcher.collect_interval=1"])
    assert time.monotonic() - began < 40  # stopped, not waited for
    assert returns[0].status is JobStatus.FAILED
    refused = r"failed on host1:\nthe output 'sub/file.txt' would land outside the job's dir \(through a link\)"
    with pytest.raises(Exception, match=refused):  # the refusal itself, not a failed collection
        returns[0].return_value
    assert list(outside.iterdir()) == []


def test_remote_mode_bits_are_masked(launch_jobs: Launch, ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    [returns] = launch_jobs(tasks.privileged_looking_output, [[["x=1"]]], remotes_only(ssh_hosts[:1]))
    assert returns[0].return_value == "0o4777"  # as the job left it on the remote
    mode = stat.S_IMODE((tmp_path / "sweep" / "0" / "tool.sh").stat().st_mode)
    assert mode == 0o755


def test_a_subdir_outside_the_sweep_dir_is_refused_before_anything_is_deleted(launch_jobs: Launch,
                                                                            tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    [returns] = launch_jobs(tasks.square, [[["x=1"], ["x=2"]]], ["hydra.sweep.subdir=.."])
    assert [r.status for r in returns] == [JobStatus.FAILED] * 2
    with pytest.raises(Exception, match="hydra.sweep.subdir is '..', which is not a folder inside"):
        returns[0].return_value
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("subdir, values, ok, message", [
    ("same", "1,2,3", [True, False, False], "hydra.sweep.subdir is 'same' for job #1, which would mix its outputs"
                                            " with job #0's. Fix: make it name one folder per job"),
    ("d${x}", "a,a/b,c", [True, False, True], "hydra.sweep.subdir is 'da/b' for job #1, which would mix its"
                                              " outputs with job #0's"),
    (".hsm/${hydra.job.num}", "1,2", [False, False], "hydra.sweep.subdir is '.hsm/0', inside the launcher's own"
                                                     " .hsm folder"),
])
def test_a_job_dir_shared_with_another_job_or_the_launcher_is_refused_before_it_runs(
        launch_jobs: Launch, tmp_path: Path, subdir: str, values: str, ok: list[bool], message: str) -> None:
    [returns] = launch_jobs(tasks.echo_value, [[[f"+value={value}", f"x={value}"] for value in values.split(",")]],
                            [f"hydra.sweep.subdir={subdir}"])
    assert [job.status == JobStatus.COMPLETED for job in returns] == ok
    failed = next(job for job in returns if job.status == JobStatus.FAILED)
    with pytest.raises(Exception, match=re.escape(message)):
        failed.return_value
    assert {record["num"] for record in starts(tmp_path / "sweep")} == {num for num, good in enumerate(ok) if good}


# -- 9. a chatty login shell; keys and GPUs that cannot be read ------------------------------------


def test_a_host_whose_login_shell_prints_a_banner_runs_jobs(launch_jobs: Launch, ssh_hosts: list[SshHost]) -> None:
    chatty = ssh_hosts[1]
    banner = subprocess.run(["ssh", "-p", str(chatty.port), "-i", str(hosts.BASE / "client_key"),
                             "-o", f"UserKnownHostsFile={hosts.BASE / 'known_hosts'}", "-o", "BatchMode=yes",
                             f"{chatty.user}@127.0.0.1", "true"], capture_output=True, text=True, timeout=30)
    assert hosts.CHATTY_BANNER in banner.stdout  # the host really is chatty
    [returns] = launch_jobs(tasks.who_runs, [[[f"x={x}"] for x in range(3)]],
                            remotes_only([chatty], setup=["echo a setup line that prints"]))
    assert [r.return_value for r in returns] == [[x, chatty.user] for x in range(3)]


# -- 10. a host that cannot load the task leaves the sweep ------------------------------------------


def test_a_host_missing_a_package_leaves_and_its_jobs_run_elsewhere(tmp_path: Path,
                                                                    ssh_hosts: list[SshHost]) -> None:
    packages = tmp_path / "only_here"  # on this machine's path, outside the project: never sent
    (packages / "labtools").mkdir(parents=True)
    (packages / "labtools" / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "app.py").write_text(
        "import time, hydra, labtools\n\n"
        "@hydra.main(version_base='1.3', config_path=None, config_name=None)\n"
        "def main(cfg):\n    time.sleep(1)\n    return labtools.double(cfg.x)\n\n"
        "if __name__ == '__main__':\n    main()\n")
    (project / "pyproject.toml").write_text("")
    logins_before = (ssh_hosts[0].directory / "sshd.log").read_text().count("Accepted publickey")
    shown = subprocess.run(
        [sys.executable, str(project / "app.py"), "-m", "hydra/launcher=hsm_distributed", "+x=1,2,3,4",
         "hydra.sweep.dir=sweep", "hydra.launcher.local.max_parallel_jobs=1",
         remote_override("host1", ssh_hosts[0].source_config())],
        cwd=project, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(packages)})
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "Source host1 is out of this sweep: the task could not be loaded here (ModuleNotFoundError:" \
           " No module named 'labtools'). Fix: install what it imports" in shown.stdout, shown.stdout
    assert "reconnecting" not in shown.stdout
    records = ends(project / "sweep")
    assert sorted(r["num"] for r in records) == [0, 1, 2, 3]
    assert {r["source"] for r in records} == {"local"} and {r["status"] for r in records} == {"completed"}
    logins = (ssh_hosts[0].directory / "sshd.log").read_text().count("Accepted publickey") - logins_before
    assert logins == 1  # left at once: not retried as a lost connection
    changes = [(r["source"], r["change"]) for r in journal.read(project / "sweep") if r["event"] == "source"]
    assert changes == [("host1", "left")]
    status = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "status", "sweep"], cwd=project,
                            capture_output=True, text=True, timeout=60)
    assert "source host1 left the sweep: the task could not be loaded here (ModuleNotFoundError" in status.stdout


# -- a real adaptive sweeper over SSH: its plugin's enums must not travel --------------------------


def test_optuna_over_local_and_ssh_finds_what_the_basic_launcher_finds(tmp_path: Path,
                                                                      ssh_hosts: list[SshHost]) -> None:
    """A 20-trial study in batches of 5 (n_jobs) over this machine and one SSH host."""
    study = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=5",
             "hydra.sweeper.sampler.seed=7", "task=square", "x=choice(-3,-2,-1,0,1,2,3)"]

    def best(*launcher: str, sweep_dir: str) -> tuple[str, str]:
        shown = subprocess.run([sys.executable, str(SWEEP_APP), "-m", *study, f"hydra.sweep.dir={sweep_dir}",
                                *launcher], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        value = [line.split("[HYDRA] ")[1] for line in shown.stdout.splitlines() if "Best value" in line][0]
        return value, shown.stdout

    basic, _ = best(sweep_dir="basic")
    ours, shown = best("hydra/launcher=hsm_distributed", remote_override("host1", ssh_hosts[0].source_config()),
                       sweep_dir="ssh")
    assert ours == basic
    assert {r["source"] for r in ends(tmp_path / "ssh")} == {"local", "host1"}
    assert len(ends(tmp_path / "ssh")) == 20
    # Four batches of 5, counted as one sweep of 20 (n_trials), with one summary at its end.
    counted = [int(line.split("] [")[1].split("/")[0]) for line in shown.splitlines() if " completed on " in line]
    assert sorted(counted) == list(range(1, 21))
    assert all("/20] job" in line for line in shown.splitlines() if " completed on " in line)
    assert shown.count("SOURCE  JOBS") == 1


def _launches(root: str, snapshot: str, seconds: float, failures: "multiprocessing.Queue[str]") -> None:
    """A launch over and over: lease its snapshot, check the files it runs are there, let go."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            target, lease = files.build_snapshot(root, snapshot, {"train.py": "a" * 64, "conf/c.yaml": "b" * 64})
            for _ in range(3):
                if Path(target, "train.py").read_text() != "print(1)\n" or not Path(target, "conf/c.yaml").exists():
                    failures.put(f"{snapshot}: a leased snapshot lost its files")
                time.sleep(0.001)
            os.close(lease)
    except Exception as error:  # any error is a failed launch
        failures.put(f"{snapshot}: {type(error).__name__}: {error}")


def _cleanups(root: str, seconds: float, failures: "multiprocessing.Queue[str]") -> None:
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            files.remove_unused(root, keep="none")
    except Exception as error:
        failures.put(f"cleanup: {type(error).__name__}: {error}")


def test_snapshot_cleanups_never_remove_a_leased_snapshot_nor_fail(tmp_path: Path) -> None:
    """Three launches (two of one snapshot) and two cleanups, each in a tight loop for 4 s."""
    objects = tmp_path / files.OBJECTS
    objects.mkdir()
    (objects / ("a" * 64)).write_text("print(1)\n")
    (objects / ("b" * 64)).write_text("x: 1\n")
    failures: multiprocessing.Queue[str] = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_launches, args=(str(tmp_path), name, 4.0, failures))
               for name in ("s1", "s1", "s2")]
    workers += [multiprocessing.Process(target=_cleanups, args=(str(tmp_path), 4.0, failures)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * 5
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert sorted(set(found)) == []


def test_a_file_saved_while_it_is_sent_is_never_stored_under_the_old_hash(tmp_path: Path,
                                                                         ssh_hosts: list[SshHost]) -> None:
    """A project file rewritten in place the whole time (an editor saving, a log): what the
    machine received never matches what the launch hashed, so it is refused and named, and
    every object in the machine's store is the content its name says."""
    app = tmp_path / "busy_project"
    app.mkdir()
    (app / "pyproject.toml").write_text("[project]\nname = 'busy'\n")
    (app / "app.py").write_text(APP_RETURNING_ONE)
    notes = app / "notes.txt"
    notes.write_bytes(b"a" * (4 << 20))
    stop = threading.Event()

    def keep_saving() -> None:
        with open(notes, "r+b") as file:
            for turn in itertools.cycle(b"ab"):
                if stop.is_set():
                    return
                file.seek(0)
                file.write(bytes([turn]) * (4 << 20))
                file.flush()

    saver = threading.Thread(target=keep_saving)
    saver.start()
    try:
        shown = subprocess.run([sys.executable, str(app / "app.py"), "-m", "hydra/launcher=hsm_distributed",
                                "hydra.sweep.dir=sweep", "+x=1", *remotes_only(ssh_hosts[:1])],
                               cwd=app, capture_output=True, text=True, timeout=180)
    finally:
        stop.set()
        saver.join()
    assert shown.returncode == 1
    assert "notes.txt changed while it was sent (it was saved after this launch read it)" in shown.stderr, shown.stderr
    stores = list(ssh_hosts[0].home.glob(".hsm/projects/busy_project-*/objects"))
    assert len(stores) == 1
    stored = [path for path in stores[0].iterdir() if ".part" not in path.name]
    assert stored and all(files.sha256_of(str(path)) == path.name.removesuffix("x") for path in stored)
    assert not [path for path in stores[0].iterdir() if ".part" in path.name]  # nothing half-sent left


APP_RETURNING_ONE = """
import hydra

@hydra.main(version_base="1.3", config_path=None)
def main(cfg):
    return 1

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_every_folder_the_agent_makes_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """os.makedirs leaves the folders above the last to the umask; the store and requests must not."""
    previous = os.umask(umask)
    try:
        files.private_dirs(str(tmp_path / ".hsm" / "slurm" / "ab12" / "jobs"))
        files.build_snapshot(str(tmp_path / "store"), "s1", {})
    finally:
        os.umask(previous)
    made = [tmp_path / ".hsm", *(tmp_path / ".hsm").rglob("*"), tmp_path / "store", *(tmp_path / "store").rglob("*")]
    modes = {str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode) for path in made if path.is_dir()}
    assert modes.pop("store/snapshots/s1") == 0o555  # a snapshot is read-only
    assert set(modes.values()) == {0o700}, modes


def test_a_hsm_folder_others_can_write_is_refused(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    """~/.hsm holds the agent's code: writable by others, anyone could change what jobs run."""
    hsm_folder = ssh_hosts[0].home / ".hsm"
    hsm_folder.mkdir(exist_ok=True)
    shutil.chown(hsm_folder, ssh_hosts[0].user, ssh_hosts[0].user)
    hsm_folder.chmod(0o777)
    try:
        shown = subprocess.run([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed",
                                "hydra.sweep.dir=sweep", "x=1", *remotes_only(ssh_hosts[:1])],
                               cwd=tmp_path, capture_output=True, text=True, timeout=180)
    finally:
        hsm_folder.chmod(0o700)
    assert shown.returncode == 1
    assert (f"host1: {hsm_folder} is writable by others (mode 777): someone else could change the code your jobs"
            f" run. Fix: `chmod go-w {hsm_folder}`") in shown.stderr, shown.stderr


def test_the_hash_cache_keeps_only_the_files_used_last(tmp_path: Path) -> None:
    cache = files.HashCache(limit=3)
    for number in range(5):
        (tmp_path / f"f{number}").write_text(str(number))
        cache.digest(str(tmp_path / f"f{number}"))
    cache.digest(str(tmp_path / "f2"))  # used again: kept over f3
    (tmp_path / "f5").write_text("5")
    cache.digest(str(tmp_path / "f5"))
    assert list(cache._known) == [str(tmp_path / name) for name in ("f4", "f2", "f5")]
