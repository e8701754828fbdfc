"""hsm_config.yaml: where it is, reading it, and changing it without losing comments.

ruamel.yaml rather than PyYAML: the CLI edits a file the user also edits by hand, and a
round trip through ruamel keeps their comments, key order and layout; it also refuses
duplicate keys (two remotes with one name) and knows the line of every key. Must not
know sources or jobs: it turns a file into settings and back.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Iterable

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from hsm_core import files, options
from hsm_core.settings import ConfigError, SweepSettings, as_flag, load_settings, merge

BLOCK = "distributed"

def default_block() -> str:
    """The `distributed:` block `hsm distributed init` writes: the main keys (options.in_init)
    with their defaults and help, as a starting point to edit."""
    lines = [f"{BLOCK}:", "  enabled: true"]
    groups: set[str] = set()
    for option in options.LAUNCHER:
        if not option.in_init:
            continue
        value = option.default_value()
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
    for candidate in options.CONFIG_FILE_PLACES:
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


def node_values(cwd: Path) -> dict[str, Any]:
    """The values the launcher node takes from the hsm_config.yaml found in `cwd`, by dotted
    key; none when there is no valid file (the launch reports what is wrong with it)."""
    try:
        path = discover(None, cwd)
        block = distributed_block(path) if path is not None else {}
        if block:
            load_settings(block, origin=f"{path}: {BLOCK}")
    except (ConfigError, OSError):
        return {}
    return {option.key: value for option in FILE_OPTIONS if (value := _lookup(block, option.key)) is not None}


# The keys both hsm_config.yaml and the launcher node hold a value for (remotes merge instead).
FILE_OPTIONS = tuple(option for option in options.LAUNCHER if option.from_file and not isinstance(option.default, dict))


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def chosen_by_user(launcher_options: dict[str, Any], node_defaults: dict[str, Any],
                   named: Iterable[str]) -> dict[str, Any]:
    """The launcher's options without the keys the user left alone, so that the file read at
    launch gives them: `config_file` may name another file than the node's defaults came
    from, and the file may have changed since. A key was chosen when its value differs from
    the node's default (a config of the user's set it) or the command line names it, or a
    group of it (`named`: dotted keys under hydra.launcher)."""
    named = tuple(named)
    chosen = copy.deepcopy(launcher_options)
    for option in FILE_OPTIONS:
        *groups, key = option.key.split(".")
        holder = _lookup(chosen, ".".join(groups)) if groups else chosen
        if not isinstance(holder, dict) or key not in holder:
            continue
        on_command_line = any(option.key == name or option.key.startswith(f"{name}.") for name in named)
        if holder[key] == _lookup(node_defaults, option.key) and not on_command_line:
            del holder[key]
    return chosen


def sweep_settings(launcher_options: dict[str, Any], cwd: Path) -> SweepSettings:
    """The launcher's settings over the file's (hydra.launcher.config_file, else the file
    found in the working dir). The file is validated on its own first, so its mistakes
    are reported with its name."""
    path = discover(launcher_options.get("config_file"), cwd)
    file_options = distributed_block(path) if path is not None else {}
    if file_options:
        load_settings(file_options, origin=f"{path}: {BLOCK}")
    return load_settings(merge(file_options, launcher_options))
