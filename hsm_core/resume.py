"""Resuming a sweep: the jobs of a batch that completed before, with their outputs moved
to where this run numbers them (a reordered or extended sweep renumbers jobs).

Reads the journal and moves job dirs; the JobReturn's renumbering is `hydra_job`'s. Must
not know the scheduler or the sources."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from hsm_core.hydra_job import renumbered
from hsm_core.jobs import JobSpec
from hsm_core.journal import Completed, Journal

STAGING = ".hsm/moving"

log = logging.getLogger(__name__)


def restore(journal: Journal, sweep_dir: Path, specs: Sequence[JobSpec], keep_changed: bool,
            running: frozenset[str] | set[str] = frozenset()) -> dict[int, Any]:
    """{spec.index: JobReturn} for the specs that completed before, with the same config and
    code (or whatever changed, with `keep_changed`; either way one line says which). Afterwards
    each of the batch's job dirs holds only its own job's outputs: a completed job's dir
    moves to its new number (through a staging folder, so swaps work), and a dir left by an
    unfinished attempt is cleared before its job runs again, unless the job (key in `running`)
    may still run there, left by a launcher that is gone (it is adopted)."""
    completed = journal.completed()
    changed = {spec.num: what for spec in specs if spec.key in completed
               and (what := changes(completed[spec.key], spec.config_hash, journal.code))}
    if changed:
        listed = ", ".join(f"#{num} ({what})" for num, what in changed.items())
        if keep_changed:
            log.warning(f"Resuming: keeping {len(changed)} completed jobs though what they ran changed since: {listed}")
        else:
            log.warning(f"Resuming: {len(changed)} completed jobs run again, as what they ran changed since: {listed}"
                        " (hydra.launcher.resume=keep keeps them)")
            for spec in specs:
                if spec.num in changed:
                    del completed[spec.key]
    done = {key: job.subdir for key, job in completed.items()}
    owners = {subdir: digest for digest, subdir in done.items()}
    for spec in specs:  # empty every target dir that holds something other than its own job
        digest, target = spec.key, sweep_dir / spec.subdir
        occupant = owners.get(spec.subdir)
        if not target.exists() or occupant == digest:
            continue
        if occupant is None:
            if digest not in running:
                shutil.rmtree(target)  # an unfinished attempt's leftovers
            continue
        staged = f"{STAGING}/{occupant}"
        (sweep_dir / STAGING).mkdir(parents=True, exist_ok=True)
        os.replace(target, sweep_dir / staged)
        journal.moved(occupant, staged)
        done[occupant] = staged
    restored = {}
    for spec in specs:
        digest = spec.key
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


def changes(completed: Completed, config_hash: str, code: str | None) -> str:
    """What differs between a completed job and the job now ("config", "code", both, or
    nothing); a journal written before these were kept cannot tell, and says nothing."""
    what = []
    if completed.config and completed.config != config_hash:
        what.append("config")
    if completed.code and code and completed.code != code:
        what.append("code")
    return " and ".join(what)
