"""The local source: per-job failures, dead workers, ordering, slots, numbering, data as data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra.core.utils import JobStatus

import tasks
from conftest import Launch


def statuses(returns) -> list[str]:
    return [job_return.status.name for job_return in returns]


def failure_text(job_return) -> str:
    with pytest.raises(Exception) as raised:
        job_return.return_value
    return str(raised.value)


def test_one_failing_job_among_many(launch_jobs: Launch) -> None:
    [returns] = launch_jobs(tasks.fail_on_two, [[[f"x={x}"] for x in range(6)]])

    assert statuses(returns) == ["COMPLETED", "COMPLETED", "FAILED", "COMPLETED", "COMPLETED", "COMPLETED"]
    assert [r.return_value for i, r in enumerate(returns) if i != 2] == [0, 1, 3, 4, 5]
    message = failure_text(returns[2])
    assert "Traceback (most recent call last)" in message
    assert "tasks.py" in message and 'raise ValueError("job 2 fails on purpose")' in message
    assert message.rstrip().endswith("ValueError: job 2 fails on purpose")
    hydra_cfg = returns[2].hydra_cfg.hydra
    job_log = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
    assert "ValueError: job 2 fails on purpose" in job_log.read_text()


def test_task_failures_are_not_retried_by_default(launch_jobs: Launch, tmp_path: Path) -> None:
    [returns] = launch_jobs(tasks.fail_on_two, [[["x=2"]]])
    assert failure_text(returns[0]).startswith("Job #0 (x=2) failed on local:")


@pytest.mark.parametrize(
    "task, cause",
    [
        (tasks.exit_hard, "the job process exited with code 3 before reporting a result"),
        (tasks.segfault, "the job process crashed (SIGSEGV)"),
    ],
)
def test_a_job_process_that_dies_by_itself_fails_that_job(launch_jobs: Launch, task, cause: str) -> None:
    [returns] = launch_jobs(task, [[["x=1"], ["x=2"]]])
    assert statuses(returns) == ["FAILED", "FAILED"]
    for job_return in returns:
        assert cause in failure_text(job_return)
        assert job_return.overrides == [f"x={returns.index(job_return) + 1}"]


def kill_when_announced(marker_dir: Path) -> threading.Thread:
    def kill() -> None:
        pid_file = marker_dir / "pid"
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_worker_killed_mid_job_fails_that_job_when_retries_are_off(launch_jobs: Launch, tmp_path: Path) -> None:
    killer = kill_when_announced(tmp_path)
    [returns] = launch_jobs(
        tasks.wait_to_be_killed,
        [[[f"+marker_dir={tmp_path}"]]],
        ["hydra.launcher.max_retries=0"],
    )
    killer.join()
    assert returns[0].status is JobStatus.FAILED
    message = failure_text(returns[0])
    assert "attempt 1 on local: lost: the job process was killed by SIGKILL" in message
    assert len((tmp_path / "invocations").read_text().split()) == 1


def test_worker_killed_mid_job_is_retried(launch_jobs: Launch, tmp_path: Path) -> None:
    killer = kill_when_announced(tmp_path)
    [returns] = launch_jobs(tasks.wait_to_be_killed, [[[f"+marker_dir={tmp_path}"]]])
    killer.join()
    assert returns[0].return_value == "second attempt"
    assert len((tmp_path / "invocations").read_text().split()) == 2


def test_unpicklable_return_value_fails_only_that_job(launch_jobs: Launch) -> None:
    [returns] = launch_jobs(tasks.unpicklable_on_one, [[["x=0"], ["x=1"], ["x=2"]]])
    assert statuses(returns) == ["COMPLETED", "FAILED", "COMPLETED"]
    assert [returns[0].return_value, returns[2].return_value] == [0, 2]
    assert "return value (of type lock) cannot be pickled" in failure_text(returns[1])


def job_times(returns) -> list[dict]:
    return [json.loads((Path(r.hydra_cfg.hydra.runtime.output_dir) / "times.json").read_text()) for r in returns]


def test_results_come_back_in_input_order_when_jobs_finish_out_of_order(launch_jobs: Launch) -> None:
    sleeps = [1.6, 0.2, 1.0, 0.6]
    [returns] = launch_jobs(
        tasks.sleep_and_time,
        [[[f"x={x}", f"+sleep={s}"] for x, s in enumerate(sleeps)]],
        ["hydra.launcher.local.max_parallel_jobs=4"],
    )
    assert [r.return_value for r in returns] == [0, 1, 2, 3]
    assert [r.overrides for r in returns] == [[f"x={x}", f"+sleep={s}"] for x, s in enumerate(sleeps)]
    ends = [times["end"] for times in job_times(returns)]
    assert ends[1] < ends[0]  # they did finish out of order (1.4 s apart: a margin for a loaded machine)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("slots", [1, 3])
def test_no_more_jobs_run_at_once_than_the_slots(launch_jobs: Launch, slots: int) -> None:
    [returns] = launch_jobs(
        tasks.sleep_and_time,
        [[[f"x={x}", "+sleep=1"] for x in range(7)]],
        [f"hydra.launcher.local.max_parallel_jobs={slots}"],
    )
    times = job_times(returns)
    overlap = max_overlap([(t["start"], t["end"]) for t in times])
    assert overlap <= slots  # never more than the slots
    assert overlap >= min(slots, 2)  # and slots are really used at once (7 x 1 s jobs leave room)
    assert len({t["pid"] for t in times}) == 7  # each job in its own process


VERBATIM_VALUES = [
    "two words",
    "semi; colon && and || or",
    "$(touch /tmp/hsm-pwned) and `touch /tmp/hsm-pwned`",
    "$HOME * ? ~ > /tmp/hsm-redirect &",
    'double "quotes" and single \'quotes\'',
    "unicode: héllo wörld ☃ 日本語",
    "back\\slash",
]


def hydra_quoted(value: str) -> str:
    """The value as a quoted string in Hydra's override grammar (only quotes are escaped)."""
    return "'" + value.replace("'", "\\'") + "'"


def test_override_values_reach_the_task_verbatim(launch_jobs: Launch) -> None:
    [returns] = launch_jobs(tasks.echo_value, [[[f"+value={hydra_quoted(v)}"] for v in VERBATIM_VALUES]])
    assert [r.return_value for r in returns] == VERBATIM_VALUES
    assert not Path("/tmp/hsm-pwned").exists() and not Path("/tmp/hsm-redirect").exists()


def test_job_numbers_continue_across_batches(launch_jobs: Launch, tmp_path: Path) -> None:
    batches = launch_jobs(tasks.square, [[["x=1"], ["x=2"]], [["x=3"], ["x=4"], ["x=5"]]])
    flat = [job_return for batch in batches for job_return in batch]
    assert [r.return_value for r in flat] == [1, 4, 9, 16, 25]
    assert [r.hydra_cfg.hydra.job.num for r in flat] == [0, 1, 2, 3, 4]
    assert len({r.hydra_cfg.hydra.job.id for r in flat}) == 5
    for num, job_return in enumerate(flat):
        job_dir = tmp_path / "sweep" / str(num)
        assert job_return.hydra_cfg.hydra.runtime.output_dir == str(job_dir)
        assert (job_dir / ".hydra" / "overrides.yaml").exists()


@pytest.fixture
def compositions(monkeypatch: pytest.MonkeyPatch) -> list:
    """The overrides of every full composition Hydra makes while the test runs."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    made: list = []
    compose = ConfigLoaderImpl.load_configuration

    def counted(self, *args, **kwargs):
        made.append(kwargs.get("overrides"))
        return compose(self, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    return made


def test_jobs_validated_by_the_sweeper_are_not_composed_again(hydra_sweep_runner, tmp_path: Path,
                                                              compositions: list) -> None:
    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=tasks.square, config_path="configs", config_name="compose.yaml",
                               overrides=["hydra/launcher=hsm_distributed", "+x=2", "group1=file1,file2,abc.cde"],
                               temp_dir=tmp_path)
    with sweep:  # group choices: each job is composed in full
        assert [r.return_value for r in sweep.returns[0]] == [4, 4, 4]
    assert len(compositions) == 1 + 3  # the master config, then each job once (by the sweeper)


def test_a_sweep_over_plain_values_composes_one_job_and_derives_the_rest(hydra_sweep_runner, tmp_path: Path,
                                                                        compositions: list) -> None:
    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=tasks.square, config_path="configs", config_name="compose.yaml",
                               overrides=["hydra/launcher=hsm_distributed", "+x=1", "foo=1,2,3,4"], temp_dir=tmp_path)
    with sweep:
        returns = sweep.returns[0]
        assert [r.return_value for r in returns] == [1, 1, 1, 1]
        assert [r.cfg.foo for r in returns] == [1, 2, 3, 4]
        assert [r.hydra_cfg.hydra.overrides.task for r in returns] == [["+x=1", f"foo={n}"] for n in range(1, 5)]
    assert len(compositions) == 1 + 1  # the master config, then the first job; the others are derived


UNGUARDED_SCRIPT = """
import sys
from hydra_zen import launch, make_config

def task(cfg):
    return cfg.x * 2

# No `if __name__ == "__main__":`: every job process that loads this script starts it again.
(jobs,) = launch(make_config(x=0), task, multirun=True, version_base="1.3",
                 overrides=["hydra/launcher=hsm_distributed", f"hydra.sweep.dir={sys.argv[1]}", "x=1,2"])
print("returned", [job.return_value for job in jobs])
"""


def test_a_script_that_sweeps_when_loaded_runs_its_sweep_once(tmp_path: Path) -> None:
    """As multiprocessing refuses a process started while the main module loads: a job process
    refuses the sweep the script starts at top level (it hung before), and the jobs run."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    ran = subprocess.run([sys.executable, str(script), "sweep"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.splitlines()[-1] == "returned [2, 4]"
    assert "the app starts a sweep when its main program is loaded; start it under" in ran.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sweep", "unguarded.py"]  # no sweep of the jobs'
