"""Progress lines, the journal, resume and `hsm distributed status`."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pyte
import pytest
from hydra.core.utils import JobStatus

import tasks
from conftest import Launch, ends, remote_override, remotes_only, starts
from hosts import SshHost, wait_until
from hsm_core import journal
from hsm_core.engine import Engine
from hsm_core.jobs import AttemptResult, JobRecord, JobSpec, Outcome
from hsm_core.progress import Progress
from hsm_core.scheduler import Scheduler
from hsm_core.strategies import round_robin

SWEEP_APP = Path(__file__).parent / "sweep_app.py"


def sweep(cwd: Path, *overrides: str, stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed",
                           "hydra.sweep.dir=sweep", *overrides], cwd=cwd, stdout=subprocess.PIPE, stderr=stderr,
                          text=True, timeout=300)


def status(cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "status", "sweep", *arguments],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_progress_lines_and_the_final_summary(tmp_path: Path) -> None:
    shown = sweep(tmp_path, "task=counted", "x=range(4)", f"+log={tmp_path / 'calls'}", "+fail_once=2",
                  "+sleep=1", "hydra.launcher.local.max_parallel_jobs=2", "hydra.launcher.progress_interval=0.5")
    lines = shown.stdout.splitlines()
    started = [line for line in lines if re.search(r"\] \[\d/4\] job #\d .* started on local$", line)]
    ended = [line for line in lines if re.search(r"\] \[\d/4\] job #\d .* (completed|failed) on local after", line)]
    assert len(started) == 4 and len(ended) == 4, shown.stdout
    assert any("Progress: " in line and "running" in line for line in lines[:lines.index(ended[-1])])
    assert "Progress: 4/4 (100.0%) - 3 completed, 1 failed, 0 retried, 0 running" in shown.stdout
    summary = next(line for line in lines if line.endswith("MAX"))
    row = lines[lines.index(summary) + 1].split("] ", 1)[1].split()
    assert row[:4] == ["local", "4", "1", "0"]
    assert re.search(r"Job #2 \(task=counted x=2 .*\) failed on local: RuntimeError: job 2 fails the first time",
                     shown.stdout)


def test_the_basic_sweeper_in_batches_counts_to_the_whole_sweep(tmp_path: Path) -> None:
    """hydra.sweeper.max_batch_size=4 over 5 x 2 jobs: three launches, counted [1/10]..[10/10], one summary."""
    shown = sweep(tmp_path, "task=square", "x=1,2,3,4,5", "+y=a,b", "hydra.sweeper.max_batch_size=4")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("hsm_distributed is launching") == 3
    counted = [int(found) for found in re.findall(r"\] \[(\d+)/10\] job #\d+ .* completed on local", shown.stdout)]
    assert sorted(counted) == list(range(1, 11)), shown.stdout
    assert shown.stdout.count("SOURCE  JOBS") == 1


def test_progress_on_ssh_hosts(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    shown = sweep(tmp_path, "task=who_runs", "x=range(6)", *remotes_only(ssh_hosts))
    assert shown.returncode == 0, shown.stderr
    hosts_started = re.findall(r"\[\d/6\] job #\d .* started on (host\d)", shown.stdout)
    assert len(hosts_started) == 6 and set(hosts_started) == {"host1", "host2"}
    assert "Progress: 6/6 (100.0%) - 6 completed, 0 failed, 0 retried, 0 running" in shown.stdout


def on_a_terminal(cwd: Path, *overrides: str) -> tuple[int, list[str], bytes]:
    """A sweep whose stdout and stderr are a terminal, as a user starts one: its exit code,
    the screen as a terminal (pyte) shows it at the end, and the bytes as written."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 500, 300, 0, 0))
    process = subprocess.Popen([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed",
                                "hydra.sweep.dir=sweep", *overrides], cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=terminal, stderr=terminal)
    os.close(terminal)
    drawn = b""
    try:
        while chunk := os.read(main, 65536):
            drawn += chunk
    except OSError:  # the terminal's other end is closed: all read
        pass
    os.close(main)
    code = process.wait(timeout=300)
    screen = pyte.Screen(300, 500)
    pyte.ByteStream(screen).feed(drawn)
    return code, [line.rstrip() for line in screen.display if line.strip()], drawn


def test_a_sweep_stopped_before_any_job_ended_shows_no_empty_table(caplog: pytest.LogCaptureFixture) -> None:
    progress = Progress()
    progress.begin_batch(3, 0, [("local", 2)])
    with caplog.at_level(logging.INFO):
        progress.finish()
    assert "Progress: 0/3 (0.0%)" in caplog.text and "SOURCE" not in caplog.text


def test_start_lines_count_jobs_not_attempts(caplog: pytest.LogCaptureFixture) -> None:
    """Two jobs, the first lost twice: its later starts say which attempt, and never [3/2]."""
    progress = Progress()
    progress.begin_batch(2, 0, [("local", 2)])
    first, second = (JobRecord(JobSpec(index=num, num=num, overrides=[f"x={num}"])) for num in (0, 1))
    with caplog.at_level(logging.INFO):
        for record in (first, second, first, first):
            progress.job_started(record, "local", 0.0)
            if record is first and len(first.attempts) < 2:
                lost = AttemptResult("local", Outcome.LOST, error="the job process was killed by SIGKILL")
                first.attempts.append(lost)
                progress.job_ended(first, lost, retrying=True)
    started = [message for message in caplog.messages if " started on " in message]
    assert started == ["[1/2] job #0 (x=0) started on local", "[2/2] job #1 (x=1) started on local",
                       "[2/2] job #0 (x=0) started on local (attempt 2)",
                       "[2/2] job #0 (x=0) started on local (attempt 3)"]


def test_a_terminal_gets_a_live_status_line_instead(tmp_path: Path) -> None:
    code, lines, drawn = on_a_terminal(tmp_path, "task=counted", "x=range(3)", f"+log={tmp_path / 'calls'}")
    assert code == 0
    assert b"\r\x1b[Klocal " in drawn and b"3/3: 3 completed, 0 failed, 0 running" in drawn
    assert not any("started on local" in line for line in lines)
    assert any(line.endswith("Progress: 3/3 (100.0%) - 3 completed, 0 failed, 0 retried, 0 running")
               for line in lines)
    assert not any(" | " in line for line in lines)  # the status line is gone at the end


def test_job_output_and_log_lines_scroll_above_the_status_line(tmp_path: Path, ssh_hosts: list[SshHost]) -> None:
    """Local jobs' output, remote jobs' (with [host]) and a failed job's warning each keep a
    line of their own on the screen, with the status line drawn between them meanwhile."""
    code, lines, drawn = on_a_terminal(
        tmp_path, "task=chatty", "x=range(4)", "+pause=0.3", "+fail=3", "hydra.launcher.local.max_parallel_jobs=2",
        remote_override("host1", ssh_hosts[0].source_config(max_parallel_jobs=2)))
    assert code == 1, "\n".join(lines)  # Hydra's sweeper raises the failed job's error at the end
    said = [line for line in lines if " says " in line]
    sources = {record["num"]: record["source"] for record in ends(tmp_path / "sweep")}
    assert set(sources.values()) == {"local", "host1"}
    expected = {f"{'[host1] ' if sources[x] == 'host1' else ''}job {x} says {n}" for x in range(4) for n in range(3)}
    assert sorted(said) == sorted(expected), "\n".join(lines)
    assert len([line for line in lines if re.fullmatch(r"\[[-\d :,]+\]\[HYDRA\] \[\d/4\] job #3 \(.*\) failed on"
                                                       r" \w+ after \d+\.\ds \(ValueError: job 3 fails\)", line)]) == 1
    assert not any(" | " in line for line in lines), "\n".join(lines)
    assert drawn.count(b" running, ETA ") >= 4  # the status line was there all along


def test_the_journal_records_failed_retried_and_completed_jobs(launch_jobs: Launch, tmp_path: Path) -> None:
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    [returns] = launch_jobs(tasks.killed_once, [[[f"x={x}", f"+marker_dir={marker_dir}"] for x in range(4)]])
    assert [r.status.name for r in returns] == ["COMPLETED", "FAILED", "COMPLETED", "COMPLETED"]
    records = journal.read(tmp_path / "sweep")
    assert records[0]["event"] == "launch" and records[0]["jobs"] == 4
    ends = {(r["num"], r["attempt"]): r for r in records if r["event"] == "end"}
    assert ends[(1, 1)]["status"] == "failed" and ends[(1, 1)]["failure_class"] == "task"
    assert "ValueError: x=1 always fails" in ends[(1, 1)]["cause"] and not ends[(1, 1)]["retrying"]
    lost = ends[(2, 1)]
    assert (lost["status"], lost["failure_class"], lost["retrying"]) == ("lost", "infrastructure", True)
    assert "killed by SIGKILL" in lost["cause"]
    assert ends[(2, 2)]["status"] == "completed" and ends[(2, 2)]["failure_class"] is None
    for record in ends.values():
        assert record["hash"] == journal.override_hash(record["overrides"]) and record["end"] >= record["start"]
    starts = [r for r in records if r["event"] == "start"]
    assert len(starts) == 5 and all(r["source"] == "local" for r in starts)
    assert "local" in (tmp_path / "sweep" / ".hsm" / "sources.yaml").read_text()


def test_resume_runs_exactly_the_unfinished_jobs_even_when_the_sweep_grew(launch_jobs: Launch,
                                                                        tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    common = [f"+log={calls}", "+fail_once=2"]
    [first] = launch_jobs(tasks.counted, [[[f"x={x}", *common] for x in range(4)]])
    assert [r.status.name for r in first] == ["COMPLETED", "COMPLETED", "FAILED", "COMPLETED"]
    assert sorted(calls.read_text().split()) == ["0", "1", "2", "3"]
    calls.write_text("")

    grown = [[f"x={x}", *common] for x in (5, 3, 2, 1, 0, 4)]  # reordered, and two new values
    [second] = launch_jobs(tasks.counted, [grown], ["hydra.launcher.resume=true"])
    assert sorted(calls.read_text().split()) == ["2", "4", "5"]  # the failed one and the new ones
    assert [r.return_value for r in second] == [50, 30, 20, 10, 0, 40]  # restored ones included
    for num, job_return in enumerate(second):  # each dir now holds the job this run numbers num
        job_dir = tmp_path / "sweep" / str(num)
        assert job_return.hydra_cfg.hydra.runtime.output_dir == str(job_dir)
        assert job_return.hydra_cfg.hydra.job.num == num
        assert (job_dir / ".hydra" / "overrides.yaml").read_text().startswith(f"- x={grown[num][0][2:]}\n")


def test_jobs_with_the_same_overrides_resume_as_themselves(launch_jobs: Launch, tmp_path: Path) -> None:
    """x=1,1 (or a sweeper proposing a point twice): each is its own job in the journal; on
    resume the completed one keeps its dir and value, and the failed one runs again."""
    flag = tmp_path / "flag"
    flag.write_text("")
    batch = [["x=1", f"+flag={flag}", "+fail_num=1"], ["x=1", f"+flag={flag}", "+fail_num=1"],
             ["x=2", f"+flag={flag}", "+fail_num=1"]]
    [first] = launch_jobs(tasks.job_num, [batch])
    assert [job.status for job in first] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED]
    flag.unlink()
    [resumed] = launch_jobs(tasks.job_num, [batch], ["hydra.launcher.resume=true"])
    assert [job.return_value for job in resumed] == [0, 1, 2]
    assert [(tmp_path / "sweep" / str(num) / "num.txt").read_text() for num in range(3)] == ["0", "1", "2"]
    runs = [record["num"] for record in starts(tmp_path / "sweep")]
    assert runs.count(0) == 1 and runs.count(1) == 2  # job 0 was not run again; job 1 was


def test_an_interrupted_optuna_study_resumes_with_only_its_unfinished_trials(tmp_path: Path) -> None:
    """9 trials in batches of 3, Ctrl-C while trial 4 runs (3 and 5 done): resume=true replays
    the seeded study; the finished trials' values come from the journal, so only trial 4 and
    the last batch run, and the study ends where an uninterrupted one does."""
    calls = tmp_path / "calls"
    study = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=9", "hydra.sweeper.n_jobs=3",
             "hydra.sweeper.sampler.seed=3", "task=held_trial", "x=interval(-4.0,4.0)", f"+log={calls}",
             "+hold=4", f"+release={tmp_path / 'release'}", "hydra.launcher.local.max_parallel_jobs=3"]
    command = [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
               *study]

    def best(shown: str) -> str:
        return next(line.split("[HYDRA] ")[1] for line in shown.splitlines() if "Best value" in line)

    interrupted = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def trial_4_held() -> bool:
            records = journal.read(tmp_path / "sweep") if (tmp_path / "sweep" / ".hsm").exists() else []
            done = {r["num"] for r in records if r["event"] == "end" and r["status"] == "completed"}
            return done >= {0, 1, 2, 3, 5} and any(r["event"] == "start" and r["num"] == 4 for r in records)
        assert wait_until(trial_4_held, 120)
        interrupted.send_signal(signal.SIGINT)
        shown, _ = interrupted.communicate(timeout=60)
    finally:
        interrupted.kill()
    assert interrupted.returncode == 130 and "Interrupted by SIGINT" in shown, shown
    assert {r["num"] for r in ends(tmp_path / "sweep") if r["status"] == "completed"} == {0, 1, 2, 3, 5}

    calls.write_text("")
    (tmp_path / "release").write_text("")
    resumed = subprocess.run([*command, "hydra.launcher.resume=true"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(int(num) for num in calls.read_text().split()) == [4, 6, 7, 8]
    assert "Resuming: 3 of 3 jobs completed earlier" in resumed.stdout
    assert "Resuming: 2 of 3 jobs completed earlier (journal); running the other 1" in resumed.stdout
    assert [line for line in resumed.stdout.splitlines() if "] [9/9] job #" in line], resumed.stdout

    whole = subprocess.run([*command[:4], "hydra.sweep.dir=whole", *study], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert best(resumed.stdout) == best(whole.stdout)


def test_status_shows_the_jobs_causes_and_the_resume_command(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    sweep(tmp_path, "task=counted", "x=range(3)", f"+log={calls}", "+fail_once=1")
    shown = status(tmp_path)
    assert shown.returncode == 1
    rows = [line.split() for line in shown.stdout.splitlines()[1:4]]
    assert [(row[0], row[-2]) for row in rows] == [("0", "completed"), ("1", "failed"), ("2", "completed")]
    assert re.search(r"job #1 \(task=counted x=1 .*\) failed: RuntimeError: job 1 fails the first time", shown.stdout)
    command = shown.stdout.strip().splitlines()[-1].strip()
    assert command.endswith(f"hydra.launcher.resume=true hydra.sweep.dir={tmp_path / 'sweep'}")
    as_json = json.loads(status(tmp_path, "--json").stdout)
    assert [job["status"] for job in as_json["jobs"]] == ["completed", "failed", "completed"]
    assert as_json["sources"]["local"] == {"jobs": 3, "completed": 2, "failed": 1, "attempts": 3, "running": 0,
                                           "detached": 0}

    resumed = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert status(tmp_path).returncode == 0


def test_status_counts_the_jobs_a_killed_sweep_never_started(tmp_path: Path) -> None:
    """SIGKILL while 2 of 4 jobs run: all 4 are unfinished, and status says which 2 never started."""
    launcher = subprocess.Popen([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed",
                                 "hydra.sweep.dir=sweep", "task=slow_with_progress", "+seconds=60", "x=range(4)",
                                 "hydra.launcher.local.max_parallel_jobs=2"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def two_started() -> bool:
            journal_file = tmp_path / "sweep" / ".hsm" / "journal.jsonl"
            return journal_file.exists() and len([r for r in journal.read(tmp_path / "sweep")
                                                  if r["event"] == "start"]) == 2
        assert wait_until(two_started, 60)
    finally:
        launcher.kill()
        launcher.wait(timeout=30)
    shown = status(tmp_path)
    assert shown.returncode == 1
    assert "2 jobs never started: #2, #3" in shown.stdout, shown.stdout
    assert "To run the 4 unfinished jobs again (2 never started; completed ones are kept):" in shown.stdout
    assert json.loads(status(tmp_path, "--json").stdout)["never_started"] == [2, 3]


def test_status_of_a_folder_without_a_journal_is_a_usage_error(tmp_path: Path) -> None:
    shown = status(tmp_path)
    assert shown.returncode == 2 and "has no .hsm/journal.jsonl" in shown.stderr


def test_a_torn_last_record_is_cut_and_a_second_resume_runs_nothing(launch_jobs: Launch, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    launch_jobs(tasks.counted, [[[f"x={x}", f"+log={calls}"] for x in range(3)]])
    path = tmp_path / "sweep" / ".hsm" / "journal.jsonl"
    whole = path.read_text()
    with open(path, "a") as file:
        file.write(whole.splitlines()[-1][: 40])  # half a record: a crash mid-write
    calls.write_text("")
    for _ in range(2):
        [returns] = launch_jobs(tasks.counted, [[[f"x={x}", f"+log={calls}"] for x in range(3)]],
                                ["hydra.launcher.resume=true"])
        assert [r.return_value for r in returns] == [0, 10, 20]
    assert calls.read_text() == ""  # neither resume ran a job
    assert all(json.loads(line) for line in path.read_text().splitlines())  # every line whole again
    assert stat_mode(path.parent) == 0o700 and stat_mode(path) == 0o600


def test_a_damaged_line_does_not_hide_the_records_after_it(tmp_path: Path) -> None:
    folder = tmp_path / ".hsm"
    folder.mkdir()
    launch = {"event": "launch", "python": "python", "command": ["app.py"], "cwd": "/"}
    moved = {"event": "moved", "hash": "abc", "subdir": "1"}
    lines = [json.dumps(launch), '{"event": "st', json.dumps({"event": "moved", "hash": "abc"}), json.dumps(moved)]
    (folder / "journal.jsonl").write_text("\n".join(lines) + "\n")
    assert journal.read(tmp_path) == [launch, moved]  # the torn and the incomplete record are skipped


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


CHANGING_APP = """
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=None, config_name="config")
def main(cfg):
    with open("{calls}", "a") as calls:
        calls.write(f"{{HydraConfig.get().job.num}}\\n")
    return cfg.x * cfg.factor

if __name__ == "__main__":
    main()
"""


def test_resume_runs_again_what_ran_another_config_or_code(tmp_path: Path) -> None:
    """A job completed with other settings or code is run again on resume (resume=keep keeps
    it); either way one line names the jobs and what changed."""
    app, calls, conf = tmp_path / "app", tmp_path / "calls", tmp_path / "conf"  # the config outside the project
    app.mkdir()
    conf.mkdir()
    (app / "pyproject.toml").write_text("[project]\nname = 'changing'\n")
    (app / "app.py").write_text(CHANGING_APP.format(calls=calls))
    (conf / "config.yaml").write_text("x: 0\nfactor: 1\n")

    def sweep_again(*extra: str) -> str:
        calls.write_text("")
        ran = subprocess.run([sys.executable, str(app / "app.py"), "--config-path", str(conf), "-m",
                              "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep", "x=1,2", *extra], cwd=app,
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr[-3000:]
        return ran.stdout + ran.stderr

    sweep_again()
    assert sorted(calls.read_text().split()) == ["0", "1"]
    assert sweep_again("hydra.launcher.resume=true") and calls.read_text() == ""  # nothing changed: nothing runs
    (conf / "config.yaml").write_text("x: 0\nfactor: 2\n")
    shown = sweep_again("hydra.launcher.resume=true")
    assert sorted(calls.read_text().split()) == ["0", "1"]
    assert ("Resuming: 2 completed jobs run again, as what they ran changed since: #0 (config), #1 (config)"
            " (hydra.launcher.resume=keep keeps them)") in shown
    (app / "app.py").write_text(CHANGING_APP.format(calls=calls) + "# edited\n")
    shown = sweep_again("hydra.launcher.resume=keep")
    assert calls.read_text() == ""
    assert "Resuming: keeping 2 completed jobs though what they ran changed since: #0 (code), #1 (code)" in shown
    shown = sweep_again("hydra.launcher.resume=true")
    assert sorted(calls.read_text().split()) == ["0", "1"] and "#0 (code), #1 (code)" in shown


def fill(path: Path) -> None:
    """Write `path` until its file system is full, to the last byte."""
    with open(path, "wb", buffering=0) as file:
        for chunk in (b"\0" * 4096, b"\0"):
            try:
                while True:
                    file.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


def test_a_full_disk_under_the_journal_stops_new_jobs_and_loses_no_record(tmp_path: Path) -> None:
    """`.hsm` on a 256 KiB tmpfs, filled while jobs 0 (1 s) and 1 (8 s) run: job 0's record
    cannot be kept, so no further job starts (one line says why and what to do); the space
    comes back, and job 1's end writes every record held meanwhile; a resume runs exactly
    the 4 jobs that never started. (Before, the first refused write ended the sweep.)"""
    folder = tmp_path / "sweep" / ".hsm"
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(folder)], check=True, timeout=10)
    try:
        overrides = ["task=fenced_work", "x=range(6)", "+sleep=[1,8,1,1,1,1]",
                     "hydra.launcher.local.max_parallel_jobs=2"]
        launcher = subprocess.Popen([sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed",
                                     "hydra.sweep.dir=sweep", *overrides], cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(launcher.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            assert wait_until(lambda: len(starts(tmp_path / "sweep")) == 2, 60), lines
            fill(folder / "filler")
            assert wait_until(lambda: any("Starting no more jobs" in line for line in lines), 60), lines
            (folder / "filler").unlink()
            launcher.wait(120)
        finally:
            launcher.kill()
        reader.join(10)
        output = "".join(lines)
        [stop] = [line for line in lines if "Starting no more jobs" in line]
        assert "the sweep's journal cannot be written (No space left on device" in stop
        assert "hydra.launcher.resume=true" in stop
        assert [r["num"] for r in starts(tmp_path / "sweep")] == [0, 1], output  # nothing started after
        ended = {r["num"]: (r["status"], r["cause"] or "") for r in ends(tmp_path / "sweep")}
        assert [ended[num][0] for num in range(6)] == ["completed"] * 2 + ["lost"] * 4, output
        assert all(ended[num][1].startswith("not started: the sweep's journal") for num in range(2, 6))

        resumed = sweep(tmp_path, *overrides, "hydra.launcher.resume=true")
        assert "Resuming: 2 of 6 jobs completed earlier (journal); running the other 4" in resumed.stdout, resumed
        assert sorted(r["num"] for r in starts(tmp_path / "sweep")) == [0, 1, 2, 3, 4, 5]  # each ran once
        assert all(len(list((tmp_path / "sweep" / str(num)).glob("attempt-*.txt"))) == 1 for num in range(6))
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True, timeout=10)


def test_status_watch_follows_a_running_sweep_to_its_end(tmp_path: Path) -> None:
    """A sweep runs in the background (4 jobs of 1 s, one at a time); `status --watch` shows
    it running, with its launcher, then exits once it has ended, showing how it ended."""
    launcher = subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=counted", "x=range(4)", "+sleep=1", f"+log={tmp_path / 'calls'}",
         "hydra.launcher.local.max_parallel_jobs=1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: (tmp_path / "sweep" / ".hsm" / "journal.jsonl").exists(), 60)
        watched = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "status", "sweep", "--watch",
                                  "--refresh", "0.5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"The sweep is running: pid {launcher.pid} on " in watched.stdout
    assert "it never finished" not in watched.stdout and "To run the" not in watched.stdout  # not while it runs
    last = watched.stdout.rsplit("NUM ", 1)[1]  # the last refresh
    assert re.search(r"The last launch ended at [-0-9: ]+: completed", last), last
    assert len(re.findall(r"^[0-3] .* local +- +1 +completed ", last, re.MULTILINE)) == 4, last


def test_a_sweep_gives_sighup_back_as_it_found_it(tmp_path: Path) -> None:
    """While a sweep holds its sweep dir, SIGHUP is the sweep's (it goes on, see test_faults);
    once it is closed, a notebook or a script's next sweep has SIGHUP's handler as it was."""
    before = signal.getsignal(signal.SIGHUP)
    engine = Engine([], Scheduler([], round_robin, max_retries=0, retry_failed_jobs=0))
    engine.claim(tmp_path / "sweep")
    assert signal.getsignal(signal.SIGHUP) not in (before, signal.SIG_DFL)
    engine.close()
    assert signal.getsignal(signal.SIGHUP) == before
