"""The launcher's config node, registered as `hydra/launcher=hsm_distributed`.

Kept import-light: Hydra imports this module during plugin discovery of every app.

The node is derived from `hsm_core.options.LAUNCHER`, the one table of keys, defaults and
help. Its defaults are plain values: for each key hsm_config.yaml may set, the value of the
file found in the working dir when Hydra discovers its plugins, else the built-in default.
So `--cfg hydra -p hydra.launcher --resolve` shows the values a sweep will use, a key set
in a launcher group file or on the command line wins as in any Hydra config, and a saved
config needs nothing of this plugin to load. (A custom resolver did this before; Hydra's
test fixtures and `OmegaConf.clear_resolvers()` remove resolvers, and then every config
with this launcher failed.) A launch reads the file again (`config_file` may name another
one): `hsm_core.config_file.sweep_settings`.
"""

import os
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, ValidationError

from hsm_core import options

GROUP, NAME = "hydra/launcher", "hsm_distributed"
NODE_PATH = f"{GROUP}/{NAME}"  # where Hydra's ConfigStore keeps the node

TYPES: Dict[str, Any] = {
    "str": Optional[str],
    "int": Optional[int],
    "float": Optional[float],
    "bool": Optional[bool],
    "texts": Optional[List[str]],
    "any": Any,
}


def file_values() -> Dict[str, Any]:
    """The valid values of the working dir's hsm_config.yaml, by dotted key; none without one."""
    if not any(os.path.isfile(place) for place in options.CONFIG_FILE_PLACES):
        return {}  # the common case stays cheap: no YAML parser imported
    from hsm_core.config_file import node_values

    return node_values(Path.cwd())


def _field(option: options.Option, values: Dict[str, Any]) -> Tuple[str, Any, Any]:
    name = option.key.rsplit(".", 1)[-1]
    if isinstance(option.default, dict):
        return name, Dict[str, Any], field(default_factory=dict)
    default = values.get(option.key, option.default_value())
    if isinstance(default, list):
        return name, TYPES[option.kind], field(default_factory=lambda: list(default))
    return name, TYPES[option.kind], field(default=default)


def _node(name: str, values: Dict[str, Any], group: str = "") -> Any:
    """The dataclass of the node's top level, or of one of its groups (local, sync)."""
    prefix = f"{group}." if group else ""
    fields: List[Tuple[str, Any, Any]] = [] if group else [("_target_", str, field(default=TARGET))]
    groups: List[str] = []
    for option in options.LAUNCHER:
        if not option.key.startswith(prefix):
            continue
        first, _, rest = option.key[len(prefix):].partition(".")
        if not rest:
            fields.append(_field(option, values))
        elif first not in groups:
            groups.append(first)
            child = _node(f"{first.capitalize()}Conf", values, first)
            fields.append((first, child, field(default_factory=child)))
    node = make_dataclass(name, fields)
    node.__module__ = __name__
    return node


TARGET = "hydra_plugins.hsm_distributed_launcher.hsm_distributed_launcher.HsmDistributedLauncher"


def _launcher_node() -> Any:
    """The node with the file's values, or with the built-in ones when a value does not fit its
    key's type: plugin discovery must not fail (the launch itself reads and checks the file)."""
    node = _node("HsmDistributedLauncherConf", file_values())
    try:
        OmegaConf.structured(node)
    except ValidationError:
        node = _node("HsmDistributedLauncherConf", {})
    return node


HsmDistributedLauncherConf = _launcher_node()

ConfigStore.instance().store(group=GROUP, name=NAME, node=HsmDistributedLauncherConf,
                             provider="hsm_distributed_launcher")
