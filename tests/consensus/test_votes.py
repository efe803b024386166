"""Commit votes and certificates: quorum intersection and certificate checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedchain.consensus.votes import (
    CommitCertificate,
    max_faulty,
    quorum,
    sign_commit_vote,
)
from fedchain.p2p.identity import Identity


@pytest.mark.parametrize("n", range(1, 40))
def test_any_two_quorums_share_an_honest_validator(n):
    f, q = max_faulty(n), quorum(n)
    assert 2 * q - n >= f + 1  # the overlap outnumbers the faulty
    assert q <= n - f  # and the honest alone can form one (liveness)
    if n % 3 == 1:
        assert q == 2 * f + 1


def test_certificates_need_a_quorum_of_distinct_valid_signers():
    rng = np.random.default_rng(1)
    validators = [Identity.from_rng(rng) for _ in range(4)]
    keys = [v.public_key for v in validators]
    block = bytes(range(32))
    votes = [(v.public_key, sign_commit_vote(v, "test", 5, block, view=2)) for v in validators]
    assert CommitCertificate.of(5, block, votes[:3], view=2).is_valid("test", keys)
    assert not CommitCertificate.of(5, block, votes[:2], view=2).is_valid("test", keys)
    assert not CommitCertificate.of(6, block, votes, view=2).is_valid("test", keys)  # height
    assert not CommitCertificate.of(5, block, votes, view=2).is_valid("other chain", keys)
    doubled = CommitCertificate(5, block, (votes[0], votes[0], votes[1]), 2)
    assert not doubled.is_valid("test", keys)
    outsider = Identity.from_rng(rng)
    forged = [
        *votes[:2],
        (outsider.public_key, sign_commit_vote(outsider, "test", 5, block, view=2)),
    ]
    assert not CommitCertificate.of(5, block, forged, view=2).is_valid("test", keys)


def test_votes_from_different_views_never_make_a_certificate():
    """Pooled votes of two views could certify a block that never committed."""
    rng = np.random.default_rng(2)
    validators = [Identity.from_rng(rng) for _ in range(4)]
    keys = [v.public_key for v in validators]
    block = bytes(range(32))
    mixed = [
        (validators[0].public_key, sign_commit_vote(validators[0], "test", 5, block, view=1)),
        (validators[1].public_key, sign_commit_vote(validators[1], "test", 5, block, view=3)),
        (validators[2].public_key, sign_commit_vote(validators[2], "test", 5, block, view=3)),
    ]
    assert not CommitCertificate.of(5, block, mixed, view=3).is_valid("test", keys)
    assert not CommitCertificate.of(5, block, mixed, view=1).is_valid("test", keys)
    same = [*mixed[1:], (keys[3], sign_commit_vote(validators[3], "test", 5, block, view=3))]
    assert CommitCertificate.of(5, block, same, view=3).is_valid("test", keys)
