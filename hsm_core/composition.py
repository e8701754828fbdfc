"""Composing the configs of a sweep's jobs: Hydra's composition, kept and reused, and a fast
path that derives a job's config from an earlier one when the result is provably the same.

Hydra composes every job from scratch (defaults list, config files, merges, deep copies:
~40 ms of CPU a job) and its sweepers do it twice, once to validate the batch. Most sweeps
change only plain values (`lr=0.1 seed=3`). For those, a job's config is the config of an
earlier job of the same shape (the same keys, in the same order) with its own values set
by the very function Hydra uses (`_apply_overrides_to_config`, so types are checked and
errors worded as Hydra words them), and the two fields Hydra derives from the overrides
rewritten: `hydra.overrides.task` and `hydra.job.override_dirname`. A value added with
`+key=` or `++key=` is set the same way: the earlier job's composition added the key.
Anything else (a config group, `~`, a `hydra.` key, a dict value, a list added with `+`,
a sweep, an error) is composed by Hydra. Must not know sources, the scheduler or the wire.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable

import cloudpickle
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

VALIDATION = Sweeper.validate_batch_is_legal.__code__  # Hydra's check of a batch, before launch()
PARSED_KEPT = 4096  # distinct override texts whose parse is kept
TEMPLATES_KEPT = 64  # shapes with a template (~12 KB each): a sweep has one or a few


@dataclass
class Template:
    """A full composition, kept pristine, that jobs of its shape are derived from."""

    master: DictConfig  # held so that its id is not reused while the template lives
    pickled: bytes  # unpickling is ~4x faster than deep-copying an OmegaConf config
    scratch: DictConfig | None = None  # a copy the sweeper's validation sets each job's values on


class Compositions:
    """Stands in for a config loader's load_sweep_config: composes (or derives) and keeps.

    Hydra's sweepers compose every job of a batch once to validate it and drop the result
    right before calling launch(). A job the fast path can derive is only checked there
    (its values set on one scratch copy: ~0.3 ms, where deriving is ~2-4 ms and composing
    ~40), so the first job of a large sweep starts early; it is derived when it is about to
    run. A job that must be composed is kept from the validation instead of composing it
    a second time: at most KEEP are kept, each handed out once.
    """

    KEEP = 256

    def __init__(self, config_loader: Any) -> None:
        self.loader = config_loader
        self.compose: Callable[[DictConfig, list[str]], DictConfig] = config_loader.load_sweep_config
        self.parser = OverridesParser.create()
        self.parsed: dict[str, Override] = {}  # grids repeat their values: each is parsed once
        self.kept: dict[tuple[int, tuple[str, ...]], DictConfig] = {}
        self.templates: dict[tuple[int, tuple[str, ...]], Template] = {}
        self.groups: dict[tuple[int, str], bool] = {}  # (master, key) -> the key names a config group
        self.derived = self.composed = 0  # how each config was made (the benchmark reports them)

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        if sys._getframe(1).f_code is VALIDATION and self._values_apply(master_config, sweep_overrides):
            return master_config  # validate_batch_is_legal drops what it gets
        config = self.make(master_config, sweep_overrides)
        if len(self.kept) < self.KEEP:
            self.kept[(id(master_config), tuple(sweep_overrides))] = config
        return config

    def take(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """The config the sweeper's validation made for these overrides, else a new one."""
        kept = self.kept.pop((id(master_config), tuple(sweep_overrides)), None)
        return kept if kept is not None else self.make(master_config, sweep_overrides)

    def make(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        shape = self._shape(master_config, sweep_overrides)
        template = self.templates.get(shape) if shape is not None else None
        if template is not None and template.master is master_config:
            overrides = [self._parse(line) for line in sweep_overrides]
            values = [override for override in overrides if self._plain(master_config, override)]
            derived = derive(template.pickled, master_config, overrides, values)
            if derived is not None:
                self.derived += 1
                return derived
        config = self.compose(master_config, sweep_overrides)  # Hydra's own, errors included
        self.composed += 1
        if shape is not None and template is None and len(self.templates) < TEMPLATES_KEPT:
            self.templates[shape] = Template(master_config, cloudpickle.dumps(config))
        return config

    def _values_apply(self, master_config: DictConfig, sweep_overrides: list[str]) -> bool:
        """Whether the job is derivable and its values set without error on its template's
        scratch copy. Jobs of a shape set the same keys, so each job overwrites the last
        one's values; a list or dict value could change the node it lands on, so a job with
        one is composed instead, as is a job whose value fails (Hydra then raises its error)."""
        shape = self._shape(master_config, sweep_overrides)
        template = self.templates.get(shape) if shape is not None else None
        if template is None or template.master is not master_config:
            return False
        values = [override for override in map(self._parse, sweep_overrides) if self._plain(master_config, override)]
        if any(isinstance(override.value(), (list, dict)) for override in values):
            return False
        scratch = template.scratch if template.scratch is not None else pickle.loads(template.pickled)
        template.scratch = None  # until the values are known to apply
        try:
            ConfigLoaderImpl._apply_overrides_to_config(on_template(values), scratch)
        except Exception:
            return False
        template.scratch = scratch
        return True

    def _shape(self, master_config: DictConfig, sweep_overrides: list[str]) -> tuple[Any, ...] | None:
        """What jobs derivable from one another share: each override either sets a plain
        value (its key, the value may differ) or is the very same text (a group choice,
        `+key=...`, a hydra key: the same for every job of the shape). None when the
        overrides cannot be told apart safely (a key inside another, or one that does not parse)."""
        try:
            parsed = [self._parse(line) for line in sweep_overrides]
        except Exception:  # Hydra's composition reports a bad override in its own words
            return None
        keys = [override.key_or_group for override in parsed]
        # A key inside another (`a` and `a.b`), or twice, would depend on the order of application.
        if len(set(keys)) < len(keys) or any(other.startswith(key + ".") for key in keys for other in keys):
            return None
        return (id(master_config), *(("value", override.key_or_group, override.type)
                                     if self._plain(master_config, override)
                                     else ("same", override.input_line) for override in parsed))

    def _plain(self, master_config: DictConfig, override: Override) -> bool:
        """Whether the override only assigns a value to a key of the app's config: an existing
        one, or one added (`+`, `++`) that the shape's template has then."""
        added = override.type in (OverrideType.ADD, OverrideType.FORCE_ADD)
        return ((override.type is OverrideType.CHANGE or added and not isinstance(override.value(), list))
                and override.value_type is ValueType.ELEMENT
                and override.package is None
                and not override.is_hydra_override()
                and not isinstance(override.value(), dict)  # merged into the node: depends on what is there
                and not self._is_group(master_config, override.key_or_group))

    def _parse(self, line: str) -> Override:
        override = self.parsed.get(line)
        if override is None:
            [override] = self.parser.parse_overrides(overrides=[line])
            if len(self.parsed) < PARSED_KEPT:
                self.parsed[line] = override
        return override

    def _is_group(self, master_config: DictConfig, key: str) -> bool:
        """Whether `key` names a config group, as Hydra's composition would see it (its search
        path includes what the master config's hydra overrides and primary config add)."""
        cached = self.groups.get((id(master_config), key))
        if cached is None:
            hydra_overrides = hydra_overrides_as_written(master_config)
            _, repository = self.loader._parse_overrides_and_create_caching_repo(
                master_config.hydra.job.config_name, hydra_overrides)
            cached = self.groups[(id(master_config), key)] = "/" in key or repository.group_exists(key)
        return cached


def hydra_overrides_as_written(config: DictConfig) -> list[str]:
    """The command line's overrides of Hydra's own keys, unresolved: iterating the node would
    resolve `hydra.sweep.subdir=run_${hydra.job.num}`, which no job num is set for yet."""
    written = OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False)
    assert isinstance(written, list)
    return [str(override) for override in written]


def derive(template: bytes, master_config: DictConfig, overrides: list[Override],
           values: list[Override]) -> DictConfig | None:
    """The template (composed with overrides of the same shape) with this job's `values` set
    as Hydra sets them; None when that fails (the caller then composes, so a bad value fails
    exactly as Hydra fails). The other overrides are the same for the whole shape: the
    template has them already."""
    config: DictConfig = pickle.loads(template)
    app_overrides = [override for override in overrides if not override.is_hydra_override()]
    try:
        ConfigLoaderImpl._apply_overrides_to_config(on_template(values), config)
    except Exception:
        return None
    hydra = config.hydra
    with read_write(hydra), open_dict(hydra):
        hydra.overrides.task = [override.input_line for override in app_overrides]
        naming = hydra.job.config.override_dirname
        hydra.job.override_dirname = get_overrides_dirname(
            overrides=app_overrides, kv_sep=naming.kv_sep, item_sep=naming.item_sep, exclude_keys=naming.exclude_keys)
    OmegaConf.copy_cache(from_config=master_config, to_config=config)
    return config


def on_template(values: list[Override]) -> list[Override]:
    """The values as they apply to a template: a key a job adds (`+key=`) is there already,
    so it is set as `++key=` sets it (Hydra's `+` refuses a key that exists; whether this
    one could be added was settled when the template was composed)."""
    return [replace(value, type=OverrideType.FORCE_ADD) if value.type is OverrideType.ADD else value
            for value in values]


def remember_compositions(config_loader: Any) -> None:
    """Called by the launcher's setup(), before the sweeper validates its first batch."""
    if not isinstance(config_loader.load_sweep_config, Compositions):
        config_loader.load_sweep_config = Compositions(config_loader)
