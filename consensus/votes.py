"""Commit votes and certificates: what makes a block final.

A validator's commit vote signs ``(chain id, height, view, block hash)``. A
block is final with a certificate of votes from a quorum (2f + 1 of
n = 3f + 1) of distinct validators *in one view*: PBFT's safety argument
covers a quorum of COMMITs from a single view, and only that. Votes from
different views must not be pooled: a validator may vote for a block in one
view that a later view replaces with another, so pooled votes could certify
a block that never committed. anyone holding the validator set can check it from
the block's bytes alone, which is what lets followers and ``fedchain chain
verify`` trust a chain without trusting the node that served it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedchain.p2p.identity import Identity, PeerId, SignatureMemo, verify_with

__all__ = [
    "CommitCertificate",
    "commit_vote_bytes",
    "max_faulty",
    "quorum",
    "sign_commit_vote",
]

_DOMAIN = b"fedchain/commit-vote/v1\x00"


def max_faulty(n: int) -> int:
    """f: how many Byzantine validators n = 3f + 1 tolerate."""
    return (n - 1) // 3


def quorum(n: int) -> int:
    """Votes needed among ``n`` validators: 2f + 1 when n = 3f + 1.

    In general ``floor((n + f) / 2) + 1``, the smallest size for which any
    two quorums share at least f + 1 validators, so at least one honest one.
    (Plain 2f + 1 is unsafe for other n: with n = 5, f = 1, two quorums of
    3 may meet in the one faulty validator.)
    """
    return (n + max_faulty(n)) // 2 + 1


def commit_vote_bytes(chain_id: str, height: int, block_hash: bytes, *, view: int) -> bytes:
    if len(block_hash) != 32 or not 0 <= height < 2**63 or not 0 <= view < 2**63:
        raise ValueError("a vote names a height, a view and a 32-byte block hash")
    chain = chain_id.encode()
    return b"".join(
        (
            _DOMAIN,
            len(chain).to_bytes(2, "big"),
            chain,
            height.to_bytes(8, "big"),
            view.to_bytes(8, "big"),
            block_hash,
        )
    )


def sign_commit_vote(
    identity: Identity, chain_id: str, height: int, block_hash: bytes, *, view: int
) -> bytes:
    return identity.sign(commit_vote_bytes(chain_id, height, block_hash, view=view))


@dataclass(frozen=True)
class CommitCertificate:
    """Votes for one block cast in one view, sorted by validator key (a
    canonical form)."""

    height: int
    block_hash: bytes
    votes: tuple[tuple[PeerId, bytes], ...]
    view: int

    @classmethod
    def of(
        cls, height: int, block_hash: bytes, votes: Iterable[tuple[PeerId, bytes]], *, view: int
    ) -> CommitCertificate:
        unique = dict(votes)
        return cls(height, block_hash, tuple(sorted(unique.items())), view)

    def valid_signers(
        self,
        chain_id: str,
        validators: Sequence[PeerId],
        *,
        memo: SignatureMemo | None = None,
    ) -> set[PeerId]:
        """The validators whose vote in this certificate verifies.

        ``memo`` (a :class:`~fedchain.p2p.identity.SignatureMemo`) skips votes
        already verified through it, e.g. as COMMIT messages by
        :class:`~fedchain.consensus.pbft.Replica`; a vote it does not hold is
        verified (and remembered if good)."""
        members = set(validators)
        message = commit_vote_bytes(chain_id, self.height, self.block_hash, view=self.view)
        return {
            key
            for key, signature in self.votes
            if key in members and verify_with(memo, key, message, signature)
        }

    def is_valid(
        self,
        chain_id: str,
        validators: Sequence[PeerId],
        *,
        memo: SignatureMemo | None = None,
    ) -> bool:
        """A quorum of distinct validators signed this height and hash
        (``memo`` as in :meth:`valid_signers`)."""
        if len({key for key, _ in self.votes}) != len(self.votes):
            return False
        members = set(validators)
        need = quorum(len(validators))
        message = commit_vote_bytes(chain_id, self.height, self.block_hash, view=self.view)
        good = 0
        if need <= 0:
            return True
        for key, signature in self.votes:
            if key in members and verify_with(memo, key, message, signature):
                good += 1
                if good >= need:  # the rest cannot change the answer
                    return True
        return False
