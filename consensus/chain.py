"""Building, validating and verifying blocks: one rule book for all roles.

The proposer executes its batch to build a block (the header carries the
state root *after* the block and the root of the per-transaction results);
a replica re-executes the proposal on its own copy of the parent state and
accepts it only if it gets the same roots; a follower, or ``fedchain chain
verify``, does the same for every block from the genesis, after checking
each block's commit certificate against the validator set in force at its
height (votes of validator epoch e sign ``contracts.epoch_chain_id(chain,
e)``, so a chain across set changes verifies from its bytes alone). Because
all three run the same :meth:`Executor.validate_block`, a chain that
verifies is exactly a chain the replicas would have built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fedchain.p2p.identity import PeerId, SignatureMemo

from .block import (
    NULL_PROPOSER,
    Block,
    BlockHeader,
    check_body,
    decode_block,
    results_root,
    tx_root,
)
from .contracts import (
    BlockContext,
    ContractRegistry,
    TxResult,
    default_registry,
    epoch_chain_id,
    execute_transactions,
    validator_epoch,
    validators_of,
)
from .errors import ConsensusError, InvalidBlock, InvalidCertificate, MalformedMessage
from .genesis import Genesis
from .state import State
from .tx import SignatureCache, Transaction

__all__ = ["ChainReport", "ChainTip", "Executor", "verify_chain"]


@dataclass(frozen=True, slots=True)
class ChainTip:
    """Where a chain stands: the last final block and the state after it."""

    height: int
    block_hash: bytes
    timestamp: int
    state: State

    @classmethod
    def of_genesis(cls, genesis: Genesis) -> ChainTip:
        return cls(0, genesis.hash, genesis.genesis_time, genesis.state())

    @property
    def validators(self) -> list[PeerId]:
        """The set that votes on the next block."""
        return validators_of(self.state)

    @property
    def epoch(self) -> int:
        """The epoch of that set: how many changes the set has had."""
        return validator_epoch(self.state)


class Executor:
    """The deterministic rules of one chain: its genesis and its contracts.

    With ``cache_blocks > 0`` it remembers the state after the last blocks
    it built or validated, keyed by (parent state root, block hash). That is
    sound because the parent root commits to the whole parent state and the
    hash to the header, which commits to the transactions, results and
    resulting root, so once the body matches the header (checked every
    time, with the signatures) re-execution could only give the cached
    answer. Replicas that share one executor in a simulation then execute
    each block once instead of once per replica; a shared
    :class:`SignatureCache` likewise verifies each signature once."""

    def __init__(
        self,
        genesis: Genesis,
        registry: ContractRegistry | None = None,
        *,
        cache_blocks: int = 0,
        signatures: SignatureCache | None = None,
        votes: SignatureMemo | None = None,
    ) -> None:
        if signatures is not None and signatures.chain_id != genesis.chain_id:
            raise ValueError("the signature cache is for another chain")
        self.signatures = signatures
        self.votes = votes
        """Commit votes already verified (as PBFT COMMITs, by this process):
        a certificate check then verifies only the votes it has not seen."""
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.params = genesis.params
        self.registry = registry if registry is not None else default_registry()
        self.cache_blocks = cache_blocks
        self._cache: OrderedDict[
            tuple[bytes, bytes], tuple[State, tuple[Transaction, ...], tuple[TxResult, ...]]
        ] = OrderedDict()
        self.cache_hits = 0

    def _remember(self, parent: State, block: Block, state: State) -> None:
        if self.cache_blocks > 0:
            self._cache[(parent.root, block.hash)] = (state, block.txs, block.results)
            self._cache.move_to_end((parent.root, block.hash))
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)

    def build_block(
        self,
        tip: ChainTip,
        txs: Sequence[Transaction],
        *,
        timestamp: int,
        view: int,
        proposer: PeerId,
    ) -> tuple[Block, State]:
        """Execute ``txs`` (already signature-checked) on the tip: the
        proposal, without certificate, and the state after it."""
        if len(txs) > self.params.max_block_txs:
            raise ValueError("more transactions than a block may hold")
        timestamp = max(timestamp, tip.timestamp)
        context = BlockContext(self.chain_id, tip.height + 1, timestamp, proposer)
        state, results = execute_transactions(tip.state, txs, self.registry, context)
        header = BlockHeader(
            height=tip.height + 1,
            prev_hash=tip.block_hash,
            timestamp=timestamp,
            view=view,
            proposer=proposer,
            tx_count=len(txs),
            tx_root=tx_root(txs),
            results_root=results_root(results),
            state_root=state.root,
        )
        block = Block(header, tuple(txs), tuple(results))
        self._remember(tip.state, block, state)
        return block, state

    def null_block(self, tip: ChainTip, view: int) -> Block:
        """The canonical block of a null request at the height after ``tip``
        (``block`` module docstring): nothing in it is anyone's choice."""
        header = BlockHeader(
            height=tip.height + 1,
            prev_hash=tip.block_hash,
            timestamp=tip.timestamp,
            view=view,
            proposer=NULL_PROPOSER,
            tx_count=0,
            tx_root=tx_root(()),
            results_root=results_root(()),
            state_root=tip.state.root,
        )
        return Block(header, (), ())

    def validate_block(
        self,
        tip: ChainTip,
        block: Block,
        *,
        verified: Callable[[Transaction], bool] | None = None,
    ) -> State:
        """The state after ``block`` if it follows from ``tip``, else InvalidBlock.

        Checks the link, limits, roots and every signature (skipping those
        for which ``verified(tx)`` is true: the mempool already checked
        that exact transaction and signature), then re-executes. The
        certificate is not checked here (a proposal has none yet)."""
        header = block.header
        if block.is_null:
            if block.txs or block.results or header != self.null_block(tip, header.view).header:
                raise InvalidBlock("a null block is not the canonical one for its parent")
            return tip.state
        if header.height != tip.height + 1:
            raise InvalidBlock(f"height {header.height} does not follow {tip.height}")
        if header.prev_hash != tip.block_hash:
            raise InvalidBlock("previous hash does not match the parent")
        if header.timestamp < tip.timestamp:
            raise InvalidBlock("timestamp is before the parent's")
        cached = self._cache.get((tip.state.root, block.hash)) if self.cache_blocks else None
        if cached is not None and cached[1] is block.txs and cached[2] is block.results:
            # This very body (the same immutable tuples) passed every check
            # below against this header when it was proposed; a replica's
            # commit re-validates the proposal it validated then (the
            # transaction root alone is ~2 ms for 1,000 transactions).
            self.cache_hits += 1
            return cached[0]
        if len(block.txs) > self.params.max_block_txs:
            raise InvalidBlock("too many transactions")
        if sum(len(tx.encoded) for tx in block.txs) > self.params.max_block_bytes:
            raise InvalidBlock("transactions exceed the block byte limit")
        if any(len(tx.encoded) > self.params.max_tx_bytes for tx in block.txs):
            raise InvalidBlock("a transaction exceeds the size limit")
        check_body(block)
        check = self.signatures.verify if self.signatures is not None else self._verify
        for tx in block.txs:
            if (verified is None or not verified(tx)) and not check(tx):
                raise InvalidBlock(f"transaction {tx.digest.hex()[:16]} has a bad signature")
        if cached is not None:
            self.cache_hits += 1
            return cached[0]
        context = BlockContext(self.chain_id, header.height, header.timestamp, header.proposer)
        state, results = execute_transactions(tip.state, block.txs, self.registry, context)
        if tuple(results) != block.results:
            first = next(
                i for i, (a, b) in enumerate(zip(results, block.results, strict=False)) if a != b
            )
            raise InvalidBlock(f"result of transaction {first} differs on re-execution")
        if state.root != header.state_root:
            raise InvalidBlock("state root differs on re-execution")
        self._remember(tip.state, block, state)
        return state

    def _verify(self, tx: Transaction) -> bool:
        return tx.verify(self.chain_id)

    def vote_chain_id(self, tip: ChainTip) -> str:
        """The chain id the votes on the block after ``tip`` sign: that of
        the validator epoch in force after ``tip`` (:func:`~.contracts.epoch_chain_id`)."""
        return epoch_chain_id(self.chain_id, tip.epoch)

    def check_certificate(self, tip: ChainTip, block: Block) -> None:
        """Raise InvalidCertificate unless a quorum of the validators in
        force after ``tip`` signed this block's height and hash, with the
        chain id of their epoch (so votes of a retired set never count)."""
        cert = block.certificate
        if cert is None:
            raise InvalidCertificate("the block has no commit certificate")
        if cert.height != block.height or cert.block_hash != block.certified_digest:
            raise InvalidCertificate("the certificate is for another block")
        if block.is_null and cert.view != block.header.view:
            raise InvalidCertificate("a null block's certificate is from another view")
        if not cert.is_valid(self.vote_chain_id(tip), tip.validators, memo=self.votes):
            raise InvalidCertificate("the certificate lacks a quorum of validator signatures")

    def apply_final(self, tip: ChainTip, block: Block) -> ChainTip:
        """Check certificate and block; the tip after it."""
        self.check_certificate(tip, block)
        state = self.validate_block(tip, block)
        return ChainTip(block.height, block.hash, block.header.timestamp, state)


@dataclass(frozen=True, slots=True)
class ChainReport:
    """``ok`` with ``height`` the last verified block, or the first broken
    ``height`` and why (``error``). ``tip`` is the last good tip."""

    ok: bool
    height: int
    error: str | None
    tip: ChainTip


def verify_chain(
    genesis: Genesis,
    encoded_blocks: Iterable[bytes],
    registry: ContractRegistry | None = None,
) -> ChainReport:
    """Verify a chain from block bytes alone, stopping at the first bad block."""
    executor = Executor(genesis, registry)
    tip = ChainTip.of_genesis(genesis)
    for data in encoded_blocks:
        height = tip.height + 1
        try:
            block = decode_block(
                data,
                max_bytes=genesis.params.max_block_bytes + 1024 * 1024,
                max_tx_bytes=genesis.params.max_tx_bytes,
            )
            tip = executor.apply_final(tip, block)
        except (MalformedMessage, ConsensusError) as exc:
            return ChainReport(False, height, f"{exc.reason}: {exc}", tip)
    return ChainReport(True, tip.height, None, tip)
