"""Finding a remote machine's Python when a source names none.

Candidates, in order: the interpreter at this one's path (shared filesystems, identical
conda paths); an environment of the same name under the remote user's usual places; the
`python` the setup lines leave on PATH; `python3`. All are tried in one SSH round trip (a
shell loop after the setup lines), and the first whose Python minor and key packages
match this machine's is taken.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hsm_core import probe

ENV_PLACES = ("~/miniconda3/envs", "~/anaconda3/envs", "~/mambaforge/envs", "~/.conda/envs", "~/.venvs", "~/venvs",
              "~/.virtualenvs")
GENERIC_ENV_NAMES = (".venv", "venv", "env", ".env")
ON_PATH = "PATH:"  # a candidate looked up with `command -v` after the setup lines
MARK = "HSM-PYTHON-CANDIDATE"
PROBE_SOURCE = Path(probe.__file__).read_text()


def env_names(prefix: str = sys.prefix) -> list[str]:
    """Names this machine's environment likely has elsewhere: its own folder's name, and for
    a generically named venv (`.venv` in a project) the project folder's name."""
    if prefix == sys.base_prefix and not (Path(prefix) / "conda-meta").is_dir():
        return []  # not a virtualenv or conda env
    folder = Path(prefix)
    return [folder.parent.name] if folder.name in GENERIC_ENV_NAMES else [folder.name]


def candidates(executable: str = sys.executable, names: list[str] | None = None) -> list[str]:
    names = env_names() if names is None else names
    found = [executable]
    found += [f"{place}/{name}/bin/python" for name in names for place in ENV_PLACES]
    return [*dict.fromkeys([*found, f"{ON_PATH}python", f"{ON_PATH}python3"])]


def shell_word(path: str) -> str:
    """A candidate as one shell word; a leading ~/ means the remote home."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def script(paths: list[str]) -> str:
    """One line per candidate: MARK, its number, the path it resolved to, then the probe's
    JSON or why it did not run. Banners and setup output are told apart by MARK."""
    code = shlex.quote(PROBE_SOURCE)
    lines = []
    for number, path in enumerate(paths):
        if path.startswith(ON_PATH):
            locate = f"p=$(command -v {shlex.quote(path[len(ON_PATH):])}) || p=''"
        else:
            locate = f"p={shell_word(path)}"
        lines.append(
            f'{locate}; if [ -n "$p" ] && [ -x "$p" ]; then'
            f' out=$("$p" -c {code} describe-python 2>&1 | tail -n 1);'
            f' printf "{MARK}\\t{number}\\t%s\\t%s\\n" "$p" "$out";'
            f' else printf "{MARK}\\t{number}\\t%s\\tnot found\\n" "$p"; fi'
        )
    return "\n".join(lines)


@dataclass
class Candidate:
    wanted: str  # as listed: a path, or PATH:name
    path: str  # as found on the machine ("" when not found)
    problem: str | None  # None: it passes the preflight
    info: dict[str, Any] | None = None

    def describe(self) -> str:
        where = self.wanted if not self.path or self.path == self.wanted else f"{self.wanted} = {self.path}"
        return f"{where}: {self.problem or 'matches this machine'}"


def judge(paths: list[str], output: str, mismatch: Callable[[dict[str, Any]], str | None]) -> list[Candidate]:
    """Each candidate with what was found, in order; `mismatch(info)` says why a Python cannot run jobs."""
    results: dict[int, Candidate] = {}
    for line in output.splitlines():
        parts = line.split("\t", 3)
        if len(parts) != 4 or parts[0] != MARK:
            continue
        number, path, answer = int(parts[1]), parts[2], parts[3]
        if answer == "not found":
            results[number] = Candidate(paths[number], "", "not found")
            continue
        try:
            info = json.loads(answer)
        except ValueError:
            results[number] = Candidate(paths[number], path, f"did not run ({answer.strip()[:200]})")
            continue
        results[number] = Candidate(paths[number], path, mismatch(info), info)
    return [results.get(number, Candidate(path, "", "not checked")) for number, path in enumerate(paths)]


def chosen(found: list[Candidate]) -> Candidate | None:
    return next((candidate for candidate in found if candidate.problem is None), None)
