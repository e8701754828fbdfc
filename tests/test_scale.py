"""What the launcher holds does not grow with the sweep: a job's config travels as bytes
until it is dispatched, and its JobReturn is kept compressed once it is settled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hosts

BENCH_APP = Path(__file__).parents[1] / "bench" / "app.py"  # no-op jobs by default


def peak_rss_kib(jobs: int, tmp_path: Path) -> int:
    """Run a sweep of `jobs` no-op jobs; the launcher's peak RSS, as its callback read it."""
    rss_file = tmp_path / f"rss-{jobs}"
    run = subprocess.run(
        [sys.executable, str(BENCH_APP), "-m", "hydra/launcher=hsm_distributed", f"x=range({jobs})",
         f"hydra.sweep.dir={tmp_path / str(jobs)}", f"rss_file={rss_file}", "hydra.launcher.local.max_parallel_jobs=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{jobs} completed, 0 failed" in run.stdout  # Hydra logs to stdout
    return int(rss_file.read_text())


@pytest.mark.timeout(900)
def test_memory_does_not_grow_with_the_sweep(tmp_path: Path) -> None:
    small, large = peak_rss_kib(100, tmp_path), peak_rss_kib(500, tmp_path)
    grown_mib = (large - small) / 1024
    print(f"launcher peak RSS: 100 jobs {small / 1024:.0f} MiB, 500 jobs {large / 1024:.0f} MiB")
    # Holding each job's config (~90 KiB) and full JobReturn (~150 KiB) grew it by ~190 MiB for
    # 800 jobs (~95 MiB for these 400); what is left per job is a few KiB of records.
    assert grown_mib < 25, f"the launcher's peak RSS grew by {grown_mib:.0f} MiB for 400 more jobs"


@pytest.mark.timeout(600)
def test_the_benchmark_runs(tmp_path: Path, ssh_hosts: list[hosts.SshHost]) -> None:
    """`bench/run.py --quick`: the benchmark's code works (its numbers are not judged here),
    on the session's SSH hosts (the bench would otherwise start its own) and a Slurm it starts."""
    hosts.require_components("parallel")
    report = tmp_path / "benchmarks.md"
    given = ",".join(f"{host.name}:{host.user}:{host.port}" for host in ssh_hosts)
    run = subprocess.run([sys.executable, str(BENCH_APP.parent / "run.py"), "--quick", "--report", str(report),
                          "--hosts", given], cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-2000:]
    text = report.read_text()
    for scenario in ("| local | hsm_distributed |", "| local | joblib |", "| local | basic |",
                     "| ssh | hsm_distributed |", "| ssh | parallel |", "| ssh | parallel -M |",
                     "| efficiency | hsm_distributed |", "| scale 20 | hsm_distributed |", "| example_app |",
                     "| environment | hsm_distributed, environment built, reused |",
                     "| hsm_distributed (uv) |", "| venv + pip install -r |",
                     "| slurm, 2 x 0.5 s | hsm_distributed (allocation) |", "| slurm, 2 x 0.5 s | submitit |"):
        assert scenario in text
    assert text.count("PASS") + text.count("FAIL") == 10
