"""A real single-node Slurm on this machine: munged, slurmctld and slurmd, started by hand.

One node (this machine, CPUs as it has them), one partition `debug`, no accounting
database (so no sacct: the source reads squeue and scontrol). The config is written where
Slurm's commands look by default (so the SSH hosts' users find it too), unless another
one is there; state and logs live under BASE. The daemons are this module's children
and `stop()` ends them by pid.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE = Path("/var/tmp/hsm-test-slurm")
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by hsm-distributed's tests (tests/slurm.py)\n"
PARTITION = "debug"
COMMANDS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")


def missing_components() -> list[str]:
    return [f"{command} (apt-get install slurm-wlm munge)" for command in COMMANDS if not Path(command).exists()]


def config_text(node: str, cpus: int) -> str:
    """`cpus` may exceed the machine's (config_overrides): a spare CPU for a test's long job."""
    return MARK + f"""ClusterName=hsmtest
SlurmdParameters=config_overrides
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation={BASE / 'state'}
SlurmdSpoolDir={BASE / 'spool'}
SlurmctldPidFile={BASE / 'slurmctld.pid'}
SlurmdPidFile={BASE / 'slurmd.pid'}
SlurmctldLogFile={BASE / 'slurmctld.log'}
SlurmdLogFile={BASE / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
KillWait=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=60 State=UP
"""


@dataclass
class Slurm:
    node: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    others: set[str] = field(default_factory=set)  # names of jobs a test left running on purpose

    def run(self, *command: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
        return done.stdout

    def queue(self, *states: str) -> list[str]:
        """The ids of the jobs Slurm still has queued or running (or in `states`, e.g. running),
        but those of `others`."""
        rows = self.run("squeue", "-h", *(("-t", ",".join(states)) if states else ()), "-o", "%i %j").splitlines()
        return [job_id for job_id, name in (row.split(maxsplit=1) for row in rows) if name not in self.others]

    def submitted(self) -> list[str]:
        """The ids of every batch job submitted since the daemons started, as slurmctld logged them
        (there is no accounting database to ask)."""
        log = (BASE / "slurmctld.log").read_text(errors="replace")
        return re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", log)

    def limits(self, job_id: str) -> tuple[float, float]:
        """A job's start (epoch seconds) and time limit (seconds), as `scontrol show job` says them."""
        shown = self.run("scontrol", "-o", "show", "job", job_id)
        start = re.search(r"StartTime=(\S+)", shown).group(1)  # type: ignore[union-attr]
        limit = re.search(r"TimeLimit=(\S+)", shown).group(1)  # type: ignore[union-attr]
        hours, minutes, seconds = (int(part) for part in limit.split(":"))
        return time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")), hours * 3600.0 + minutes * 60 + seconds

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def start(spare_cpus: int = 0) -> Slurm:
    """Write the config (a node of this machine's CPUs, and `spare_cpus` more), start the
    three daemons, and wait until the node is idle."""
    node = socket.gethostname().split(".")[0]
    shutil.rmtree(BASE, ignore_errors=True)
    for folder in (BASE, BASE / "state", BASE / "spool"):
        folder.mkdir(parents=True)
    BASE.chmod(0o755)
    if CONF.exists() and not CONF.read_text().startswith(MARK):
        raise RuntimeError(f"{CONF} is another cluster's config: the tests do not overwrite it")
    CONF.parent.mkdir(exist_ok=True)
    CONF.write_text(config_text(node, (os.cpu_count() or 1) + spare_cpus))
    slurm = Slurm(node)
    munge = pwd.getpwnam("munge")
    run_dir = Path("/run/munge")
    run_dir.mkdir(exist_ok=True)
    os.chown(run_dir, munge.pw_uid, munge.pw_gid)
    slurm.processes.append(daemon(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground"], "munged"))
    wait_for(lambda: Path("/run/munge/munge.socket.2").exists(), 10, "munged did not start")
    slurm.processes.append(daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(CONF)], "slurmctld"))
    slurm.processes.append(daemon(["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(CONF)], "slurmd"))

    def idle() -> bool:
        try:
            return "idle" in slurm.run("sinfo", "-h", "-N", "-o", "%T")
        except RuntimeError:
            return False

    wait_for(idle, 60, f"the Slurm node did not become idle; see {BASE}/slurmctld.log and slurmd.log")
    return slurm


def daemon(command: list[str], name: str) -> subprocess.Popen[bytes]:
    """A daemon in the foreground, its console output in BASE/NAME.out."""
    with open(BASE / f"{name}.out", "wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_for(ready: object, timeout: float, problem: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(problem)
        time.sleep(0.1)
