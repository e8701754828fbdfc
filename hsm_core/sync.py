"""Project snapshot up, job outputs down, and the path mapping between the two machines.

The project travels content-addressed: the launcher hashes its files, the remote agent
hashes its copy, and only files whose hash differs are sent (then renamed into place,
so a half-sent file is never seen). Outputs come back the same way, and the remote copy
is removed only once every local file's hash matches the remote one.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import posixpath
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from hsm_core.settings import SyncSettings
from hsm_core.worker import sha256_of

PROJECT_MARKERS = ("pyproject.toml", ".git")
DEFAULT_EXCLUDES = (
    ".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".venv", "venv", ".tox", ".nox",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "node_modules",
    "*.egg-info", "outputs", "multirun", ".hsm", "wandb", "mlruns", "lightning_logs", ".DS_Store",
)
HYDRA_OUTPUT_MARKERS = (".hydra", "multirun.yaml")  # a folder with one of these holds run outputs
MAX_FILES = 20_000
MAX_BYTES = 2 * 1024**3
TRANSFERS_AT_ONCE = 8

Tree = dict[str, tuple[int, str]]  # relative path -> (size, sha256)


class SyncError(Exception):
    """The project cannot be sent as configured; the message says what to change."""


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def app_directory() -> Path:
    """Where the user's app lives: the main script's folder, else the working directory."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        folder = Path(main_file).resolve().parent
        if not any(part in ("site-packages", "dist-packages") for part in folder.parts):
            return folder
    return Path.cwd()


def find_project_root(start: Path) -> Path:
    """The nearest folder at or above `start` with a pyproject.toml or .git; else `start`."""
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return start


def excluded(relative: str, patterns: Iterable[str]) -> bool:
    parts = relative.split("/")
    return any(
        fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(part, pattern) for part in parts)
        for pattern in patterns
    )


def exclusions(settings: SyncSettings) -> tuple[str, ...]:
    return (*DEFAULT_EXCLUDES, *settings.exclude)


def project_tree(root: Path, settings: SyncSettings) -> Tree:
    """The files of the project that travel, with their sizes and hashes. Folders of Hydra
    outputs (sweep and run dirs) never travel, wherever they are."""
    patterns = exclusions(settings)
    tree: Tree = {}
    total = 0
    for folder, subfolders, files in os.walk(root):
        if any(marker in files or marker in subfolders for marker in HYDRA_OUTPUT_MARKERS):
            subfolders[:] = []
            continue
        relative_folder = os.path.relpath(folder, root)
        prefix = "" if relative_folder == "." else relative_folder.replace(os.sep, "/") + "/"
        subfolders[:] = [name for name in subfolders if not excluded(prefix + name, patterns)]
        for name in files:
            relative = prefix + name
            path = os.path.join(folder, name)
            if excluded(relative, patterns) or not os.path.isfile(path):
                continue
            if settings.include and not any(fnmatch.fnmatch(relative, pattern) for pattern in settings.include):
                continue
            size = os.path.getsize(path)
            total += size
            tree[relative] = (size, sha256_of(path))
            if len(tree) > MAX_FILES or total > MAX_BYTES:
                raise SyncError(
                    f"the project at {root} has more than {MAX_FILES} files or {MAX_BYTES >> 30} GiB to send;"
                    " add patterns to hydra.launcher.sync.exclude (data, checkpoints), or launch from the"
                    " project's own folder"
                )
    return tree


def differing(source: Tree, target: Tree) -> list[str]:
    """Paths whose content in source is not already in target."""
    return sorted(path for path, (_, digest) in source.items() if target.get(path, (0, ""))[1] != digest)


@dataclass
class SyncReport:
    sent: int = 0
    sent_bytes: int = 0
    unchanged: int = 0
    removed: int = 0

    def __str__(self) -> str:
        return (f"{self.sent} {'file' if self.sent == 1 else 'files'} sent ({self.sent_bytes} bytes),"
                f" {self.unchanged} unchanged, {self.removed} removed")


@dataclass
class PathMap:
    """Where the launcher's paths live on one remote machine."""

    local_project: Path
    remote_project: str
    local_cwd: str
    local_sweep_dir: str  # absolute
    remote_outputs: str  # this machine's folder for this sweep's outputs
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pairs = [(self.local_sweep_dir, self.remote_sweep_dir), (self.local_cwd, self.remote_cwd)]

    def to_remote(self, local: str) -> str | None:
        """The remote twin of a local path inside the project, else None."""
        try:
            relative = Path(local).resolve().relative_to(self.local_project)
        except ValueError:
            return None
        return posixpath.join(self.remote_project, relative.as_posix()) if relative.parts else self.remote_project

    @property
    def remote_cwd(self) -> str:
        return self.to_remote(self.local_cwd) or self.remote_project

    @property
    def remote_sweep_dir(self) -> str:
        return posixpath.join(self.remote_outputs, Path(self.local_sweep_dir).name)

    def to_local(self, remote: str) -> str:
        """A remote path under the sweep dir or working dir, as its local twin."""
        for local_root, remote_root in self.pairs:
            if remote == remote_root or remote.startswith(remote_root + "/"):
                return local_root + remote[len(remote_root):]
        return remote


def sweep_outputs_folder(remote_home: str, local_sweep_dir: str) -> str:
    """A remote folder unique to this launcher machine and sweep dir."""
    return posixpath.join(remote_home, ".hsm", "outputs", short_hash(socket.gethostname(), local_sweep_dir))


def remote_project_folder(project_dir: str, remote_home: str, local_project: Path) -> str:
    """`<project_dir>/<name>-<id>`: same-named projects of different machines never collide."""
    root = remote_home + project_dir[1:] if project_dir.startswith("~") else project_dir
    return posixpath.join(root, f"{local_project.name}-{short_hash(socket.gethostname(), str(local_project))}")


async def each_at_most(limit: int, action: Callable[[str], Awaitable[None]], paths: Iterable[str]) -> None:
    """`action(path)` for every path, at most `limit` at once (SFTP pipelines them)."""
    gate = asyncio.Semaphore(limit)

    async def one(path: str) -> None:
        async with gate:
            await action(path)

    await asyncio.gather(*(one(path) for path in paths))


async def push_project(sftp: Any, agent: Any, local_root: Path, tree: Tree, remote_root: str,
                       patterns: Iterable[str]) -> SyncReport:
    """Make remote_root hold `tree`, sending only the files whose hash differs. Remote files
    matching `patterns` (such as __pycache__ written by the jobs) are left alone."""
    await make_private_dirs(sftp, remote_root)
    remote_tree: Tree = {
        path: entry for path, entry in (await agent.call("tree", remote_root)).items() if not excluded(path, patterns)
    }
    to_send = differing(tree, remote_tree)
    for folder in sorted({posixpath.dirname(path) for path in to_send} - {""}):
        await make_private_dirs(sftp, posixpath.join(remote_root, folder))

    async def send(path: str) -> None:
        target = posixpath.join(remote_root, path)
        await sftp.put(str(local_root / path), target + ".hsm-part", preserve=True)
        await sftp.posix_rename(target + ".hsm-part", target)

    await each_at_most(TRANSFERS_AT_ONCE, send, to_send)
    stale = sorted(set(remote_tree) - set(tree))
    for path in stale:
        await sftp.remove(posixpath.join(remote_root, path))
    return SyncReport(
        sent=len(to_send),
        sent_bytes=sum(tree[path][0] for path in to_send),
        unchanged=len(tree) - len(to_send),
        removed=len(stale),
    )


async def pull_outputs(sftp: Any, agent: Any, remote_dir: str, local_dir: Path, remove: bool) -> int:
    """Copy remote_dir's files that differ into local_dir; with remove, delete the remote
    copy once every local file's hash matches. Returns the number of files copied."""
    remote_tree: Tree = await agent.call("tree", remote_dir)
    local_tree: Tree = {
        path: (size, sha256_of(str(local_dir / path)))
        for path, (size, _) in remote_tree.items()
        if (local_dir / path).is_file()
    }
    to_fetch = differing(remote_tree, local_tree)

    async def fetch(path: str) -> None:
        target = local_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".hsm-part")
        await sftp.get(posixpath.join(remote_dir, path), str(partial), preserve=True)
        os.replace(partial, target)

    await each_at_most(TRANSFERS_AT_ONCE, fetch, to_fetch)
    if remove:
        mismatched = [path for path, (_, digest) in remote_tree.items() if sha256_of(str(local_dir / path)) != digest]
        if mismatched:
            raise SyncError(f"{len(mismatched)} pulled files differ from the remote copy (first: {mismatched[0]});"
                            f" the remote copy is kept at {remote_dir}")
        await agent.call("remove", remote_dir)
    return len(to_fetch)


async def make_private_dirs(sftp: Any, path: str) -> None:
    """Create path and its parents, readable only by the remote user (0700)."""
    import asyncssh

    await sftp.makedirs(path, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
