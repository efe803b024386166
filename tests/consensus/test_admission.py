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


@pytest.mark.parametrize(
    "kwargs", [{"floor": 0}, {"floor": 1, "queue_seconds": 0}, {"floor": 1, "window": -1.0}]
)
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CommitPacedLimit(**kwargs)
