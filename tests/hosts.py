"""Real OpenSSH test hosts: one sshd on a loopback port per host, each host a Linux user.

Every host has its own home (0700), the sshds have generated host keys, the client has a
generated key and a known_hosts file, and the hosts run a Python environment of their
own (a venv of /usr/bin/python3 in a shared directory, not the launcher's interpreter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
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
WORKER_PACKAGES = ("hydra-core", "omegaconf", "cloudpickle")


@dataclass
class TestHost:
    name: str
    user: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(self.user).pw_dir)

    def source_config(self, **extra: Any) -> dict[str, Any]:
        """This host as a `hydra.launcher.remotes.NAME` mapping."""
        config = {
            "host": "127.0.0.1",
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
        self.process = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.directory / "sshd_config"), "-E", str(self.directory / "sshd.log")],
            start_new_session=True,  # its own group: a test can kill the whole sshd tree at once
        )
        deadline = time.monotonic() + 10
        while not pid_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd for {self.name} did not start:\n{log}")
            time.sleep(0.01)

    def kill_tree(self, signum: int = signal.SIGKILL) -> None:
        """Signal sshd and every session process it started (they share its process group)."""
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def processes(self) -> list[str]:
        """Processes running as this host's user (for orphan checks)."""
        shown = subprocess.run(["ps", "-u", self.user, "-o", "pid=,args="], capture_output=True, text=True)
        return [line.strip() for line in shown.stdout.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_components() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the tests create Linux users for the hosts)")
    if not Path(SSHD).exists():
        missing.append(f"{SSHD} (apt-get install openssh-server)")
    if not Path(HOST_PYTHON).exists():
        missing.append(HOST_PYTHON)
    return missing


def run(*command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


def ensure_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        run("useradd", "--create-home", "--shell", "/bin/sh", user)
    run("usermod", "-p", "*", user)  # no password, but not locked: key login works
    home = Path(pwd.getpwnam(user).pw_dir)
    home.chmod(0o700)
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


def setup_hosts(count: int) -> list[TestHost]:
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
        host = TestHost(f"host{number}", f"hsm-host{number}", free_port(), BASE / f"host{number}")
        shutil.rmtree(host.directory, ignore_errors=True)
        host.directory.mkdir()
        ensure_user(host.user)
        key = host.directory / "ssh_host_ed25519_key"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        (host.directory / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
        (host.directory / "sshd_config").write_text(
            f"""Port {host.port}
ListenAddress 127.0.0.1
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
        known_hosts.append(f"[127.0.0.1]:{host.port} {key_type} {key_data}")
        host.start()
        hosts.append(host)
    (BASE / "known_hosts").write_text("\n".join(known_hosts) + "\n")
    return hosts


def require_components() -> None:
    """Under CI a missing component fails the run; elsewhere the SSH tests are skipped."""
    import pytest

    missing = missing_components()
    if not missing:
        return
    message = "real SSH hosts need: " + ", ".join(missing) + " (./dev test installs them)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


if __name__ == "__main__":  # a manual check: start two hosts and print how to reach them
    for started in setup_hosts(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        print(started.name, started.user, started.port)
