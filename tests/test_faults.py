"""Faults injected into real hosts mid-sweep: every job ends with exactly one result, and no
job process outlives the sweep on any host.

Each test asserts, for every job, one JobReturn (or, for interrupted launchers, one output
dir) holding exactly one attempt's mark, and that no worker or job process of any host
user is left once the fault has been seen.
"""

from __future__ import annotations

import collections
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from hydra.core.utils import JobStatus

import hosts
import tasks
from conftest import Launch, remote_override, remotes_only
from hosts import SshHost, alive, process_tree, wait_until
from hsm_core import journal

SWEEP_APP = Path(__file__).parent / "sweep_app.py"
FAST_KEEPALIVE = ["hydra.launcher.keepalive_interval=1", "hydra.launcher.keepalive_count_max=3"]


def in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def when_running_jobs(host: SshHost, action: Callable[[], None], at_least: int = 1) -> threading.Thread:
    """Do `action` once the host runs jobs (its agent plus `at_least` job processes)."""

    def wait_then_act() -> None:
        assert wait_until(lambda: len(host.job_processes()) >= 1 + 2 * at_least, 60), "the host never ran a job"
        action()

    return in_background(wait_then_act)


def assert_each_job_once(sweep_dir: Path, count: int) -> collections.Counter[str]:
    """Every job dir holds one attempt's mark; returns how many jobs each user ran."""
    runners: collections.Counter[str] = collections.Counter()
    for num in range(count):
        marks = sorted(path.name for path in (sweep_dir / str(num)).glob("attempt-*.txt"))
        assert len(marks) == 1, f"job {num}: {marks}"
        runners[(sweep_dir / str(num) / "who.txt").read_text()] += 1
    return runners


def assert_no_job_processes(test_hosts: list[SshHost], within: float) -> None:
    assert wait_until(lambda: not any(host.job_processes() for host in test_hosts), within), {
        host.name: host.job_processes() for host in test_hosts
    }


def completed_values(returns: list) -> list:
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * len(returns)
    return [r.return_value for r in returns]


def test_sigkill_of_a_hosts_sshd_tree_moves_its_jobs(launch_jobs: Launch, ssh_hosts: list[SshHost],
                                                    tmp_path: Path) -> None:
    host1, host2 = ssh_hosts

    def kill_sshd_tree() -> None:
        time.sleep(1)
        host1.signal_tree(signal.SIGKILL)

    fault = when_running_jobs(host1, kill_sshd_tree)
    try:
        [returns] = launch_jobs(tasks.fenced_work, [[[f"x={x}", "+sleep=1.5"] for x in range(10)]],
                                [*remotes_only(ssh_hosts), *FAST_KEEPALIVE])
    finally:
        fault.join()
        host1.start()
    assert [x for x, _ in completed_values(returns)] == list(range(10))
    runners = assert_each_job_once(tmp_path / "sweep", 10)
    assert runners["hsm-host2"] > runners["hsm-host1"]
    assert_no_job_processes(ssh_hosts, within=10)
    records = journal.read(tmp_path / "sweep")
    ends = [r for r in records if r["event"] == "end"]
    lost = [r for r in ends if r["status"] == "lost"]
    assert lost and all(r["source"] == "host1" and r["failure_class"] == "infrastructure" and r["retrying"]
                        for r in lost)
    assert sorted(r["num"] for r in ends if not r["retrying"]) == list(range(10))
    # Its sshd stayed down: after two refused reconnections host1 is quarantined, never used again.
    first_lost = records.index(lost[0])
    assert not [r for r in records[first_lost:] if r["event"] == "start" and r["source"] == "host1"]


@pytest.mark.parametrize("down_s", [0.5, 3.5])
def test_a_host_whose_sshd_comes_back_is_reconnected_and_used_again(launch_jobs: Launch, ssh_hosts: list[SshHost],
                                                                   tmp_path: Path, down_s: float) -> None:
    """Back at once, or refusing connections for 3.5 s (a laptop waking: three quick refusals,
    shorter than the 4 s keepalive bound here, are no lost machine)."""
    host1, host2 = ssh_hosts

    def restart() -> None:
        host1.signal_tree(signal.SIGKILL)
        time.sleep(down_s)
        host1.start()

    fault = when_running_jobs(host1, restart)
    try:
        [returns] = launch_jobs(tasks.fenced_work, [[[f"x={x}", "+sleep=1.5"] for x in range(16)]],
                                [*remotes_only(ssh_hosts), *FAST_KEEPALIVE])
    finally:
        fault.join()
    assert [x for x, _ in completed_values(returns)] == list(range(16))
    assert_each_job_once(tmp_path / "sweep", 16)
    records = journal.read(tmp_path / "sweep")
    lost = [i for i, r in enumerate(records) if r["event"] == "end" and r["status"] == "lost"]
    assert lost and all(records[i]["source"] == "host1" for i in lost)
    later = [r for r in records[lost[-1]:] if r["event"] == "start" and r["source"] == "host1"]
    assert later, "host1 was not used again after it came back"
    changes = [(r["source"], r["change"]) for r in records if r["event"] == "source"]
    assert changes[0] == ("host1", "lost") and changes[-1] == ("host1", "back"), changes
    assert_no_job_processes(ssh_hosts, within=10)


def test_retry_failed_jobs_reruns_a_task_that_raised_on_a_host(launch_jobs: Launch, ssh_hosts: list[SshHost],
                                                              tmp_path: Path) -> None:
    log = Path("/tmp/hsm-faults") / f"retry-{os.getpid()}" / "calls"
    log.parent.mkdir(parents=True, exist_ok=True)
    for folder in (log.parent.parent, log.parent):
        folder.chmod(0o777)
    for stale in log.parent.iterdir():
        stale.unlink()
    [returns] = launch_jobs(tasks.counted, [[[f"x={x}", f"+log={log}", "+fail_once=1"] for x in range(3)]],
                            [*remotes_only(ssh_hosts[:1]), "hydra.launcher.retry_failed_jobs=1"])
    assert [r.return_value for r in returns] == [0, 10, 20]
    assert sorted(log.read_text().split()) == ["0", "1", "1", "2"]  # job 1 ran twice, the others once
    ends = [r for r in journal.read(tmp_path / "sweep") if r["event"] == "end" and r["num"] == 1]
    assert [(r["status"], r["failure_class"], r["retrying"]) for r in ends] == [
        ("failed", "task", True), ("completed", None, False)]
    assert {r["source"] for r in ends} == {"host1"}


def test_a_hung_host_is_declared_lost_within_the_keepalive_bound(launch_jobs: Launch, ssh_hosts: list[SshHost],
                                                                 tmp_path: Path) -> None:
    host1, host2 = ssh_hosts
    stopped_at: list[float] = []
    def hang() -> None:
        host1.signal_everything(signal.SIGSTOP)
        stopped_at.append(time.monotonic())

    fault = when_running_jobs(host1, hang)
    try:
        [returns] = launch_jobs(tasks.fenced_work, [[[f"x={x}", "+sleep=1.5"] for x in range(8)]],
                                [*remotes_only(ssh_hosts), *FAST_KEEPALIVE])
        finished_at = time.monotonic()
    finally:
        fault.join()
        host1.signal_everything(signal.SIGCONT)
    # Keepalive 1 s x 3 declares it lost after about 4 s; host2 alone may then run every job
    # (8 x 1.5 s on 2 slots = 6 s): 25 s leaves room for a loaded 2-core machine.
    print(f"host1 stopped at {time.time() - time.monotonic() + stopped_at[0]:.3f} (epoch s);"
          f" the sweep ended {finished_at - stopped_at[0]:.1f} s later (bound 25 s)")
    assert finished_at - stopped_at[0] < 25
    assert [x for x, _ in completed_values(returns)] == list(range(8))
    assert assert_each_job_once(tmp_path / "sweep", 8)["hsm-host2"] >= 1
    assert_lost_and_rerun_elsewhere(tmp_path / "sweep", "host1")
    assert_no_job_processes(ssh_hosts, within=15)


def assert_lost_and_rerun_elsewhere(sweep_dir: Path, victim: str) -> None:
    """The journal proves the fault: the victim's running attempts ended `lost`, and each of
    those jobs then completed on another source."""
    ends = [r for r in journal.read(sweep_dir) if r["event"] == "end"]
    lost = [r for r in ends if r["status"] == "lost"]
    assert lost, "no attempt was recorded lost"
    assert all(r["source"] == victim and r["failure_class"] == "infrastructure" and r["retrying"] for r in lost)
    final = {r["num"]: r for r in ends if not r["retrying"]}
    assert all(final[r["num"]]["status"] == "completed" and final[r["num"]]["source"] != victim for r in lost)


def test_a_pulled_cable_moves_the_jobs_and_the_cut_off_host_stops_them(
    launch_jobs: Launch, ssh_hosts: list[SshHost], netns_host: SshHost, tmp_path: Path
) -> None:
    host1 = ssh_hosts[0]
    pulled_at: list[float] = []
    def pull_the_cable() -> None:
        hosts.set_link(up=False)
        pulled_at.append(time.monotonic())

    fault = when_running_jobs(netns_host, pull_the_cable)
    try:
        [returns] = launch_jobs(tasks.fenced_work, [[[f"x={x}", "+sleep=1.5"] for x in range(8)]],
                                [*remotes_only([host1, netns_host]), *FAST_KEEPALIVE])
        finished_at = time.monotonic()
    finally:
        fault.join()
    print(f"cable pulled at {time.time() - time.monotonic() + pulled_at[0]:.3f} (epoch s);"
          f" the sweep ended {finished_at - pulled_at[0]:.1f} s later")
    assert finished_at - pulled_at[0] < 25  # lost after ~4 s, then 6 s of jobs at most: see the hung-host test
    assert [x for x, _ in completed_values(returns)] == list(range(8))
    assert assert_each_job_once(tmp_path / "sweep", 8)["hsm-host3"] < 8
    assert_lost_and_rerun_elsewhere(tmp_path / "sweep", "host3")
    # Cut off, the host's agent hears no heartbeat and ends its jobs by itself (silent for ~4 s).
    assert_no_job_processes([netns_host], within=20)
    hosts.set_link(up=True)


def test_sigkill_of_a_remote_job_process_is_retried(launch_jobs: Launch, ssh_hosts: list[SshHost]) -> None:
    marker_dir = Path("/tmp/hsm-faults") / str(os.getpid())
    marker_dir.mkdir(parents=True, exist_ok=True)
    for folder in (marker_dir.parent, marker_dir):
        folder.chmod(0o777)
    for stale in marker_dir.iterdir():
        stale.unlink()

    def kill_announced() -> None:
        pid_file = marker_dir / "pid"
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = in_background(kill_announced)
    [returns] = launch_jobs(tasks.wait_to_be_killed, [[[f"+marker_dir={marker_dir}"]]], remotes_only(ssh_hosts[:1]))
    killer.join()
    assert returns[0].return_value == "second attempt"
    assert len((marker_dir / "invocations").read_text().split()) == 2
    assert_no_job_processes(ssh_hosts, within=10)


def nproc_limits(pid: int) -> tuple[str, str]:
    """A process's RLIMIT_NPROC, soft and hard, as /proc shows them."""
    with open(f"/proc/{pid}/limits") as limits:
        soft, hard = next(line.split()[2:4] for line in limits if line.startswith("Max processes"))
    return soft, hard


def test_a_failed_fork_rejects_one_job_and_the_agent_keeps_serving(launch_jobs: Launch, ssh_hosts: list[SshHost],
                                                                   tmp_path: Path) -> None:
    """Job 0 leaves its agent unable to fork (RLIMIT_NPROC 1 on the agent process); the next
    job is rejected and lost; the test lifts the limit; every job then completes, once, on
    that same agent (the agent's loop ended at the first failed fork before)."""
    host1 = ssh_hosts[0]
    lifted: list[int] = []

    def lift_once_a_job_is_lost() -> None:
        assert wait_until(lambda: any(r["event"] == "end" and r["status"] == "lost"
                                      for r in journal.read(tmp_path / "sweep")), 60), "no job was lost"
        [agent] = [pid for pid in (int(line.split()[0]) for line in host1.job_processes())
                   if nproc_limits(pid)[0] == "1"]
        hard = nproc_limits(agent)[1]  # as the host's user: root here may not change others' limits
        subprocess.run(["runuser", "-u", host1.user, "--", "prlimit", f"--pid={agent}", f"--nproc={hard}:{hard}"],
                       check=True, timeout=10)
        lifted.append(agent)

    fault = in_background(lift_once_a_job_is_lost)
    [returns] = launch_jobs(tasks.starve_the_agent_of_processes, [[[f"x={x}"] for x in range(4)]],
                            [*remotes_only(ssh_hosts[:1], max_parallel_jobs=1), "hydra.launcher.max_retries=5"])
    fault.join()
    assert lifted, "the limit was never lifted"
    assert completed_values(returns) == [[x, lifted[0]] for x in range(4)]  # one agent ran them all
    records = [r for r in journal.read(tmp_path / "sweep") if r["event"] == "end"]
    lost = [r for r in records if r["status"] == "lost"]
    assert lost and all("fork failed" in r["cause"] for r in lost), lost
    assert sorted(r["num"] for r in records if r["status"] == "completed") == [0, 1, 2, 3]


def test_a_closed_terminal_does_not_end_the_sweep(ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    """The launcher runs on a terminal (a pty), in its own process group as a shell's job runs;
    the terminal goes away (its master is closed) and, as a shell does on hangup, SIGHUP goes
    to the job's group. The sweep completes (exit 0), every job once, the journal complete, and
    what the launcher printed afterwards is in .hsm/launcher.log. Before: SIGHUP ended it."""
    main, terminal = pty.openpty()
    sweep = subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=fenced_work", "x=range(6)", "+sleep=2", "hydra.launcher.local.max_parallel_jobs=1",
         remote_override("host1", ssh_hosts[0].source_config(max_parallel_jobs=1))],
        cwd=tmp_path, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    try:
        assert wait_until(lambda: len(journal_starts(tmp_path / "sweep")) >= 2, 60), "no job started"
        os.close(main)  # the terminal goes away
        os.killpg(sweep.pid, signal.SIGHUP)
        assert sweep.wait(180) == 0
    finally:
        if sweep.poll() is None:
            sweep.kill()
    records = journal.read(tmp_path / "sweep")
    assert sorted(r["num"] for r in records if r["event"] == "end" and r["status"] == "completed") == list(range(6))
    assert len(journal_starts(tmp_path / "sweep")) == 6
    assert_each_job_once(tmp_path / "sweep", 6)
    assert [r["reason"] for r in records if r["event"] == "launch_end"] == ["completed"]
    printed = (tmp_path / "sweep" / ".hsm" / "launcher.log").read_text()
    assert "The terminal closed (SIGHUP): the sweep goes on" in printed
    assert "Progress: 6/6 (100.0%) - 6 completed, 0 failed" in printed, printed


def status_of(cwd: Path) -> str:
    """`hsm distributed status sweep`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "status", "sweep"], cwd=cwd,
                          capture_output=True, text=True, timeout=60).stdout


def journal_starts(sweep_dir: Path) -> list[dict]:
    return [r for r in journal.read(sweep_dir) if r["event"] == "start"]


def start_sweep(cwd: Path, test_hosts: list[SshHost], sleeps: list[float]) -> subprocess.Popen[str]:
    """A sweep over local (1 slot) and the hosts, as a user starts it from a terminal."""
    return subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=fenced_work", f"x=range({len(sleeps)})", f"+sleep=[{','.join(map(str, sleeps))}]",
         "hydra.launcher.local.max_parallel_jobs=1", *FAST_KEEPALIVE,
         *(remote_override(host.name, host.source_config()) for host in test_hosts)],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, like a foreground job of a shell
    )


def completed_in_journal(sweep_dir: Path) -> set[int]:
    return {r["num"] for r in journal.read(sweep_dir) if r["event"] == "end" and r["status"] == "completed"}


def wait_for_a_busy_sweep(sweep: subprocess.Popen[str], sweep_dir: Path, test_hosts: list[SshHost]) -> list[int]:
    """Wait until the launcher has recorded the two quick jobs as completed and every host
    runs a job; returns the launcher's local processes (itself, its agent and its jobs)."""
    busy = wait_until(lambda: {0, 1} <= completed_in_journal(sweep_dir)
                      and all(len(host.job_processes()) >= 3 for host in test_hosts), 60)
    assert busy, sweep.communicate(timeout=30)[0] if sweep.poll() is not None else "the sweep did not get busy"
    local = process_tree(sweep.pid)
    assert len(local) >= 3  # the launcher, its agent, a job's guard
    return local


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_job_everywhere(ssh_hosts: list[SshHost], tmp_path: Path,
                                                     signum: signal.Signals) -> None:
    sweep = start_sweep(tmp_path, ssh_hosts, sleeps=[0.2, 0.2, 60, 60, 60, 60, 60, 60])
    local = wait_for_a_busy_sweep(sweep, tmp_path / "sweep", ssh_hosts)
    if signum == signal.SIGINT:
        os.killpg(sweep.pid, signum)  # what the terminal does on Ctrl-C
    else:
        sweep.send_signal(signum)  # what a scheduler or `kill` does
    output, _ = sweep.communicate(timeout=30)
    assert sweep.returncode == 128 + signum, output
    assert f"Interrupted by {signum.name}: every running job was stopped" in output
    assert [r["reason"] for r in journal.read(tmp_path / "sweep") if r["event"] == "launch_end"] == [
        f"interrupted by {signum.name}"]
    assert f": interrupted by {signum.name}" in status_of(tmp_path)
    assert wait_until(lambda: alive(local) == [], 2), alive(local)  # stopped as the launcher exited
    assert_no_job_processes(ssh_hosts, within=0)
    time.sleep(3)
    assert alive(local) == []  # and nothing came back
    assert_no_job_processes(ssh_hosts, within=0)
    for num in (0, 1):  # finished before Ctrl-C: their outputs are all here
        job_dir = tmp_path / "sweep" / str(num)
        assert (job_dir / "who.txt").exists() and (job_dir / ".hydra" / "overrides.yaml").exists()


def test_sigkill_of_the_launcher_leaves_no_job_running(ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    sweep = start_sweep(tmp_path, ssh_hosts, sleeps=[0.2, 0.2, 60, 60, 60, 60, 60, 60])
    local = wait_for_a_busy_sweep(sweep, tmp_path / "sweep", ssh_hosts)
    sweep.kill()
    sweep.communicate(timeout=30)
    window = 20  # the hosts' agents stop hearing the launcher after ~4 s (keepalive 1 s x 3)
    assert wait_until(lambda: alive(local[1:]) == [], window), alive(local[1:])
    assert_no_job_processes(ssh_hosts, within=window)
    lines = (tmp_path / "sweep" / ".hsm" / "journal.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: each record was fsynced
    assert "The last launch ended without recording why (killed, or its machine stopped)" in status_of(tmp_path)
    assert len([r for r in records if r["event"] == "start"]) >= 7
