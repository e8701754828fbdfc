"""The composition fast path gives exactly what Hydra's composition gives, or steps aside.

Every case composes each job both ways, Hydra's `load_sweep_config` and the launcher's
`Compositions`, and requires the same YAML for the whole config (hydra node included),
and says how many jobs the fast path derived: where it must not apply, none.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import hydra
import pytest
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.plugins.sweeper import Sweeper
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hsm_core.composition import Compositions, remember_compositions

CORPUS = Path(__file__).parent / "conf_composition"
HYDRA_CONFIGS = Path(hydra.__file__).parent / "test_utils" / "configs"
EXAMPLE_APP = Path(__file__).parents[1] / "example_app" / "conf"


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclass
class Typed:
    count: int = 1
    ratio: float = 0.5
    label: str = "x"
    color: Color = Color.RED
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    double: float = "${ratio}"  # type: ignore[assignment]  # an interpolation to a swept key


ConfigStore.instance().store(name="typed", node=Typed)


@pytest.fixture(autouse=True)
def restore_hydra(hydra_restore_singletons: Any) -> None:
    """Composing sets Hydra's global state; later tests must find it as it was."""


def compose_both_ways(config_dir: Path, config_name: str, jobs: list[list[str]],
                      master: Sequence[str] = ()) -> tuple[list[str], list[str], Compositions]:
    """Each job's whole config as YAML: Hydra's, then the fast path's."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        found = GlobalHydra.instance().hydra
        assert found is not None
        master_config = found.compose_config(config_name=config_name, overrides=list(master),
                                             run_mode=RunMode.MULTIRUN)
        loader = found.config_loader
        hydras = [OmegaConf.to_yaml(loader.load_sweep_config(master_config, job)) for job in jobs]
        compositions = Compositions(loader)
        fast = [OmegaConf.to_yaml(compositions(master_config, job)) for job in jobs]
    return hydras, fast, compositions


def assert_same(config_dir: Path, config_name: str, jobs: list[list[str]], derived: int,
                master: Sequence[str] = ()) -> None:
    hydras, fast, compositions = compose_both_ways(config_dir, config_name, jobs, master)
    for job, by_hydra, by_fast_path in zip(jobs, hydras, fast, strict=True):
        assert by_fast_path == by_hydra, f"{config_name} {job}"
    assert compositions.derived == derived, f"{config_name}: derived {compositions.derived} of {len(jobs)}"


@pytest.mark.parametrize("jobs, derived", [
    pytest.param([["lr=0.5", "seed=1"], ["lr=0.25", "seed=2"], ["lr=1e-3", "seed=3"]], 2, id="plain values"),
    pytest.param([["text='a b'"], ["text='x=y,z'"], ['text="it\'s"'], ["text=null"], ["text=42"]], 4, id="quoting"),
    pytest.param([["items=[4,5]"], ["items=[]"], ["items=[a,'b c']"]], 2, id="lists"),
    pytest.param([["nested.a.b=2"], ["nested.a.b=3"]], 1, id="nested key, interpolated elsewhere"),
    pytest.param([["maybe=1"], ["maybe=[1,2]"], ["maybe=x"]], 2, id="a value of another type"),
    pytest.param([["flag=false", "lr=2"], ["flag=true", "lr=3"]], 1, id="booleans"),
    pytest.param([["deploy.server.workers=4"], ["deploy.server.workers=8"]], 1, id="a key in a nested package"),
    pytest.param([["db.port=1"], ["db.port=2"]], 1, id="a key of a group's config"),
    pytest.param([["seed=1", "lr=0.5"], ["lr=0.5", "seed=2"]], 0, id="keys in another order"),
    pytest.param([["db=postgres"], ["db=mysql"]], 0, id="group choices"),
    pytest.param([["server=large", "lr=1"], ["server=small", "lr=2"]], 0, id="a group among values"),
    pytest.param([["+extra=1"], ["+extra=2"], ["+extra=abc"], ["+extra=null"], ["+extra='${lr}'"]], 4, id="append"),
    pytest.param([["+new.deep.key=1", "lr=2"], ["+new.deep.key=x", "lr=3"]], 1, id="append a nested key"),
    pytest.param([["+maybe=1"], ["+maybe=two"]], 1, id="append over a null"),
    pytest.param([["+extra=[1]"], ["+extra=[2,3]"]], 0, id="append a list"),
    pytest.param([["++lr=1"], ["++lr=2"], ["++fresh=3"], ["++fresh=4"]], 2, id="force add"),
    pytest.param([["++seed=5"], ["++seed=abc"]], 1, id="force add of another type"),
    pytest.param([["~text"], ["~flag"]], 0, id="delete"),
    pytest.param([["hydra.job.name=a"], ["hydra.job.name=b"]], 0, id="hydra keys"),
    pytest.param([["nested={a: {b: 5}}"], ["nested={a: {c: 6}}"]], 0, id="dict values"),
    pytest.param([["items=[1,2]", "items.0=5"], ["items=[3,4]", "items.0=6"]], 0, id="a key inside another"),
])
def test_the_fast_path_equals_hydra_or_steps_aside(jobs: list[list[str]], derived: int) -> None:
    assert_same(CORPUS, "app", jobs, derived)


def test_structured_configs_keep_their_types() -> None:
    assert_same(CORPUS, "typed", [["count=2", "ratio=0.25", "color=BLUE", "sizes=[3]"],
                                  ["count=3", "ratio=1", "color=RED", "sizes=[]"],
                                  ["count=4", "ratio=2.5", "color=BLUE", "sizes=[5,6,7]"]], derived=2)


@contextlib.contextmanager
def typed_app() -> Iterator[tuple[DictConfig, Any]]:
    """The structured `typed` config of the corpus, composed for a sweep, and its config loader."""
    with initialize_config_dir(config_dir=str(CORPUS), version_base="1.3"):
        found = GlobalHydra.instance().hydra
        assert found is not None
        yield found.compose_config(config_name="typed", overrides=[], run_mode=RunMode.MULTIRUN), found.config_loader


def sweepers_check(loader: Any, master_config: DictConfig, jobs: list[list[str]]) -> None:
    """Hydra's validate_batch_is_legal, as a sweeper calls it before launch()."""
    sweeper = SimpleNamespace(hydra_context=SimpleNamespace(config_loader=loader), config=master_config)
    Sweeper.validate_batch_is_legal(sweeper, jobs)  # type: ignore[arg-type]


@pytest.mark.parametrize("jobs", [[["count=2"], ["count=abc"]], [["++count=2"], ["++count=abc"]],
                                  [["+count=1"], ["+count=2"]]], ids=["change", "force add", "append an existing key"])
def test_a_bad_value_fails_exactly_as_hydra_fails(jobs: list[list[str]]) -> None:
    with typed_app() as (master_config, loader):
        with pytest.raises(Exception) as by_hydra:
            loader.load_sweep_config(master_config, jobs[1])
        compositions = Compositions(loader)
        with contextlib.suppress(Exception):  # the first is fine, or fails as the second does
            compositions(master_config, jobs[0])
        with pytest.raises(Exception) as by_fast_path:
            compositions(master_config, jobs[1])
    assert type(by_fast_path.value) is type(by_hydra.value)
    assert str(by_fast_path.value) == str(by_hydra.value)
    assert jobs[1][0].lstrip("+").split("=")[0] in str(by_hydra.value) + str(by_hydra.value.__cause__)


def validate_then_take(jobs: list[list[str]]) -> tuple[list[str], list[str], tuple[int, int], Compositions]:
    """The sweeper's check of the batch (Hydra's validate_batch_is_legal, with the launcher's
    compositions installed), then each job's config as the launcher takes it, next to Hydra's."""
    with typed_app() as (master_config, loader):
        hydras = [OmegaConf.to_yaml(loader.load_sweep_config(master_config, job)) for job in jobs]
        remember_compositions(loader)
        compositions = loader.load_sweep_config
        assert isinstance(compositions, Compositions)
        sweepers_check(loader, master_config, jobs)
        checked = compositions.composed, compositions.derived
        taken = [OmegaConf.to_yaml(compositions.take(master_config, job)) for job in jobs]
    return hydras, taken, checked, compositions


def test_the_sweepers_check_sets_values_on_a_scratch_copy_and_launch_derives() -> None:
    jobs = [[f"count={n}", f"ratio={n / 4}", f"label='job {n}'", "color=BLUE"] for n in range(40)]
    hydras, taken, checked, compositions = validate_then_take(jobs)
    assert taken == hydras
    assert checked == (1, 0)  # the check composed the first job and only set the others' values
    assert compositions.derived == 39  # launch derived them


def test_the_sweepers_check_and_launch_derive_added_keys_too() -> None:
    """`+key=value` sweeps (an app without that key in its config) take the fast path as well."""
    jobs = [[f"+extra={n}", f"++fresh='run {n}'", f"count={n}"] for n in range(20)]
    hydras, taken, checked, compositions = validate_then_take(jobs)
    assert taken == hydras
    assert checked == (1, 0) and compositions.derived == 19


def test_the_sweepers_check_rejects_a_bad_value_exactly_as_hydra() -> None:
    jobs = [[f"count={n}"] for n in range(30)] + [["count=abc"]]
    with typed_app() as (master_config, loader):
        with pytest.raises(Exception) as by_hydra:
            loader.load_sweep_config(master_config, jobs[-1])
        remember_compositions(loader)
        with pytest.raises(Exception) as by_check:
            sweepers_check(loader, master_config, jobs)
    assert type(by_check.value) is type(by_hydra.value)
    assert str(by_check.value) == str(by_hydra.value)


def test_the_sweepers_check_composes_jobs_with_list_values() -> None:
    jobs = [["count=1", f"sizes=[{n}]"] for n in range(5)]
    hydras, taken, checked, compositions = validate_then_take(jobs)
    assert taken == hydras
    assert checked == (1, 4)  # a list may change the node it lands on: derived in full, and kept
    assert (compositions.composed, compositions.derived) == (1, 4)


# Hydra's configs that exist to make its composition fail.
HYDRA_ERROR_CASES = {"defaults_not_list", "missing-default", "schema_key_error", "schema_validation_error",
                     "unspecified_mandatory_default"}


def hydra_corpus() -> Iterator[Any]:
    """Hydra's own test configs (shipped in the hydra-core wheel), each with jobs that set
    every top-level scalar it has to three values in turn."""
    for path in sorted(HYDRA_CONFIGS.glob("*.yaml")):
        if path.stem not in HYDRA_ERROR_CASES:
            yield pytest.param(path.stem, id=path.stem)


def override_value(value: Any, turn: int) -> str:
    if isinstance(value, bool):
        return str(turn % 2 == 0).lower()
    if isinstance(value, (int, float)):
        return str(value + turn)
    return f"'{value} {turn}'"


@pytest.mark.parametrize("config_name", list(hydra_corpus()))
def test_hydras_own_test_configs(config_name: str) -> None:
    with initialize_config_dir(config_dir=str(HYDRA_CONFIGS), version_base="1.3"):
        found = GlobalHydra.instance().hydra
        assert found is not None
        master = found.compose_config(config_name=config_name, overrides=[], run_mode=RunMode.MULTIRUN)
        written = OmegaConf.to_container(master, resolve=False)
        assert isinstance(written, dict)
        plain = {key: value for key, value in written.items()
                 if key != "hydra" and isinstance(value, (bool, int, float, str)) and "${" not in str(value)}
    jobs = [[f"{key!s}={override_value(value, turn)}" for key, value in plain.items()] for turn in (1, 2, 3)]
    hydras, fast, compositions = compose_both_ways(HYDRA_CONFIGS, config_name, jobs)
    assert fast == hydras
    assert compositions.derived == 2  # the first job composed, the others derived (equal jobs too)


def test_the_example_app() -> None:
    assert_same(EXAMPLE_APP, "config", [[f"lr={lr}", f"seed={seed}"] for lr in (0.1, 0.01) for seed in (1, 2)],
                derived=3)
