"""Every setting a user can write, in one table: its key, its default and what it means.

The launcher's config node (`hydra_plugins/.../config.py`), validation (`settings`), the
file `hsm distributed init` writes (`config_file`) and the README's reference tables are
all derived from these tables; a test compares the README with `markdown()`. To change a
default or a key's meaning, change it here, then run `python -m hsm_core.options` and
paste its output over the README's tables.

Stdlib only and import-light: Hydra reads this during plugin discovery of every app.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from hsm_core.slurm import SBATCH_FLAGS


class _CpuCount:
    """The default of local.max_parallel_jobs: this machine's CPU count, read when needed."""

    def __repr__(self) -> str:
        return "CPU_COUNT"


CPU_COUNT: Any = _CpuCount()


def cpu_count() -> int:
    return os.cpu_count() or 1

# Where hsm_config.yaml is looked for, in the working dir, in this order (when config_file is null).
CONFIG_FILE_NAME = "hsm_config.yaml"
CONFIG_FILE_PLACES = (CONFIG_FILE_NAME, f"sweeps/{CONFIG_FILE_NAME}")


@dataclass(frozen=True)
class Option:
    key: str  # dotted, under hydra.launcher (and under `distributed:` in hsm_config.yaml)
    default: Any
    help: str  # one line: what it is, and what the values mean
    kind: str = "any"  # the config node's type: str, int, float, bool, texts (list of str), any
    shown: str | None = None  # the default as the README says it, when the value alone does not
    from_file: bool = True  # hsm_config.yaml may set it (config_file and sources: per sweep only)
    in_init: bool = False  # written into the file `hsm distributed init` creates

    def default_value(self) -> Any:
        """The built-in default as a value (the CPU count read now)."""
        return cpu_count() if self.default is CPU_COUNT else self.default

    def shown_default(self) -> str:
        return self.shown if self.shown is not None else f"`{yaml_scalar(self.default)}`"


def yaml_scalar(value: Any) -> str:
    """A default as YAML writes it: plain words bare, anything else in JSON's form (valid YAML)."""
    if isinstance(value, str) and re.fullmatch(r"(~/)?[A-Za-z_.][A-Za-z0-9_./-]*", value):
        return value
    return json.dumps(value)


GPU_HELP = {
    "gpus": "the machine's GPUs for the jobs: a count (`2`: ids 0 and 1), a list of ids (`[0, 2, 3]`) or `auto`"
            " (nvidia-smi; see \"GPUs\")",
    "gpus_per_job": "GPUs each job gets (1 when `gpus` is set)",
    "min_free_memory_mb": "with `gpus: auto`, a GPU with less free memory (another user's job) waits until it frees up",
    "stagger_s": "at least this many seconds between two job starts on the machine",
}

LAUNCHER: tuple[Option, ...] = (
    Option("config_file", None, "path of `hsm_config.yaml`; null: `./hsm_config.yaml`, then"
           " `./sweeps/hsm_config.yaml`, else none", "str", from_file=False),
    Option("sources", None, "names of the sources this sweep may use (`local` and remote names); null: every"
           " enabled source", "texts", from_file=False),
    Option("strategy", "round_robin", "`round_robin`, `least_loaded` or `capability_based`", "str",
           in_init=True),
    Option("max_retries", 3, "re-dispatches of a job lost to the infrastructure (machine, connection, killed"
           " worker)", "int", in_init=True),
    Option("retry_failed_jobs", 0, "re-runs of a job whose task raised", "int"),
    Option("collect_interval", 300, "seconds between pulls of a running remote job's outputs", "float",
           in_init=True),
    Option("health_check_interval", 60, "*not used by this version* (keepalive detects lost machines); another"
           " value is warned about", "float"),
    Option("keepalive_interval", 15, "seconds between SSH keepalive probes; a silent host is lost after"
           " interval x (count_max + 1)", "float"),
    Option("keepalive_count_max", 3, "unanswered keepalive probes before a host is lost", "int"),
    Option("resume", False, "skip the jobs this sweep dir's journal records as completed, unless their config or"
           " code changed since (those run again); `keep`: skip those too, with a line naming them"),
    Option("progress_interval", 30, "seconds between progress summaries in the log", "float"),
    Option("report", False, "rewrite the sweep's report page, `<sweep_dir>/.hsm/report.html`, every"
           " progress_interval and at the end (also: `hsm distributed report SWEEP_DIR`)", "bool"),
    Option("detach_grace", 0, "seconds the machines' worker agents keep running their jobs when the launcher is"
           " gone (killed, asleep, off the network), for a launch with `resume=true` to re-attach; 0: they stop"
           " them at once (see \"Long sweeps from a laptop\")", "float"),
    Option("environment", "found", "the jobs' Python environment on each remote machine (each may set its own):"
           " `found` (the configured or discovered Python), `mirror` (this environment's packages at their exact"
           " versions, built there and cached), or the path of a requirements.txt, pyproject.toml, uv.lock or"
           " pylock.toml of the project (see \"Environments\")", "str"),
    Option("wheels", "auto", "where a built environment's packages come from: `index` (each machine's own pip"
           " configuration), `ship` (wheels made here and sent over the SSH connection), `auto` (the index, and"
           " wheels sent when a machine cannot reach it)"),
    Option("env_keep_days", 30, "days a built environment is kept on a machine after its last use (an environment"
           " in use is never removed)", "float"),
    Option("local.enabled", True, "run jobs on this machine", "bool"),
    Option("local.max_parallel_jobs", CPU_COUNT, "jobs at once on this machine", "int", shown="the CPU count",
           in_init=True),
    Option("local.gpus", None, GPU_HELP["gpus"], shown="none"),
    Option("local.gpus_per_job", None, GPU_HELP["gpus_per_job"], "int", shown="1 with `gpus`"),
    Option("local.min_free_memory_mb", 0, GPU_HELP["min_free_memory_mb"], "float"),
    Option("local.stagger_s", 0, GPU_HELP["stagger_s"], "float"),
    Option("sync.include", [], "glob patterns of project files to send even when excluded by default"
           " (secrets, caches), e.g. `[.env]`", "texts"),
    Option("sync.exclude", [], "glob patterns never sent, added to the defaults (.git, venvs, caches,"
           " outputs, secrets, ...)", "texts"),
    Option("remotes", {}, "one SSH machine per entry, `NAME: {host: ..., ...}`: keys below", shown="`{}`",
           in_init=True),
)

REMOTE: tuple[Option, ...] = (
    Option("host", None, "host name, address, or `~/.ssh/config` alias (its HostName, Port, User,"
           " IdentityFile, ProxyJump apply)", shown="(required)"),
    Option("kind", "ssh", "`ssh`, or `slurm`: a cluster's login node (`host: localhost` for this machine), each job"
           " one Slurm job (see \"Slurm\")"),
    Option("user", None, "login user", shown="from `~/.ssh/config`, else yours"),
    Option("ssh_port", None, "SSH port", shown="from `~/.ssh/config`, else 22"),
    Option("ssh_key", None, "private key file (no passphrase, or loaded in your ssh-agent)",
           shown="from `~/.ssh/config`, else ssh's defaults"),
    Option("known_hosts", None, "host keys are always verified against it", shown="`~/.ssh/known_hosts`"),
    Option("max_parallel_jobs", 1, "jobs at once on that machine"),
    Option("enabled", True, "`false` keeps the entry but does not use it"),
    Option("python", None, "the remote interpreter (one executable); when absent it is found (see below)",
           shown="found"),
    Option("setup", [], "shell lines run before the remote worker starts (e.g. conda activation); the jobs"
           " inherit their environment"),
    Option("environment", None, "`found`, `mirror` or a file of the project: this machine's jobs' environment",
           shown="the top-level `environment`"),
    Option("wheels", None, "`auto`, `index` or `ship`: where this machine's environment's packages come from",
           shown="the top-level `wheels`"),
    Option("env", {}, "environment variables for the jobs (names `[A-Za-z_][A-Za-z0-9_]*`; values are passed"
           " quoted, never interpreted)"),
    Option("project_dir", "~/.hsm/projects", "remote folder holding a copy per project; it must be yours and"
           " not writable by others"),
    Option("gpus", None, GPU_HELP["gpus"], shown="none"),
    Option("gpus_per_job", None, GPU_HELP["gpus_per_job"], shown="1 with `gpus`"),
    Option("min_free_memory_mb", 0, GPU_HELP["min_free_memory_mb"]),
    Option("stagger_s", 0, GPU_HELP["stagger_s"]),
    Option("weight", None, "declared capability for `capability_based` (else the number of GPUs, else 1)",
           shown="-"),
    Option("partition", None, "Slurm: the partition (`--partition`)", shown="the cluster's default"),
    Option("time", None, "Slurm: each job's time limit (`--time`, e.g. `30` minutes or `2:00:00`); past it the job"
           " fails with TIMEOUT", shown="the partition's"),
    Option("mode", "per_job", "Slurm: `per_job` (each job one Slurm job) or `allocation` (warm worker agents in a"
           " pool of allocations, for many short jobs; see \"Slurm\")"),
    Option("jobs_per_allocation", 1, "Slurm, `mode: allocation`: jobs an allocation runs at once (it asks for"
           " their CPUs, memory and GPUs together)"),
    Option("max_allocations", None, "Slurm, `mode: allocation`: allocations at once (the source runs"
           " `max_allocations` x `jobs_per_allocation` jobs at once)",
           shown="`max_parallel_jobs` / `jobs_per_allocation`"),
    Option("idle_timeout_s", 60, "Slurm, `mode: allocation`: an allocation that ran no job for this long is"
           " released"),
    Option("allocation_time", None, "Slurm, `mode: allocation`: each allocation's time limit (`--time`); a job"
           " starts only where its `time` (else the mean of the jobs so far) fits in what is left",
           shown="the partition's"),
    Option("cpus_per_task", None, "Slurm: `--cpus-per-task`", shown="-"),
    Option("mem", None, "Slurm: `--mem`, e.g. `8G`", shown="-"),
    Option("gres", None, "Slurm: `--gres`, e.g. `gpu:a100:1` (else `gpus_per_job` asks for `--gpus`)", shown="-"),
    Option("account", None, "Slurm: `--account`", shown="-"),
    Option("qos", None, "Slurm: `--qos`", shown="-"),
    Option("sbatch_args", [], "Slurm: more `sbatch` options, one per item, e.g. `[--constraint=a100]`"),
)
SLURM_KEYS = (*SBATCH_FLAGS, "sbatch_args")
ALLOCATION_KEYS = ("jobs_per_allocation", "max_allocations", "idle_timeout_s", "allocation_time")  # mode allocation
MODES = ("per_job", "allocation")


def defaults(table: tuple[Option, ...]) -> dict[str, Any]:
    return {option.key: option.default for option in table}


def markdown(table: tuple[Option, ...]) -> str:
    """The table as the README shows it."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{option.key}` | {option.shown_default()} | {option.help} |" for option in table]
    return "\n".join(rows)


TABLES = {"launcher": LAUNCHER, "remotes": REMOTE}


def readme_block(name: str) -> str:
    """A table as it sits in the README, between the markers the test finds it by."""
    start = f"<!-- options:{name} (generated: python -m hsm_core.options) -->"
    return f"{start}\n{markdown(TABLES[name])}\n<!-- /options -->"


if __name__ == "__main__":
    print("\n\n".join(readme_block(name) for name in TABLES))
