"""File trees, hashes, atomic writes and the remote project store: the file work of both sides.

Stdlib only: this module travels to remote machines with the worker. Every function here
may be slow (it reads whole files), so callers run it off their message loop.

Trees are read with lstat and never follow links: a file that vanishes or changes while
it is read (a checkpoint being rewritten) is left out of this listing and seen again at
the next one.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import threading
import time
from typing import Iterable

Tree = dict[str, tuple[int, str]]  # relative path -> (size, sha256)

OBJECTS, SNAPSHOTS = "objects", "snapshots"
UNUSED_OBJECT_AGE_SECONDS = 3600.0  # an unlinked object younger than this may be about to be linked


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, re-read only when (size, mtime_ns, inode) changed since the last read.
    Keeps the `limit` files used last: an agent that pulls a long sweep's outputs (and removes
    them) would otherwise keep an entry per file it ever saw."""

    def __init__(self, limit: int = 100_000) -> None:
        self._known: collections.OrderedDict[str, tuple[tuple[int, int, int], str]] = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def digest(self, path: str) -> tuple[int, str] | None:
        """(size, sha256) of a regular file that stayed the same while it was read; else None."""
        try:
            before = os.lstat(path)
            if not stat.S_ISREG(before.st_mode):
                return None
            key = (before.st_size, before.st_mtime_ns, before.st_ino)
            with self._lock:
                known = self._known.get(path)
                if known is not None:
                    self._known.move_to_end(path)
            if known is not None and known[0] == key:
                return before.st_size, known[1]
            digest = sha256_of(path)
            after = os.lstat(path)
        except OSError:  # vanished or unreadable meanwhile
            return None
        if (after.st_size, after.st_mtime_ns, after.st_ino) != key:
            return None  # written while it was read: next time
        with self._lock:
            self._known[path] = (key, digest)
            self._known.move_to_end(path)
            if len(self._known) > self._limit:
                self._known.popitem(last=False)
        return before.st_size, digest

    def tree(self, root: str) -> Tree:
        """Every stable regular file under root (links not followed). Missing root: empty."""
        found: Tree = {}
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                entry = self.digest(path)
                if entry is not None:
                    found[os.path.relpath(path, root)] = entry
        return found


def remove_tree(path: str) -> bool:
    """Remove a folder, read-only ones (snapshots) included; True when it is gone."""
    for folder, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.exists(path)


def private_dirs(path: str) -> None:
    """Create `path` and every missing folder above it as 0700, whatever the umask
    (os.makedirs gives the folders above the last the umask's mode, 0755 as a rule)."""
    missing = []
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)


def make_read_only(path: str) -> None:
    """Folders that take no new entries: a job cannot write into the project copy it runs."""
    for folder, _, _ in os.walk(path, topdown=False):
        os.chmod(folder, 0o555)


def remove_verified(root: str, verified: Tree, hashes: HashCache) -> list[str]:
    """Remove the files of `verified` that still hold the verified content, then links and
    empty folders. Returns the files left (changed since, or new): nothing unverified goes."""
    for relative, entry in verified.items():
        path = os.path.join(root, relative)
        if hashes.digest(path) == tuple(entry):
            os.unlink(path)
    left = []
    for directory, folders, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                os.unlink(path)
            else:
                left.append(os.path.relpath(path, root))
        for name in folders:
            path = os.path.join(directory, name)
            try:
                os.unlink(path) if os.path.islink(path) else os.rmdir(path)
            except OSError:
                pass  # it holds a file that was left
    try:
        os.rmdir(root)
    except OSError:
        pass
    return sorted(left)


def write_atomically(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Write through a temporary file, fsync it, rename it into place: all or nothing.
    `durable=False` skips the fsync, for files that need not outlive the machine's boot."""
    temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the project store on a remote machine -----------------------------------------------
#
# <root>/objects/<sha256>[x]      each file content once, read-only ("x": executable)
# <root>/snapshots/<id>/...       one launch's project: hard links to objects, in read-only
#                                 folders (so no job's stray write changes a later launch's copy)
# <root>/snapshots/<id>.lease     held (flock, shared) by every agent running that snapshot


def object_name(digest: str, executable: bool) -> str:
    return digest + ("x" if executable else "")


def settle_object(partial: str, target: str) -> bool:
    """Put an uploaded object in place, read-only, if its bytes are the ones its name says;
    else drop it and say False (the file changed between its hashing and its upload)."""
    name = os.path.basename(target)
    executable = name.endswith("x")
    if sha256_of(partial) != name.removesuffix("x"):
        os.unlink(partial)
        return False
    os.chmod(partial, 0o555 if executable else 0o444)
    os.rename(partial, target)
    return True


def missing_objects(root: str, names: Iterable[str]) -> list[str]:
    """The objects the store lacks. Those it has are touched: a cleanup by another launch
    removes only objects untouched for UNUSED_OBJECT_AGE_SECONDS, so none of these goes
    before this launch has linked it into its snapshot."""
    folder = os.path.join(root, OBJECTS)
    missing = []
    for name in sorted(set(names)):
        try:
            os.utime(os.path.join(folder, name))
        except FileNotFoundError:
            missing.append(name)
    return missing


def take_lease(lease_path: str) -> int:
    """A shared lock on the lease file; the fd stays open (the lock lasts) while the agent lives."""
    while True:
        fd = os.open(lease_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(lease_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the lease was removed by a cleanup while we waited: take a new one


def build_snapshot(root: str, snapshot: str, files: dict[str, str]) -> tuple[str, int]:
    """Make <root>/snapshots/<snapshot> hold `files` (relative path -> object name) as hard
    links, leased by this process. Returns the snapshot's path and the lease's fd."""
    folder = os.path.join(root, SNAPSHOTS)
    private_dirs(folder)
    lease = take_lease(os.path.join(folder, snapshot + ".lease"))
    target = os.path.join(folder, snapshot)
    if not os.path.isdir(target):
        staging = f"{target}.part-{os.getpid()}"
        remove_tree(staging)
        for relative, name in files.items():
            path = os.path.join(staging, relative)
            private_dirs(os.path.dirname(path))
            os.link(os.path.join(root, OBJECTS, name), path)
        private_dirs(staging)  # an empty project still has a folder
        make_read_only(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another agent built the same snapshot first: the same content
            remove_tree(staging)
    return target, lease


def remove_unused(root: str, keep: str) -> int:
    """Remove snapshots no agent holds a lease on, and objects no snapshot links any more.
    Returns the number of snapshots removed."""
    folder = os.path.join(root, SNAPSHOTS)
    removed = 0
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not entry.endswith(".lease") or entry == keep + ".lease":
            continue
        lease_path = os.path.join(folder, entry)
        try:
            fd = os.open(lease_path, os.O_RDWR)
        except FileNotFoundError:
            continue  # another cleanup removed it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lease_path).st_ino != os.fstat(fd).st_ino:
                continue  # removed and taken anew (take_lease) since we opened it: that lease is in use
            remove_tree(lease_path[: -len(".lease")])
            os.unlink(lease_path)
            removed += 1
        except (BlockingIOError, FileNotFoundError):
            continue  # a running sweep uses it, or another cleanup removed it
        finally:
            os.close(fd)
    objects = os.path.join(root, OBJECTS)
    cutoff = time.time() - UNUSED_OBJECT_AGE_SECONDS
    for name in os.listdir(objects) if os.path.isdir(objects) else []:
        path = os.path.join(objects, name)
        try:
            found = os.lstat(path)
            if found.st_nlink == 1 and found.st_mtime < cutoff:
                os.unlink(path)
        except OSError:
            pass
    return removed
