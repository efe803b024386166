"""The consensus error vocabulary (one place, as in trio: few and typed).

Each class says when it is raised. Errors a peer or a client can cause
(malformed bytes, bad signatures, rejected transactions) never crash a node:
the caller catches them, counts them by ``reason``, and answers or drops.
"""

from __future__ import annotations

from fedchain.p2p.errors import MalformedBody


class ConsensusError(Exception):
    """Base of every error raised by ``fedchain.consensus``."""

    reason = "consensus"


class MalformedMessage(MalformedBody):
    """Bytes that should hold a transaction, block, vote or PBFT message
    do not decode as one (wrong shape, types, sizes, non-canonical form).

    A subclass of the p2p ``MalformedBody`` so a node's intake counts it like
    any other refused frame.
    """

    reason = "malformed_consensus"


class InvalidSignature(ConsensusError):
    """A transaction, vote or certificate signature does not verify."""

    reason = "invalid_signature"


class InvalidCertificate(ConsensusError):
    """A commit certificate lacks a quorum of distinct validator signatures
    over the right (height, block hash)."""

    reason = "invalid_certificate"


class InvalidBlock(ConsensusError):
    """A block does not follow from its parent: height, previous hash, Merkle
    root, state root or results do not match what re-execution gives."""

    reason = "invalid_block"


class ChainBroken(ConsensusError):
    """Chain verification found the first bad block; ``height`` says where."""

    reason = "chain_broken"

    def __init__(self, message: str, height: int) -> None:
        super().__init__(message)
        self.height = height


class ContractRejected(ConsensusError):
    """A contract refused a transaction. The transaction is still recorded
    in its block, as rejected with this reason; the state is unchanged."""

    reason = "rejected"


class MempoolFull(ConsensusError):
    """The mempool is at its bound: the client gets an explicit busy reply."""

    reason = "busy"


class DuplicateTransaction(ConsensusError):
    """The transaction (by digest) is already pending or committed, or
    another one holds its sender's nonce (``digest`` is None then)."""

    reason = "duplicate"

    def __init__(self, message: str, digest: bytes | None = None) -> None:
        super().__init__(message)
        self.digest = digest


class StoreError(ConsensusError):
    """The block store cannot do what was asked (closed, wrong height)."""

    reason = "store"


class StoreCorrupted(StoreError):
    """The store's files fail their integrity or checksum checks on open."""

    reason = "store_corrupted"
