"""Project snapshot up, job outputs down, and the path mapping between the two machines.

Owns which files travel (and which never do: secrets, links outside the project), the
remote project store, and the checks that keep pulled outputs inside their job dir.
Must not know Hydra, jobs or sources: it moves files for whoever asks.

The project travels content-addressed into a per-machine store: each file content once
(`objects/`), and each launch runs a snapshot of its own (`snapshots/<id>/`, hard links
to the objects), so two sweeps of one project never share code under a running job and
a launch sends only the contents the machine does not have yet. Outputs come back the
same way: only files whose hash differs travel, every file is fsynced here before the
remote copy of it is removed, and only files verified here are removed there.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import socket
import stat
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from hsm_core import files
from hsm_core.settings import SyncSettings

log = logging.getLogger(__name__)

PROJECT_MARKERS = ("pyproject.toml", ".git")
DEFAULT_EXCLUDES = (
    ".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".venv", "venv", ".tox", ".nox",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "node_modules",
    "*.egg-info", "outputs", "multirun", ".hsm", "wandb", "mlruns", "lightning_logs", ".DS_Store",
    "nohup.out",  # a sweep started with nohup writes its log there while it runs
    "hsm_config.yaml",  # the launcher's own settings (env values may hold tokens): no job reads it
)
# Files that hold credentials: they travel only when sync.include names them.
SECRET_EXCLUDES = (
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    ".netrc", ".pypirc", ".git-credentials", ".aws", ".ssh", ".gnupg", ".docker", ".kube",
    "credentials*.json", "*credentials*.json", "service-account*.json", "*.kdbx",
)
HYDRA_OUTPUT_MARKERS = (".hydra", "multirun.yaml")  # a folder with one of these holds run outputs
# A folder with one of these is a Python environment (venv, conda) of any name: it never travels (it would
# not work elsewhere; a machine's jobs get theirs by `environment`).
ENVIRONMENT_MARKERS = ("pyvenv.cfg", "conda-meta")
MAX_FILES = 20_000
MAX_BYTES = 2 * 1024**3
TRANSFERS_AT_ONCE = 8

Tree = files.Tree


class SyncError(Exception):
    """The project cannot be sent as configured; the message says what to change."""


class UnsafeOutput(SyncError):
    """A remote machine named an output outside the job's dir: the job fails, nothing is written."""


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
    """The nearest folder at or above `start` with a pyproject.toml or .git; else `start`.
    Never the home directory: that would send everything in it."""
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            root = folder
            break
    else:
        root = start
    if root.resolve() == Path.home().resolve():
        raise SyncError(
            f"the project folder would be your home directory ({root}), and all of it would be sent."
            " Fix: put your app in a folder of its own with a pyproject.toml or .git, and launch it from there"
        )
    return root


def matches(relative: str, patterns: Iterable[str]) -> bool:
    """Whether the path, or any folder on it, matches one of the glob patterns."""
    parts = relative.split("/")
    return any(
        fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(part, pattern) for part in parts)
        for pattern in patterns
    )


def may_hold_included(relative_folder: str, include: Iterable[str]) -> bool:
    """Whether an include pattern can match something inside this folder."""
    parts = relative_folder.split("/")
    for pattern in include:
        leading = pattern.split("/")[: len(parts)]
        if len(pattern.split("/")) > len(parts) and all(map(fnmatch.fnmatch, parts, leading)):
            return True
    return False


@dataclass
class FileRule:
    """Which project paths travel: the user's excludes always stay home; the user's
    includes travel even when a default (secrets, caches, environments) would keep them."""

    settings: SyncSettings

    def sends(self, relative: str) -> bool:
        if matches(relative, self.settings.exclude):
            return False
        if matches(relative, self.settings.include):
            return True
        return not matches(relative, (*DEFAULT_EXCLUDES, *SECRET_EXCLUDES))

    def keeps_secret(self, relative: str) -> bool:
        """Kept here only because it looks like credentials."""
        return not self.sends(relative) and not matches(relative, self.settings.exclude) and not matches(
            relative, DEFAULT_EXCLUDES) and matches(relative, SECRET_EXCLUDES)

    def enters(self, relative_folder: str) -> bool:
        return self.sends(relative_folder) or (
            not matches(relative_folder, self.settings.exclude)
            and may_hold_included(relative_folder, self.settings.include)
        )


ProjectTree = dict[str, tuple[int, str, bool]]  # relative path -> (size, sha256, executable)


@dataclass
class ProjectFiles:
    """What of the project travels, and what stays here: links that point outside the
    project, and files that look like credentials (unless sync.include names them)."""

    tree: ProjectTree = field(default_factory=dict)
    links_outside: list[str] = field(default_factory=list)
    secrets_kept: list[str] = field(default_factory=list)


def project_files(root: Path, settings: SyncSettings,
                  digest_of: Callable[[str, os.stat_result], str] = lambda path, _: files.sha256_of(path),
                  ) -> ProjectFiles:
    """The files of the project that travel, with sizes, digests (sha256 unless `digest_of`
    says otherwise) and exec bits. Folders of Hydra outputs and Python environments never
    travel; links travel as the file they name when it is inside the project, and not at all
    when it is outside."""
    rule = FileRule(settings)
    real_root = os.path.realpath(root)
    found = ProjectFiles()
    total = 0
    for folder, subfolders, names in os.walk(root):
        markers = HYDRA_OUTPUT_MARKERS if folder == str(root) else (*HYDRA_OUTPUT_MARKERS, *ENVIRONMENT_MARKERS)
        if any(marker in names or marker in subfolders for marker in markers):
            subfolders[:] = []
            continue
        relative_folder = os.path.relpath(folder, root)
        prefix = "" if relative_folder == "." else relative_folder.replace(os.sep, "/") + "/"
        for name in subfolders:
            if os.path.islink(os.path.join(folder, name)) and rule.enters(prefix + name):
                found.links_outside.append(f"{prefix}{name} -> {os.readlink(os.path.join(folder, name))}")
        found.secrets_kept += [prefix + name for name in subfolders if rule.keeps_secret(prefix + name)]
        subfolders[:] = [name for name in subfolders if rule.enters(prefix + name)]
        for name in names:
            relative = prefix + name
            path = os.path.join(folder, name)
            if not rule.sends(relative):
                if rule.keeps_secret(relative):
                    found.secrets_kept.append(relative)
                continue
            real = os.path.realpath(path)
            if os.path.islink(path) and not real.startswith(real_root + os.sep):
                found.links_outside.append(f"{relative} -> {os.readlink(path)}")
                continue
            try:
                details = os.stat(path)
                if not stat.S_ISREG(details.st_mode):
                    continue
                digest = digest_of(path, details)
            except OSError as error:
                raise SyncError(f"cannot read {path}: {error.strerror or error}. Fix: make it readable, or add it"
                                " to hydra.launcher.sync.exclude") from None
            total += details.st_size
            found.tree[relative] = (details.st_size, digest, bool(details.st_mode & stat.S_IXUSR))
            if len(found.tree) > MAX_FILES or total > MAX_BYTES:
                raise SyncError(
                    f"the project at {root} has more than {MAX_FILES} files or {MAX_BYTES >> 30} GiB to send;"
                    " add patterns to hydra.launcher.sync.exclude (data, checkpoints), or launch from the"
                    " project's own folder"
                )
    return found


def code_fingerprint(settings: SyncSettings) -> str | None:
    """A hash of the project as it travels, from each file's size and modification time (a
    walk, no reading): a resume tells by it whether the code changed since a job completed.
    None when the project cannot be listed."""
    try:
        root = find_project_root(app_directory())
        tree = project_files(root, settings, lambda _, details: f"{details.st_size}:{details.st_mtime_ns}").tree
    except (SyncError, OSError):
        return None
    return short_hash(json.dumps(sorted(tree.items())))


def some(items: list[str], shown: int = 5) -> str:
    """The first few items, and how many more."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


@dataclass
class SyncReport:
    sent: int = 0
    sent_bytes: int = 0
    unchanged: int = 0
    removed: int = 0  # snapshots of earlier launches that no sweep used any more

    def __str__(self) -> str:
        return (f"{self.sent} {'file' if self.sent == 1 else 'files'} sent ({self.sent_bytes} bytes),"
                f" {self.unchanged} unchanged, {self.removed} old {'snapshot' if self.removed == 1 else 'snapshots'}"
                " removed")


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


def expand_home(path: str, home: str) -> str:
    """A remote path with a leading ~ made the remote home (SFTP does not expand it)."""
    return home + path[1:] if path == "~" or path.startswith("~/") else path


def remote_project_folder(project_dir: str, remote_home: str, local_project: Path) -> str:
    """`<project_dir>/<name>-<id>`: same-named projects of different machines never collide."""
    return posixpath.join(expand_home(project_dir, remote_home),
                          f"{local_project.name}-{short_hash(socket.gethostname(), str(local_project))}")


async def push_project(sftp: Any, agent: Any, local_root: Path, tree: ProjectTree,
                       remote_root: str) -> tuple[str, SyncReport]:
    """Send the contents the machine lacks into its store, and have its agent build (and
    lease) this launch's snapshot. Returns the snapshot's remote path and what was sent."""
    import asyncssh

    await make_private_dirs(sftp, posixpath.join(remote_root, files.OBJECTS))
    names = {path: files.object_name(digest, executable) for path, (_, digest, executable) in tree.items()}
    missing = set(await agent.call("missing_objects", remote_root, sorted(set(names.values()))))
    to_send = {name: path for path, name in sorted(names.items()) if name in missing}

    async def send(name: str) -> None:
        path = to_send[name]
        target = posixpath.join(remote_root, files.OBJECTS, name)
        partial = f"{target}.part-{uuid.uuid4().hex[:8]}"
        try:
            await sftp.put(str(local_root / path), partial)
        except (OSError, asyncssh.Error) as error:
            raise SyncError(f"could not send {path}: {describe_error(error)}") from None
        # The machine hashes what it received: a file saved while it was read is never stored as the content hashed.
        if not await agent.call("settle_object", partial, target):
            raise SyncError(f"{path} changed while it was sent (it was saved after this launch read it), so the"
                            " machine would not run what this launch read. Fix: launch again once it is saved")

    await each_at_most(TRANSFERS_AT_ONCE, send, to_send)
    snapshot = short_hash(json.dumps(sorted(names.items())))
    remote_path, removed = await agent.call("snapshot", remote_root, snapshot, names)
    sent = set(to_send.values())
    return remote_path, SyncReport(
        sent=len(sent),
        sent_bytes=sum(tree[path][0] for path in sent),
        unchanged=len(tree) - len(sent),
        removed=removed,
    )


def describe_error(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
    return f"{type(error).__name__}: {reason}"


def inside(local_dir: Path, relative: str) -> Path:
    """The local path of an output the remote named; UnsafeOutput unless it stays in local_dir."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise UnsafeOutput(f"the remote named an output {relative!r} outside the job's dir; nothing was written")
    target = local_dir.joinpath(*parts)
    root = os.path.realpath(local_dir)
    parent = os.path.realpath(target.parent)
    if parent != root and not parent.startswith(root + os.sep):
        raise UnsafeOutput(f"the output {relative!r} would land outside the job's dir (through a link);"
                           " nothing was written")
    return target


def settle_pulled(partial: Path, target: Path) -> None:
    """Mask the remote's mode bits (no setuid, nothing writable by others), make the file
    durable, and put it in place."""
    os.chmod(partial, stat.S_IMODE(os.stat(partial).st_mode) & 0o755)
    files.fsync_file(str(partial))
    os.replace(partial, target)


async def pull_outputs(sftp: Any, agent: Any, remote_dir: str, local_dir: Path, hashes: files.HashCache,
                       final: bool) -> int:
    """Copy remote_dir's files that differ into local_dir. A file that vanishes between the
    listing and the copy (a rewritten checkpoint) is skipped until the next pull. The final
    pull verifies every file here, then has the remote remove exactly the verified ones.
    Returns the number of files copied."""
    import asyncssh

    remote_tree: Tree = await agent.call("tree", remote_dir)
    targets = {path: inside(local_dir, path) for path in remote_tree}

    def local_state() -> dict[str, tuple[int, str] | None]:
        return {path: hashes.digest(str(target)) for path, target in targets.items()}

    here = await asyncio.to_thread(local_state)
    to_fetch = [path for path, entry in remote_tree.items() if here[path] != tuple(entry)]

    async def fetch(path: str) -> None:
        target = targets[path]
        partial = target.with_name(target.name + ".hsm-part")
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        try:
            await sftp.get(posixpath.join(remote_dir, path), str(partial), preserve=True)
        except asyncssh.SFTPNoSuchFile:
            partial.unlink(missing_ok=True)
            if final:
                raise
            return  # renamed or removed since the listing: the next pull sees what replaced it
        await asyncio.to_thread(settle_pulled, partial, target)

    await each_at_most(TRANSFERS_AT_ONCE, fetch, to_fetch)
    if final:
        here = await asyncio.to_thread(local_state)
        mismatched = [path for path, entry in remote_tree.items() if here[path] != tuple(entry)]
        if mismatched:
            raise SyncError(f"{len(mismatched)} pulled files differ from the remote copy (first: {mismatched[0]});"
                            f" the remote copy is kept at {remote_dir}")
        left = await agent.call("remove_verified", remote_dir, remote_tree)
        if left:
            log.warning(f"{len(left)} files appeared in {remote_dir} after the job ended and were left there"
                        f" (first: {left[0]})")
    return len(to_fetch)


async def each_at_most(limit: int, action: Callable[[str], Awaitable[None]], paths: Iterable[str]) -> None:
    """`action(path)` for every path, at most `limit` at once (SFTP pipelines them)."""
    gate = asyncio.Semaphore(limit)

    async def one(path: str) -> None:
        async with gate:
            await action(path)

    await asyncio.gather(*(one(path) for path in paths))


async def make_private_dirs(sftp: Any, path: str) -> None:
    """Create path and its parents, readable only by the remote user (0700)."""
    import asyncssh

    await sftp.makedirs(path, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)


class Project:
    """The local project that remote jobs run: found and hashed once per sweep."""

    def __init__(self, settings: SyncSettings) -> None:
        self.folder = app_directory()
        self.settings = settings
        self._listing: asyncio.Task[tuple[Path, ProjectFiles]] | None = None

    async def listing(self) -> tuple[Path, ProjectFiles]:
        """The project's root and the files that travel (the skipped links said once). One
        scan for all the sources of all the batches; a scan a batch's end cut short (each
        batch has its own loop, cancelled at its end) is begun again, and a source that stops
        waiting does not stop it for the others."""
        if self._listing is None or self._listing.cancelled():
            self._listing = asyncio.ensure_future(asyncio.to_thread(self._scan))
        return await asyncio.shield(self._listing)

    def _scan(self) -> tuple[Path, ProjectFiles]:
        root = find_project_root(self.folder)
        found = project_files(root, self.settings)
        if found.secrets_kept:
            log.info(f"Not sent to remote machines (credentials; list them in sync.include to send them):"
                     f" {some(found.secrets_kept)}")
        if found.links_outside:
            log.info(f"Not sent to remote machines (links that point outside the project):"
                     f" {some(found.links_outside)}")
        return root, found
