"""GPUs as slots: each job sees only its own GPUs, on every machine. No GPU is needed: a fake
nvidia-smi reports the GPUs (tests/fake_nvidia_smi.sh), locally and on an SSH test host."""

from __future__ import annotations

import collections
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import browser
import hosts
import tasks
from conftest import Launch, remote_override
from hosts import SshHost
from hsm_core import journal
from hsm_core.gpus import Gpu, GpuPool

FAKE = Path(__file__).parent / "fake_nvidia_smi.sh"


def fake_gpus(folder: Path, rows: list[tuple[int, str, int, int]]) -> dict[str, str]:
    """A bin dir whose nvidia-smi reports `rows` (index, uuid, used MiB, total MiB): the env
    (PATH, HSM_FAKE_GPUS) that makes a machine's jobs and probes see them. Readable by the hosts."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FAKE, folder / "nvidia-smi")
    (folder / "nvidia-smi").chmod(0o755)
    (folder / "gpus.csv").write_text("".join(f"{i}, {uuid}, {used}, {total}\n" for i, uuid, used, total in rows))
    for path in (folder, folder / "gpus.csv"):
        path.chmod(path.stat().st_mode | 0o755)
    return {"PATH": f"{folder}:/usr/local/bin:/usr/bin:/bin", "HSM_FAKE_GPUS": str(folder / "gpus.csv")}


def test_a_pool_hands_out_free_gpus_and_takes_them_back() -> None:
    pool = GpuPool([Gpu(0, "a"), Gpu(1, "b"), Gpu(2, "c"), Gpu(3, "d")], per_job=2, min_free_memory_mb=1000)
    pool.read_memory([{"uuid": "a", "memory_used": 15500, "memory_total": 16000}])
    assert pool.slots() == 2 and pool.skipped() == [Gpu(0, "a")] and pool.capacity() == 1
    assert pool.take("job1") == (Gpu(1, "b"), Gpu(2, "c"))
    assert pool.capacity() == 0
    pool.read_memory([{"uuid": "a", "memory_used": 0, "memory_total": 16000}])
    assert pool.take("job2") == (Gpu(0, "a"), Gpu(3, "d"))
    pool.release("job1")
    assert pool.capacity() == 1 and pool.usable() == [Gpu(1, "b"), Gpu(2, "c")]


def overlapping(first: dict, second: dict) -> bool:
    return first["start"] < second["end"] and second["start"] < first["end"]


@pytest.mark.timeout(300)
def test_no_gpu_is_held_by_two_jobs_and_every_gpu_is_used(launch_jobs: Launch, ssh_hosts: list[SshHost]) -> None:
    """...and the report draws each attempt in the row of the GPUs it had."""
    uuids = [f"GPU-host1-{n}" for n in range(4)]
    host_env = fake_gpus(hosts.BASE / "fake-gpus-host1", [(n, uuid, 100, 16000) for n, uuid in enumerate(uuids)])
    [returns] = launch_jobs(
        tasks.gpu_job, [[[f"x={x}", "+sleep=1"] for x in range(10)]],
        ["hydra.launcher.local.gpus=2",
         remote_override("host1", ssh_hosts[0].source_config(gpus="auto", gpus_per_job=2, max_parallel_jobs=4,
                                                             env=host_env))],
    )
    seen = [job_return.return_value for job_return in returns]
    held = collections.defaultdict(list)  # (machine, GPU) -> the jobs that saw it
    for job in seen:
        assert job["visible"] == job["hsm"]
        for gpu in job["visible"].split(","):
            held[(job["user"], gpu)].append(job)
    for (machine, gpu), jobs in held.items():
        assert not any(overlapping(a, b) for a, b in itertools.combinations(jobs, 2)), (machine, gpu)
    assert set(held) == {("root", "0"), ("root", "1"), *((ssh_hosts[0].user, uuid) for uuid in uuids)}
    host_jobs = [job for job in seen if job["user"] == ssh_hosts[0].user]
    assert host_jobs and all(len(job["visible"].split(",")) == 2 for job in host_jobs)
    starts = [r for r in journal.read(launch_jobs_sweep(returns)) if r["event"] == "start"]
    assert all(r["gpus"] for r in starts)  # the journal names each attempt's GPUs
    with browser.chromium() as chromium:  # started after the sweep: see browser.chromium
        data, opened = browser.report_shown(chromium, launch_jobs_sweep(returns))
        shown = opened.page.eval_on_selector_all("text.lane-label", "labels => labels.map(l => l.textContent)")
    assert {"GPU 0", "GPU 1"} <= set(shown) and any(label.startswith("GPUs ") for label in shown), shown
    rows = {(row["job"], row["source"]): data["lanes"][row["lane"]] for row in data["attempts"]}
    assert {key: (lane["source"], lane["label"]) for key, lane in rows.items()} == {
        (r["num"], r["source"]): (r["source"], ("GPU " if len(r["gpus"]) == 1 else "GPUs ") + ",".join(
            map(str, r["gpus"]))) for r in starts}
    timeline = sorted((job["start"] - min(j["start"] for j in seen), job["user"], job["visible"]) for job in seen)
    print("\n".join(f"{start:5.2f}s  {user:10} {visible}" for start, user, visible in timeline))


def launch_jobs_sweep(returns: list) -> Path:
    return Path(returns[0].hydra_cfg.hydra.sweep.dir)


def test_a_gpu_short_of_free_memory_is_skipped(launch_jobs: Launch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in fake_gpus(tmp_path / "bin", [(0, "GPU-busy", 15500, 16000), (1, "GPU-idle", 0, 16000)]).items():
        monkeypatch.setenv(name, value)
    [returns] = launch_jobs(tasks.gpu_job, [[[f"x={x}", "+sleep=0.2"] for x in range(3)]],
                            ["hydra.launcher.local.gpus=auto", "hydra.launcher.local.min_free_memory_mb=1000"])
    assert [r.return_value["visible"] for r in returns] == ["GPU-idle"] * 3
    shown = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "status", str(tmp_path / "sweep")],
                           capture_output=True, text=True, timeout=60)
    header, *rows = shown.stdout.split("\n\n")[0].splitlines()
    assert header.split()[3] == "GPUS" and [row.split()[4] for row in rows] == ["1", "1", "1"]  # GPU 1, each job
    skipped = "GPU 0 of local is skipped while it has 500 MiB free (min_free_memory_mb is 1000)"
    assert capsys.readouterr().out.count(skipped) == 1


def test_a_child_left_behind_keeps_its_gpu_until_it_exits(launch_jobs: Launch, tmp_path: Path) -> None:
    marker = tmp_path / "child-ended"
    [returns] = launch_jobs(tasks.leave_a_child, [[["x=0", "+linger=3", f"+marker={marker}"], ["x=1"]]],
                            ["hydra.launcher.local.gpus=1", "hydra.launcher.local.max_parallel_jobs=2"])
    first, second = (r.return_value for r in returns)
    assert first["visible"] == second["visible"] == "0"
    child_ended = float(marker.read_text())
    assert second["start"] >= child_ended - 0.05  # job 1 got GPU 0 only after job 0's child was gone


def test_stagger_spaces_the_starts_on_a_source(launch_jobs: Launch) -> None:
    [returns] = launch_jobs(tasks.gpu_job, [[[f"x={x}"] for x in range(3)]],
                            ["hydra.launcher.local.max_parallel_jobs=3", "hydra.launcher.local.stagger_s=1"])
    starts = sorted(r.return_value["start"] for r in returns)
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # 1 s apart (a lower bound: load only widens gaps)


def test_gpus_per_job_zero_runs_cpu_jobs_that_see_no_gpu(launch_jobs: Launch) -> None:
    [returns] = launch_jobs(tasks.gpu_job, [[["x=1"], ["x=2"]]],
                            ["hydra.launcher.local.gpus=2", "hydra.launcher.local.gpus_per_job=0"])
    assert [(r.return_value["visible"], r.return_value["hsm"]) for r in returns] == [("", "")] * 2
