"""hsm_distributed next to its peers, on this machine; writes docs/benchmarks.md.

    .venv/bin/python bench/run.py            # the full run (about an hour on 2 cores)
    .venv/bin/python bench/run.py --quick    # tiny sizes: proves the code works (CI runs it)

As root: the SSH scenarios start two real sshd hosts on loopback (tests/hosts.py), and
compare with GNU parallel (apt-get install parallel); the Slurm scenarios start a
single-node Slurm (tests/slurm.py) and compare with Hydra's submitit launcher, installed
into a venv of its own (~/.cache/hsm-bench/submitit: it is no dependency of the project).

Each scenario runs every contender in turn, `--repeat` rounds alternating contenders,
and reports medians, ratios to the peer and each target with PASS/FAIL. A benchmark, not
a test: the numbers belong to the machine they were measured on (written at the top).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
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
REPORT = ROOT / "docs" / "benchmarks.md"
SLOTS = 4  # local slots of every local launcher
SSH_SLOTS = 3  # per host, in the SSH scenario
UNEQUAL_SLOTS = (2, 1, 3)  # local, host1, host2, in the efficiency scenario

SLURM_SLOTS = 2  # jobs queued or running at once on the test Slurm, for every contender
SUBMITIT_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsm-bench" / "submitit"

sys.path.insert(0, str(ROOT / "tests"))
import hosts  # noqa: E402  (the tests' real sshd hosts)
import slurm as test_slurm  # noqa: E402  (the tests' single-node Slurm)


@dataclass
class Run:
    seconds: float
    first_job: float  # from the process's start to the first job's start
    makespan: float  # from the first job's start to the last job's end
    rss_mib: float | None  # the launcher process's peak RSS (Hydra launchers only)


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


def shown(value: float, limit: float) -> str:
    """The value to three digits, or as many more as tell it from the limit (0.8996, not 0.9)."""
    for digits in range(3, 8):
        text = f"{value:.{digits}g}"
        if float(text) != limit:
            break
    return text


# A contender's command for one sweep: (app, scratch folder, jobs, seconds per job) -> argv.
Command = Callable[[Path, Path, int, float], list[str]]


def hydra_sweep(*launcher: str) -> Command:
    """The bench app as a Hydra multirun with these launcher overrides."""

    def command(app: Path, scratch: Path, jobs: int, sleep: float) -> list[str]:
        return [sys.executable, str(app), "-m", f"x=range({jobs})", f"sleep={sleep}", f"times_file={scratch / 'times'}",
                f"rss_file={scratch / 'rss'}", "hydra.sweep.dir=sweep", *launcher]

    return command


LOCAL = {
    "hsm_distributed": hydra_sweep("hydra/launcher=hsm_distributed", f"hydra.launcher.local.max_parallel_jobs={SLOTS}"),
    "joblib": hydra_sweep("hydra/launcher=joblib", f"hydra.launcher.n_jobs={SLOTS}"),
    "basic": hydra_sweep("hydra/launcher=basic"),
}


@dataclass
class Hosts:
    """Two real sshd hosts on loopback (tests/hosts.py), and an ssh wrapper that reaches them
    by name, for GNU parallel (its --ssh cannot take a command with spaces)."""

    machines: list[hosts.SshHost]
    wrapper: Path

    @classmethod
    def reach(cls, machines: list[hosts.SshHost], folder: Path) -> Hosts:
        entries = [f"Host {host.name}\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n"
                   f"  IdentityFile {hosts.BASE / 'client_key'}\n  IdentitiesOnly yes\n"
                   f"  UserKnownHostsFile {hosts.BASE / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                   "  BatchMode yes\n" for host in machines]
        config = folder / "ssh_config"
        config.write_text("".join(entries))
        wrapper = folder / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec ssh -F {config} "$@"\n')
        wrapper.chmod(0o755)
        return cls(machines, wrapper)

    def hsm(self, *slots: int, **extra: str) -> Command:
        """hsm_distributed over these hosts with these slots (a first slot count is local's; 0: none),
        `extra` settings for each host."""
        local, *remote = slots
        return hydra_sweep(
            "hydra/launcher=hsm_distributed",
            f"hydra.launcher.local.max_parallel_jobs={local}" if local else "hydra.launcher.local.enabled=false",
            *(hosts.remote_override(host.name, host.source_config(max_parallel_jobs=count, **extra))
              for host, count in zip(self.machines, remote, strict=True)))

    def run(self, host: hosts.SshHost, script: str, stdin: str = "") -> str:
        """A shell script on the host over ssh; its output."""
        done = subprocess.run([str(self.wrapper), host.name, script], input=stdin, capture_output=True, text=True,
                              timeout=1800)
        if done.returncode:
            raise SystemExit(f"on {host.name}: {script} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done.stdout

    def parallel(self, master: bool) -> Command:
        """GNU parallel running one `python app.py x=N` per job over ssh (with -M: over one
        ControlMaster connection per host), the app read from this machine's folder."""
        logins = ",".join(f"{SSH_SLOTS}/{host.name}" for host in self.machines)

        def command(app: Path, scratch: Path, jobs: int, sleep: float) -> list[str]:
            return ["parallel", "--will-cite", "--halt", "now,fail=1", "--ssh", str(self.wrapper), "-S", logins,
                    *(["-M"] if master else []), str(hosts.host_python_env()), str(app), "x={}", f"sleep={sleep}",
                    f"times_file={scratch / 'times'}", f"hydra.run.dir={scratch / 'runs' / '{#}'}",
                    ":::", *map(str, range(jobs))]

        return command


def sweep(command: Command, app: Path, jobs: int, sleep: float) -> Run:
    """One sweep in a fresh scratch folder, timed from outside. The folder is open to the
    hosts' users, whose jobs append to its times file."""
    with tempfile.TemporaryDirectory() as name:
        scratch = Path(name)
        scratch.chmod(0o755)
        times, rss = scratch / "times", scratch / "rss"
        times.touch(0o666)
        times.chmod(0o666)
        (scratch / "runs").mkdir(mode=0o1777)
        (scratch / "runs").chmod(0o1777)
        began = time.time()
        done = subprocess.run(command(app, scratch, jobs, sleep), cwd=scratch, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=3600)
        if done.returncode:
            raise SystemExit(f"{' '.join(done.args[:8])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
        seconds = time.time() - began
        spans = [tuple(map(float, line.split())) for line in times.read_text().splitlines()]
        assert len(spans) == jobs, f"{len(spans)} of {jobs} jobs ran"
        first, last = min(start for start, _ in spans), max(end for _, end in spans)
        return Run(seconds, first - began, last - first, int(rss.read_text()) / 1024 if rss.exists() else None)


def alternate(scenario: str, contenders: dict[str, Command], app: Path, jobs: int, sleep: float,
              repeat: int) -> dict[str, Row]:
    rows = {name: Row(scenario, name) for name in contenders}
    for _ in range(repeat):
        for name, command in contenders.items():
            rows[name].runs.append(sweep(command, app, jobs, sleep))
            print(f"  {scenario}: {name} {rows[name].runs[-1].seconds:.1f} s", flush=True)
    return rows


def submitit_python() -> Path:
    """The Python of a venv with Hydra's submitit launcher at this Hydra's version (made once)."""
    python = SUBMITIT_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(SUBMITIT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"hydra-core=={metadata.version('hydra-core')}", "hydra-submitit-launcher"], check=True)
    return python


def on_slurm() -> dict[str, Command]:
    """The test Slurm, SLURM_SLOTS jobs at once: hsm_distributed (per_job, and warm agents in
    SLURM_SLOTS allocations) and submitit (job arrays), none with local slots."""
    submitit = hydra_sweep("hydra/launcher=submitit_slurm", f"hydra.launcher.partition={test_slurm.PARTITION}",
                           f"hydra.launcher.array_parallelism={SLURM_SLOTS}", "hydra.launcher.timeout_min=10",
                           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null")
    python = str(submitit_python())
    cluster = {"kind": "slurm", "host": "localhost", "max_parallel_jobs": SLURM_SLOTS,
               "partition": test_slurm.PARTITION}
    return {
        "hsm_distributed (per_job)": hydra_sweep("hydra/launcher=hsm_distributed", "hydra.launcher.local.enabled=false",
                                                 hosts.remote_override("cluster", cluster)),
        "hsm_distributed (allocation)": hydra_sweep(
            "hydra/launcher=hsm_distributed", "hydra.launcher.local.enabled=false",
            hosts.remote_override("cluster", {**cluster, "mode": "allocation"})),  # SLURM_SLOTS allocations of 1 job
        # Its jobs unpickle the app's module: Slurm passes them the PYTHONPATH that finds it.
        "submitit": lambda app, scratch, jobs, sleep: ["env", f"PYTHONPATH={app.parent}", python,
                                                       *submitit(app, scratch, jobs, sleep)[1:]],
    }


def slot_overhead(row: Row, jobs: int, sleep: float) -> float:
    """Seconds of slot time each job cost beyond its own work (makespan x slots - work) / jobs."""
    return (row.median(lambda run: run.makespan) * SLURM_SLOTS - jobs * sleep) / jobs


def bench_environment(quick: bool, app: Path) -> str:
    """The `environment` the bench builds: `mirror` of this venv; quick, a requirements file
    in the app's folder naming nothing (what the worker needs is added)."""
    if not quick:
        return "mirror"
    (app.parent / "requirements.txt").write_text("")
    return "requirements.txt"


def environment_builds(reach: Hosts, quick: bool, repeat: int, app: Path) -> dict[str, list[float]]:
    """Seconds to build the jobs' environment from scratch on host1 with warm caches (a first,
    untimed round warms them, and installs uv into ~/.hsm/tools; quick: no such round): the
    launcher's own build (uv) next to `python3 -m venv` + `pip install -r` of the same
    requirements."""
    from hsm_core import env_requirements

    environment = env_requirements.described(bench_environment(quick, app), app.parent, "environment")
    assert environment is not None
    host = reach.machines[0]
    reach.run(host, "mkdir -p ~/.hsm/envs && cat > ~/.hsm/envs/bench.requirements", environment.requirements_text())
    builder = (ROOT / "hsm_core" / "environments.py").read_text()
    commands = {
        "hsm_distributed (uv)": ('rm -rf ~/.hsm/envs/bench-* && /usr/bin/python3 - build "$HOME/.hsm/envs" bench 30'
                                 " index", builder),
        "venv + pip install -r": ("rm -rf /tmp/bench-pip-env && /usr/bin/python3 -m venv /tmp/bench-pip-env &&"
                                  " /tmp/bench-pip-env/bin/pip install -q --disable-pip-version-check"
                                  " -r ~/.hsm/envs/bench.requirements", ""),
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    warm = 0 if quick else 1
    for round_number in range(warm + repeat):
        for name, (script, stdin) in commands.items():
            began = time.monotonic()
            reach.run(host, script, stdin)
            if round_number >= warm:
                seconds[name].append(time.monotonic() - began)
                print(f"  environment build: {name} {seconds[name][-1]:.1f} s", flush=True)
    reach.run(host, "rm -rf ~/.hsm/envs/bench-* /tmp/bench-pip-env")
    return seconds


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


def given_hosts(spec: str) -> list[hosts.SshHost]:
    """`--hosts host1:USER:PORT,...`: hosts already running (the tests' fixture's)."""
    machines = []
    for entry in spec.split(","):
        name, user, port = entry.split(":")
        machines.append(hosts.SshHost(name, user, int(port), hosts.BASE / name))
    return machines


def copy_app(folder: Path) -> Path:
    """The bench app in a project folder of its own, readable by the hosts' users."""
    shutil.copy(ROOT / "bench" / "app.py", folder / "app.py")
    shutil.copytree(ROOT / "bench" / "conf", folder / "conf")
    for path in (folder, folder / "conf"):
        path.chmod(0o755)
    return folder / "app.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--hosts", help="NAME:USER:PORT,NAME:USER:PORT of running test hosts (default: start two)")
    parser.add_argument("--slurm-running", action="store_true", help="the tests' Slurm is running (default: start it)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        machines = given_hosts(options.hosts) if options.hosts else hosts.setup_hosts(2)
        cluster = None if options.slurm_running else test_slurm.start()
        try:
            report = measure(options.quick, options.repeat, copy_app(Path(folder)), Hosts.reach(machines, Path(folder)))
        finally:
            if cluster is not None:
                cluster.stop()
            if not options.hosts:
                for host in machines:
                    host.stop()
    options.report.parent.mkdir(parents=True, exist_ok=True)
    options.report.write_text(report)
    print(report)


def measure(quick: bool, repeat: int, app: Path, reach: Hosts) -> str:
    """Every scenario; the report's text."""
    repeat = 1 if quick else repeat
    short_jobs, efficiency_jobs, compose_jobs = (6, 6, 5) if quick else (60, 120, 200)
    scale_sizes = (20,) if quick else (1000, 10000)
    started = time.time()

    print("local: short jobs", flush=True)
    local = alternate("local", LOCAL, app, short_jobs, 0.2, repeat)
    print("ssh: short jobs over two hosts", flush=True)
    ssh = alternate("ssh", {"hsm_distributed": reach.hsm(0, SSH_SLOTS, SSH_SLOTS), "parallel": reach.parallel(False),
                            "parallel -M": reach.parallel(True)}, app, short_jobs, 0.2, repeat)
    print("efficiency: 1 s jobs over local and two hosts", flush=True)
    efficiency = alternate("efficiency", {"hsm_distributed": reach.hsm(*UNEQUAL_SLOTS)}, app, efficiency_jobs, 1.0,
                           repeat)
    scale: dict[int, dict[str, Row]] = {}
    for size in scale_sizes:
        print(f"scale: {size} no-op jobs", flush=True)
        # The peers at 1,000 (joblib's and Hydra's own launchers); 10,000 once, alone: ~10 min a run.
        contenders = {"hsm_distributed": LOCAL["hsm_distributed"]} if size > 1000 else LOCAL
        scale[size] = alternate(f"scale {size}", contenders, app, size, 0.0, 1 if size > 1000 else repeat)
    print("environments: a first build on host1, and a sweep reusing it", flush=True)
    builds = environment_builds(reach, quick, repeat, app)
    host1 = Hosts(reach.machines[:1], reach.wrapper)
    reused = alternate("environment", {
        "hsm_distributed, environment: found": host1.hsm(0, SSH_SLOTS),
        "hsm_distributed, environment built, reused": host1.hsm(0, SSH_SLOTS, python=hosts.HOST_PYTHON,
                                                                environment=bench_environment(quick, app)),
    }, app, short_jobs, 0.0, repeat + 1)
    for row in reused.values():
        del row.runs[0]  # the first round builds the environment: reuse is measured
    slurm_targets = {(2, 0.5): 0.6} if quick else {(20, 1.0): 0.6, (200, 0.1): 0.2}  # (jobs, seconds): limit
    slurm_sizes = list(slurm_targets)
    print("slurm: short jobs on the test Slurm", flush=True)
    contenders = on_slurm()
    if quick:  # the suite runs the quick bench: per_job is the Slurm tests' own
        del contenders["hsm_distributed (per_job)"]
    slurm_rows = {size: alternate(f"slurm, {size[0]} x {size[1]:g} s", contenders, app, *size, repeat)
                  for size in slurm_sizes}
    print("composition", flush=True)
    composition = {
        "example_app": composition_ms(ROOT / "example_app" / "conf", "config", compose_jobs),
        "several groups (tests/conf_composition/app.yaml)": composition_ms(ROOT / "tests" / "conf_composition",
                                                                           "app", compose_jobs),
    }

    def wall(rows: dict[str, Row], name: str) -> float:
        return rows[name].median(lambda run: run.seconds)

    ideal = efficiency_jobs * 1.0 / sum(UNEQUAL_SLOTS)  # seconds: every slot busy with 1 s jobs, nothing else
    largest = max(scale_sizes)
    targets = [
        Target(f"local, {short_jobs} x 0.2 s jobs: hsm / joblib",
               wall(local, "hsm_distributed") / wall(local, "joblib"), 0.6),
        Target(f"ssh, {short_jobs} x 0.2 s jobs over 2 hosts x {SSH_SLOTS} slots: hsm / GNU parallel -M",
               wall(ssh, "hsm_distributed") / wall(ssh, "parallel -M"), 0.5),
        Target(f"efficiency, {efficiency_jobs} x 1 s jobs, slots {'/'.join(map(str, UNEQUAL_SLOTS))} on local/host1/"
               "host2: ideal / actual makespan",
               ideal / efficiency["hsm_distributed"].median(lambda run: run.makespan), 0.9, at_least=True),
    ]
    if 1000 in scale:
        targets.append(Target("1,000 no-op jobs: hsm / joblib",
                              wall(scale[1000], "hsm_distributed") / wall(scale[1000], "joblib"), 0.4))
    targets += [
        Target(f"first job started after process start, {largest} jobs (s)",
               scale[largest]["hsm_distributed"].median(lambda run: run.first_job), 10.0),
        Target(f"launcher peak RSS, {largest} jobs (MiB)",
               scale[largest]["hsm_distributed"].median(lambda run: run.rss_mib or 0.0), 500.0),
    ]
    targets += [Target(f"composition, {name}: fast path / Hydra", fast / full, 0.1)
                for name, (full, fast) in composition.items()]
    targets += [Target(f"slurm, {jobs} x {sleep:g} s jobs, {SLURM_SLOTS} at a time: hsm (allocation) / submitit",
                       wall(slurm_rows[(jobs, sleep)], "hsm_distributed (allocation)")
                       / wall(slurm_rows[(jobs, sleep)], "submitit"), limit)
                for (jobs, sleep), limit in slurm_targets.items()]
    build = {name: statistics.median(values) for name, values in builds.items()}
    targets += [
        Target("environment, a sweep reusing a built env: added launch time (s)",
               wall(reused, "hsm_distributed, environment built, reused")
               - wall(reused, "hsm_distributed, environment: found"), 0.5),
        Target(f"environment, first build of {'what the worker needs' if quick else 'mirror'} with warm caches:"
               " hsm (uv) / venv + pip install -r",
               build["hsm_distributed (uv)"] / build["venv + pip install -r"], 0.3),
    ]

    lines = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime(started))} on {platform.node()}: {os.cpu_count()} cores,"
        f" {platform.platform()}, Python {platform.python_version()}; {versions()}.",
        f"Command: `.venv/bin/python bench/run.py{' --quick' if quick else ''}`"
        f" ({repeat} round{'s' if repeat > 1 else ''}, contenders alternating, medians; took"
        f" {(time.time() - started) / 60:.0f} min). {SLOTS} local slots for every launcher that has them"
        " (Hydra's BasicLauncher runs one job at a time). The app is `bench/app.py`. The hosts are real sshd"
        f" servers on loopback, each a Linux user of this machine (`tests/hosts.py`), {SSH_SLOTS} slots each in the"
        " ssh scenario; GNU parallel reads the app from this machine's folder (as a shared filesystem would give"
        " it), hsm_distributed sends it.",
        "",
        "| scenario | contender | median wall time | first job after | makespan | launcher peak RSS | vs peer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rows, peer in ((local, "joblib"), (ssh, "parallel -M"), (efficiency, None),
                       (reused, "hsm_distributed, environment: found"),
                       *((rows, "submitit") for rows in slurm_rows.values()),
                       *((rows, "joblib" if "joblib" in rows else None) for rows in scale.values())):
        for row in rows.values():
            ratio = f"{wall(rows, row.contender) / wall(rows, peer):.2f}x vs {peer}" if peer else "-"
            first, makespan = row.median(lambda run: run.first_job), row.median(lambda run: run.makespan)
            rss = f"{row.median(lambda run: run.rss_mib or 0.0):.0f} MiB" if row.runs[0].rss_mib else "-"
            lines.append(f"| {row.scenario} | {row.contender} | {wall(rows, row.contender):.1f} s | {first:.1f} s"
                         f" | {makespan:.1f} s | {rss} | {ratio} |")
    lines += ["", "| composition, CPU per job | Hydra | fast path | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {full:.1f} ms | {fast:.2f} ms | {fast / full:.3f} |"
              for name, (full, fast) in composition.items()]
    lines += ["", "| slurm, slot time per job beyond its work | " + " | ".join(contenders) + " |",
              "| --- | " + " | ".join("---" for _ in contenders) + " |"]
    lines += [f"| {jobs} x {sleep:g} s | " + " | ".join(f"{slot_overhead(rows[name], jobs, sleep):.2f} s"
                                                     for name in contenders) + " |"
              for (jobs, sleep), rows in slurm_rows.items()]
    lines += ["", "| environment build on host1, warm caches | median | vs pip |", "| --- | --- | --- |"]
    lines += [f"| {name} | {build[name]:.1f} s | {build[name] / build['venv + pip install -r']:.2f}x |"
              for name in build]
    lines += ["", "| target | measured | limit | |", "| --- | --- | --- | --- |"]
    lines += [f"| {target.text} | {shown(target.value, target.limit)} | {'>=' if target.at_least else '<='}"
              f" {target.limit:g} |"
              f" {'PASS' if target.met else 'FAIL'} |" for target in targets]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
