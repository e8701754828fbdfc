"""The jobs' environment built on a machine from this one (environment: mirror, or a
requirements file), cached there by its hash: described here, built there once, reused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import hosts
from conftest import remote_override
from hosts import SshHost
from hsm_core import env_requirements, environments, remote_machine
from hsm_core.settings import ConfigError, load_settings

SWEEP_APP = Path(__file__).parent / "sweep_app.py"
PROJECT = Path(__file__).parent.parent


def test_mirror_pins_this_environment_without_the_project_itself() -> None:
    mirrored = env_requirements.described("mirror", PROJECT, "environment")
    assert mirrored is not None
    assert f"hydra-core=={metadata.version('hydra-core')}" in mirrored.requirements
    assert f"cloudpickle=={metadata.version('cloudpickle')}" in mirrored.requirements
    assert not [line for line in mirrored.requirements if line.startswith(("hsm-distributed", "pip=="))]
    assert env_requirements.described("found", PROJECT, "environment") is None


def test_mirror_sends_what_only_this_machine_has_and_leaves_the_project_to_the_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution installed from a folder outside the project is pinned and marked to be
    built here and sent (no index has it); one installed from inside the project is left out."""
    site, project = tmp_path / "site", tmp_path / "project"
    for name, source in (("elsewhere-tool", tmp_path / "src" / "tool"), ("in-project", project / "lib")):
        info = site / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "direct_url.json").write_text(json.dumps({"url": source.as_uri(), "dir_info": {}}))
    project.mkdir()
    monkeypatch.syspath_prepend(str(site))
    mirrored = env_requirements.described("mirror", project, "environment")
    assert mirrored is not None
    assert "elsewhere-tool==1.0" in mirrored.requirements
    assert mirrored.built_here == (("elsewhere-tool==1.0", str(tmp_path / "src" / "tool")),)
    assert not [line for line in mirrored.requirements if line.startswith("in-project")]


def test_a_requirements_file_gets_what_the_worker_needs_unless_it_names_it(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# the app\nnumpy>=1.0  # maths\n\nomegaconf==2.3.0\n")
    described = env_requirements.described("requirements.txt", tmp_path, "remotes.gpu.environment")
    assert described is not None
    assert described.requirements == ("numpy>=1.0", "omegaconf==2.3.0", f"hydra-core=={metadata.version('hydra-core')}",
                                      f"cloudpickle=={metadata.version('cloudpickle')}")
    again = env_requirements.described("requirements.txt", tmp_path, "x")
    (tmp_path / "requirements.txt").write_text("numpy>=1.1\n")
    changed = env_requirements.described("requirements.txt", tmp_path, "x")
    assert again is not None and changed is not None
    assert again.digest() == described.digest() != changed.digest()


@pytest.mark.parametrize("content, fragment", [("-r base.txt\n", "option line '-r base.txt'"),
                                               (None, "cannot read")])
def test_a_requirements_file_a_machine_cannot_follow_is_refused_naming_the_key(tmp_path: Path, content: str | None,
                                                                               fragment: str) -> None:
    if content is not None:
        (tmp_path / "requirements.txt").write_text(content)
    with pytest.raises(env_requirements.NotDescribable, match="remotes.gpu.environment") as refused:
        env_requirements.described("requirements.txt", tmp_path, "remotes.gpu.environment")
    assert fragment in str(refused.value) and "Fix:" in str(refused.value)


def test_pyproject_and_lock_files_describe_what_the_machine_installs(tmp_path: Path) -> None:
    """pyproject.toml: its [project] dependencies (worker needs added); uv.lock: the packages
    the project reaches on this platform, pinned (a Windows-only edge and the project itself
    left out); pylock.toml: each package pinned with its own marker, local folders aside."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "app"\ndependencies = ["numpy>=1.20", "rich"]\n')
    pyproject = env_requirements.described("pyproject.toml", tmp_path, "environment")
    assert pyproject is not None and pyproject.requirements[:2] == ("numpy>=1.20", "rich") and not pyproject.closed
    assert {"hydra-core", "omegaconf", "cloudpickle"} <= {env_requirements.requirement_name(line)
                                                         for line in pyproject.requirements}

    def registry(name: str, version: str, more: str = "") -> str:
        """A [[package]] of the lock that an index serves."""
        return (f'[[package]]\nname = "{name}"\nversion = "{version}"\n'
                f'source = {{ registry = "https://pypi.org/simple" }}\n{more}')

    (tmp_path / "uv.lock").write_text("""version = 1
[[package]]
name = "app"
version = "0.1.0"
source = { editable = "." }
dependencies = [{ name = "numpy" }, { name = "colorama", marker = "sys_platform == 'win32'" },
                { name = "Hydra_Core", extra = ["x"] }]
""" + registry("numpy", "2.0.1") + registry("colorama", "0.4.6") + registry(
        "hydra-core", "1.3.2", 'dependencies = [{ name = "omegaconf" }]\n[package.optional-dependencies]\n'
                               'x = [{ name = "cloudpickle" }]\n') + registry("omegaconf", "2.3.0")
        + registry("cloudpickle", "3.0.0"))
    locked = env_requirements.described("uv.lock", tmp_path, "environment")
    assert locked is not None and locked.closed
    assert locked.requirements == ("cloudpickle==3.0.0", "hydra-core==1.3.2", "numpy==2.0.1", "omegaconf==2.3.0")
    (tmp_path / "pylock.toml").write_text("""lock-version = "1.0"
created-by = "test"
[[packages]]
name = "numpy"
version = "2.0.1"
[[packages]]
name = "pywin32"
version = "306"
marker = "sys_platform == 'win32'"
[[packages]]
name = "app"
directory = { path = "." }
""")
    pylock = env_requirements.described("pylock.toml", tmp_path, "environment")
    assert pylock is not None
    assert pylock.requirements[:2] == ("numpy==2.0.1", "pywin32==306 ; sys_platform == 'win32'")
    (tmp_path / "pyproject.toml").write_text('[tool.poetry]\nname = "app"\n')
    with pytest.raises(env_requirements.NotDescribable, match=r"remotes.a.environment: .*\[project\] dependencies"):
        env_requirements.described("pyproject.toml", tmp_path, "remotes.a.environment")


def test_envs_live_next_to_the_projects_copies() -> None:
    """On a cluster, a project_dir on the shared filesystem puts the envs there too."""
    assert remote_machine.envs_folder("~/.hsm/projects") == "~/.hsm/envs"
    assert remote_machine.envs_folder("/scratch/me/hsm/projects/") == "/scratch/me/hsm/envs"
    assert remote_machine.envs_folder("~/.hsm/projects", "/home/me") == "/home/me/.hsm/envs"
    assert remote_machine.envs_folder("projects", "/home/me") == "/home/me/envs"


def test_the_environment_key_is_checked_and_inherited() -> None:
    settings = load_settings({"environment": "mirror", "remotes": {
        "a": {"host": "a"}, "b": {"host": "b", "environment": "found"}, "c": {"host": "localhost", "kind": "slurm"}}})
    assert [remote.environment for remote in settings.remotes] == ["mirror", "found", "found"]
    with pytest.raises(ConfigError, match="remotes.a.environment"):
        load_settings({"remotes": {"a": {"host": "a", "environment": "conda.yml"}}})
    with pytest.raises(ConfigError, match="remotes.a.wheels"):
        load_settings({"remotes": {"a": {"host": "a", "wheels": "always"}}})
    shipped = load_settings({"wheels": "ship", "remotes": {"a": {"host": "a"}, "b": {"host": "b", "wheels": "index"}}})
    assert [remote.wheels for remote in shipped.remotes] == ["ship", "index"]
    with pytest.raises(ConfigError, match="host: localhost"):
        load_settings({"remotes": {"c": {"host": "localhost", "kind": "slurm", "environment": "mirror"}}})


def test_two_builds_of_one_environment_at_once_build_it_once(tmp_path: Path) -> None:
    """The second waits for the first's lock, says so, and reuses what it built; a third
    reuses it at once; a failed build says the log's last lines."""
    (tmp_path / "d1.requirements").write_text("")
    command = [sys.executable, "-m", "hsm_core.environments", "build", str(tmp_path), "d1", "30", "index"]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=PROJECT) for _ in range(2))
    answers = [process.communicate(timeout=120)[0].splitlines() for process in (first, second)]
    outcomes = [json.loads(lines[-1]) for lines in answers]
    assert sorted(outcome["built"] for outcome in outcomes) == [False, True], answers
    assert any(json.loads(lines[0]) == {"waiting": True} for lines in answers if len(lines) == 2), answers
    assert outcomes[0]["python"] == outcomes[1]["python"] and Path(outcomes[0]["python"]).exists()
    log = Path(outcomes[0]["log"])
    written = log.stat().st_mtime_ns
    third = json.loads(subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, timeout=60).stdout)
    assert third["built"] is False and third["seconds"] == 0 and log.stat().st_mtime_ns == written

    (tmp_path / "d2.requirements").write_text("this-package-does-not-exist-hsm==1.0\n")
    failed = json.loads(subprocess.run([*command[:-3], "d2", "30", "index"], capture_output=True, text=True,
                                       cwd=PROJECT, timeout=300).stdout.splitlines()[-1])
    assert "this-package-does-not-exist-hsm" in failed["error"], failed
    assert not (tmp_path / f"d2-{environments.platform.machine()}" / environments.COMPLETE).exists()


def without_built_envs(host: SshHost) -> SshHost:
    """The session's host with no env built and no wheel sent by an earlier test."""
    for folder in ("envs", "wheels"):
        shutil.rmtree(host.home / ".hsm" / folder, ignore_errors=True)
    return host


def sweep(cwd: Path, *extra: str, task: str = "who_runs") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", f"task={task}", "x=1,2",
         *extra], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_host_with_a_bare_python_runs_the_sweep_in_a_mirror_built_there_and_reused(
        ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    """host1's /usr/bin/python3 has neither Hydra nor the app's packages: with environment:
    mirror the first sweep builds this environment there and runs its jobs in it; the second
    reuses it (the log says so; the build log on the host is not rewritten)."""
    host = without_built_envs(ssh_hosts[0])
    bare = subprocess.run(["runuser", "-u", host.user, "--", hosts.HOST_PYTHON, "-c", "import hydra"],
                          capture_output=True, text=True)
    assert bare.returncode != 0, "the host's bare Python must not have Hydra"
    remote = remote_override("host1", host.source_config(python=hosts.HOST_PYTHON, environment="mirror"))
    first = sweep(tmp_path, "hydra.launcher.local.enabled=false", "hydra.sweep.dir=first", remote)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "host1: the jobs' environment (mirror, " in first.stdout and "was built in" in first.stdout, first.stdout
    [log] = (host.home / ".hsm" / "envs").glob("*.log")
    written = log.stat().st_mtime_ns
    assert (tmp_path / "first" / ".hsm" / "environment-host1.log").read_text() == log.read_text()
    started = time.monotonic()
    second = sweep(tmp_path, "hydra.launcher.local.enabled=false", "hydra.sweep.dir=second", remote)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "was reused" in second.stdout, second.stdout
    assert log.stat().st_mtime_ns == written
    print(f"a sweep reusing the environment took {time.monotonic() - started:.1f}s")
    for folder in ("first", "second"):
        for num in (0, 1):
            assert (tmp_path / folder / str(num) / "who.txt").read_text() == host.user


def test_a_host_without_an_index_gets_wheels_sent_from_here(ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    """host1's pip points at an index that refuses connections (its setup lines): with wheels:
    auto (the default) its build asks for wheels; they are made here (hydra-core's antlr4
    dependency has no wheel on any index: built here) and sent; the env is built from them
    alone and the jobs run in it. Made once: a second host... the same wheelhouse is reused."""
    host = without_built_envs(ssh_hosts[0])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml\n")
    dead_index = ["export PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_RETRIES=0 PIP_TIMEOUT=3"]
    remote = remote_override("host1", host.source_config(python=hosts.HOST_PYTHON, environment=str(requirements),
                                                         setup=dead_index))
    cache = tmp_path / "cache"
    environment = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    shown = subprocess.run(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "task=who_runs", "x=1,2",
         "hydra.launcher.local.enabled=false", "hydra.sweep.dir=sweep", remote],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    build_log = (tmp_path / "sweep" / ".hsm" / "environment-host1.log").read_text()
    assert "--no-index --find-links" in build_log, build_log
    assert "host1: sent " in shown.stdout and "wheels from" in shown.stdout, shown.stdout
    sent = sorted(path.name for path in (host.home / ".hsm" / "wheels").iterdir())
    assert any(name.startswith("antlr4_python3_runtime-4.9.3") for name in sent), sent  # built here
    assert any(name.startswith(f"hydra_core-{metadata.version('hydra-core')}-") for name in sent), sent
    for num in (0, 1):
        assert (tmp_path / "sweep" / str(num) / "who.txt").read_text() == host.user


def test_two_sweeps_at_once_build_one_environment_once_and_the_cli_lists_and_prunes_it(
        ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    """Two sweeps started together on host1 with one requirements file (from hsm_config.yaml, as
    a user sets it): the environment is built once (one says built, the other reused, waiting if
    it came during the build). Then `test` shows it reused with its size, `envs` lists it, and
    `envs --prune` removes it."""
    host = without_built_envs(ssh_hosts[0])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml\n")
    config = host.source_config(python=hosts.HOST_PYTHON, environment=str(requirements))
    (tmp_path / "hsm_config.yaml").write_text(yaml.safe_dump(
        {"distributed": {"local": {"enabled": False}, "remotes": {"host1": config}}}))
    command = [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "task=who_runs", "x=1,2"]
    sweeps = [subprocess.Popen([*command, f"hydra.sweep.dir=sweep{number}"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for number in (1, 2)]
    outputs = [sweep.communicate(timeout=300)[0] for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], outputs
    said = sorted("was built in" if "was built in" in output else "was reused" if "was reused" in output else output
                  for output in outputs)
    assert said == ["was built in", "was reused"], outputs
    assert len(list((host.home / ".hsm" / "envs").glob("*-x86_64"))) == 1

    hsm = [str(Path(sys.executable).parent / "hsm"), "distributed"]
    tested = subprocess.run([*hsm, "test", "host1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert re.search(r"environment\s+ok\s+\S+requirements.txt \w{16}: reused, \d+M", tested.stdout), tested.stdout
    listed = subprocess.run([*hsm, "envs"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert re.search(r"host1\s+\w{16}-x86_64\s+\d+M\s+\S+ \S+\s+built", listed.stdout), listed.stdout
    pruned = subprocess.run([*hsm, "envs", "--prune"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Removed 1 environment (" in pruned.stdout and "No environments built." in pruned.stdout, pruned.stdout
    assert not list((host.home / ".hsm" / "envs").glob("*-x86_64"))


def test_a_host_whose_environment_cannot_be_built_leaves_and_the_others_finish(
        ssh_hosts: list[SshHost], tmp_path: Path) -> None:
    """The host's build fails (no such package) while local runs the jobs (6 s of them, one slot):
    the host leaves with the build log's last lines, local finishes the sweep."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("this-package-does-not-exist-hsm==1.0\n")
    host = without_built_envs(ssh_hosts[0])
    remote = remote_override("host1", host.source_config(python=hosts.HOST_PYTHON, environment=str(requirements)))
    shown = sweep(tmp_path, "hydra.sweep.dir=sweep", "hydra.launcher.local.max_parallel_jobs=1", "+sleep=3", remote,
                  task="sleep_and_time")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"Source host1 is out of this sweep: its environment ({requirements}) could not be built" in shown.stdout
    assert "this-package-does-not-exist-hsm" in shown.stdout
    assert "this-package-does-not-exist-hsm" in (tmp_path / "sweep" / ".hsm" / "environment-host1.log").read_text()
    assert shown.stdout.count("completed on local") == 2


def test_a_build_whose_launcher_went_away_still_completes(tmp_path: Path) -> None:
    """The launcher's end of the build's output closes at once (its batch ended): the build
    goes on and marks the env complete, for the next launch to reuse."""
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "d3.requirements").write_text("")
    build = subprocess.Popen([sys.executable, "-m", "hsm_core.environments", "build", str(tmp_path / "envs"), "d3",
                              "30", "index"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=PROJECT)
    assert build.stdout is not None
    build.stdout.close()
    build.wait(timeout=300)
    assert (tmp_path / "envs" / f"d3-{environments.platform.machine()}" / environments.COMPLETE).exists()


def test_a_build_step_tells_how_far_it_is_at_most_once_a_second(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """What the launcher's status line shows during a build: packages collected of those
    listed (pip), or uv's stage; its output goes to the log whole."""
    program = ("import time; print('Collecting a'); print('Collecting b'); time.sleep(1.2);"
               " print('Resolved 7 packages in 1s'); print('done')")
    with open(tmp_path / "log", "w") as log:
        status = environments.run_telling_progress([sys.executable, "-c", program], log, 3, None)
    assert status == 0
    told = [json.loads(line)["progress"] for line in capsys.readouterr().out.splitlines()]
    assert told == ["1/3 packages", "7 packages resolved"]  # "2/3" came within the same second
    assert (tmp_path / "log").read_text().splitlines() == ["Collecting a", "Collecting b",
                                                          "Resolved 7 packages in 1s", "done"]


def test_envs_unused_for_env_keep_days_are_removed_unless_in_use(tmp_path: Path) -> None:
    """prune: an env last used 40 days ago goes (with its log and requirements); one as old
    that a running agent holds (environments.hold) stays, and so does a recent one."""
    envs = tmp_path / "envs"
    month_and_more = time.time() - 40 * 86400
    for name in ("old", "held", "fresh"):
        folder = envs / f"{name}-x86_64"
        folder.mkdir(parents=True)
        (folder / environments.COMPLETE).touch()
        (envs / f"{name}-x86_64.log").write_text("built\n")
        (envs / f"{name}.requirements").write_text("")
        if name != "fresh":
            os.utime(folder / environments.COMPLETE, (month_and_more, month_and_more))
    held = environments.hold(str(envs / "held-x86_64"))
    assert held is not None
    try:
        assert environments.prune(str(envs), 30, keep=str(envs / "fresh-x86_64")) == ["old-x86_64"]
    finally:
        os.close(held)
    assert sorted(path.name for path in envs.iterdir() if not path.name.endswith(".lock")) == [
        "fresh-x86_64", "fresh-x86_64.log", "fresh.requirements", "held-x86_64", "held-x86_64.log", "held.requirements"]
    assert environments.prune(str(envs), 30, keep="") == ["held-x86_64"]  # let go of: now it goes
