"""Backoff, quarantine and keepalive arithmetic, driven by plain numbers (no sleeping)."""

from hsm_core.breaker import RetryPolicy, SourceBreaker, State
from hsm_core.remote_machine import keepalive_detection_bound


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(first_delay=1, factor=2, max_delay=30)
    assert [policy.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_source_that_never_became_ready_is_not_retried() -> None:
    breaker = SourceBreaker(RetryPolicy())
    assert breaker.failed(now=100.0, reason="host key mismatch") is State.QUARANTINED
    assert breaker.retry_at is None and breaker.reason == "host key mismatch"


def test_a_lost_source_reconnects_with_backoff_then_is_quarantined() -> None:
    breaker = SourceBreaker(RetryPolicy(first_delay=1, factor=2, quarantine_after=3, quarantine_after_s=0))
    breaker.ready()
    assert breaker.failed(now=10.0, reason="connection lost") is State.RECONNECTING
    assert breaker.retry_at == 11.0
    breaker.ready()  # reconnected, but no job went through yet: failures still count
    assert breaker.failed(now=20.0, reason="connection lost") is State.RECONNECTING
    assert breaker.retry_at == 22.0
    breaker.ready()
    assert breaker.failed(now=30.0, reason="connection lost") is State.QUARANTINED


def test_a_job_going_through_forgives_earlier_failures() -> None:
    breaker = SourceBreaker(RetryPolicy(quarantine_after=2, quarantine_after_s=0))
    breaker.ready()
    breaker.failed(now=0.0, reason="blip")
    breaker.ready()
    breaker.worked()
    assert breaker.failed(now=5.0, reason="blip") is State.RECONNECTING


def test_keepalive_declares_a_silent_host_lost_after_interval_times_count_plus_one() -> None:
    assert keepalive_detection_bound(15, 3) == 60  # the defaults: about a minute
    assert keepalive_detection_bound(1, 3) == 4


def test_quick_failures_after_a_wake_are_no_lost_machine() -> None:
    """Refused three times in 3 s (the network coming back): still reconnecting; failing for
    longer than the bound (60 s): out."""
    breaker = SourceBreaker(RetryPolicy(first_delay=1, factor=2, quarantine_after=3, quarantine_after_s=60))
    breaker.ready()
    for now in (100.0, 101.0, 103.0):
        assert breaker.failed(now=now, reason="connection refused") is State.RECONNECTING
    assert breaker.retry_at == 107.0
    assert breaker.failed(now=130.0, reason="connection refused") is State.RECONNECTING
    assert breaker.failed(now=160.0, reason="connection refused") is State.QUARANTINED
