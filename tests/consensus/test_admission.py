"""Admission paced by commits: the limit follows the measured commit rate."""

from __future__ import annotations

import pytest

from fedchain.consensus.admission import CommitPacedLimit


def test_the_floor_holds_until_commits_show_a_rate() -> None:
    pacer = CommitPacedLimit(floor=200, queue_seconds=2.0, window=4.0)
    assert pacer.limit() == 200 and pacer.rate == 0.0
    assert pacer.committed(1.0, 40) == 200  # 10 tx/s x 2 s is below the floor


def test_the_limit_is_the_windowed_rate_times_the_target_delay() -> None:
    pacer = CommitPacedLimit(floor=100, queue_seconds=2.0, window=4.0)
    for second in range(1, 9):  # 1,000 tx/s for 8 s
        limit = pacer.committed(float(second), 1_000)
    assert pacer.rate == 1_000.0 and limit == 2_000
    assert pacer.limit(validators=4) == 500  # each validator's share
    assert CommitPacedLimit(floor=10).limit(validators=4) == 3  # of the floor too


def test_old_commits_leave_the_window() -> None:
    pacer = CommitPacedLimit(floor=100, queue_seconds=1.0, window=4.0)
    pacer.committed(0.0, 10_000)
    assert pacer.limit() == 2_500
    # 4 s later the burst is out of the window; only the new block counts.
    assert pacer.committed(4.0, 400) == 100
    assert pacer.rate == 100.0


def test_the_share_is_this_validators_part_of_the_commits_but_at_least_one_nth() -> None:
    """Forwards go to the primary alone, so a validator cannot count who
    else has clients; it takes its own clients' part of what committed."""
    alone = CommitPacedLimit(floor=100, queue_seconds=2.0, window=4.0)
    for second in range(1, 5):
        alone.committed(float(second), 1_000, own=1_000)
    assert alone.own_fraction == 1.0 and alone.limit(validators=4) == 2_000  # serves everyone
    even = CommitPacedLimit(floor=100, queue_seconds=2.0, window=4.0)
    for second in range(1, 5):
        even.committed(float(second), 1_000, own=250)
    assert even.limit(validators=4) == 500  # an even spread adds up to the limit
    crowded = CommitPacedLimit(floor=100, queue_seconds=2.0, window=4.0)
    for second in range(1, 5):
        crowded.committed(float(second), 1_000, own=10)
    assert crowded.limit(validators=4) == 500  # never below 1/n: it climbs back
    # Once its own commits leave the window, the share goes with them.
    assert alone.committed(8.0, 1_000, own=0, validators=4) == 125  # 250 tx/s x 2 s / 4
    assert alone.own_fraction == 0.0


def test_own_commits_are_a_part_of_the_count() -> None:
    pacer = CommitPacedLimit(floor=10)
    with pytest.raises(ValueError):
        pacer.committed(1.0, 5, own=6)
    with pytest.raises(ValueError):
        pacer.committed(1.0, 5, own=-1)
    assert pacer.rate == 0.0 and pacer.own_fraction is None  # nothing recorded


@pytest.mark.parametrize(
    "kwargs", [{"floor": 0}, {"floor": 1, "queue_seconds": 0}, {"floor": 1, "window": -1.0}]
)
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CommitPacedLimit(**kwargs)
