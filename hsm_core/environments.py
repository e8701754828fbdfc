"""The jobs' Python environment on a machine: built there once, reused by its hash.

Run there as `python -m hsm_core.environments build ENVS DIGEST KEEP_DAYS SOURCE` with the
machine's Python of the launcher's minor (what to install is described on the launcher, by
`env_requirements`, and sent as ENVS/DIGEST.requirements). The venv at ENVS/DIGEST-MACHINE is
built under a lock, so that two launches build it once; its log is ENVS/DIGEST-MACHINE.log,
and it is marked complete only once it is whole. By uv where the machine has it (or it can
be installed into ~/.hsm/tools), else by venv and pip. SOURCE says where packages come from:
`index` (the machine's own pip configuration), `auto` (the same, but a build that cannot
reach it asks for wheels instead of failing), `ship` (ask for wheels), or the folder of wheels
the launcher sent. Stdlib only: this module travels with the worker (AGENT_FILES).
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

INDEX, AUTO, SHIP = "index", "auto", "ship"
COMPLETE = ".hsm-complete"  # in a built env: it is whole (touched at each use: its last use)
LOG_TAIL_LINES = 15
UV_RETRY_AFTER_SECONDS = 86400  # a machine where uv could not be installed is not asked again before
INDEX_PROBE_TIMEOUT_SECONDS = 10
DEFAULT_INDEX = "https://pypi.org/simple/"


# -- on the machine ------------------------------------------------------------------------


def tell(message: Any) -> None:
    """A JSON line for the launcher. It may be gone (its batch ended, its link dropped): the
    build goes on to its end regardless, so that the next launch finds it built, not half."""
    with contextlib.suppress(OSError):
        print(json.dumps(message), flush=True)


def build(envs: str, digest: str, keep_days: float, source: str = INDEX) -> dict[str, object]:
    """Make ENVS/DIGEST-MACHINE a complete venv of this Python with ENVS/DIGEST.requirements
    installed, and remove the envs unused for `keep_days` (prune); what happened, for the
    launcher: the env's Python, whether it was built now, how long it took or waited, the
    envs removed; on failure the log's last lines; or that it needs wheels sent."""
    outcome = settle(envs, digest, source)
    if "python" in outcome:
        outcome["removed"] = prune(envs, keep_days, keep=os.path.dirname(os.path.dirname(str(outcome["python"]))))
    return outcome


def settle(envs: str, digest: str, source: str = INDEX) -> dict[str, object]:
    """The env found complete (its lock held shared meanwhile, so no prune removes it under us),
    or built, once, under its lock held exclusively (a second launch says it waits)."""
    target = os.path.join(envs, f"{digest}-{platform.machine()}")
    log_path = target + ".log"
    marker = os.path.join(target, COMPLETE)
    started = time.monotonic()
    python = os.path.join(target, "bin", "python")
    with open(target + ".lock", "w") as lock:
        waited = False
        for mode in (fcntl.LOCK_SH, fcntl.LOCK_EX):
            try:
                fcntl.flock(lock, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    tell({"waiting": True})  # another launch builds it: said, then waited for
                waited = True
                fcntl.flock(lock, mode)
            if os.path.exists(marker):
                os.utime(marker)
                return {"python": python, "built": False, "seconds": time.monotonic() - started if waited else 0.0,
                        "log": log_path, "size": recorded_size(target)}
        if source == SHIP or (source == AUTO and not index_reachable()):
            return {"needs_wheels": True, "machine": platform.machine()}
        shutil.rmtree(target, ignore_errors=True)  # an earlier build that did not finish
        requirements = os.path.join(envs, f"{digest}.requirements")
        with open(requirements) as listed:
            total = sum(1 for line in listed if line.strip())
        with open(log_path, "w") as log:
            uv = find_uv(os.path.dirname(envs), None if os.path.isabs(source) else log)
            for step in steps(target, requirements, source, uv):
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                if run_telling_progress(step, log, total, uv_environment() if uv else None):
                    log.close()
                    shutil.rmtree(target, ignore_errors=True)
                    with open(log_path, errors="replace") as written:
                        tail = written.read().splitlines()[-LOG_TAIL_LINES:]
                    return {"error": "\n".join(tail), "log": log_path}
        size = folder_size(target)
        Path(marker).write_text(str(size))  # for listings
    return {"python": python, "built": True, "seconds": time.monotonic() - started, "log": log_path,
            "installer": "uv" if uv else "pip", "size": size}


def run_telling_progress(step: list[str], log: Any, total: int, environment: dict[str, str] | None) -> int:
    """Run one build step, its output into the log, and print how far the install is as
    JSON lines (`{"progress": "12/52 packages"}`, at most one a second) for the launcher's
    status line; its exit status."""
    process = subprocess.Popen(step, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=environment, text=True, errors="replace")
    assert process.stdout is not None
    collected, told = 0, 0.0
    for line in process.stdout:
        log.write(line)
        uv_stage = re.match(r"(Resolved|Prepared|Installed) (\d+ packages?)", line)
        collected += line.startswith("Collecting ")
        text = (f"{uv_stage[2]} {uv_stage[1].lower()}" if uv_stage else
                f"{collected}/{max(total, collected)} packages" if line.startswith("Collecting ") else "")
        if text and time.monotonic() - told >= 1:
            told = time.monotonic()
            tell({"progress": text})
    return process.wait()


def steps(target: str, requirements: str, source: str, uv: str | None) -> list[list[str]]:
    """The commands that build the venv: by uv, else venv and pip; from the wheels in `source`
    alone when it is a folder."""
    python = os.path.join(target, "bin", "python")
    wheels = ["--no-index", "--find-links", source] if os.path.isabs(source) else []
    if uv:
        return [[uv, "venv", "--quiet", "--python", sys.executable, target],
                [uv, "pip", "install", "--python", python, *(wheels or uv_index_options()), "-r", requirements]]
    return [[sys.executable, "-m", "venv", target],
            [python, "-m", "pip", "install", "--disable-pip-version-check", *wheels, "-r", requirements]]


def find_uv(hsm_home: str = "", log: Any = None) -> str | None:
    """uv on the PATH, else in HSM_HOME/tools; with a `log`, installed there (into a venv of
    its own, by pip from the machine's index) when it is in neither: one install, then every
    build is faster. None: pip builds (tried again a day later)."""
    tools = os.path.join(hsm_home, "tools")
    private = os.path.join(tools, "bin", "uv")
    found = shutil.which("uv") or (private if hsm_home and os.access(private, os.X_OK) and own(tools) else None)
    if found or log is None:
        return found
    failed = tools + ".failed"
    with open(tools + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(private, os.X_OK) and own(tools):
            return private
        if os.path.exists(failed) and time.time() - os.path.getmtime(failed) < UV_RETRY_AFTER_SECONDS:
            return None
        shutil.rmtree(tools, ignore_errors=True)
        log.write("$ installing uv into ~/.hsm/tools (once per machine)\n")
        log.flush()
        tell({"progress": "installing uv (once for this machine)"})
        for step in ([sys.executable, "-m", "venv", tools],
                     [os.path.join(tools, "bin", "python"), "-m", "pip", "install", "--quiet",
                      "--disable-pip-version-check", "uv"]):
            if subprocess.run(step, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT).returncode:
                Path(failed).touch()
                log.write("(uv could not be installed: venv and pip build instead)\n")
                return None
    return private


def own(folder: str) -> bool:
    """Whether a folder is this user's alone (owned, writable by no one else): a uv someone
    else could replace is not run."""
    found = os.stat(folder)
    return found.st_uid == os.getuid() and not found.st_mode & 0o022


def pip_configuration() -> dict[str, str]:
    """The machine's pip settings that say where packages come from (its config files, then
    PIP_* variables), so that uv takes them from the same place pip would."""
    files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", os.path.expanduser("~/.pip/pip.conf"),
             os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "pip", "pip.conf")]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([*files, os.environ.get("PIP_CONFIG_FILE", "")])
    found = {key: value for section in ("global", "install") if parser.has_section(section)
             for key, value in parser.items(section)}
    for key in ("index-url", "extra-index-url", "find-links", "cert", "no-index"):
        variable = "PIP_" + key.upper().replace("-", "_")
        if variable in os.environ:
            found[key] = os.environ[variable]
    return found


def index_reachable() -> bool:
    """Whether the index pip would use answers at all (any HTTP answer, even a refusal, or a
    TLS handshake pip's own certificates may accept, is an index there); False with no index
    configured (`no-index`)."""
    settings = pip_configuration()
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        return False
    cert = settings.get("cert")
    context = ssl.create_default_context(cafile=cert if cert and os.path.exists(cert) else None)
    request = urllib.request.Request(settings.get("index-url", DEFAULT_INDEX), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=INDEX_PROBE_TIMEOUT_SECONDS, context=context).close()
    except urllib.error.HTTPError:
        return True
    except urllib.error.URLError as error:
        return isinstance(error.reason, ssl.SSLError)
    except (OSError, ValueError):
        return False
    return True


def uv_index_options() -> list[str]:
    settings = pip_configuration()
    options = ["--index-url", settings["index-url"]] if "index-url" in settings else []
    for key in ("extra-index-url", "find-links"):
        for value in settings.get(key, "").split():
            options += [f"--{key}", value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        options.append("--no-index")
    return options


def uv_environment() -> dict[str, str]:
    """uv's environment: pip's certificate file, else the system's certificates (as pip's
    own bundle would serve)."""
    cert = pip_configuration().get("cert")
    return {**os.environ, **({"SSL_CERT_FILE": cert} if cert else {"UV_NATIVE_TLS": "1"})}


def prune(envs: str, keep_days: float, keep: str) -> list[str]:
    """Remove the envs (and their logs, locks, requirements) whose last use is older than
    `keep_days`, unless one is in use: an agent running from an env holds its lock shared
    (hold), a build holds it exclusively; and the wheels sent that long ago. The envs removed."""
    removed = []
    cutoff = time.time() - keep_days * 86400
    wheels = wheels_folder(envs)
    for name in os.listdir(wheels) if os.path.isdir(wheels) else []:
        with contextlib.suppress(FileNotFoundError):
            if os.path.getmtime(os.path.join(wheels, name)) < cutoff:
                os.unlink(os.path.join(wheels, name))
    for entry in sorted(os.listdir(envs)):
        folder = os.path.join(envs, entry)
        if folder == keep or not os.path.isdir(folder):
            continue
        marker = os.path.join(folder, COMPLETE)
        last_used = os.path.getmtime(marker if os.path.exists(marker) else folder)
        if last_used >= cutoff:
            continue
        with open(folder + ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            shutil.rmtree(folder, ignore_errors=True)
            for leftover in (folder + ".log", os.path.join(envs, entry.rsplit("-", 1)[0] + ".requirements")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        removed.append(entry)
    return removed


def folder_size(folder: str) -> int:
    return sum(os.lstat(os.path.join(parent, name)).st_size for parent, _, names in os.walk(folder) for name in names)


def recorded_size(folder: str) -> int:
    """An env's size in bytes, as its build recorded it (measured when it did not)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(folder, COMPLETE).read_text())
    return folder_size(folder)


def listing(envs: str) -> list[dict[str, Any]]:
    """The envs there: name, size, last use (epoch seconds), whether complete and in use."""
    found = []
    for entry in sorted(os.listdir(envs)) if os.path.isdir(envs) else []:
        folder = os.path.join(envs, entry)
        if not os.path.isdir(folder):
            continue
        marker = os.path.join(folder, COMPLETE)
        complete = os.path.exists(marker)
        with open(folder + ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                in_use = False
            except BlockingIOError:
                in_use = True
        found.append({"name": entry, "complete": complete, "in_use": in_use, "size": recorded_size(folder),
                      "last_used": os.path.getmtime(marker if complete else folder)})
    return found


def wheels_folder(envs: str) -> str:
    """Where the launcher sends wheels for a machine without an index: ~/.hsm/wheels."""
    return os.path.join(os.path.dirname(envs), "wheels")


def hold(prefix: str = sys.prefix) -> int | None:
    """In a process running from a built env: hold its lock shared for the process's life (and
    its children's), so that no prune removes it meanwhile. The lock's fd, or None."""
    if os.path.basename(os.path.dirname(prefix)) != "envs" or not os.path.exists(os.path.join(prefix, COMPLETE)):
        return None
    fd = os.open(prefix + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # being pruned this very moment: nothing to hold
        os.close(fd)
        return None
    return fd


def main(arguments: list[str]) -> Any:
    """build ENVS DIGEST KEEP_DAYS SOURCE | list ENVS | prune ENVS (every env not in use)."""
    if arguments[:1] == ["build"] and len(arguments) == 5:
        return build(arguments[1], arguments[2], float(arguments[3]), arguments[4])
    if arguments[:1] == ["list"] and len(arguments) == 2:
        return listing(os.path.expanduser(arguments[1]))
    if arguments[:1] == ["prune"] and len(arguments) == 2:  # what it removed, as listed before
        envs = os.path.expanduser(arguments[1])
        before = {env["name"]: env for env in listing(envs)}
        return [before[name] for name in prune(envs, 0, keep="")] if before else []
    sys.exit("usage: python -m hsm_core.environments build ENVS DIGEST KEEP_DAYS index|auto|ship|WHEELS"
             " | list ENVS | prune ENVS")


if __name__ == "__main__":
    tell(main(sys.argv[1:]))
