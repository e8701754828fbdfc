"""hsm_distributed next to its peers, on this machine; writes docs/benchmarks.md.

    .venv/bin/python bench/run.py            # the full run (about half an hour on 2 cores)
    .venv/bin/python bench/run.py --quick    # tiny sizes: proves the code works (CI runs it)

Each scenario runs every contender in turn, `--repeat` rounds alternating contenders,
and reports medians, ratios to the peer and each target with PASS/FAIL. A benchmark, not
a test: the numbers belong to the machine they were measured on (written at the top).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "app.py"
REPORT = ROOT / "docs" / "benchmarks.md"
SLOTS = 4


@dataclass
class Run:
    seconds: float
    first_job: float  # from the process's start to the first job's start
    makespan: float  # from the first job's start to the last job's end
    rss_mib: float  # the launcher process's peak RSS


@dataclass
class Row:
    scenario: str
    contender: str
    runs: list[Run] = field(default_factory=list)

    def median(self, measure: Callable[[Run], float]) -> float:
        return statistics.median(measure(run) for run in self.runs)


@dataclass
class Target:
    text: str
    value: float
    limit: float
    at_least: bool = False  # the value must reach the limit (else stay under it)

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def sweep(launcher: list[str], jobs: int, sleep: float) -> Run:
    """One sweep of the bench app in a fresh folder, timed from outside."""
    with tempfile.TemporaryDirectory() as folder:
        times, rss = Path(folder) / "times", Path(folder) / "rss"
        began = time.time()
        subprocess.run([sys.executable, str(APP), "-m", f"x=range({jobs})", f"sleep={sleep}",
                        f"times_file={times}", f"rss_file={rss}", "hydra.sweep.dir=sweep", *launcher],
                       cwd=folder, check=True, capture_output=True, timeout=3600)
        seconds = time.time() - began
        spans = [tuple(map(float, line.split())) for line in times.read_text().splitlines()]
        assert len(spans) == jobs, f"{len(spans)} of {jobs} jobs ran"
        first, last = min(start for start, _ in spans), max(end for _, end in spans)
        return Run(seconds, first - began, last - first, int(rss.read_text()) / 1024)


LAUNCHERS = {
    "hsm_distributed": ["hydra/launcher=hsm_distributed", f"hydra.launcher.local.max_parallel_jobs={SLOTS}"],
    "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={SLOTS}"],
    "basic": ["hydra/launcher=basic"],
}


def alternate(scenario: str, contenders: list[str], jobs: int, sleep: float, repeat: int) -> dict[str, Row]:
    rows = {name: Row(scenario, name) for name in contenders}
    for _ in range(repeat):
        for name in contenders:
            rows[name].runs.append(sweep(LAUNCHERS[name], jobs, sleep))
            print(f"  {scenario}: {name} {rows[name].runs[-1].seconds:.1f} s", flush=True)
    return rows


def composition_ms(config_dir: Path, config_name: str, jobs: int) -> tuple[float, float]:
    """CPU ms per job: Hydra's load_sweep_config, then the launcher's fast path."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from hsm_core.composition import Compositions

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        found = GlobalHydra.instance().hydra
        assert found is not None
        master = found.compose_config(config_name=config_name, overrides=[], run_mode=RunMode.MULTIRUN)
        overrides = [[f"lr={0.001 * n}", f"seed={n}"] for n in range(jobs)]
        began = time.process_time()
        for job in overrides:
            found.config_loader.load_sweep_config(master, job)
        hydra_ms = (time.process_time() - began) / jobs * 1000
        compositions = Compositions(found.config_loader)
        compositions.make(master, overrides[0])  # the one full composition its shape needs
        began = time.process_time()
        for job in overrides[1:]:
            compositions.make(master, job)
        fast_ms = (time.process_time() - began) / (jobs - 1) * 1000
    return hydra_ms, fast_ms


def versions() -> str:
    names = ("hsm-distributed", "hydra-core", "omegaconf", "hydra-joblib-launcher", "joblib", "asyncssh")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--report", type=Path, default=REPORT)
    options = parser.parse_args()
    repeat = 1 if options.quick else options.repeat
    short_jobs, scale_sizes, compose_jobs = (6, (20,), 5) if options.quick else (60, (1000, 10000), 200)
    started = time.time()

    print("local: short jobs", flush=True)
    local = alternate("local", ["hsm_distributed", "joblib", "basic"], short_jobs, 0.2, repeat)
    print("efficiency: 1 s jobs", flush=True)
    efficiency_jobs = SLOTS * (1 if options.quick else 12)
    efficiency = alternate("efficiency", ["hsm_distributed"], efficiency_jobs, 1.0, repeat)
    scale: dict[int, dict[str, Row]] = {}
    for size in scale_sizes:
        print(f"scale: {size} no-op jobs", flush=True)
        # The peers at 1,000 (joblib's and Hydra's own launchers); 10,000 once, alone: ~10 min a run.
        contenders = ["hsm_distributed"] if size > 1000 else ["hsm_distributed", "joblib", "basic"]
        scale[size] = alternate(f"scale {size}", contenders, size, 0.0, 1 if size > 1000 else repeat)
    print("composition", flush=True)
    composition = {
        "example_app": composition_ms(ROOT / "example_app" / "conf", "config", compose_jobs),
        "several groups (tests/conf_composition/app.yaml)": composition_ms(ROOT / "tests" / "conf_composition",
                                                                           "app", compose_jobs),
    }

    seconds = {name: row.median(lambda run: run.seconds) for name, row in local.items()}
    ideal = efficiency_jobs * 1.0 / SLOTS  # seconds: every slot busy with 1 s jobs, nothing else
    largest = max(scale_sizes)
    targets = [
        Target(f"local, {short_jobs} x 0.2 s jobs: hsm / joblib", seconds["hsm_distributed"] / seconds["joblib"], 0.6),
        Target(f"efficiency, {efficiency_jobs} x 1 s jobs at {SLOTS} local slots: ideal / actual makespan",
               ideal / efficiency["hsm_distributed"].median(lambda run: run.makespan), 0.9, at_least=True),
    ]
    if 1000 in scale:
        no_op = {name: row.median(lambda run: run.seconds) for name, row in scale[1000].items()}
        targets.append(Target("1,000 no-op jobs: hsm / joblib", no_op["hsm_distributed"] / no_op["joblib"], 0.4))
    targets += [
        Target(f"first job started after process start, {largest} jobs (s)",
               scale[largest]["hsm_distributed"].median(lambda run: run.first_job), 10.0),
        Target(f"launcher peak RSS, {largest} jobs (MiB)",
               scale[largest]["hsm_distributed"].median(lambda run: run.rss_mib), 500.0),
    ]
    targets += [Target(f"composition, {name}: fast path / Hydra", fast / full, 0.1)
                for name, (full, fast) in composition.items()]

    lines = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime(started))} on {platform.node()}: {os.cpu_count()} cores,"
        f" {platform.platform()}, Python {platform.python_version()}; {versions()}.",
        f"Command: `.venv/bin/python bench/run.py{' --quick' if options.quick else ''}`"
        f" ({repeat} round{'s' if repeat > 1 else ''}, contenders alternating, medians; took"
        f" {(time.time() - started) / 60:.0f} min). {SLOTS} slots for every launcher that has them"
        " (Hydra's BasicLauncher runs one job at a time). The app is `bench/app.py`.",
        "",
        "| scenario | contender | median wall time | first job after | makespan | launcher peak RSS | vs joblib |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rows in (local, efficiency, *scale.values()):
        peer = rows.get("joblib")
        for row in rows.values():
            wall = row.median(lambda run: run.seconds)
            ratio = f"{wall / peer.median(lambda run: run.seconds):.2f}x" if peer else "-"
            first, makespan = row.median(lambda run: run.first_job), row.median(lambda run: run.makespan)
            lines.append(f"| {row.scenario} | {row.contender} | {wall:.1f} s | {first:.1f} s | {makespan:.1f} s"
                         f" | {row.median(lambda run: run.rss_mib):.0f} MiB | {ratio} |")
    lines += ["", "| composition, CPU per job | Hydra | fast path | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {full:.1f} ms | {fast:.2f} ms | {fast / full:.3f} |"
              for name, (full, fast) in composition.items()]
    lines += ["", "| target | measured | limit | |", "| --- | --- | --- | --- |"]
    lines += [f"| {target.text} | {target.value:.2f} | {'>=' if target.at_least else '<='} {target.limit:g} |"
              f" {'PASS' if target.met else 'FAIL'} |" for target in targets]
    options.report.parent.mkdir(parents=True, exist_ok=True)
    options.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
