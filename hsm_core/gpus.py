"""GPUs as slots: which of a source's GPUs are free, which a job gets, and what the job sees.

Pure logic: the scheduler owns one GpuPool per source that has GPUs and asks it at each
dispatch; sources only report what the machine has (nvidia-smi) and when a job's whole
process group is gone (only then does its GPU come back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index: what people call "GPU 1"
    ident: str  # what CUDA_VISIBLE_DEVICES gets: the UUID when probed, else the index


@dataclass(frozen=True)
class GpuPlan:
    """A source's GPU settings (see settings.gpu_settings)."""

    gpus: Any = None  # None, "auto", or a tuple of device ids
    gpus_per_job: int = 0
    min_free_memory_mb: float = 0.0
    stagger_s: float = 0.0

    @classmethod
    def of(cls, settings: Any) -> "GpuPlan":
        return cls(settings.gpus, settings.gpus_per_job, settings.min_free_memory_mb, settings.stagger_s)


def configured(gpus: Any) -> list[Gpu] | None:
    """A source's `gpus` setting as devices: a count, a list of ids; None for none or "auto"."""
    if gpus is None or gpus == "auto":
        return None
    indices = range(gpus) if isinstance(gpus, int) else gpus
    return [Gpu(index, str(index)) for index in indices]


def probed(inventory: list[dict[str, Any]]) -> list[Gpu]:
    """nvidia-smi's GPUs (probe.gpu_inventory), named by UUID: other users' numbering or MIG
    cannot make two jobs share one."""
    return [Gpu(int(entry["index"]), str(entry["uuid"])) for entry in inventory]


def environment(gpus: Sequence[Gpu] | None) -> dict[str, str]:
    """What a job's process sees: its own GPUs only. None: the source has no GPUs to manage.
    An empty list (gpus_per_job 0 on a GPU machine): no GPU at all."""
    if gpus is None:
        return {}
    idents = ",".join(gpu.ident for gpu in gpus)
    return {"CUDA_VISIBLE_DEVICES": idents, "HSM_GPUS": idents}


def label(gpus: Sequence[Gpu]) -> str:
    """` [GPU 0,1]` for a start line; empty without GPUs."""
    return f" [GPU {','.join(str(gpu.index) for gpu in gpus)}]" if gpus else ""


@dataclass
class GpuPool:
    """One source's GPUs: held by running jobs (until their process group is gone), or free.
    With `min_free_memory_mb`, a free GPU whose last reading shows less free memory (another
    user's job) is skipped until a later reading shows it freed up."""

    devices: list[Gpu]
    per_job: int
    min_free_memory_mb: float = 0.0
    free_memory_mb: dict[str, float] = field(default_factory=dict)  # ident -> last reading
    held: dict[Hashable, tuple[Gpu, ...]] = field(default_factory=dict)

    def slots(self) -> int | None:
        """Jobs the GPUs allow at once; None when jobs take no GPU (gpus_per_job 0)."""
        return len(self.devices) // self.per_job if self.per_job else None

    def _in_use(self) -> set[Gpu]:
        return {gpu for gpus in self.held.values() for gpu in gpus}

    def skipped(self) -> list[Gpu]:
        """Free GPUs that another user's memory use keeps from this sweep right now."""
        in_use = self._in_use()
        return [gpu for gpu in self.devices if gpu not in in_use
                and self.free_memory_mb.get(gpu.ident, float("inf")) < self.min_free_memory_mb]

    def usable(self) -> list[Gpu]:
        in_use, skipped = self._in_use(), set(self.skipped())
        return [gpu for gpu in self.devices if gpu not in in_use and gpu not in skipped]

    def capacity(self) -> int | None:
        """How many more jobs could get their GPUs now; None: unlimited by GPUs."""
        return len(self.usable()) // self.per_job if self.per_job else None

    def take(self, owner: Hashable) -> tuple[Gpu, ...]:
        """The lowest-numbered usable GPUs for one job (call only when capacity() > 0)."""
        chosen = tuple(sorted(self.usable(), key=lambda gpu: gpu.index)[: self.per_job])
        assert len(chosen) == self.per_job, "take() without capacity"
        self.held[owner] = chosen
        return chosen

    def hold(self, owner: Hashable, indices: Sequence[int]) -> tuple[Gpu, ...]:
        """Mark the GPUs a job already runs on (adopted from an earlier launcher) as held."""
        chosen = tuple(gpu for gpu in self.devices if gpu.index in indices)
        self.held[owner] = chosen
        return chosen

    def release(self, owner: Hashable) -> None:
        self.held.pop(owner, None)

    def read_memory(self, inventory: list[dict[str, Any]]) -> None:
        for entry in inventory:
            self.free_memory_mb[str(entry["uuid"])] = float(entry["memory_total"]) - float(entry["memory_used"])
