"""The strategies as pure functions: each picks its own sequence on heterogeneous sources."""

from __future__ import annotations

import pytest

from hsm_core.strategies import STRATEGIES, SourceView, capability_based, least_loaded, round_robin

# a: a big CPU box; b: fewer slots but GPUs (weight 3); c: a laptop with one slot.
SOURCES = [SourceView("a", slots=4, running=0), SourceView("b", slots=2, running=0, weight=3.0),
           SourceView("c", slots=1, running=0)]


def dispatch(strategy, count: int, sources=SOURCES) -> list[str | None]:
    """Pick `count` times, no job finishing in between."""
    running = {source.name: source.running for source in sources}
    picks: list[str | None] = []
    for _ in range(count):
        views = [SourceView(s.name, s.slots, running[s.name], s.weight, s.failures) for s in sources]
        pick = strategy(views, picks[-1] if picks else None)
        picks.append(pick)
        if pick is not None:
            running[pick] += 1
    return picks


def test_round_robin_rotates_over_sources_with_a_free_slot() -> None:
    assert dispatch(round_robin, 8) == ["a", "b", "c", "a", "b", "a", "a", None]


def test_least_loaded_fills_the_lowest_share_of_busy_slots() -> None:
    assert dispatch(least_loaded, 8) == ["a", "b", "c", "a", "a", "b", "a", None]


def test_capability_based_follows_free_slots_times_weight() -> None:
    assert dispatch(capability_based, 8) == ["b", "a", "a", "b", "a", "a", "c", None]


def test_the_three_sequences_differ() -> None:
    assert len({tuple(dispatch(strategy, 7)) for strategy in STRATEGIES.values()}) == 3


@pytest.mark.parametrize("strategy", [least_loaded, capability_based])
def test_ties_go_to_fewer_past_failures(strategy) -> None:
    sources = [SourceView("flaky", 2, 0, failures=2), SourceView("sound", 2, 0)]
    assert strategy(sources, None) == "sound"


@pytest.mark.parametrize("strategy", list(STRATEGIES.values()))
def test_no_free_slot_means_no_pick(strategy) -> None:
    assert strategy([SourceView("a", 1, 1), SourceView("b", 2, 2)], "a") is None
