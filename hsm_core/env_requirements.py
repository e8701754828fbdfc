"""What an `environment` setting asks a machine to install, described here, on the launcher.

`mirror`: the distributions of this launcher's environment at their exact versions (the
project itself aside: it travels with the sync). Or a file of the project: requirements.txt,
pyproject.toml (its `[project] dependencies`), uv.lock or pylock.toml (their pinned packages).
What the worker itself imports is added, pinned to this machine's versions, unless the file
names it. The machine side (the build, its cache and lock) is `environments`.

Also the wheels that travel with the sync of a machine that cannot reach an index
(`wheels: ship`): built or fetched here once, by this environment's pip, into a wheelhouse
kept per environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MIRROR = "mirror"
FILE_KINDS = ("requirements .txt", "pyproject.toml", "uv.lock", "pylock.toml")
WORKER_NEEDS = ("hydra-core", "omegaconf", "cloudpickle")  # what the agent itself imports
NOT_MIRRORED = ("pip", "hsm-distributed")  # the venv brings its own pip; the worker travels by itself
WHEELHOUSE_TIMEOUT_SECONDS = 1800


class NotDescribable(Exception):
    """An environment cannot be described (a file that is not there, a line pip cannot take)."""


@dataclass(frozen=True)
class Environment:
    """What a machine's jobs need installed: pip requirement lines, and the Python minor."""

    requirements: tuple[str, ...]
    python_minor: str  # "3.11"
    origin: str  # `mirror` or the file it came from, for messages
    closed: bool = False  # the requirements name every distribution (mirror, a lock): no resolving needed
    built_here: tuple[tuple[str, str], ...] = field(default=())  # (pin, folder): what no index has (mirror)

    def digest(self) -> str:
        """Its name: the same requirements and Python minor make one env (per platform: the
        machine adds its own to the folder's name)."""
        text = "\n".join([self.python_minor, *self.requirements])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def requirements_text(self) -> str:
        return "".join(f"{line}\n" for line in self.requirements)


def is_environment_file(value: str) -> bool:
    name = Path(value).name
    return name.endswith(".txt") or name in ("pyproject.toml", "uv.lock", "pylock.toml") or (
        name.startswith("pylock.") and name.endswith(".toml"))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return canonical(re.split(r"[<>=!~;@\[ (]", line.strip(), maxsplit=1)[0])


def mirror_requirements(project_root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """This environment's distributions as `name==version` (the one Python imports, where two
    have a name), and those no index has, installed from a local folder outside the project,
    with that folder (their wheels are built here and shipped). What lives in the project
    itself is left out: it travels with the sync."""
    pinned: dict[str, str] = {}
    local: list[tuple[str, str]] = []
    seen: set[str] = set()
    for distribution in metadata.distributions():
        name = canonical(distribution.metadata["Name"] or "")
        if not name or name in NOT_MIRRORED or name in seen:
            continue
        seen.add(name)
        direct = json.loads(distribution.read_text("direct_url.json") or "{}")
        entry = Path(str(distribution.locate_file(""))).resolve()
        in_project = entry.is_relative_to(project_root.resolve()) and not {"site-packages", "dist-packages"} & set(
            entry.parts)
        url = str(direct.get("url", ""))
        if url.startswith("file:"):
            folder = Path(url.removeprefix("file://"))
            if in_project or folder.resolve().is_relative_to(project_root.resolve()):
                continue
            local.append((f"{name}=={distribution.version}", str(folder)))
        elif in_project:
            continue
        pinned[name] = f"{name}=={distribution.version}"
    return sorted(pinned.values()), sorted(local)


def worker_pins() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in WORKER_NEEDS]


def described(environment: str, project_root: Path, key: str) -> Environment | None:
    """The environment a setting asks for (None: `found`, nothing to build); `key` names the
    setting in errors."""
    minor = ".".join(platform.python_version_tuple()[:2])
    if environment == "found":
        return None
    if environment == MIRROR:
        pinned, local = mirror_requirements(project_root)
        return Environment(tuple(pinned), minor, MIRROR, closed=True, built_here=tuple(local))
    path = project_root / environment
    if not is_environment_file(environment):
        raise NotDescribable(f"{key}: {environment!r} is not an environment file. Fix: use found, mirror, or the"
                             f" path of a {', '.join(FILE_KINDS)} file in the project")
    try:
        text = path.read_text()
    except OSError as error:
        raise NotDescribable(f"{key}: cannot read {path} ({error.strerror}). Fix: give a file of the project,"
                             f" relative to {project_root}") from None
    try:
        if path.name.endswith(".txt"):
            requirements, closed = _requirements_file(text, path.name, key), False
        elif path.name == "pyproject.toml":
            requirements, closed = _pyproject(tomllib.loads(text), path.name, key), False
        elif path.name == "uv.lock":
            requirements, closed = _uv_lock(tomllib.loads(text), path.name, key), True
        else:
            requirements, closed = _pylock(tomllib.loads(text)), True
    except tomllib.TOMLDecodeError as error:
        raise NotDescribable(f"{key}: {path.name} is not valid TOML ({error}). Fix: correct it") from None
    named = {requirement_name(line) for line in requirements}
    extra = [pin for pin in worker_pins() if requirement_name(pin) not in named]
    return Environment(tuple([*requirements, *extra]), minor, environment, closed=closed and not extra)


def _requirements_file(text: str, name: str, key: str) -> list[str]:
    requirements = [line.split(" #")[0].strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    for line in requirements:
        if line.startswith("-"):
            raise NotDescribable(f"{key}: {name} has the option line {line!r}, which a machine cannot follow"
                                 f" there. Fix: list the packages in {name} itself")
    return requirements


def _pyproject(document: dict[str, Any], name: str, key: str) -> list[str]:
    dependencies = document.get("project", {}).get("dependencies")
    if not isinstance(dependencies, list):
        raise NotDescribable(f"{key}: {name} has no [project] dependencies list. Fix: list them there (PEP 621),"
                             " or name a requirements file or lock instead")
    return [str(line) for line in dependencies]


def _uv_lock(document: dict[str, Any], name: str, key: str) -> list[str]:
    """The packages the project needs on this platform (the lock is universal: its edges carry
    markers, evaluated here for this Python and platform), pinned; the project itself and
    other local folders aside (they travel with the sync)."""
    from packaging.markers import Marker  # hydra-core's own dependency: on every launcher

    packages = {canonical(entry["name"]): entry for entry in document.get("package", [])}
    roots = [entry for entry in packages.values() if {"editable", "virtual"} & set(entry.get("source", {}))]
    if not roots:
        raise NotDescribable(f"{key}: {name} has no project of its own (no editable or virtual package). Fix:"
                             " run `uv lock` in the project")
    wanted: dict[str, str] = {}
    pending = [dependency for root in roots for dependency in root.get("dependencies", [])]
    while pending:
        dependency = pending.pop()
        package = packages.get(canonical(dependency["name"]))
        marker = dependency.get("marker")
        if package is None or (marker and not Marker(marker).evaluate()):
            continue
        for extra in dependency.get("extra", []):
            pending.extend(package.get("optional-dependencies", {}).get(extra, []))
        source = package.get("source", {})
        if canonical(package["name"]) in wanted or {"editable", "virtual", "directory", "path"} & set(source):
            continue
        wanted[canonical(package["name"])] = (f"{package['name']} @ {source['url']}" if "url" in source
                                              else f"{package['name']} @ git+{source['git']}" if "git" in source
                                              else f"{package['name']}=={package['version']}")
        pending.extend(package.get("dependencies", []))
    return sorted(wanted.values())


def _pylock(document: dict[str, Any]) -> list[str]:
    """PEP 751: each package with its own marker (evaluated there by pip); local folders aside."""
    lines = []
    for package in document.get("packages", []):
        if "directory" in package:
            continue
        marker = f" ; {package['marker']}" if package.get("marker") else ""
        vcs = package.get("vcs")
        if vcs:
            lines.append(f"{package['name']} @ git+{vcs['url']}@{vcs['commit-id']}{marker}")
        else:
            lines.append(f"{package['name']}=={package['version']}{marker}")
    return lines


# -- wheels for a machine without an index --------------------------------------------------


def wheelhouse_folder(environment: Environment) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hsm" / "wheels" / f"{environment.digest()}-{platform.machine()}"


def wheelhouse(environment: Environment) -> tuple[Path, bool]:
    """A folder of wheels of everything the environment installs, for this platform and Python
    (the machine's, checked by the caller): pip's cache and this machine's index serve them,
    or they are built here (a package with no wheel, a local folder). Made once per
    environment; whether it was made now."""
    folder = wheelhouse_folder(environment)
    if (folder / ".complete").exists():
        return folder, False
    folder.mkdir(parents=True, exist_ok=True)
    local = dict(environment.built_here)
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{line}\n" for line in environment.requirements if line not in local))
    steps = [["wheel", *(["--no-deps"] if environment.closed else []), "-r", str(requirements)]]
    steps += [["wheel", "--no-deps", source] for source in local.values()]
    with open(folder / "wheelhouse.log", "w") as log:
        for step in steps:
            command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *step, "--wheel-dir", str(folder)]
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=WHEELHOUSE_TIMEOUT_SECONDS)
            if done.returncode:
                log.close()
                tail = (folder / "wheelhouse.log").read_text(errors="replace").splitlines()[-15:]
                raise NotDescribable("its wheels could not be made here (pip wheel); the log ends with:\n"
                                     + "\n".join(tail) + f"\nThe whole log: {folder / 'wheelhouse.log'}")
    (folder / ".complete").touch()
    return folder, True
