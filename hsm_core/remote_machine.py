"""Talking to a remote machine over SSH: the one way every part of the project reaches one.

Owns: opening a connection (host keys always verified, ~/.ssh/config honoured, no
password or passphrase ever asked), running a program after the remote's setup lines
and env, running the probe, finding the remote Python, and placing the worker agent's
files. `sources.bring_up` puts these together for the sources and `hsm distributed test`.
Must not know jobs, sources or the scheduler: what goes wrong is a MachineRefused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
import shlex
import socket
from pathlib import Path
from typing import Any

import asyncssh

import hsm_core
from hsm_core import probe, remote_python, sync
from hsm_core.console import forward_lines
from hsm_core.probe import CHECKED_PACKAGES, describe_environment
from hsm_core.settings import RemoteSettings, SweepSettings

# What a remote machine needs of the project to run jobs (stdlib, Hydra and cloudpickle aside).
# options.py: the launcher's config node reads it, and Hydra's plugin discovery in a job
# imports that node when the machine has this plugin installed too.
AGENT_FILES = ("__init__.py", "wire.py", "files.py", "probe.py", "jobs.py", "hydra_job.py", "options.py", "worker.py",
               "slurm.py", "batch_job.py", "environments.py")
CONNECT_TIMEOUT_SECONDS = 30
COMMAND_TIMEOUT_SECONDS = 60
PROBE_SOURCE = Path(probe.__file__).read_text()
ENVIRONMENTS_SOURCE = (Path(hsm_core.__file__).parent / "environments.py").read_text()
CONNECTION_ERRORS = (OSError, asyncssh.Error)  # what a channel raises when its connection ends


class MachineRefused(Exception):
    """The machine cannot be used as it is; the message says why and how to fix it."""


class Unreachable(MachineRefused):
    """No SSH server answered."""


class HostKeyRefused(MachineRefused):
    """The server's key is unknown or changed."""


class LoginRefused(MachineRefused):
    """The server refused our user and key."""


async def open_connection(remote: RemoteSettings, settings: SweepSettings) -> asyncssh.SSHClientConnection:
    """Connect with the remote's settings (else ~/.ssh/config's); host keys always verified."""
    # known_hosts is never passed as None: that would switch host key checking off.
    options: dict[str, Any] = {
        "keepalive_interval": settings.keepalive_interval,
        "keepalive_count_max": settings.keepalive_count_max,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "agent_forwarding": False,
        "kbdint_auth": False,
        "password": None,
    }
    if remote.known_hosts is not None:
        options["known_hosts"] = str(Path(remote.known_hosts).expanduser())
    if remote.ssh_port is not None:
        options["port"] = remote.ssh_port
    if remote.user is not None:
        options["username"] = remote.user
    if remote.ssh_key is not None:
        options["client_keys"] = [readable_key(remote)]
    try:
        return await asyncssh.connect(remote.host, **options)
    except asyncssh.KeyImportError as error:  # a key named by ~/.ssh/config
        raise LoginRefused(f"a private key for {address(remote)} cannot be used: {error}. Fix: load it into"
                           f" your ssh-agent (ssh-add KEY), or set remotes.{remote.name}.ssh_key to a key"
                           " without a passphrase") from None
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyRefused(host_key_advice(remote)) from None
    except asyncssh.PermissionDenied:
        raise LoginRefused(
            f"{address(remote)} refused the login ({remote.user or 'default user'},"
            f" key {remote.ssh_key or 'from ~/.ssh'}). Fix: install the public key with"
            f" `ssh-copy-id {ssh_args(remote)}`, or set remotes.{remote.name}.ssh_key / user"
        ) from None
    except (OSError, asyncio.TimeoutError, asyncssh.Error) as error:
        raise Unreachable(
            f"cannot connect to {address(remote)}: {error or type(error).__name__}."
            f" Fix: check that `ssh {ssh_args(remote)} true` works from this machine"
        ) from None


def readable_key(remote: RemoteSettings) -> str:
    """The ssh_key's path, once it is known to load without a passphrase (none can be asked)."""
    assert remote.ssh_key is not None
    path = str(Path(remote.ssh_key).expanduser())
    key = f"remotes.{remote.name}.ssh_key"
    try:
        asyncssh.read_private_key(path)
    except OSError as error:
        raise LoginRefused(f"{key} {remote.ssh_key} cannot be read: {error.strerror}. Fix: check the path,"
                           f" and that you own the file (chmod 600 {shlex.quote(path)})") from None
    except asyncssh.KeyImportError as error:
        if "passphrase" in str(error).lower():
            raise LoginRefused(f"{key} {remote.ssh_key} is protected by a passphrase, which a sweep cannot ask"
                               f" for. Fix: load it into your ssh-agent (ssh-add {shlex.quote(path)}) and remove"
                               f" {key}, or use a key without a passphrase") from None
        raise LoginRefused(f"{key} {remote.ssh_key} is not a private key ({error}). Fix: point it at the private"
                           " half (not the .pub file)") from None
    return path


def address(remote: RemoteSettings) -> str:
    return f"{remote.host}:{remote.ssh_port or 22}"


def ssh_args(remote: RemoteSettings) -> str:
    """The ssh command line arguments that reach this remote, for fix hints."""
    words = []
    if remote.ssh_port:
        words += ["-p", str(remote.ssh_port)]
    if remote.ssh_key:
        words += ["-i", remote.ssh_key]
    return shlex.join([*words, f"{remote.user}@{remote.host}" if remote.user else remote.host])


def pasteable_path(path: str) -> str:
    """A path quoted for a fix line the user reads and pastes here: a leading ~/ kept as they
    write it (remote_python.shell_word spells it "$HOME"/ for the remote shells we drive)."""
    home, rest = ("~/", path[2:]) if path.startswith("~/") else ("", path)
    return home + shlex.quote(rest)


def host_key_advice(remote: RemoteSettings) -> str:
    known_hosts = remote.known_hosts or "~/.ssh/known_hosts"
    entry = f"[{remote.host}]:{remote.ssh_port}" if remote.ssh_port not in (None, 22) else remote.host
    target = pasteable_path(known_hosts)
    scan = shlex.join(["ssh-keyscan", *(["-p", str(remote.ssh_port)] if remote.ssh_port else []), remote.host])
    try:
        listed = asyncssh.read_known_hosts(str(Path(known_hosts).expanduser())).match(remote.host, "", remote.ssh_port)
        known = any(listed[:2])
    except (OSError, ValueError):
        known = False
    if known:
        return (
            f"the host key of {entry} DIFFERS from the one in {known_hosts}; refusing to"
            " connect (the machine was reinstalled, or someone is intercepting). If the change is"
            f" expected: ssh-keygen -R {shlex.quote(entry)} -f {target} && {scan} >> {target}"
        )
    folder = pasteable_path(posixpath.dirname(known_hosts) or ".")
    return (
        f"the host key of {entry} is not in {known_hosts}; refusing to connect."
        f" Fix: check the key's fingerprint, then: mkdir -p {folder} && {scan} >> {target}"
    )


def python_word(remote: RemoteSettings) -> str:
    """The remote interpreter as one shell word (a leading ~/ still means the remote home)."""
    assert remote.python is not None, "discover_python() first"
    return remote_python.shell_word(remote.python)


async def discover_python(connection: asyncssh.SSHClientConnection, remote: RemoteSettings,
                          packages: bool = True) -> list[remote_python.Candidate]:
    """Every candidate interpreter, tried in one round trip after the setup lines, with what
    keeps it from running jobs (None for those that can; without `packages`, its minor alone
    counts: an environment is built from it)."""
    paths = remote_python.candidates()
    try:
        shown = await connection.run(shell_command(remote, remote_python.script(paths)), input="",
                                     timeout=CONNECT_TIMEOUT_SECONDS * 2)
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
        raise MachineRefused(f"could not look for a Python there: {error}") from None
    return remote_python.judge(paths, str(shown.stdout),
                               lambda info: "; ".join(python_problems(info, packages)) or None)


def no_python_found(remote: RemoteSettings, found: list[remote_python.Candidate]) -> str:
    build = (f"set remotes.{remote.name}.environment: mirror (the jobs' environment is then built there from a"
             " Python of this minor, once), or " if remote.environment == "found" else "")
    return (f"no Python there can run the jobs (tried {'; '.join(c.describe() for c in found)}). Fix: {build}set"
            f" remotes.{remote.name}.python to an interpreter with this machine's Python minor and"
            f" {', '.join(CHECKED_PACKAGES)}, or setup lines that activate one")


def shell_command(remote: RemoteSettings, program: str) -> str:
    """The remote's setup lines and env (values quoted), then `program`."""
    lines = [*remote.setup, *(f"export {name}={shlex.quote(value)}" for name, value in remote.env)]
    return "\n".join([*lines, program])


def python_problems(theirs: dict[str, Any], packages: bool = True) -> list[str]:
    """What keeps a Python from running this machine's cloudpickled jobs (minor, and unless an
    environment is built from it, key packages)."""
    ours = describe_environment()
    problems = []
    if theirs["python"].split(".")[:2] != ours["python"].split(".")[:2]:
        problems.append(f"Python {theirs['python']} (this machine: {ours['python']})")
    for name in CHECKED_PACKAGES if packages else ():
        if theirs["packages"].get(name) != ours["packages"][name]:
            there = theirs["packages"].get(name) or "missing"
            problems.append(f"{name} {there} (this machine: {ours['packages'][name]})")
    return problems


def version_mismatch(remote: RemoteSettings, theirs: dict[str, Any]) -> str | None:
    """Why cloudpickled jobs cannot run there (Python minor or key packages differ), with the fix."""
    problems = python_problems(theirs)
    if not problems:
        return None
    ours = describe_environment()
    minor = ".".join(ours["python"].split(".")[:2])
    installs = [f"{name}=={ours['packages'][name]}" for name in CHECKED_PACKAGES
                if theirs["packages"].get(name) != ours["packages"][name]]
    fixes = []
    if installs:
        fixes.append(f"on {remote.host} run: {shlex.quote(theirs['executable'])} -m pip install "
                     + " ".join(shlex.quote(spec) for spec in installs))
    if problems[0].startswith("Python"):
        fixes.append(f"point remotes.{remote.name}.python at a Python {minor}")
    return f"the remote Python does not match: {', '.join(problems)}. Fix: " + "; ".join(fixes)


def keepalive_detection_bound(interval: float, count_max: int) -> float:
    """Seconds after which SSH keepalive declares a silent host lost: count_max unanswered
    probes, one per interval, after the interval in which the host went silent."""
    return interval * (count_max + 1)


async def forward_stderr(name: str, stream: Any) -> None:
    """The remote jobs' console output, shown in this terminal with the source's name."""
    with contextlib.suppress(asyncssh.Error, OSError):  # the connection's end is reported elsewhere
        await forward_lines(stream, f"[{name}] ")


async def refuse_shared_folder(sftp: asyncssh.SFTPClient, home: str, path: str, label: str = "",
                               own_folder: str = "") -> None:
    """The code jobs run must be the user's alone: `path`, when it exists, owned by the login
    user and writable by no one else. `label` names the setting that chose it, `own_folder`
    how to choose another."""
    try:
        found = await sftp.stat(path)
    except asyncssh.SFTPNoSuchFile:
        return
    mode, quoted = (found.permissions or 0) & 0o7777, shlex.quote(path)
    if found.uid != (await sftp.stat(home)).uid:
        problem = "is not owned by the login user"
        fix = own_folder or f"move it away (`mv {quoted} {quoted}.old`); the launcher then makes its own"
    elif mode & 0o022:
        problem = f"is writable by others (mode {mode:o})"
        fix = f"`chmod go-w {quoted}`" + (f", or {own_folder}" if own_folder else "")
    else:
        return
    raise MachineRefused(f"{label}{path} {problem}: someone else could change the code your jobs run. Fix: {fix}")


def agent_socket(home: str, local_sweep_dir: str, source: str) -> str:
    """Where the source's worker agent for this launcher machine and sweep dir is found by a
    later launcher (worker --attach): a socket in a folder only its user reaches."""
    return posixpath.join(home, ".hsm", "agents", sync.short_hash(socket.gethostname(), local_sweep_dir, source)
                          + ".sock")


def envs_folder(project_dir: str, home: str = "") -> str:
    """Where a machine's built environments live: next to the projects' copies (`~/.hsm/envs`
    by default), so that a cluster whose project_dir is on its shared filesystem has them
    there too, for its compute nodes. The wheels sent and uv sit beside it. With `home`, a
    leading ~ (or none: a path relative to it) is made that home, for SFTP and the build."""
    folder = posixpath.join(posixpath.dirname(project_dir.rstrip("/")) or ".", "envs")
    return posixpath.normpath(posixpath.join(home, sync.expand_home(folder, home))) if home else folder


async def send_missing(sftp: asyncssh.SFTPClient, home: str, paths: list[Path], folder: str) -> int:
    """Each file into `folder` there (the user's alone) unless one of its name and size is
    there already (that one is touched: in use); written under a temporary name, then
    renamed, so that no reader sees half a file. How many were sent."""
    await sync.make_private_dirs(sftp, folder)
    await refuse_shared_folder(sftp, home, folder)
    present = {entry.filename: entry.attrs.size for entry in await sftp.readdir(folder)}
    sent = 0
    for path in paths:
        target = posixpath.join(folder, path.name)
        if present.get(path.name) == path.stat().st_size:
            await sftp.utime(target)
            continue
        await sftp.put(str(path), target + ".part")
        await sftp.posix_rename(target + ".part", target)
        sent += 1
    return sent


async def place_requirements(sftp: asyncssh.SFTPClient, home: str, envs: str, digest: str, text: str) -> None:
    """An environment's requirements at ENVS/DIGEST.requirements (ENVS the user's alone)."""
    await sync.make_private_dirs(sftp, envs)
    await refuse_shared_folder(sftp, home, envs)
    async with sftp.open(posixpath.join(envs, f"{digest}.requirements"), "wb") as file:
        await file.write(text.encode())


async def upload_agent(sftp: asyncssh.SFTPClient, home: str) -> str:
    """Put this version's worker files in ~/.hsm/agent/<hash>/ unless they are there; every
    folder on the way must be the user's alone."""
    package = Path(hsm_core.__file__).parent
    contents = {name: (package / name).read_bytes() for name in AGENT_FILES}
    digest = sync.short_hash(*(contents[name].decode() for name in AGENT_FILES))
    agent_dir = posixpath.join(home, ".hsm", "agent", digest)
    for folder in (posixpath.join(home, ".hsm"), posixpath.dirname(agent_dir), agent_dir):
        await refuse_shared_folder(sftp, home, folder)
    if not await sftp.exists(posixpath.join(agent_dir, "hsm_core", "worker.py")):
        staging = f"{agent_dir}.part-{sync.short_hash(str(id(sftp)), str(asyncio.get_running_loop().time()))}"
        await sync.make_private_dirs(sftp, posixpath.join(staging, "hsm_core"))
        for name, content in contents.items():
            async with sftp.open(posixpath.join(staging, "hsm_core", name), "wb") as file:
                await file.write(content)
        with contextlib.suppress(asyncssh.SFTPError):  # another launcher may have won the race
            await sftp.posix_rename(staging, agent_dir)
    return agent_dir


class ProbeFailed(Exception):
    pass


async def run_probe(connection: asyncssh.SSHClientConnection, remote: RemoteSettings, *arguments: str,
                    source: str = PROBE_SOURCE) -> Any:
    """Run probe.py (or another stdlib-only module's `source`) on the remote (program on stdin,
    after the setup lines) and parse its JSON."""
    program = f"{python_word(remote)} - {shlex.join(arguments)}"
    result = await connection.run(shell_command(remote, program), input=source, timeout=COMMAND_TIMEOUT_SECONDS)
    if result.exit_status != 0:
        lines = str(result.stderr or "").strip().splitlines() or [f"exit status {result.exit_status}"]
        raise ProbeFailed(lines[-1])
    return json.loads(str(result.stdout).strip().splitlines()[-1])
