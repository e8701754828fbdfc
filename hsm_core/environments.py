"""The jobs' Python environment on a machine: described here, built there once, reused by its hash.

Both halves, as `hydra_job` holds both halves of a job. Here: what an `environment` setting
asks for (`mirror`: the distributions of this launcher's environment at their exact
versions, the project itself aside, since it travels with the sync; or a requirements file
of the project, with what the worker needs pinned to this machine's versions), and the hash
that names it. There (`python -m hsm_core.environments build ENVS DIGEST`, with the machine's
Python of the same minor): a venv at ENVS/DIGEST built by pip from ENVS/DIGEST.requirements,
under a lock so that two launches build it once, its log at ENVS/DIGEST.log, marked complete
only once it is whole. Stdlib only: this module travels with the worker (AGENT_FILES).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

FOUND, MIRROR = "found", "mirror"
WORKER_NEEDS = ("hydra-core", "omegaconf", "cloudpickle")  # what the agent itself imports
NOT_MIRRORED = ("pip",)  # the venv brings its own
COMPLETE = ".hsm-complete"  # in a built env: it is whole (touched at each use: its last use)
LOG_TAIL_LINES = 15


class NotDescribable(Exception):
    """An environment cannot be described (a file that is not there, a line pip cannot take)."""


@dataclass(frozen=True)
class Environment:
    """What a machine's jobs need installed: pip requirement lines, and the Python minor."""

    requirements: tuple[str, ...]
    python_minor: str  # "3.11"
    origin: str  # `mirror` or the file it came from, for messages

    def digest(self) -> str:
        """Its name: the same requirements and Python minor make one env (per platform: the
        machine adds its own to the folder's name)."""
        text = "\n".join([self.python_minor, *self.requirements])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def requirements_text(self) -> str:
        return "".join(f"{line}\n" for line in self.requirements)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def mirror_requirements(project_root: Path) -> tuple[list[str], list[str]]:
    """This environment's distributions as `name==version` (the one Python imports, where two
    have a name), and the names of those left out because no index has them: installed from a
    local folder, or living in the project itself (it travels with the sync)."""
    pinned: dict[str, str] = {}
    local: set[str] = set()
    for distribution in metadata.distributions():
        name = canonical(distribution.metadata["Name"] or "")
        if not name or name in NOT_MIRRORED or name in pinned or name in local:
            continue
        direct = distribution.read_text("direct_url.json")
        entry = Path(str(distribution.locate_file(""))).resolve()
        in_project = entry.is_relative_to(project_root.resolve()) and not {"site-packages", "dist-packages"} & set(
            entry.parts)
        if in_project or (direct and json.loads(direct).get("url", "").startswith("file:")):
            local.add(name)
        else:
            pinned[name] = f"{name}=={distribution.version}"
    return sorted(pinned.values()), sorted(local)


def worker_pins() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in WORKER_NEEDS]


def described(environment: str, project_root: Path, key: str) -> Environment | None:
    """The environment a setting asks for (None: `found`, nothing to build); `key` names the
    setting in errors."""
    minor = ".".join(platform.python_version_tuple()[:2])
    if environment == FOUND:
        return None
    if environment == MIRROR:
        pinned, _ = mirror_requirements(project_root)
        return Environment(tuple(pinned), minor, MIRROR)
    path = project_root / environment
    if path.name != "requirements.txt" and not path.name.endswith(".txt"):
        raise NotDescribable(f"{key}: {environment!r} is not a requirements file. Fix: use found, mirror, or the"
                                " path of a requirements .txt file in the project")
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise NotDescribable(f"{key}: cannot read {path} ({error.strerror}). Fix: give a requirements file of"
                                f" the project, relative to {project_root}") from None
    requirements = [line.split(" #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for line in requirements:
        if line.startswith("-"):
            raise NotDescribable(f"{key}: {path.name} has the option line {line!r}, which a machine cannot follow"
                                    f" there. Fix: list the packages in {path.name} itself")
    named = {canonical(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]) for line in requirements}
    extra = [pin for pin in worker_pins() if canonical(pin.split("==")[0]) not in named]
    return Environment(tuple([*requirements, *extra]), minor, environment)


# -- on the machine ------------------------------------------------------------------------


def build(envs: str, digest: str, keep_days: float) -> dict[str, object]:
    """Make ENVS/DIGEST-MACHINE a complete venv of this Python with ENVS/DIGEST.requirements
    installed, and remove the envs unused for `keep_days` (prune); what happened, for the
    launcher: the env's Python, whether it was built now, how long it took or waited, the
    envs removed, and on failure the log's last lines."""
    outcome = settle(envs, digest)
    if "error" not in outcome:
        outcome["removed"] = prune(envs, keep_days, keep=os.path.dirname(os.path.dirname(str(outcome["python"]))))
    return outcome


def settle(envs: str, digest: str) -> dict[str, object]:
    """The env found complete (its lock held shared meanwhile, so no prune removes it under us),
    or built, once, under its lock held exclusively (a second launch says it waits)."""
    target = os.path.join(envs, f"{digest}-{platform.machine()}")
    requirements = os.path.join(envs, f"{digest}.requirements")
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
                    print(json.dumps({"waiting": True}), flush=True)  # another launch builds it: said, then waited for
                waited = True
                fcntl.flock(lock, mode)
            if os.path.exists(marker):
                os.utime(marker)
                return {"python": python, "built": False, "seconds": time.monotonic() - started if waited else 0.0,
                        "log": log_path}
        shutil.rmtree(target, ignore_errors=True)  # an earlier build that did not finish
        with open(log_path, "w") as log:
            for step in ([sys.executable, "-m", "venv", target],
                         [python, "-m", "pip", "install", "--disable-pip-version-check", "-r", requirements]):
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                if subprocess.run(step, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT).returncode:
                    log.close()
                    with open(log_path, errors="replace") as written:
                        tail = written.read().splitlines()[-LOG_TAIL_LINES:]
                    return {"error": "\n".join(tail), "log": log_path}
        Path(marker).touch()
    return {"python": python, "built": True, "seconds": time.monotonic() - started, "log": log_path}


def prune(envs: str, keep_days: float, keep: str) -> list[str]:
    """Remove the envs (and their logs, locks, requirements) whose last use is older than
    `keep_days`, unless one is in use: an agent running from an env holds its lock shared
    (hold), a build holds it exclusively. The names removed."""
    removed = []
    cutoff = time.time() - keep_days * 86400
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


if __name__ == "__main__":
    if sys.argv[1:2] != ["build"] or len(sys.argv) != 5:
        sys.exit("usage: python -m hsm_core.environments build ENVS DIGEST KEEP_DAYS")
    print(json.dumps(build(sys.argv[2], sys.argv[3], float(sys.argv[4]))), flush=True)
