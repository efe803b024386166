"""The virtual-time consensus benchmark at a tiny scale: it commits what it
was asked to, the validators agree, the chain verifies from its bytes, and
a seed fixes the chain."""

from __future__ import annotations

import pytest

from fedchain.sims.bench_consensus_virtual import run_virtual

VALIDATORS = 7
BLOCKS = 5


@pytest.fixture(scope="module")
def first() -> dict:
    return run_virtual(VALIDATORS, BLOCKS, seed=3)


def test_every_validator_commits_the_blocks_asked_for_and_they_agree(first: dict) -> None:
    assert first["validators"] == VALIDATORS
    assert first["blocks"] >= BLOCKS
    assert first["agreement"] is True
    assert first["chain_verifies"] is True
    assert first["view"] == 0  # no faults, so no view change
    assert first["null_blocks"] == 0


def test_the_figures_count_real_work(first: dict) -> None:
    assert 0 < first["committed_txs"] <= first["blocks"] * 20
    # Each block needs at least a PRE-PREPARE, PREPAREs and COMMITs to all.
    assert first["messages_delivered"] >= BLOCKS * 3 * (VALIDATORS - 1)
    assert first["messages_per_wall_s"] > 0
    assert 0 < first["virtual_s"] < 30
    assert first["wall_s"] > 0
    assert first["peak_rss_bytes"] > 0


def test_a_seed_fixes_the_chain(first: dict) -> None:
    again = run_virtual(VALIDATORS, BLOCKS, seed=3)
    assert again["tip_hash"] == first["tip_hash"]
    assert again["blocks"] == first["blocks"]
    assert again["messages_delivered"] == first["messages_delivered"]
    other = run_virtual(VALIDATORS, BLOCKS, seed=4)
    assert other["tip_hash"] != first["tip_hash"]


def test_a_run_that_cannot_finish_in_time_says_so() -> None:
    with pytest.raises(RuntimeError, match="slowest validator holds"):
        run_virtual(4, 3, max_virtual_s=0.01)
