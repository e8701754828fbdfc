"""Wall time of one local sweep under hsm_distributed and under Hydra's joblib launcher.

    .venv/bin/python bench/local_vs_joblib.py [--jobs 24] [--slots 6] [--sleep 1.0] [--repeat 3]

Both launchers run the same app (tests/sweep_app.py, task who_runs: sleep, then write a
file) with the same number of parallel slots, one after the other, `--repeat` times each.
Prints the best time of each and their ratio (hsm / joblib); ARCHITECTURE.md's target is
at most 0.6. A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "tests" / "sweep_app.py"


def sweep_seconds(launcher: list[str], jobs: int, sleep: float) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run([sys.executable, str(APP), "-m", "task=who_runs", f"x=range({jobs})", f"+sleep={sleep}",
                        "hydra.sweep.dir=sweep", *launcher], cwd=folder, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--slots", type=int, default=6)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    launchers = {
        "hsm_distributed": ["hydra/launcher=hsm_distributed",
                            f"hydra.launcher.local.max_parallel_jobs={options.slots}"],
        "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={options.slots}"],
    }
    best = {name: min(sweep_seconds(args, options.jobs, options.sleep) for _ in range(options.repeat))
            for name, args in launchers.items()}
    ideal = options.jobs / options.slots * options.sleep
    for name, seconds in best.items():
        print(f"{name:16} {seconds:6.2f} s   (ideal {ideal:.2f} s of job time; efficiency {ideal / seconds:.2f})")
    print(f"ratio hsm_distributed / joblib: {best['hsm_distributed'] / best['joblib']:.2f} (target <= 0.6)")


if __name__ == "__main__":
    main()
