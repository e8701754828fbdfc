"""The `hsm` command: `hsm distributed init|add|remove|list|test|health|envs|sync|status|report`.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad config. Errors are one line
naming what is wrong and how to fix it; no tracebacks. Owns the commands and how they
print; the checks are `diagnostics`', the file `config_file`'s. Must not know the
scheduler or the sources.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hsm_core import __version__, config_file, options
from hsm_core.jobs import error_summary
from hsm_core.slurm import SBATCH_FLAGS
from hsm_core.settings import LOCAL, ConfigError, SweepSettings, as_flag, load_settings

OK, CHECK_FAILED, BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input on the command line; the message says what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsm", description="hsm-distributed: Hydra sweeps on many machines")
    parser.add_argument("--version", action="version", version=f"hsm-distributed {__version__}")
    groups = parser.add_subparsers(dest="group", required=True, metavar="distributed")
    distributed = groups.add_parser("distributed", help="manage the compute sources in hsm_config.yaml")
    commands = distributed.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="PATH",
                         help="hsm_config.yaml to use (default: ./hsm_config.yaml, then ./sweeps/hsm_config.yaml)")
        return sub

    command("init", "create hsm_config.yaml, or add its distributed: block to an existing file")
    add = command("add", "add an SSH machine as a compute source")
    add.add_argument("name")
    add.add_argument("host", help="host name, address, or ~/.ssh/config alias")
    add.add_argument("--user")
    add.add_argument("--port", type=int)
    add.add_argument("--key", help="private key file, e.g. ~/.ssh/id_ed25519")
    add.add_argument("--max-jobs", type=int, default=1, help="jobs at once on that machine (default 1)")
    add.add_argument("--python", help="the remote interpreter (default: found on the machine, see the README)")
    add.add_argument("--project-dir", help="remote folder for project copies (default ~/.hsm/projects)")
    add.add_argument("--environment", help="the jobs' environment there: found (default), mirror (this one's"
                     " packages, built there), or a requirements.txt, pyproject.toml, uv.lock or pylock.toml")
    add.add_argument("--wheels", choices=("auto", "index", "ship"), help="where that environment's packages come"
                     " from (default auto: the machine's index, else wheels sent from here)")
    add.add_argument("--disabled", action="store_true", help="add it switched off")
    add.add_argument("--slurm", action="store_true", help="a Slurm cluster's login node (HOST localhost: this"
                     " machine); each job one Slurm job")
    for key, flag in SBATCH_FLAGS.items():
        add.add_argument(flag, type=int if key == "cpus_per_task" else str, help=f"Slurm's {flag} for each job"
                         " (with --slurm)")
    add.add_argument("--mode", choices=("per_job", "allocation"), help="with --slurm: each job one Slurm job"
                     " (per_job, default), or jobs run by warm agents in allocations (see the README's \"Many short"
                     " jobs\")")
    add.add_argument("--jobs-per-allocation", type=int, help="with --mode allocation: jobs an allocation runs at once")
    remove = command("remove", "remove a compute source")
    remove.add_argument("name")
    command("list", "show the compute sources")
    for name, help_text in (("test", "check that each source can run jobs (connect, host key, login, setup"
                                     " lines, Python and packages, project_dir)"),
                            ("health", "show each source's load, free memory and disk, GPUs and hsm jobs")):
        sub = command(name, help_text)
        sub.add_argument("names", nargs="*", metavar="NAME")
        sub.add_argument("--all", action="store_true", help="every enabled source (the default)")
        if name == "health":
            watchable(sub, "refresh until Ctrl-C")
    envs = command("envs", "list the jobs' environments built on each machine (environment: mirror or a file)")
    envs.add_argument("names", nargs="*", metavar="NAME")
    envs.add_argument("--prune", action="store_true", help="remove every environment no running sweep uses"
                      " (the next sweep builds what it needs again)")
    files = command("sync", "list what a sweep sends to remote machines: the project's files, and what stays here")
    files.add_argument("--dry-run", action="store_true", required=True,
                       help="only list (the files are sent by the sweep itself, at launch)")
    files.add_argument("app", nargs="?", default=".", metavar="APP_DIR",
                       help="the folder of your app's main script (default: the working dir)")
    status = command("status", "show the jobs of a sweep from its journal")
    status.add_argument("sweep_dir", metavar="SWEEP_DIR")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    watchable(status, "refresh while the sweep runs (its launcher anywhere on this machine), then show its end")
    report = command("report", "write a sweep's report page (a timeline of every attempt, each source's use, the"
                     " values against the parameters) to SWEEP_DIR/.hsm/report.html")
    report.add_argument("sweep_dir", metavar="SWEEP_DIR")
    report.add_argument("--open", action="store_true", help="open the page in this machine's web browser")
    report.add_argument("--json", action="store_true", help="print the page's data instead of writing the page")
    return parser


def watchable(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("--watch", action="store_true", help=what)
    command.add_argument("--refresh", type=float, default=5.0, metavar="S", help="seconds between refreshes")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        return COMMANDS[arguments.command](arguments)
    except (ConfigError, UsageError) as error:
        print(f"hsm: {error}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        return OK


# -- the file ---------------------------------------------------------------------------


def config_path(arguments: argparse.Namespace) -> Path:
    found = config_file.discover(arguments.config, Path.cwd())
    return found if found is not None else Path.cwd() / options.CONFIG_FILE_NAME


def existing_config(arguments: argparse.Namespace) -> Path:
    path = config_path(arguments)
    if not path.exists():
        raise UsageError(f"{path} does not exist. Fix: run `hsm distributed init` first, or pass --config PATH")
    return path


def validated(path: Path, document: Any) -> tuple[dict[str, Any], SweepSettings]:
    """The distributed block as plain data (switch aside) and its validated settings."""
    block = config_file.to_plain(document.get(config_file.BLOCK) or {})
    block.pop("enabled", None)
    return block, load_settings(block, origin=f"{path}: {config_file.BLOCK}")


def settings_of(path: Path) -> SweepSettings:
    settings = validated(path, config_file.read(path))[1]
    for warning in settings.ignored:
        print(f"hsm: warning: {warning}", file=sys.stderr)
    return settings


def init(arguments: argparse.Namespace) -> int:
    print(config_file.initialize(config_path(arguments)))
    return OK


def add(arguments: argparse.Namespace) -> int:
    path = existing_config(arguments)
    document = config_file.read(path)
    block = document.get(config_file.BLOCK)
    if block is None:
        raise UsageError(f"{path} has no `{config_file.BLOCK}:` block. Fix: run `hsm distributed init`")
    if block.get("remotes") is None:
        block["remotes"] = {}
    remotes = block["remotes"]
    if arguments.name in remotes:
        raise UsageError(f"a source named {arguments.name!r} is already in {path}."
                         f" Fix: `hsm distributed remove {arguments.name}` first, or pick another name")
    entry = {"host": arguments.host, "kind": "slurm" if arguments.slurm else None, "user": arguments.user,
             "ssh_port": arguments.port, "ssh_key": arguments.key,
             "max_parallel_jobs": arguments.max_jobs, "python": arguments.python,
             "project_dir": arguments.project_dir, "environment": arguments.environment,
             "wheels": arguments.wheels, "enabled": False if arguments.disabled else None}
    slurm_keys = {key: getattr(arguments, key) for key in (*SBATCH_FLAGS, "mode", "jobs_per_allocation")
                  if getattr(arguments, key) is not None}
    if slurm_keys and not arguments.slurm:
        raise UsageError(f"--{next(iter(slurm_keys)).replace('_', '-')} is a Slurm option. Fix: add --slurm")
    entry.update(slurm_keys)
    remotes[arguments.name] = {key: value for key, value in entry.items() if value is not None}
    if hasattr(remotes, "fa"):
        remotes.fa.set_block_style()
    validated(path, document)  # refuse to write what a sweep would refuse to read
    config_file.write(path, document)
    slots = plural(arguments.max_jobs, "slot")
    print(f"added {arguments.name} ({arguments.host}, {slots}) to {path};"
          f" check it with: hsm distributed test {arguments.name}")
    return OK


def remove(arguments: argparse.Namespace) -> int:
    if arguments.name == LOCAL:
        raise UsageError("`local` is this machine and cannot be removed."
                         " Fix: set distributed.local.max_parallel_jobs, or hydra.launcher.local.enabled=false")
    path = existing_config(arguments)
    document = config_file.read(path)
    remotes = (document.get(config_file.BLOCK) or {}).get("remotes") or {}
    if arguments.name not in remotes:
        known = ", ".join(remotes) or "none"
        raise UsageError(f"no source named {arguments.name!r} in {path} (sources: {known})")
    del remotes[arguments.name]
    config_file.write(path, document)
    print(f"removed {arguments.name} from {path}")
    return OK


def list_sources(arguments: argparse.Namespace) -> int:
    path = existing_config(arguments)
    block, settings = validated(path, config_file.read(path))
    remotes = block.get("remotes") or {}
    rows = [(LOCAL, "local", "this machine", str(settings.local.max_parallel_jobs), yes(settings.local.enabled))]
    for name, entry in remotes.items():
        rows.append((name, entry.get("kind", "ssh"), entry["host"], str(entry.get("max_parallel_jobs", 1)),
                     yes(as_flag(entry.get("enabled", True), f"{path}: remotes.{name}.enabled"))))
    print(table(("NAME", "KIND", "HOST", "SLOTS", "ENABLED"), rows))
    return OK


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in (header, *rows))


# -- checks -----------------------------------------------------------------------------


def chosen(settings: SweepSettings, names: list[str]) -> tuple[bool, list[Any]]:
    """Whether `local` is chosen, and the chosen remotes (all enabled ones by default)."""
    known = {remote.name: remote for remote in settings.remotes}
    for name in names:
        if name != LOCAL and name not in known:
            raise UsageError(f"no enabled source named {name!r} (sources: {', '.join([LOCAL, *known])})")
    if not names:
        return settings.local.enabled, list(known.values())
    return LOCAL in names, [known[name] for name in names if name != LOCAL]


def test(arguments: argparse.Namespace) -> int:
    from hsm_core import diagnostics

    settings = settings_of(existing_config(arguments))
    with_local, remotes = chosen(settings, arguments.names)
    results = diagnostics.check_local(settings) if with_local else []
    for found in asyncio.run(gather(diagnostics.check_remote(remote, settings, building(remote.name))
                                    for remote in remotes)):
        results += found
    marks = {True: "ok", False: "FAIL", None: "-"}
    print(table(("SOURCE", "CHECK", "RESULT", "DETAIL"),
                [(check.source, check.name, marks[check.ok], check.detail) for check in results]))
    return CHECK_FAILED if any(check.ok is False for check in results) else OK


def building(name: str) -> Callable[[str], None]:
    """A machine's long step (its environment's build) as it goes, on a terminal: one line,
    rewritten, then cleared."""
    def show(text: str) -> None:
        if sys.stderr.isatty():
            print(f"\r\033[K{name}: {text}" if text else "\r\033[K", end="", file=sys.stderr, flush=True)
    return show


async def gather(coroutines: Any) -> list[Any]:
    return list(await asyncio.gather(*coroutines))


def health(arguments: argparse.Namespace) -> int:
    from hsm_core import diagnostics

    settings = settings_of(existing_config(arguments))
    with_local, remotes = chosen(settings, arguments.names)
    while True:
        reports = [(LOCAL, diagnostics.local_health())] if with_local else []
        found = asyncio.run(gather(diagnostics.remote_health(remote, settings) for remote in remotes))
        reports += list(zip((remote.name for remote in remotes), found, strict=True))
        if arguments.watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")
        print(health_table(reports))
        if not arguments.watch:
            return CHECK_FAILED if any("error" in report for _, report in reports) else OK
        sys.stdout.flush()
        time.sleep(arguments.refresh)


def health_table(reports: list[tuple[str, dict[str, Any]]]) -> str:
    rows = []
    for name, report in reports:
        if "error" in report:
            rows.append((name, "no", "-", "-", "-", "-", "-", "-", report["error"]))
            continue
        rows.append((name, "yes", f"{report['load']:.2f}/{report['cpus']}",
                     f"{gib(report['memory_free'])}/{gib(report['memory_total'])}", gib(report["disk_free"]),
                     gpu_summary(report["gpus"]), str(report["hsm_jobs"]), slurm_summary(report.get("slurm")), ""))
    return table(("SOURCE", "REACHABLE", "LOAD/CPUS", "MEM FREE", "DISK FREE", "GPUS", "HSM JOBS", "SLURM",
                  "PROBLEM"), rows)


def slurm_summary(report: dict[str, Any] | None) -> str:
    """A Slurm source's partition at a glance: `gpu: 3 idle, 5 allocated nodes; 12 pending`."""
    if report is None:
        return "-"
    if "error" in report:
        return report["error"]
    nodes = ", ".join(f"{count} {state}" for state, count in sorted(report["nodes"].items())) or "no nodes"
    return f"{report['partition']}: {nodes}; {report['pending']} pending"


def gib(size: int) -> str:
    return f"{size / 1024**3:.1f}G"


def gpu_summary(gpus: list[dict[str, Any]] | dict[str, str] | None) -> str:
    if gpus is None:
        return "none"
    if isinstance(gpus, dict):
        return f"unknown ({gpus['error']})"
    if not gpus:
        return "0"
    busy = sum(gpu["utilization"] for gpu in gpus) / len(gpus)
    used = sum(gpu["memory_used_mib"] for gpu in gpus) / 1024
    total = sum(gpu["memory_total_mib"] for gpu in gpus) / 1024
    return f"{len(gpus)}x {gpus[0]['name']} ({busy:.0f}% busy, {used:.1f}/{total:.1f}G)"


def environments(arguments: argparse.Namespace) -> int:
    from hsm_core import diagnostics

    settings = settings_of(existing_config(arguments))
    _, remotes = chosen(settings, [name for name in arguments.names if name != LOCAL])
    found = asyncio.run(gather(diagnostics.remote_envs(remote, settings, arguments.prune) for remote in remotes))
    rows, freed = [], 0
    for remote, report in zip(remotes, found, strict=True):
        if "error" in report:
            rows.append((remote.name, "-", "-", "-", report["error"]))
            continue
        freed += sum(removed["size"] for removed in report["removed"])
        for env in report["envs"]:
            state = "in use" if env["in_use"] else "built" if env["complete"] else "unfinished build"
            rows.append((remote.name, env["name"], f"{env['size'] / 1024**2:.0f}M",
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(env["last_used"])), state))
    print(table(("SOURCE", "ENV", "SIZE", "LAST USED", "STATE"), rows) if rows else "No environments built.")
    if arguments.prune:
        count = sum(len(report.get("removed", [])) for report in found)
        print(f"Removed {plural(count, 'environment')} ({freed / 1024**2:.0f}M); those in use were kept.")
    return CHECK_FAILED if any("error" in report for report in found) else OK


def sync_dry_run(arguments: argparse.Namespace) -> int:
    from hsm_core import sync

    path = config_file.discover(arguments.config, Path.cwd())
    settings = settings_of(path) if path is not None else load_settings({})
    try:
        root = sync.find_project_root(Path(arguments.app).resolve())
        found = sync.project_files(root, settings.sync)
    except sync.SyncError as error:
        raise UsageError(str(error)) from None
    print(f"project {root}: {len(found.tree)} files, {sum(size for size, _, _ in found.tree.values())} bytes"
          " would be sent")
    for relative, (size, _, _) in sorted(found.tree.items()):
        print(f"  {relative}  ({size} bytes)")
    if found.secrets_kept:
        print(f"kept here as credentials (list them in sync.include to send them): {', '.join(found.secrets_kept)}")
    if found.links_outside:
        print(f"kept here, links that point outside the project: {', '.join(found.links_outside)}")
    return OK


def journaled_sweep_dir(arguments: argparse.Namespace) -> Path:
    """SWEEP_DIR, once it is known to hold a journal."""
    from hsm_core import journal

    sweep_dir = Path(arguments.sweep_dir)
    if not (sweep_dir / journal.FOLDER / journal.FILE).exists():
        raise UsageError(f"{sweep_dir} has no {journal.FOLDER}/{journal.FILE}: it is not the sweep dir of an"
                         " hsm_distributed sweep (it is the folder holding multirun.yaml)")
    return sweep_dir


def status(arguments: argparse.Namespace) -> int:
    from hsm_core import journal

    sweep_dir = journaled_sweep_dir(arguments)
    while True:
        running = journal.holder(sweep_dir) is not None  # looked at first: a state shown after it ended is final
        if arguments.watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")
        code = show_status(sweep_dir, arguments.json)
        if not (arguments.watch and running):
            return code
        sys.stdout.flush()
        time.sleep(arguments.refresh)


def show_status(sweep_dir: Path, as_json: bool) -> int:
    """Print what the journal says of the sweep; CHECK_FAILED while any job is unfinished."""
    from hsm_core import journal

    found = journal.sweep_status(sweep_dir)
    unfinished = [job for job in found["jobs"] if job["status"] != "completed"]
    never_started = found["never_started"]
    if as_json:
        print(json.dumps(found, indent=2))
        return CHECK_FAILED if unfinished or never_started else OK
    print(table(("NUM", "OVERRIDES", "SOURCE", "GPUS", "ATTEMPTS", "STATUS", "DURATION"),
                [(str(job["num"]), " ".join(job["overrides"]), job["source"],
                  ",".join(map(str, job["gpus"])) or "-", str(job["attempts"]), job["status"],
                  "-" if job["duration"] is None else f"{job['duration']:.1f}s") for job in found["jobs"]]))
    print()
    columns = ("jobs", "completed", "failed", "running", "detached", "attempts")
    print(table(("SOURCE", *(column.upper() for column in columns)),
                [(name, *(str(tally[key]) for key in columns)) for name, tally in found["sources"].items()]))
    for source, held in found["allocations"].items():
        print(f"Slurm allocations of {source}: " + ", ".join(
            f"{allocation} on {where['node']} ({plural(where['jobs'], 'job')}, {where['running']} running)"
            for allocation, where in sorted(held.items(), key=lambda item: int(item[0]))))
    if found["launcher"]:
        print(f"The sweep is running: {found['launcher']}")
    elif found["launch_end"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found["launch_end"]["time"]))
        print(f"The last launch ended at {when}: {found['launch_end']['reason']}")
    elif found["resume_command"]:
        print("The last launch ended without recording why (killed, or its machine stopped); with detach_grace its"
              " running jobs may run on where they were: the resume command below adopts them")
    running = found["launcher"] is not None  # its running jobs are no trouble, and a resume is not for now
    for job in unfinished:
        cause = error_summary(job["cause"]) if job["cause"] else job.get("detail") or "it never finished"
        if job["cause"] or job.get("detail") or not running:
            print(f"job #{job['num']} ({' '.join(job['overrides'])}) {job['status']}: {cause}")
    if never_started and not running:
        print(f"{plural(len(never_started), 'job')} never started: {', '.join(f'#{num}' for num in never_started)}")
    for source, last in found["source_changes"].items():
        if last["change"] in ("quarantined", "left"):
            print(f"source {source} {'was quarantined' if last['change'] == 'quarantined' else 'left the sweep'}:"
                  f" {error_summary(last['reason'])}")
    to_run = len(unfinished) + len(never_started)
    for source, where in found["slurm"].items() if to_run and not running else ():
        print(f"Slurm jobs of this sweep on {source} are named {where['job_name']}; should any be left (the"
              f" launcher and its login-node agent both killed), on {where['host']}:"
              f" scancel --name={where['job_name']}")
    if to_run and found["resume_command"] and not running:
        started = f"{len(never_started)} never started; " if never_started else ""
        print(f"\nTo run the {plural(to_run, 'unfinished job')} again ({started}completed ones are kept):\n"
              f"  {found['resume_command']}")
    return CHECK_FAILED if to_run else OK


def report(arguments: argparse.Namespace) -> int:
    import shlex
    import socket
    import webbrowser

    from hsm_core import report as reports

    sweep_dir = journaled_sweep_dir(arguments)
    try:
        data = reports.sweep_report(sweep_dir)
    except OSError as error:
        print(f"hsm: the sweep's journal cannot be read ({error.strerror or error}: {error.filename or sweep_dir})."
              " Fix: run this as the user who ran the sweep", file=sys.stderr)
        return CHECK_FAILED
    if arguments.json:
        print(json.dumps(data, indent=1))
        return OK
    try:
        path = reports.write(sweep_dir, data)
    except OSError as error:
        print(f"hsm: the report cannot be written ({error.strerror or error}: {reports.report_path(sweep_dir)})."
              " Fix: free space there, or run with --json to print its data", file=sys.stderr)
        return CHECK_FAILED
    print(f"report: {path.absolute().as_uri()}")
    if arguments.open and not webbrowser.open(path.absolute().as_uri()):
        print(f"hsm: no web browser here to open it. Fix: copy the page (it needs no network) to a machine with"
              f" one, e.g. scp {socket.gethostname()}:{shlex.quote(str(path.absolute()))} . and open it there",
              file=sys.stderr)
        return CHECK_FAILED
    return OK


COMMANDS = {
    "init": init,
    "add": add,
    "remove": remove,
    "list": list_sources,
    "test": test,
    "health": health,
    "envs": environments,
    "sync": sync_dry_run,
    "status": status,
    "report": report,
}


if __name__ == "__main__":
    sys.exit(main())
