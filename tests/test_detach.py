"""A sweep outlives its launcher (detach_grace): the machines' agents keep running their jobs
when the launcher is killed or its link is cut, and the same command with resume=true adopts
them (never runs them again), collects those that ended meanwhile, and runs only the rest.

Each test counts the task's own invocations (a log every job appends to) and reads the
journal for the fault: `adopted` records, `detached` states, or `lost` ends.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import cloudpickle
import pytest

import browser
import hosts
from conftest import remotes_only
from hosts import SshHost, wait_until
from hsm_core import journal

SWEEP_APP = Path(__file__).parent / "sweep_app.py"
FAST_KEEPALIVE = ["hydra.launcher.keepalive_interval=1", "hydra.launcher.keepalive_count_max=3"]


@pytest.fixture
def calls() -> Iterator[Path]:
    """A log every job appends its start and end to, writable by the hosts' users too."""
    folder = hosts.BASE / f"calls-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    log = folder / "log"
    log.touch()
    log.chmod(0o666)  # local jobs (this user) and the hosts' users append to one file
    yield log
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def command(log: Path, *extra: str, jobs: int = 3, sleep: float = 8) -> list[str]:
    return [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
            "task=patient", f"x=range({jobs})", f"+sleep={sleep}", f"+log={log}", f"+release={log}.release",
            *FAST_KEEPALIVE, *extra]


def invocations(log: Path) -> collections.Counter[str]:
    """How many times each job's task started, and ended ("start 0", "end 0", ...)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return collections.Counter(" ".join(line.split()[:2]) for line in lines)


def records(cwd: Path, event: str) -> list[dict]:
    return [record for record in journal.read(cwd / "sweep") if record["event"] == event]


def kill_once_submitted(cwd: Path, sweep: subprocess.Popen[str], count: int) -> None:
    """SIGKILL the launcher once `count` attempts are on their machines (journal: submitted)."""
    try:
        assert wait_until(lambda: (cwd / "sweep" / ".hsm").exists() and len(records(cwd, "submitted")) >= count,
                          90), "the sweep did not get busy"
    finally:
        sweep.kill()
        sweep.communicate(timeout=30)


def returned(cwd: Path) -> dict[int, object]:
    """Each completed job's return value, as the journal keeps it for resumes."""
    results = cwd / "sweep" / ".hsm" / "results"
    return {end["num"]: cloudpickle.loads((results / f"{end['hash']}.pkl").read_bytes()).return_value
            for end in records(cwd, "end") if end["status"] == "completed"}


def detached_on(cwd: Path, source: str) -> int:
    """How many jobs `hsm distributed status --json` shows as detached on the source."""
    shown = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "status", "sweep", "--json"],
                           cwd=cwd, capture_output=True, text=True, timeout=30)
    return int(json.loads(shown.stdout)["sources"].get(source, {}).get("detached", 0))


def relaunch(cwd: Path, sweep: list[str]) -> str:
    resumed = subprocess.run([*sweep, "hydra.launcher.resume=true"], cwd=cwd, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return resumed.stdout + resumed.stderr


def test_a_killed_launchers_ssh_jobs_run_on_and_the_resumed_sweep_adopts_them(
        ssh_hosts: list[SshHost], tmp_path: Path, calls: Path) -> None:
    """detach_grace=120, jobs of 8 s on an SSH host (2 slots), launcher SIGKILLed while two run:
    they run to their end with no launcher (their own log says so); the re-launch adopts or
    collects them and runs the third; every task ran once; every output is here. The host's
    login shell prints a banner (before the agent, and before the bridge that re-attaches).
    The report shows each job's one attempt, the adopted ones from the first launch to their end."""
    host = ssh_hosts[1]
    sweep = command(calls, "hydra.launcher.detach_grace=120", *remotes_only([host]))
    kill_once_submitted(tmp_path, subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True), 2)
    assert wait_until(lambda: invocations(calls)["end 0"] and invocations(calls)["end 1"], 60), calls.read_text()
    assert host.job_processes(), "the detached agent waits for a launcher"
    shown = relaunch(tmp_path, sweep)
    assert "2 may still run where an earlier launch left them" in shown, shown
    assert invocations(calls) == {f"{what} {x}": 1 for x in range(3) for what in ("start", "end")}
    assert sorted(record["num"] for record in records(tmp_path, "adopted")) == [0, 1]
    assert returned(tmp_path) == {0: 0, 1: 10, 2: 20}
    for x in range(3):
        assert (tmp_path / "sweep" / str(x) / "result.txt").read_text() == str(x * 10)
    assert wait_until(lambda: not host.job_processes(), 20), host.job_processes()  # Shutdown at the end
    with browser.chromium() as chromium:
        data, opened = browser.report_shown(chromium, tmp_path / "sweep")
        assert sorted(browser.shown_attempts(opened)) == [(x, 1, host.name, "completed") for x in range(3)]
        assert opened.page.locator("g.attempt.adopted").count() == 2
    assert [row["job"] for row in data["attempts"] if row.get("adopted")] == [0, 1]
    first_launch_end = data["launches"][0]["end"]
    assert all(row["queued"] < first_launch_end < row["end"] for row in data["attempts"] if row.get("adopted"))


def test_when_the_grace_ends_the_host_stops_the_jobs_and_the_resumed_sweep_runs_them_again(
        ssh_hosts: list[SshHost], tmp_path: Path, calls: Path) -> None:
    """detach_grace=3 and jobs of 60 s: once the launcher is killed the host stops its jobs
    after the grace and leaves nothing running; the re-launch finds them gone (journal: lost,
    and why), and runs them again."""
    host = ssh_hosts[0]
    sweep = command(calls, "hydra.launcher.detach_grace=3", *remotes_only([host]), sleep=60)
    kill_once_submitted(tmp_path, subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True), 2)
    killed_at = time.monotonic()
    assert wait_until(lambda: invocations(calls)["start 1"] == 1, 30)
    assert wait_until(lambda: not host.job_processes(), 30), host.job_processes()
    stopped_after = time.monotonic() - killed_at
    assert stopped_after > 2, f"the jobs stopped {stopped_after:.1f}s after the kill, before the grace ended"
    assert not invocations(calls)["end 0"] and not invocations(calls)["end 1"]
    agents = host.home / ".hsm" / "agents"
    assert [path.suffix for path in agents.iterdir()] == [".log"], "the socket is gone, the agent's log kept"
    assert "no launcher came back within detach_grace (3s)" in next(agents.iterdir()).read_text()
    Path(f"{calls}.release").write_text("")
    relaunch(tmp_path, sweep)
    gone = [end for end in records(tmp_path, "end") if end["status"] == "lost"]
    assert sorted(end["num"] for end in gone) == [0, 1], gone
    assert all("was gone from host1 when the launcher came back" in end["cause"] for end in gone), gone
    assert invocations(calls)["start 0"] == 2 and invocations(calls)["start 1"] == 2
    with browser.chromium() as chromium:
        data, opened = browser.report_shown(chromium, tmp_path / "sweep")
        shown = sorted(browser.shown_attempts(opened))
    assert shown == [(0, 1, host.name, "lost"), (0, 2, host.name, "completed"), (1, 1, host.name, "lost"),
                     (1, 2, host.name, "completed"), (2, 1, host.name, "completed")]
    assert len(data["launches"]) == 2
    assert returned(tmp_path) == {0: 0, 1: 10, 2: 20}
    for path in agents.iterdir():
        path.unlink()


def test_local_jobs_outlive_a_killed_launcher_and_a_second_launch_is_refused_while_one_runs(
        tmp_path: Path, calls: Path) -> None:
    """The local source's agent (its own session) outlives a SIGKILLed launcher with
    detach_grace; while the first launcher runs, the same command is refused by the sweep
    dir's lock; afterwards resume=true adopts the local jobs."""
    sweep = command(calls, "hydra.launcher.detach_grace=60", "hydra.launcher.local.max_parallel_jobs=2")
    first = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_until(lambda: (tmp_path / "sweep" / ".hsm").exists() and len(records(tmp_path, "submitted")) >= 2,
                      90)
    second = subprocess.run([*sweep, "hydra.launcher.resume=true"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode != 0 and "another launch is using the sweep dir" in second.stderr, second.stderr
    kill_once_submitted(tmp_path, first, 2)
    assert wait_until(lambda: invocations(calls)["end 0"] and invocations(calls)["end 1"], 60), calls.read_text()
    relaunch(tmp_path, sweep)
    assert invocations(calls) == {f"{what} {x}": 1 for x in range(3) for what in ("start", "end")}
    assert sorted(record["num"] for record in records(tmp_path, "adopted")) == [0, 1]
    assert returned(tmp_path) == {0: 0, 1: 10, 2: 20}
    adopted_ends = [end for end in records(tmp_path, "end") if end["num"] in (0, 1)]
    assert all(end["end"] - end["start"] > 7 for end in adopted_ends), adopted_ends  # timed from their submission


def test_a_pulled_cable_detaches_the_hosts_jobs_and_they_are_adopted_when_it_is_back(
        ssh_hosts: list[SshHost], netns_host: SshHost, tmp_path: Path, calls: Path) -> None:
    """detach_grace=120: the cable of the only host is pulled for 8 s while two jobs of 12 s
    run (the launcher calls the host lost after ~4 s, the agent stops hearing it): the jobs run
    on, the launcher reconnects and adopts them, and the sweep completes, every task once."""
    sweep = command(calls, "hydra.launcher.detach_grace=120", *remotes_only([netns_host]), sleep=12)
    launcher = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: (tmp_path / "sweep" / ".hsm").exists()
                          and len(records(tmp_path, "submitted")) >= 2, 90), "the sweep did not get busy"
        hosts.set_link(up=False)
        pulled = time.monotonic()
        seen = wait_until(lambda: detached_on(tmp_path, "host3") == 2, 7.5, interval=0.5)  # `status`, from anywhere
        time.sleep(max(0.0, 8 - (time.monotonic() - pulled)))
        hosts.set_link(up=True)
        shown, _ = launcher.communicate(timeout=180)
    finally:
        hosts.set_link(up=True)
        launcher.kill()
    assert launcher.returncode == 0, shown
    assert seen, "status never showed host3's two jobs as detached while its cable was out"
    states = [record for record in records(tmp_path, "state") if record["state"] == "detached"]
    assert sorted(record["num"] for record in states) == [0, 1], shown
    assert sorted(record["num"] for record in records(tmp_path, "adopted")) == [0, 1], shown
    changes = [change["change"] for change in records(tmp_path, "source")]
    assert changes[0] == "lost" and "back" in changes and "quarantined" not in changes, changes
    assert invocations(calls) == {f"{what} {x}": 1 for x in range(3) for what in ("start", "end")}
    assert returned(tmp_path) == {0: 0, 1: 10, 2: 20}
    assert not [end for end in records(tmp_path, "end") if end["status"] != "completed"]
    agents = netns_host.home / ".hsm" / "agents"
    assert wait_until(lambda: not netns_host.job_processes(), 20), (
        netns_host.job_processes(), shown, [path.read_text()[-3000:] for path in agents.glob("*.log")])
    assert os.path.exists(tmp_path / "sweep" / "1" / "result.txt")


def test_an_optuna_study_killed_mid_batch_resumes_with_the_trials_that_ran_on(tmp_path: Path, calls: Path) -> None:
    """Optuna, 6 trials in batches of 2 (each batch its own launch): the launcher is killed
    while the second batch runs; the re-launch takes the first batch from the journal, adopts
    the second (a later batch's launch record must not hide it), and the study ends with every
    trial's task run once."""
    sweep = command(calls, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
                    "hydra.sweeper.sampler.seed=3", "hydra.launcher.detach_grace=60",
                    "hydra.launcher.local.max_parallel_jobs=2", sleep=3)
    sweep[sweep.index("x=range(3)")] = "x=interval(-4.0,4.0)"
    kill_once_submitted(tmp_path, subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True), 4)
    shown = relaunch(tmp_path, sweep)
    assert "Best value" in shown, shown
    started = [line.split()[1] for line in calls.read_text().splitlines() if line.startswith("start")]
    assert len(started) == 6 and len(set(started)) == 6, calls.read_text()
    assert sorted(record["num"] for record in records(tmp_path, "adopted")) == [2, 3], shown
    assert sorted(end["num"] for end in records(tmp_path, "end") if end["status"] == "completed") == list(range(6))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_still_stops_every_job_everywhere_with_a_detach_grace(
        ssh_hosts: list[SshHost], tmp_path: Path, calls: Path, signum: int) -> None:
    """detach_grace is for a launcher that is gone, not one told to stop: Ctrl-C or SIGTERM ends
    the jobs on the host and here at once, and no agent is left waiting."""
    host = ssh_hosts[0]
    sweep = command(calls, "hydra.launcher.detach_grace=120", "hydra.launcher.local.max_parallel_jobs=1",
                    hosts.remote_override(host.name, host.source_config()), jobs=4, sleep=60)
    launcher = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        busy = wait_until(lambda: len([line for line in invocations(calls) if line.startswith("start")]) == 3, 90)
        launcher.send_signal(signum)
        shown, _ = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert busy and launcher.returncode == 128 + signum, shown
    assert wait_until(lambda: not host.job_processes(), 20), host.job_processes()
    pids = [int(line.split()[2]) for line in calls.read_text().splitlines()]
    assert wait_until(lambda: not hosts.alive(pids), 20)  # the local job too (the host's pids are gone as well)
    assert not (host.home / ".hsm" / "agents").exists() or not list((host.home / ".hsm" / "agents").iterdir())
    assert not [line for line in invocations(calls) if line.startswith("end")]
