"""Real OpenSSH test hosts: one sshd on a loopback port per host, each host a Linux user.

Every host has its own home (0700), the sshds have generated host keys, the client has a
generated key and a known_hosts file, and the hosts run a Python environment of their
own (a venv of /usr/bin/python3 in a shared directory, not the launcher's interpreter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BASE = Path("/var/tmp/hsm-test-hosts")
SSHD = "/usr/sbin/sshd"
HOST_PYTHON = "/usr/bin/python3"
# What the worker needs, and what the test apps import (hydra-zen: tests/zen_app.py), at this
# machine's versions.
WORKER_PACKAGES = ("hydra-core", "omegaconf", "cloudpickle", "hydra-zen")


@dataclass
class SshHost:
    name: str
    user: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    address: str = "127.0.0.1"
    namespace: str | None = None  # a network namespace of its own, when it has one

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(self.user).pw_dir)

    def source_config(self, **extra: Any) -> dict[str, Any]:
        """This host as a `hydra.launcher.remotes.NAME` mapping."""
        config = {
            "host": self.address,
            "ssh_port": self.port,
            "user": self.user,
            "ssh_key": str(BASE / "client_key"),
            "known_hosts": str(BASE / "known_hosts"),
            "python": str(host_python_env()),
            "max_parallel_jobs": 2,
        }
        config.update(extra)
        return config

    def start(self) -> None:
        pid_file = self.directory / "sshd.pid"
        pid_file.unlink(missing_ok=True)
        inside = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        self.process = subprocess.Popen(
            [*inside, SSHD, "-D", "-f", str(self.directory / "sshd_config"), "-E", str(self.directory / "sshd.log")],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not pid_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd for {self.name} did not start:\n{log}")
            time.sleep(0.01)

    def signal_tree(self, signum: int) -> None:
        """sshd and every process below it (its connections, the agent, the jobs)."""
        assert self.process is not None
        for pid in process_tree(self.process.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def signal_everything(self, signum: int) -> None:
        """A whole machine's processes: the sshd tree and everything its user runs."""
        self.signal_tree(signum)
        for line in self.processes():
            try:
                os.kill(int(line.split()[0]), signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def processes(self) -> list[str]:
        """Processes running as this host's user: "PID ARGS" lines."""
        shown = subprocess.run(["ps", "-u", self.user, "-o", "pid=,args="], capture_output=True, text=True)
        return [line.strip() for line in shown.stdout.splitlines() if line.strip()]

    def job_processes(self) -> list[str]:
        """This host's worker agent and job processes (sshd's own session processes aside)."""
        return [line for line in self.processes() if "hsm_core.worker" in line]


def remote_override(name: str, config: dict[str, Any]) -> str:
    """A `+hydra.launcher.remotes.NAME={...}` override."""
    return f"+hydra.launcher.remotes.{name}={hydra_value(config)}"


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (strings quoted, containers recursed)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def process_tree(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_components(*commands: str) -> list[str]:
    """What the SSH tests need and this machine lacks; `commands`: further programs (by apt package name)."""
    missing = [f"{command} (apt-get install {command})" for command in commands if not shutil.which(command)]
    if os.geteuid() != 0:
        missing.append("root (the tests create Linux users for the hosts)")
    if not Path(SSHD).exists():
        missing.append(f"{SSHD} (apt-get install openssh-server)")
    if not Path(HOST_PYTHON).exists():
        missing.append(HOST_PYTHON)
    if not shutil.which("ip"):
        missing.append("ip (apt-get install iproute2)")
    return missing


def run(*command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


CHATTY_BANNER = "Welcome to the lab cluster! Quota: 87% used."


def ensure_user(user: str, chatty: bool = False) -> None:
    """A host's Linux user. A chatty one logs in with bash, whose ~/.bashrc (read for ssh
    commands too, on Debian) prints a banner to stdout, as many lab machines do."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        run("useradd", "--create-home", "--shell", "/bin/sh", user)
    run("usermod", "-p", "*", "--shell", "/bin/bash" if chatty else "/bin/sh", user)  # not locked: key login works
    home = Path(pwd.getpwnam(user).pw_dir)
    home.chmod(0o700)
    bashrc = home / ".bashrc"
    bashrc.write_text(f'echo "{CHATTY_BANNER}"\n' if chatty else "")
    shutil.chown(bashrc, user)
    shutil.rmtree(home / ".hsm", ignore_errors=True)  # every session starts from a clean host


def python_env(name: str, packages: list[str]) -> Path:
    """A venv of HOST_PYTHON with exactly `packages`, readable by every host user (cached)."""
    env = BASE / name
    stamp = env / "hsm-packages.txt"
    wanted = "\n".join(packages)
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(env, ignore_errors=True)
        run(HOST_PYTHON, "-m", "venv", str(env))
        run(str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages)
        stamp.write_text(wanted)
        run("chmod", "-R", "a+rX", str(env))
    return env / "bin" / "python"


def pinned(names: tuple[str, ...]) -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in names]


def host_python_env() -> Path:
    return python_env("pyenv", pinned(WORKER_PACKAGES))


def host_python_env_without_cloudpickle() -> Path:
    return python_env("pyenv-nocloudpickle", pinned(("hydra-core", "omegaconf")))


def write_sshd_config(host: SshHost, client_key: Path) -> str:
    """Generate the host's key and sshd_config; returns its known_hosts line."""
    key = host.directory / "ssh_host_ed25519_key"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    (host.directory / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    (host.directory / "sshd_config").write_text(
        f"""Port {host.port}
ListenAddress {host.address}
HostKey {key}
PidFile {host.directory / 'sshd.pid'}
AuthorizedKeysFile {host.directory / 'authorized_keys'}
AllowUsers {host.user}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""
    )
    key_type, key_data = key.with_suffix(".pub").read_text().split()[:2]
    where = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    return f"{where} {key_type} {key_data}\n"


def setup_hosts(count: int) -> list[SshHost]:
    BASE.mkdir(parents=True, exist_ok=True)
    BASE.chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    client_key = BASE / "client_key"
    for path in (client_key, client_key.with_suffix(".pub")):
        path.unlink(missing_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hsm-tests", "-f", str(client_key))
    host_python_env()
    hosts, known_hosts = [], []
    for number in range(1, count + 1):
        host = SshHost(f"host{number}", f"hsm-host{number}", free_port(), BASE / f"host{number}")
        shutil.rmtree(host.directory, ignore_errors=True)
        host.directory.mkdir()
        ensure_user(host.user, chatty=number == 2)  # host2's login shell prints a banner
        known_hosts.append(write_sshd_config(host, client_key))
        host.start()
        hosts.append(host)
    (BASE / "known_hosts").write_text("".join(known_hosts))
    return hosts


# A host in a network namespace of its own, joined to this one by a veth pair, so a test
# can pull its cable (ip link set down). Addresses come from 198.18.0.0/15, the range set
# aside for network tests; an unreachable route for the whole range keeps its packets on
# this machine even while the link is down.
NETNS = "hsm-test-ns"
VETH_OUTSIDE, VETH_INSIDE = "hsm-veth0", "hsm-veth1"
OUTSIDE_ADDRESS, INSIDE_ADDRESS = "198.18.7.1", "198.18.7.2"
TEST_RANGE = "198.18.0.0/15"


def setup_netns_host() -> SshHost:
    teardown_netns()
    run("ip", "route", "replace", "unreachable", TEST_RANGE, "metric", "4000")
    run("ip", "netns", "add", NETNS)
    run("ip", "link", "add", VETH_OUTSIDE, "type", "veth", "peer", "name", VETH_INSIDE)
    run("ip", "link", "set", VETH_INSIDE, "netns", NETNS)
    run("ip", "addr", "add", f"{OUTSIDE_ADDRESS}/30", "dev", VETH_OUTSIDE)
    run("ip", "link", "set", VETH_OUTSIDE, "up")
    for command in (["ip", "addr", "add", f"{INSIDE_ADDRESS}/30", "dev", VETH_INSIDE],
                    ["ip", "link", "set", VETH_INSIDE, "up"], ["ip", "link", "set", "lo", "up"]):
        run("ip", "netns", "exec", NETNS, *command)
    host = SshHost("host3", "hsm-host3", 22, BASE / "host3", address=INSIDE_ADDRESS, namespace=NETNS)
    shutil.rmtree(host.directory, ignore_errors=True)
    host.directory.mkdir()
    ensure_user(host.user)
    line = write_sshd_config(host, BASE / "client_key")
    with open(BASE / "known_hosts", "a") as known_hosts:
        known_hosts.write(line)
    host.start()
    return host


def set_link(up: bool) -> None:
    """Plug or pull the namespace host's cable."""
    run("ip", "link", "set", VETH_OUTSIDE, "up" if up else "down")


def teardown_netns() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)  # takes the veth pair along
    subprocess.run(["ip", "link", "del", VETH_OUTSIDE], capture_output=True)  # a pair an interrupted set-up left here
    subprocess.run(["ip", "route", "del", "unreachable", TEST_RANGE, "metric", "4000"], capture_output=True)


def require_components(*commands: str) -> None:
    """What the SSH tests need (and `commands`), as `require` judges it."""
    require(missing_components(*commands), "real SSH hosts")


def require(missing: list[str], needed_by: str) -> None:
    """Under CI a missing component fails the run; elsewhere the tests that need it are skipped."""
    import pytest

    if not missing:
        return
    message = f"{needed_by} need: " + ", ".join(missing) + " (./dev test installs them)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


if __name__ == "__main__":  # a manual check: start two hosts and print how to reach them
    for started in setup_hosts(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        print(started.name, started.user, started.port)
