"""Resuming a sweep: the jobs of a batch that completed before, with their outputs moved
to where this run numbers them (a reordered or extended sweep renumbers jobs)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf, read_write

from hsm_core.jobs import JobSpec
from hsm_core.journal import Journal, override_hash

STAGING = ".hsm/moving"


def restore(journal: Journal, sweep_dir: Path, specs: Sequence[JobSpec]) -> dict[int, Any]:
    """{spec.index: JobReturn} for the specs that completed before. Afterwards each of the
    batch's job dirs holds only its own job's outputs: a completed job's dir moves to its
    new number (through a staging folder, so swaps work), and a dir left by an unfinished
    attempt is cleared before its job runs again."""
    done = journal.completed()
    owners = {subdir: digest for digest, subdir in done.items()}
    for spec in specs:  # empty every target dir that holds something other than its own job
        digest, target = override_hash(spec.overrides), sweep_dir / spec.subdir
        occupant = owners.get(spec.subdir)
        if not target.exists() or occupant == digest:
            continue
        if occupant is None:
            shutil.rmtree(target)  # an unfinished attempt's leftovers
            continue
        staged = f"{STAGING}/{occupant}"
        (sweep_dir / STAGING).mkdir(parents=True, exist_ok=True)
        os.replace(target, sweep_dir / staged)
        journal.moved(occupant, staged)
        done[occupant] = staged
    restored = {}
    for spec in specs:
        digest = override_hash(spec.overrides)
        if digest not in done:
            continue
        if done[digest] != spec.subdir and (sweep_dir / done[digest]).exists():
            (sweep_dir / spec.subdir).parent.mkdir(parents=True, exist_ok=True)
            os.replace(sweep_dir / done[digest], sweep_dir / spec.subdir)
            journal.moved(digest, spec.subdir)
        restored[spec.index] = renumbered(journal.result(digest), spec, sweep_dir)
    with contextlib.suppress(OSError):
        (sweep_dir / STAGING).rmdir()  # only when nothing waits there for a later batch
    return restored


def renumbered(job_return: Any, spec: JobSpec, sweep_dir: Path) -> Any:
    """The stored JobReturn as this run numbers the job (num, id, output dir, overrides)."""
    job_return = copy.copy(job_return)
    job_return.overrides = spec.overrides
    hydra = job_return.hydra_cfg.hydra
    output_dir = str(sweep_dir / spec.subdir)
    with read_write(hydra.job), read_write(hydra.runtime):
        if job_return.working_dir == hydra.runtime.output_dir:
            job_return.working_dir = output_dir
        hydra.job.num = spec.num
        hydra.job.id = f"{hydra.job.name}_{spec.num}"
        hydra.runtime.output_dir = output_dir
    if hydra.output_subdir is not None and (sweep_dir / spec.subdir / str(hydra.output_subdir)).is_dir():
        (sweep_dir / spec.subdir / str(hydra.output_subdir) / "hydra.yaml").write_text(
            OmegaConf.to_yaml(job_return.hydra_cfg))
    return job_return
