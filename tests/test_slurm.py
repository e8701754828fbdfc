"""Slurm sources against a real single-node Slurm (tests/slurm.py): every sweep job one Slurm job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hydra.core.utils import JobStatus

import hosts
import slurm
import tasks
from conftest import Launch
from hosts import hydra_value, remote_override
from hsm_core import diagnostics, settings
from hsm_core.jobs import Handle
from hsm_core.sources.agent import AgentClient
from hsm_core.sources.base import SourceFailure
from hsm_core import slurm as slurm_jobs
from hsm_core.sources import allocations, slurm as slurm_source
from test_cli import hsm

GOLDEN = Path(__file__).parent / "golden" / "slurm_job.sh"
SWEEP_APP = Path(__file__).parent / "sweep_app.py"


@pytest.fixture(scope="session")
def cluster() -> Iterator[slurm.Slurm]:
    """One CPU more than the machine has: the spare one runs `past_its_time_limit`'s job."""
    hosts.require(slurm.missing_components(), "the Slurm tests")
    started = slurm.start(spare_cpus=1)
    yield started
    started.stop()


@dataclass
class LongSweep:
    process: subprocess.Popen[str]
    sweep_dir: Path
    job_name: str  # its Slurm jobs'


@pytest.fixture(scope="module", autouse=True)
def past_its_time_limit(cluster: slurm.Slurm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LongSweep]:
    """A sweep of one job past its time limit (`time: "0:05"`, Slurm's least: a minute; the task
    sleeps 300 s), started with this module: Slurm ends it 60 to 90 s in (it checks time limits
    every 30 s), while the module's other tests run beside it (`cluster.others`: theirs are the
    rest of the queue); the module's last test reads its end."""
    cwd = tmp_path_factory.mktemp("time-limit")
    process = subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=sleep_and_time", "x=1", "+sleep=300", "hydra.launcher.local.enabled=false", on_slurm(time="0:05")],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_name = slurm_source.sweep_job_name(str((cwd / "sweep").absolute()))
    cluster.others.add(job_name)
    yield LongSweep(process, cwd / "sweep", job_name)
    if process.poll() is None:
        process.kill()
        process.communicate()


def on_slurm(**extra: Any) -> str:
    """This machine's Slurm as the source `cluster`."""
    return remote_override("cluster", {"kind": "slurm", "host": "localhost", "max_parallel_jobs": 2,
                                       "partition": slurm.PARTITION, **extra})


def journal(sweep_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (sweep_dir / ".hsm" / "journal.jsonl").read_text().splitlines()]


def test_the_batch_script_is_readable_and_carries_no_override() -> None:
    options = slurm_jobs.sbatch_options("hsm-1a2b3c4d5e", "/home/u/.hsm/slurm/ab12/jobs/7-1/slurm.out",
                                        {"partition": "gpu", "time": "30", "cpus_per_task": 4, "gpus": 1,
                                         "sbatch_args": ("--constraint=a100",)})
    script = slurm_jobs.batch_script(options, "/opt/conda/envs/ml/bin/python", "/home/u/.hsm/agent/3f2a",
                                     "/home/u/.hsm/slurm/ab12/jobs/7-1", "/home/u/.hsm/slurm/ab12/sessions/9c1e")
    assert script == GOLDEN.read_text()


def test_a_sweep_runs_fully_on_slurm(launch_jobs: Launch, cluster: slurm.Slurm, tmp_path: Path) -> None:
    [returns] = launch_jobs(tasks.who_runs, [[[f"x={x}"] for x in range(4)]],
                            ["hydra.launcher.local.enabled=false", on_slurm()])
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 4
    assert [r.return_value for r in returns] == [[x, "root"] for x in range(4)]
    for job_return in returns:
        job_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        assert (job_dir / "who.txt").read_text() == "root"
        assert (job_dir / ".hydra" / "config.yaml").exists()
    ends = [record for record in journal(tmp_path / "sweep") if record["event"] == "end"]
    assert all(record["where"].startswith("Slurm job ") for record in ends), ends
    assert cluster.queue() == []


def scancel_the_first_attempt(launch_jobs: Launch, cluster: slurm.Slurm, tmp_path: Path,
                              source: str) -> tuple[Any, list[dict[str, Any]], Path]:
    """One job (tasks.wait_to_be_killed) on the cluster alone; whatever Slurm runs is scancelled
    by hand once its first attempt has started. Its JobReturn, the journal's end records, and
    its marker dir (`invocations`: one line per run)."""
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (marker_dir / "pid").exists():
            time.sleep(0.1)
        running = cluster.queue("running")
        assert running, "nothing is running in Slurm"
        cluster.run("scancel", *running)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    [returns] = launch_jobs(tasks.wait_to_be_killed, [[[f"+marker_dir={hydra_value(str(marker_dir))}"]]],
                            # Slurm alone: a local slot could take the first attempt, which nobody cancels.
                            [source, "hydra.launcher.sources=[cluster]", "hydra.launcher.max_retries=1"])
    canceller.join()
    return returns[0], [record for record in journal(tmp_path / "sweep") if record["event"] == "end"], marker_dir


def test_a_job_scancelled_by_hand_runs_again_once(launch_jobs: Launch, cluster: slurm.Slurm,
                                                  tmp_path: Path) -> None:
    job_return, records, marker_dir = scancel_the_first_attempt(launch_jobs, cluster, tmp_path,
                                                                on_slurm(max_parallel_jobs=1))
    assert [(record["status"], record["retrying"]) for record in records] == [("lost", True), ("completed", False)]
    first, second = (record["where"] for record in records)
    assert first != second  # a new Slurm job
    assert "CANCELLED" in records[0]["cause"]
    assert job_return.return_value == "second attempt"
    assert len((marker_dir / "invocations").read_text().split()) == 2


@pytest.mark.parametrize("mode", ["per_job", "allocation"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_stopped_launcher_leaves_nothing_in_the_queue(cluster: slurm.Slurm, tmp_path: Path, signum: int,
                                                        mode: str) -> None:
    """Ctrl-C: one scancel; SIGKILL: the login node's agent sees its launcher gone and scancels
    (its 2 jobs, or the 2 allocations running them)."""
    running = tmp_path / "running"
    sweep = subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=patient", f"+log={running}", "+sleep=300", "x=1,2,3", "hydra.launcher.local.enabled=false",
         on_slurm(**({"mode": "allocation", "max_allocations": 2} if mode == "allocation" else {}))],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert hosts.wait_until(lambda: len(cluster.queue()) == 2 and running.exists()
                                and running.read_text().count("start") == 2, 60), cluster.queue()
        job_name = journal(tmp_path / "sweep")[0]["slurm"]["cluster"]["job_name"]
        queued = cluster.run("squeue", "-h", "--name", job_name, "-o", "%i").split()
        assert len(queued) == 2
        sweep.send_signal(signum)
        output, _ = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode != 0, output
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()
    shown = hsm(tmp_path, "status", "sweep").stdout
    assert f"on localhost: scancel --name={job_name}" in shown
    if mode == "allocation":  # status names the allocations the jobs ran in
        assert all(f" {job_id} on {cluster.node} (1 job, " in shown for job_id in queued), shown


@pytest.mark.parametrize("variant", ["found", "requirements", "allocation"])
def test_a_login_node_over_ssh_as_another_user(launch_jobs: Launch, cluster: slurm.Slurm,
                                               ssh_hosts: list[hosts.SshHost], variant: str, tmp_path: Path) -> None:
    """With a requirements file, the login node's bare Python gets an environment built there
    (its home is the compute node's too), and the Slurm jobs run in it. In mode allocation the
    worker agent inside the allocation is reached by srun over the same SSH connection."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml\n")  # and what the worker needs, at this machine's versions
    variants: dict[str, dict[str, Any]] = {
        "requirements": {"python": hosts.HOST_PYTHON, "environment": str(requirements)},
        "allocation": {"mode": "allocation", "jobs_per_allocation": 2, "max_allocations": 1}}
    extra = variants.get(variant, {})
    login = ssh_hosts[0].source_config(kind="slurm", partition=slurm.PARTITION, max_parallel_jobs=2, **extra)
    [returns] = launch_jobs(tasks.who_runs, [[[f"x={x}"] for x in range(3)]],
                            ["hydra.launcher.local.enabled=false", remote_override("login", login)])
    assert [r.return_value for r in returns] == [[x, ssh_hosts[0].user] for x in range(3)]
    for job_return in returns:
        assert (Path(job_return.hydra_cfg.hydra.runtime.output_dir) / "who.txt").read_text() == ssh_hosts[0].user
    if variant == "requirements":
        assert list((ssh_hosts[0].home / ".hsm" / "envs").glob("*-*/bin/python"))
    if variant == "allocation":
        ends = [record for record in journal(tmp_path / "sweep") if record["event"] == "end"]
        assert len({record["where"] for record in ends}) == 1 and ends[0]["where"].startswith("allocation "), ends
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


def test_a_mixed_sweep_over_local_a_host_and_slurm(launch_jobs: Launch, cluster: slurm.Slurm,
                                                   ssh_hosts: list[hosts.SshHost], tmp_path: Path) -> None:
    [returns] = launch_jobs(tasks.who_runs, [[[f"x={x}", "+sleep=1"] for x in range(9)]],
                            ["hydra.launcher.local.max_parallel_jobs=1", on_slurm(),
                             remote_override("host1", ssh_hosts[0].source_config(max_parallel_jobs=1))])
    assert [r.return_value[0] for r in returns] == list(range(9))
    by_source = {record["source"] for record in journal(tmp_path / "sweep") if record["event"] == "end"}
    assert by_source == {"local", "host1", "cluster"}


def test_the_cli_adds_checks_and_watches_a_slurm_source(cluster: slurm.Slurm, tmp_path: Path) -> None:
    assert hsm(tmp_path, "init").returncode == 0
    added = hsm(tmp_path, "add", "cluster", "localhost", "--slurm", "--partition", slurm.PARTITION, "--time", "10",
                "--max-jobs", "4")
    assert added.returncode == 0, added.stderr
    listed = hsm(tmp_path, "list").stdout.splitlines()
    assert listed[-1].split() == ["cluster", "slurm", "localhost", "4", "yes"]
    tested = hsm(tmp_path, "test", "cluster")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    results = {line.split("  ")[1].strip(): line for line in tested.stdout.splitlines()[1:]}
    assert set(results) == {"slurm", "partition", "sbatch --test-only"}
    node = cluster.run("sinfo", "-h", "-N", "-o", "%T").strip()  # idle, or mixed while past_its_time_limit runs
    assert " ok " in results["partition"] and f"{slurm.PARTITION}: nodes 1 {node}" in results["partition"]
    watched = hsm(tmp_path, "health", "cluster")
    assert watched.returncode == 0, watched.stdout
    assert f"{slurm.PARTITION}: 1 {node}; 0 pending" in watched.stdout

    assert hsm(tmp_path, "add", "wrong", "localhost", "--slurm", "--partition", "nope").returncode == 0
    refused = hsm(tmp_path, "test", "wrong")
    assert refused.returncode == 1
    assert "'nope' is not a partition here. Fix: set remotes.wrong.partition to one of debug" in refused.stdout
    assert "sbatch --test-only  -" in refused.stdout  # not checked

    # mode allocation: sbatch is asked about an allocation as it would be submitted (its jobs' CPUs together)
    assert hsm(tmp_path, "add", "pool", "localhost", "--slurm", "--partition", slurm.PARTITION, "--mode", "allocation",
               "--jobs-per-allocation", "2").returncode == 0
    assert hsm(tmp_path, "test", "pool").returncode == 0
    assert hsm(tmp_path, "add", "big", "localhost", "--slurm", "--partition", slurm.PARTITION, "--mode", "allocation",
               "--jobs-per-allocation", str(2 * (os.cpu_count() or 1)), "--cpus-per-task", "1").returncode == 0
    too_big = hsm(tmp_path, "test", "big")
    assert too_big.returncode == 1 and "Fix: correct the Slurm keys of remotes.big" in too_big.stdout, too_big.stdout


def test_main_targets_resolve_in_slurm_jobs(cluster: slurm.Slurm, tmp_path: Path) -> None:
    app = Path(__file__).parent / "main_target_app.py"
    run = subprocess.run([sys.executable, str(app), "-m", "hydra/launcher=hsm_distributed", "model.width=4",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.local.enabled=false", on_slurm()],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "sweep" / "0" / "made.json").read_text()) == {"width": 4, "module": "__mp_main__"}


class SlowSqueueAgent:
    """The login node's agent as SlurmProvider sees it: its squeue waits until `answer` is set,
    then says every job COMPLETED."""

    broken = None

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.cancelled: list[str] = []

    async def call(self, operation: str, *args: Any) -> Any:
        if operation == "slurm_states":
            self.asked.set()
            await self.answer.wait()
            return {job_id: slurm_jobs.JobState("COMPLETED", "n1", "None") for job_id in args[0]}
        assert operation == "slurm_cancel"
        self.cancelled += args[0]


def test_a_job_cancelled_while_squeue_runs_leaves_its_siblings_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_jobs, "MIN_POLL_SECONDS", 0.01)

    async def scenario() -> None:
        agent = SlowSqueueAgent()
        provider = slurm_source.SlurmProvider("hpc", {}, {})
        provider.queue.agent = agent  # type: ignore[assignment]
        cancelled, sibling = (Handle("hpc", f"t{n}", {"slurm_id": str(n), "job": f"#{n}", "folder": f"/nowhere/{n}",
                                                     "session": "/nowhere/s"}) for n in (1, 2))
        for handle in (cancelled, sibling):
            await provider.adopt(handle)
        waiting = asyncio.create_task(provider.ended(cancelled))
        await asyncio.wait_for(agent.asked.wait(), 5)
        waiting.cancel()  # ended() scancels its job
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        agent.answer.set()
        assert (await asyncio.wait_for(provider.queue.watched["2"].ended, 5)).state == "COMPLETED"
        await provider.close()
        assert agent.cancelled == ["1"]

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_the_readme_s_slurm_example_with_gpus_per_job_is_accepted_and_asks_for_gpus() -> None:
    """gpus_per_job alone on a Slurm source becomes --gpus; the login node's GPUs are never
    the jobs' (gpus: auto there is refused with the fix)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    slurm_section = readme.split("## Slurm", 1)[1]
    example = yaml.safe_load(slurm_section.split("```yaml\n", 1)[1].split("```", 1)[0])["distributed"]
    example["remotes"]["cluster"]["host"] = "localhost"
    loaded = settings.load_settings(example)
    cluster = next(remote for remote in loaded.remotes if remote.name == "cluster")
    assert (cluster.gpus, cluster.gpus_per_job) == (None, 1)
    options = slurm_jobs.sbatch_options("hsm-x", "/log", cluster.sbatch_settings())
    assert "--gpus=1" in options and "--partition=gpu" in options
    with pytest.raises(settings.ConfigError, match=r"remotes.cluster.gpus: is not for a Slurm source .* Fix:"):
        settings.load_settings({"remotes": {"cluster": {"kind": "slurm", "host": "login", "gpus": "auto"}}})


def test_a_localhost_cluster_honours_env_setup_and_python(launch_jobs: Launch, cluster: slurm.Slurm) -> None:
    """host: localhost starts its login-node agent as an SSH login node's: setup lines, env, python."""
    python = str(hosts.host_python_env())
    source = on_slurm(env={"HSM_FROM_ENV": "a b"}, setup=["export FROM_SETUP=yes"], python=python)
    [returns] = launch_jobs(tasks.environment_and_python, [[["+names=[FROM_SETUP,HSM_FROM_ENV]"]]],
                            ["hydra.launcher.local.enabled=false", source])
    assert returns[0].return_value == {"FROM_SETUP": "yes", "HSM_FROM_ENV": "a b", "python": python}


def test_squeue_backs_off_as_the_jobs_age() -> None:
    assert slurm_jobs.poll_delay([0.0]) == 1.0  # a new job: every second
    assert slurm_jobs.poll_delay([40.0]) == 4.0
    assert slurm_jobs.poll_delay([3600.0, 2.0]) == 1.0  # the youngest decides
    assert slurm_jobs.poll_delay([3600.0]) == 15.0  # a long job: at most every 15 s


def test_a_job_whose_sbatch_did_not_answer_is_found_by_its_tag(cluster: slurm.Slurm, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """slurmctld stopped for 4 s: sbatch times out (2 s here), yet it had submitted; the job is
    found by its comment, so it is watched (and cancelled) instead of running unseen."""
    monkeypatch.setattr(slurm_jobs, "COMMAND_TIMEOUT_SECONDS", 2.0)
    tag = "hsm-0-timedout"
    options = slurm_jobs.sbatch_options("hsm-test", "/dev/null", {"partition": slurm.PARTITION}, tag)
    script = tmp_path / "job.sh"
    script.write_text("\n".join(["#!/bin/sh", *(f"#SBATCH {option}" for option in options), "sleep 30", ""]))
    controller = cluster.processes[1]  # slurmctld
    controller.send_signal(signal.SIGSTOP)
    waking = threading.Timer(4.0, controller.send_signal, [signal.SIGCONT])
    waking.start()
    began = time.monotonic()
    try:
        job_id = slurm_jobs.submit(str(script), tag)
    finally:
        waking.join()
    try:
        assert time.monotonic() - began > 2.0  # sbatch did time out
        assert job_id in cluster.queue()
        comment = cluster.run("squeue", "-h", "-j", job_id, "-o", "%k").strip()
        assert comment == tag
    finally:
        slurm_jobs.cancel([job_id])


def test_a_job_slurm_can_never_start_is_not_waited_for(launch_jobs: Launch, cluster: slurm.Slurm,
                                                       tmp_path: Path) -> None:
    """time: 2:00:00 on a partition whose limit is 60 minutes: Slurm keeps the job pending for
    PartitionTimeLimit forever. The cluster leaves the sweep with the reason and the fix, its
    job is cancelled, and the jobs run on this machine."""
    [returns] = launch_jobs(tasks.square, [[[f"x={x}"] for x in range(2)]],
                            ["hydra.launcher.local.max_parallel_jobs=1", on_slurm(time="2:00:00")])
    assert [r.return_value for r in returns] == [0, 1]
    records = journal(tmp_path / "sweep")
    lost = [r for r in records if r["event"] == "end" and r["source"] == "cluster"]
    assert lost and all(r["status"] == "lost" and "pending for PartitionTimeLimit, which no wait ends" in r["cause"]
                        and "time: 2:00:00 is over the partition's limit" in r["cause"] for r in lost)
    assert {r["source"] for r in records if r["event"] == "end" and r["status"] == "completed"} == {"local"}
    assert cluster.queue() == []


def test_status_says_why_slurm_keeps_a_job_pending(cluster: slurm.Slurm, tmp_path: Path) -> None:
    """`--begin=now+600`: Slurm keeps the job pending for BeginTime; while the sweep waits,
    `hsm distributed status` shows the job pending, with its Slurm id and that reason."""
    sweep = subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=square", "x=3", "hydra.launcher.local.enabled=false", on_slurm(sbatch_args=["--begin=now+600"])],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert hosts.wait_until(lambda: "pending (BeginTime)" in hsm(tmp_path, "status", "sweep").stdout, 60), \
            hsm(tmp_path, "status", "sweep").stdout
        [job_id] = cluster.queue()
        shown = hsm(tmp_path, "status", "sweep").stdout
        assert re.search(r"^0 +task=square x=3 +cluster +- +1 +pending ", shown, re.MULTILINE), shown
        assert f"job #0 (task=square x=3) pending: Slurm job {job_id} pending (BeginTime)" in shown
        [job] = json.loads(hsm(tmp_path, "status", "sweep", "--json").stdout)["jobs"]
        assert (job["status"], job["detail"]) == ("pending", f"Slurm job {job_id} pending (BeginTime)")
        sweep.send_signal(signal.SIGINT)
        sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


def test_a_handle_written_by_one_process_is_watched_to_its_end_by_another(cluster: slurm.Slurm,
                                                                          tmp_path: Path) -> None:
    """A sweep submits a 6 s job and is frozen (SIGSTOP: a laptop asleep) once its journal
    holds the attempt's handle; another process adopts that handle and watches the job to
    its end through the source API: pending/running, ended, collected (the job's real return
    value), released. The launcher then dies (SIGKILL) and leaves the queue empty."""
    sweep = subprocess.Popen(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=sleep_and_time", "x=7", "+sleep=6", "hydra.launcher.local.enabled=false", on_slurm()],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        journal_file = tmp_path / "sweep" / ".hsm" / "journal.jsonl"
        assert hosts.wait_until(lambda: journal_file.exists() and '"submitted"' in journal_file.read_text(), 60)
        os.kill(sweep.pid, signal.SIGSTOP)
        [handle] = [r for r in journal(tmp_path / "sweep") if r["event"] == "submitted"]
        assert handle["source"] == "cluster" and handle["names"]["slurm_id"] in cluster.queue()
        watcher = subprocess.run([sys.executable, str(Path(__file__).parent / "adopt_watcher.py"), json.dumps(handle),
                                  str(tmp_path / "sweep")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert watcher.returncode == 0, watcher.stderr
        seen = json.loads(watcher.stdout.splitlines()[-1])
    finally:
        sweep.kill()
        sweep.wait(30)
    print(f"the other process saw: {seen}")
    assert seen["adopted"] and seen["value"] == 7, seen
    assert seen["events"][-3:] == ["Ended", "Collected", "Released"], seen
    assert "Noticed:running" in seen["events"], seen
    assert (tmp_path / "sweep" / "0" / "times.json").exists()  # the job wrote in place (a localhost cluster)
    assert not Path(handle["names"]["folder"], "outcome").exists()  # taken by the watcher
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


def test_a_refusal_that_waiting_ends_is_told_from_a_wrong_key() -> None:
    assert slurm_jobs.refused_for_now("sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job"
                                      " submission failed: Job violates accounting/QOS policy (job submit limit,"
                                      " user's size and/or time limits)")
    assert slurm_jobs.refused_for_now("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying")
    assert not slurm_jobs.refused_for_now("sbatch: error: invalid partition specified: gpu")
    assert not slurm_jobs.refused_for_now("sbatch: error: Invalid account or account/partition combination")


def test_a_killed_launchers_slurm_jobs_stay_queued_and_are_adopted_never_resubmitted(
        cluster: slurm.Slurm, tmp_path: Path) -> None:
    """detach_grace=120: SIGKILL of the launcher while two Slurm jobs run leaves them in the
    queue (the login node's agent does not scancel them); the re-launch with resume=true adopts
    both (journal: adopted) and submits only the third: 3 sbatch in all, each task once."""
    log = tmp_path / "calls"
    sweep = [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
             "task=patient", "x=range(3)", "+sleep=10", f"+log={log}", "hydra.launcher.local.enabled=false",
             "hydra.launcher.detach_grace=120", on_slurm()]
    first = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hosts.wait_until(lambda: len(cluster.queue()) == 2 and log.exists()
                                and log.read_text().count("start") == 2, 90), cluster.queue()
    finally:
        first.kill()
        first.wait(30)
    queued = cluster.queue()
    time.sleep(3)
    assert cluster.queue() == queued, "the jobs stay in Slurm's queue while the launcher is away"
    resumed = subprocess.run([*sweep, "hydra.launcher.resume=true"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = journal(tmp_path / "sweep")
    assert sorted(r["num"] for r in records if r["event"] == "adopted") == [0, 1]
    assert len([r for r in records if r["event"] == "submitted"]) == 3
    started = sorted(line.split()[1] for line in log.read_text().splitlines() if line.startswith("start"))
    assert started == ["0", "1", "2"], log.read_text()
    assert sorted(r["num"] for r in records if r["event"] == "end" and r["status"] == "completed") == [0, 1, 2]
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


# -- mode allocation: warm worker agents inside a pool of allocations ---------------------------


def in_allocations(**extra: Any) -> str:
    return on_slurm(mode="allocation", **extra)


def test_an_allocation_sweep_runs_every_job_in_warm_agents_of_at_most_max_allocations(
        launch_jobs: Launch, cluster: slurm.Slurm, tmp_path: Path) -> None:
    before = set(cluster.submitted())
    [returns] = launch_jobs(tasks.environment, [[[f"x={x}", "+names=[SLURM_JOB_ID,CUDA_VISIBLE_DEVICES]"]
                                                 for x in range(8)]],
                            ["hydra.launcher.local.enabled=false", in_allocations(max_allocations=2)])
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 8
    submitted = set(cluster.submitted()) - before
    assert 1 <= len(submitted) <= 2, submitted  # batch jobs: the allocations, not one per job
    ran_in = {r.return_value["SLURM_JOB_ID"] for r in returns}
    assert ran_in <= submitted, (ran_in, submitted)  # each job ran inside an allocation
    ends = [record for record in journal(tmp_path / "sweep") if record["event"] == "end"]
    assert {record["where"].split(",")[0] for record in ends} == {f"allocation {job_id}" for job_id in ran_in}
    assert all(r.return_value["CUDA_VISIBLE_DEVICES"] is None for r in returns)  # no GPUs asked for
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


def test_an_allocation_scancelled_by_hand_loses_its_job_which_runs_again_once(
        launch_jobs: Launch, cluster: slurm.Slurm, tmp_path: Path) -> None:
    job_return, records, marker_dir = scancel_the_first_attempt(launch_jobs, cluster, tmp_path,
                                                                in_allocations(max_parallel_jobs=1))
    assert [(record["status"], record["retrying"]) for record in records] == [("lost", True), ("completed", False)]
    assert "CANCELLED" in records[0]["cause"], records[0]
    first, second = (record["where"] for record in records)
    assert first.startswith("allocation ") and second.startswith("allocation ") and first != second
    assert job_return.return_value == "second attempt"
    assert len((marker_dir / "invocations").read_text().split()) == 2
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


def test_no_job_starts_on_an_allocation_without_time_left_for_it(launch_jobs: Launch, cluster: slurm.Slurm,
                                                                  tmp_path: Path) -> None:
    """Allocations of 1 minute, jobs of up to 50 s (`time`): a job starts only in an
    allocation's first seconds; the rest run in a new allocation, and none is lost."""
    [returns] = launch_jobs(tasks.sleep_and_time, [[[f"x={x}", "+sleep=3"] for x in range(6)]],
                            ["hydra.launcher.local.enabled=false",
                             in_allocations(max_allocations=1, jobs_per_allocation=2, allocation_time="1",
                                            time="0:50")])
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 6
    records = journal(tmp_path / "sweep")
    assert not [record for record in records if record["event"] == "end" and record["status"] != "completed"]
    allocations: dict[str, list[float]] = {}
    for job_return in returns:
        started = json.loads((Path(job_return.hydra_cfg.hydra.runtime.output_dir) / "times.json").read_text())["start"]
        [where] = [record["where"] for record in records
                   if record["event"] == "end" and record["num"] == job_return.hydra_cfg.hydra.job.num]
        allocations.setdefault(where.split(",")[0].split()[-1], []).append(started)
    assert len(allocations) >= 2, allocations
    for job_id, starts in allocations.items():
        began, limit = cluster.limits(job_id)
        assert limit == 60
        assert max(starts) + 50 <= began + limit + 1, (job_id, began, starts)  # StartTime is whole seconds
    assert hosts.wait_until(lambda: cluster.queue() == [], 20), cluster.queue()


def test_an_allocation_asks_for_its_jobs_resources_together() -> None:
    held = slurm_jobs.allocation_settings({"partition": "gpu", "time": "10", "cpus_per_task": 4, "mem": "8G",
                                           "gres": "gpu:a100:1,shard", "sbatch_args": ("--constraint=x",)}, 3,
                                          "2:00:00")
    assert held == {"partition": "gpu", "time": "2:00:00", "cpus_per_task": 12, "mem": "24G",
                    "gres": "gpu:a100:3,shard:3", "sbatch_args": ("--constraint=x",)}
    assert slurm_jobs.allocation_settings({"gpus": 2, "time": "10"}, 2, None) == {"gpus": "4"}
    step = slurm_jobs.step_command("77", held, "/opt/py -m hsm_core.worker")
    assert step.startswith("srun --jobid=77 --overlap --unbuffered --nodes=1 --ntasks=1 --quiet --cpus-per-task=12"
                           " --gres=gpu:a100:3,shard:3 ")
    script = slurm_jobs.hold_script(slurm_jobs.sbatch_options("hsm-ab", "/h/a.out", held, "hsm-alloc-1"))
    assert "#SBATCH --cpus-per-task=12\n" in script and "#SBATCH --time=2:00:00\n" in script
    assert script.rstrip().endswith("exec sleep 2147483647")


def test_slurm_time_words_are_read_as_slurm_reads_them() -> None:
    words = {"30": 1800, "0:50": 50, "5:00": 300, "1:00:00": 3600, "2-0": 172800, "1-2:30": 95400,
             "1-00:00:05": 86405, "UNLIMITED": None, "NOT_SET": None}
    assert {word: slurm_jobs.duration(word) for word in words} == words
    assert slurm_jobs.parse_squeue("7|RUNNING|n1|None|4:58\n8|PENDING||Priority|1:00:00\n") == {
        "7": slurm_jobs.JobState("RUNNING", "n1", "None", 298.0), "8": slurm_jobs.JobState("PENDING", "", "Priority")}


def test_a_job_starts_only_where_its_expected_time_fits() -> None:
    assert allocations.expected_seconds(None, []) == 0.0
    assert allocations.expected_seconds(None, [10.0, 30.0]) == 20.0  # learned as the sweep goes
    assert allocations.expected_seconds(50.0, [1.0]) == 50.0  # `time` bounds it when set
    assert allocations.fits(None, 1e9)
    assert allocations.fits(60.0, 50.0) and not allocations.fits(54.0, 50.0)


@pytest.mark.parametrize(("entry", "problem"), [
    ({"mode": "pool"}, "remotes.cluster.mode: unknown mode 'pool'. Fix: use one of per_job, allocation"),
    ({"jobs_per_allocation": 2}, "remotes.cluster.jobs_per_allocation: is for mode: allocation. Fix: set mode:"
                                 " allocation, or remove it"),
    ({"mode": "allocation", "allocation_time": "soon"}, "remotes.cluster.allocation_time: 'soon' is not a Slurm"
                                                        " time limit"),
    ({"mode": "allocation", "mem": "lots"}, "remotes.cluster.mem: 'lots' is not an amount of memory"),
])
def test_allocation_keys_are_checked(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(settings.ConfigError) as error:
        settings.load_settings({"remotes": {"cluster": {"kind": "slurm", "host": "localhost", **entry}}})
    assert str(error.value).startswith(f"hydra.launcher.{problem}")


def test_a_job_whose_request_file_cannot_be_read_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Mode allocation's jobs travel as files of the login node: a compute node that does not
    share them refuses the job and says why (the source then leaves, not the sweep)."""

    async def scenario() -> str:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "hsm_core.worker",
                                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdin is not None
        agent = AgentClient("probe", process.stdout, process.stdin)
        try:
            await agent.start()
            with pytest.raises(SourceFailure) as refusal:
                await asyncio.wait_for(agent.run_filed("a1", str(tmp_path / "a1.run"), str(tmp_path / "a1.out")), 10)
            return str(refusal.value)
        finally:
            await agent.close()
            await process.wait()

    reason = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert f"{tmp_path / 'a1.run'} cannot be read here" in reason and "shares" in reason


def test_hsm_test_asks_sbatch_about_an_allocation_as_it_would_be_submitted() -> None:
    loaded = settings.load_settings({"remotes": {"cluster": {
        "kind": "slurm", "host": "login", "mode": "allocation", "jobs_per_allocation": 4, "cpus_per_task": 2,
        "time": "10", "allocation_time": "3:00:00", "partition": "short"}}})
    partition, options = diagnostics.slurm_question(loaded.remotes[0])
    assert partition == "short"
    assert "--cpus-per-task=8" in options and "--time=3:00:00" in options and "--time=10" not in options


def test_a_job_past_its_time_in_an_allocation_is_stopped_and_fails(launch_jobs: Launch, cluster: slurm.Slurm,
                                                                    tmp_path: Path) -> None:
    """In mode allocation the worker, not Slurm, holds a job to `time` (to the second); the
    allocation lives on for the next job."""
    began = time.monotonic()
    [returns] = launch_jobs(tasks.sleep_and_time, [[["x=1", "+sleep=60"], ["x=2", "+sleep=0"]]],
                            ["hydra.launcher.local.enabled=false",
                             in_allocations(max_allocations=1, time="0:03")])
    assert time.monotonic() - began < 45  # stopped after 3 s (and its TERM grace), not after 60
    assert returns[0].status is JobStatus.FAILED and "ran past its time limit" in str(returns[0]._return_value)
    assert returns[1].status is JobStatus.COMPLETED
    ends = [record for record in journal(tmp_path / "sweep") if record["event"] == "end"]
    assert len({record["where"] for record in ends}) == 1, ends  # one allocation ran both


@pytest.mark.timeout(240)
def test_a_job_past_its_time_limit_fails_with_timeout(past_its_time_limit: LongSweep, cluster: slurm.Slurm) -> None:
    """The module's last test: the sweep its fixture started (see past_its_time_limit) ends with
    its job failed, Slurm's TIMEOUT the cause, and nothing of it left in the queue."""
    output, _ = past_its_time_limit.process.communicate(timeout=200)
    [end] = [record for record in journal(past_its_time_limit.sweep_dir) if record["event"] == "end"]
    assert (end["status"], end["failure_class"], end["retrying"]) == ("failed", "task", False), output[-3000:]
    assert "TIMEOUT" in end["cause"] and end["where"].startswith("Slurm job "), end
    assert end["end"] - end["start"] >= 60, end  # Slurm's least time limit is a minute
    name = past_its_time_limit.job_name
    assert hosts.wait_until(lambda: cluster.run("squeue", "-h", "--name", name) == "", 20)
