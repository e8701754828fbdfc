"""hsm_config.yaml: where it is, reading it, and changing it without losing comments.

ruamel.yaml rather than PyYAML: the CLI edits a file the user also edits by hand, and a
round trip through ruamel keeps their comments, key order and layout; it also refuses
duplicate keys (two remotes with one name) and knows the line of every key. Must not
know sources or jobs: it turns a file into settings and back.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from hsm_core import files, options
from hsm_core.settings import DEFAULTS, ConfigError, SweepSettings, as_flag, cpu_count, load_settings, merge

FILE_NAME = "hsm_config.yaml"
SEARCHED = (Path(FILE_NAME), Path("sweeps") / FILE_NAME)
BLOCK = "distributed"

def default_block() -> str:
    """The `distributed:` block `hsm distributed init` writes: the main keys (options.in_init)
    with their defaults and help, as a starting point to edit."""
    lines = [f"{BLOCK}:", "  enabled: true"]
    groups: set[str] = set()
    for option in options.LAUNCHER:
        if not option.in_init:
            continue
        value = cpu_count() if option.default is options.CPU_COUNT else option.default
        comment = "hsm distributed add NAME HOST ... fills this" if option.key == "remotes" else option.help
        group, _, key = option.key.rpartition(".")
        if group and group not in groups:
            groups.add(group)
            lines.append(f"  {group}:")
        indent = "    " if group else "  "
        lines.append(f"{indent}{key}: {options.yaml_scalar(value)}  # {comment.replace('`', '')}")
    return "\n".join(lines) + "\n"


def _yaml() -> YAML:
    yaml = YAML()  # round-trip mode: comments and order survive
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def discover(explicit: str | None, cwd: Path) -> Path | None:
    """The explicit path, else ./hsm_config.yaml, else ./sweeps/hsm_config.yaml, else None."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        return path if path.is_absolute() else cwd / path
    for candidate in SEARCHED:
        if (cwd / candidate).is_file():
            return cwd / candidate
    return None


def read(path: Path) -> CommentedMap:
    """The whole document (an empty one for an empty file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file", "create it with: hsm distributed init") from None
    try:
        document = _yaml().load(text)
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "the file"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: {where}", f"not valid YAML ({problem})",
                          "fix that line (each name may appear once per mapping)") from None
    if document is None:
        return CommentedMap()
    if not isinstance(document, CommentedMap):
        raise ConfigError(str(path), "the file must be a mapping of keys", f"start it with `{BLOCK}:`")
    return document


def distributed_block(path: Path) -> dict[str, Any]:
    """The `distributed:` settings as plain containers; empty when absent or disabled."""
    block = read(path).get(BLOCK)
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: {BLOCK}", "must be a mapping", "indent its keys under it")
    plain = to_plain(block)
    if not as_flag(plain.pop("enabled", True), f"{path}: {BLOCK}.enabled"):
        return {}
    return plain


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    return value


def write(path: Path, document: CommentedMap) -> None:
    """Replace the file atomically: a failure at any point leaves the old file whole."""
    buffer = io.StringIO()
    _yaml().dump(document, buffer)
    write_text(path, buffer.getvalue())


def write_text(path: Path, text: str) -> None:
    """Atomically, keeping the file's mode (a new file is the user's alone: it may hold env tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o600
    files.write_atomically(str(path), text.encode(), mode)


def initialize(path: Path) -> str:
    """Create the file, or add the distributed block to it; returns what was done."""
    block = default_block()
    if not path.exists():
        write_text(path, block)
        return f"created {path}"
    if BLOCK in read(path):
        return f"{path} already has a `{BLOCK}:` block; nothing changed"
    text = path.read_text()
    write_text(path, text + ("" if text.endswith("\n") or not text else "\n") + block)
    return f"added the `{BLOCK}:` block to {path}"


def effective_value(key: str, explicit: str | None) -> Any:
    """A launcher key's value as a sweep from this working dir gets it when the command line
    does not set it: hsm_config.yaml's (when the file is valid), else the default."""
    try:
        path = discover(explicit, Path.cwd())
        block = _valid_block(path, path.stat().st_mtime_ns) if path is not None else {}
    except (ConfigError, OSError):
        block = {}  # the sweep itself reports what is wrong with the file
    node: Any = block
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        return node
    return cpu_count() if DEFAULTS[key] is options.CPU_COUNT else DEFAULTS[key]


@functools.lru_cache(maxsize=8)
def _valid_block(path: Path, mtime_ns: int) -> dict[str, Any]:
    block = distributed_block(path)
    if block:
        load_settings(block, origin=f"{path}: {BLOCK}")
    return block


def sweep_settings(launcher_options: dict[str, Any], cwd: Path) -> SweepSettings:
    """The launcher's settings over the file's (hydra.launcher.config_file, else the file
    found in the working dir). The file is validated on its own first, so its mistakes
    are reported with its name."""
    path = discover(launcher_options.get("config_file"), cwd)
    file_options = distributed_block(path) if path is not None else {}
    if file_options:
        load_settings(file_options, origin=f"{path}: {BLOCK}")
    return load_settings(merge(file_options, launcher_options))
