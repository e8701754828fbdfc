"""The launcher's config node, registered as `hydra/launcher=hsm_distributed`.

Kept import-light: Hydra imports this module during plugin discovery of every app.

The node is derived from `hsm_core.options.LAUNCHER`, the one table of keys, defaults and
help. Every key that hsm_config.yaml can also set defaults to `${hsm:KEY,CONFIG_FILE}`:
the file's value, else the built-in default. So `--cfg hydra -p hydra.launcher --resolve`
shows the values a sweep will use, and a key given on the command line still wins.
"""

from dataclasses import field, make_dataclass
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hsm_core import options


def _setting(key: str, config_file: Optional[str] = None) -> Any:
    from hsm_core.config_file import effective_value  # only when a value is read

    return effective_value(key, config_file)


if not OmegaConf.has_resolver("hsm"):
    OmegaConf.register_new_resolver("hsm", _setting)


TYPES: Dict[str, Any] = {
    "str": Optional[str],
    "int": Optional[int],
    "float": Optional[float],
    "bool": Optional[bool],
    "texts": Optional[List[str]],
    "any": Any,
}


def _field(option: options.Option, depth: int) -> Tuple[str, Any, Any]:
    """One key of the node: keys hsm_config.yaml may set default to the file's value."""
    name = option.key.rsplit(".", 1)[-1]
    if isinstance(option.default, dict):
        return name, Dict[str, Any], field(default_factory=dict)
    if not option.from_file:
        return name, TYPES[option.kind], field(default=option.default)
    return name, TYPES[option.kind], field(default="${hsm:%s,${%sconfig_file}}" % (option.key, "." * depth))


def _node(name: str, group: str = "") -> Any:
    """The dataclass of the node's top level, or of one of its groups (local, sync)."""
    prefix, depth = (f"{group}.", 2) if group else ("", 1)
    fields: List[Tuple[str, Any, Any]] = [] if group else [("_target_", str, field(default=TARGET))]
    groups: List[str] = []
    for option in options.LAUNCHER:
        if not option.key.startswith(prefix):
            continue
        first, _, rest = option.key[len(prefix):].partition(".")
        if not rest:
            fields.append(_field(option, depth))
        elif first not in groups:
            groups.append(first)
            child = _node(f"{first.capitalize()}Conf", first)
            fields.append((first, child, field(default_factory=child)))
    node = make_dataclass(name, fields)
    node.__module__ = __name__
    return node


TARGET = "hydra_plugins.hsm_distributed_launcher.hsm_distributed_launcher.HsmDistributedLauncher"
HsmDistributedLauncherConf = _node("HsmDistributedLauncherConf", "")

ConfigStore.instance().store(
    group="hydra/launcher",
    name="hsm_distributed",
    node=HsmDistributedLauncherConf,
    provider="hsm_distributed_launcher",
)
