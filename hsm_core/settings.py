"""Sweep settings: read from the launcher's config node, validated with messages a user can act on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from hsm_core.strategies import STRATEGIES


class ConfigError(Exception):
    """Bad configuration. The message names the key, the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}: {problem}. Fix: {fix}")
        self.key = key


@dataclass(frozen=True)
class LocalSettings:
    enabled: bool = True
    max_parallel_jobs: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass(frozen=True)
class SweepSettings:
    strategy: str = "round_robin"
    max_retries: int = 3
    retry_failed_jobs: int = 0
    local: LocalSettings = field(default_factory=LocalSettings)


def load_settings(options: Mapping[str, Any], origin: str = "hydra.launcher") -> SweepSettings:
    """Validate the launcher's options (plain containers) into SweepSettings."""
    strategy = options.get("strategy", "round_robin")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"{origin}.strategy",
            f"unknown strategy {strategy!r}",
            f"use one of {', '.join(STRATEGIES)}",
        )
    remotes = options.get("remotes") or {}
    if remotes:
        raise ConfigError(
            f"{origin}.remotes",
            f"remote sources ({', '.join(remotes)}) are not supported by this version yet",
            "remove them; this version runs jobs on the local machine only",
        )
    local = options.get("local") or {}
    slots = local.get("max_parallel_jobs")
    return SweepSettings(
        strategy=strategy,
        max_retries=_count(options, "max_retries", 3, origin),
        retry_failed_jobs=_count(options, "retry_failed_jobs", 0, origin),
        local=LocalSettings(
            enabled=bool(local.get("enabled", True)),
            max_parallel_jobs=(
                LocalSettings().max_parallel_jobs
                if slots is None
                else _positive(slots, f"{origin}.local.max_parallel_jobs")
            ),
        ),
    )


def _count(options: Mapping[str, Any], key: str, default: int, origin: str) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{origin}.{key}", f"must be a whole number >= 0, got {value!r}", f"set {key}: {default}")
    return value


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a whole number >= 1, got {value!r}", "set it to 1 or more (null: the CPU count)")
    return value
