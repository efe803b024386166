"""Building, validating and verifying chains from the genesis and block
bytes alone; every kind of break is reported at its height."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from fedchain.consensus.block import (
    NULL_DIGEST,
    Block,
    decode_block,
    encode_block,
    results_root,
    tx_root,
)
from fedchain.consensus.chain import ChainTip, Executor, verify_chain
from fedchain.consensus.contracts import (
    ContractRegistry,
    KvContract,
    TxResult,
    epoch_chain_id,
    kv_key,
    kv_set,
    validator_change_transaction,
)
from fedchain.consensus.errors import InvalidBlock, InvalidCertificate, MalformedMessage
from fedchain.consensus.genesis import ConsensusParams, Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.tx import (
    SignatureCache,
    Transaction,
    decode_transaction,
    sign_transaction,
)
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity

CHAIN = "chain-test"
VALIDATORS = [Identity(bytes([i + 1]) * 32) for i in range(4)]
NEWCOMER = Identity(b"n" * 32)
ALICE = Identity(b"a" * 32)
GENESIS = Genesis.create(
    CHAIN,
    1_000,
    [v.public_key for v in VALIDATORS],
    {"hello": "world"},
    ConsensusParams(max_block_txs=50, state_buckets=16),
)


def kv(nonce: int, key: str = "k", who: Identity = ALICE) -> Transaction:
    content = kv_set(key, nonce)
    return sign_transaction(who, CHAIN, type="kv", content=content, nonce=nonce, timestamp=0)


def certify(block: Block, signers: list[Identity], chain_id: str = CHAIN) -> Block:
    votes = [
        (s.public_key, sign_commit_vote(s, chain_id, block.height, block.hash, view=0))
        for s in signers
    ]
    return block.with_certificate(CommitCertificate.of(block.height, block.hash, votes, view=0))


def grow(
    executor: Executor,
    tip: ChainTip,
    batches: list[list[Transaction]],
    signers=VALIDATORS[:3],
    chain_id: str = CHAIN,
) -> tuple[list[Block], ChainTip]:
    blocks = []
    for i, txs in enumerate(batches):
        block, state = executor.build_block(
            tip, txs, timestamp=tip.timestamp + 10 * i, view=0, proposer=VALIDATORS[0].public_key
        )
        block = certify(block, signers, chain_id)
        blocks.append(block)
        tip = ChainTip(block.height, block.hash, block.header.timestamp, state)
    return blocks, tip


def three_blocks() -> tuple[list[Block], ChainTip]:
    executor = Executor(GENESIS)
    return grow(executor, ChainTip.of_genesis(GENESIS), [[kv(0), kv(1)], [], [kv(2), kv(2), kv(3)]])


def test_a_good_chain_verifies() -> None:
    blocks, tip = three_blocks()
    report = verify_chain(GENESIS, [encode_block(b) for b in blocks])
    assert report.ok and report.height == 3 and report.error is None
    assert report.tip.block_hash == tip.block_hash and report.tip.state.root == tip.state.root
    assert report.tip.state.get(kv_key(ALICE.public_key, "k")) == 3
    assert blocks[2].results == (
        TxResult(0),
        TxResult(1, "bad nonce: expected 3"),
        TxResult(0),
    )
    assert verify_chain(GENESIS, []).ok


def test_links_are_to_the_genesis_and_each_parent() -> None:
    blocks, _ = three_blocks()
    assert blocks[0].header.prev_hash == GENESIS.hash
    assert [b.header.prev_hash for b in blocks[1:]] == [b.hash for b in blocks[:2]]
    assert [b.height for b in blocks] == [1, 2, 3]


def _report_for(blocks: list[Block], index: int, data: bytes):
    encoded = [encode_block(b) for b in blocks]
    encoded[index] = data
    return verify_chain(GENESIS, encoded)


def test_each_break_is_reported_at_its_height() -> None:
    blocks, _ = three_blocks()
    b2 = blocks[1]
    header = b2.header
    cases = {
        "garbage": b"\xc1",
        "no certificate": encode_block(replace(b2, certificate=None)),
        "too few votes": encode_block(certify(replace(b2, certificate=None), VALIDATORS[:2])),
        "outsiders": encode_block(
            certify(replace(b2, certificate=None), [ALICE, NEWCOMER, VALIDATORS[0]])
        ),
        "wrong parent": encode_block(
            certify(Block(replace(header, prev_hash=b"\x00" * 32), (), ()), VALIDATORS)
        ),
        "wrong height": encode_block(certify(Block(replace(header, height=3), (), ()), VALIDATORS)),
        "wrong state root": encode_block(
            certify(Block(replace(header, state_root=b"\x00" * 32), (), ()), VALIDATORS)
        ),
        "time goes back": encode_block(
            certify(Block(replace(header, timestamp=999), (), ()), VALIDATORS)
        ),
        "skipped block": encode_block(blocks[2]),
    }
    for name, data in cases.items():
        report = _report_for(blocks, 1, data)
        assert not report.ok, name
        assert report.height == 2, name
        assert report.tip.height == 1, name
    assert "malformed" in _report_for(blocks, 1, cases["garbage"]).error
    assert "invalid_certificate" in _report_for(blocks, 1, cases["too few votes"]).error
    assert "previous hash" in _report_for(blocks, 1, cases["wrong parent"]).error
    assert "state root" in _report_for(blocks, 1, cases["wrong state root"]).error


def test_signed_but_wrong_execution_is_caught_by_re_execution() -> None:
    """Even a quorum of validators cannot certify a block that lies about
    what its transactions did."""
    blocks, _ = three_blocks()
    b3 = blocks[2]
    lying = (TxResult(0), TxResult(0), TxResult(0))
    header = replace(b3.header, results_root=results_root(lying))
    forged = certify(Block(header, b3.txs, lying), VALIDATORS)
    report = _report_for(blocks, 2, encode_block(forged))
    assert not report.ok and report.height == 3 and "differs on re-execution" in report.error


def test_a_bad_transaction_signature_breaks_the_block() -> None:
    blocks, _ = three_blocks()
    b1 = blocks[0]
    bad_tx = decode_transaction(b1.txs[0].encoded[:-64] + bytes(64))
    txs = (bad_tx, b1.txs[1])
    header = replace(b1.header, tx_root=tx_root(txs))
    forged = certify(Block(header, txs, b1.results), VALIDATORS)
    report = _report_for(blocks, 0, encode_block(forged))
    assert not report.ok and report.height == 1 and "bad signature" in report.error


def test_the_validator_set_changes_on_chain() -> None:
    executor = Executor(GENESIS)
    tip = ChainTip.of_genesis(GENESIS)
    new_set = sorted([NEWCOMER.public_key] + [v.public_key for v in VALIDATORS[1:]])
    change = validator_change_transaction(ALICE, CHAIN, new_set, VALIDATORS[1:], epoch=0, nonce=0)
    first, tip = grow(executor, tip, [[change]], VALIDATORS[:3])
    assert first[0].results == (TxResult(0),)
    assert tip.validators == new_set
    # from height 2 on the new set signs, with epoch 1's chain id:
    # VALIDATORS[0] is out, NEWCOMER in
    epoch1 = epoch_chain_id(CHAIN, 1)
    old_signers, _ = grow(executor, tip, [[kv(1)]], [VALIDATORS[0], *VALIDATORS[1:3]], epoch1)
    new_signers, _ = grow(executor, tip, [[kv(1)]], [NEWCOMER, *VALIDATORS[1:3]], epoch1)
    good = verify_chain(GENESIS, [encode_block(first[0]), encode_block(new_signers[0])])
    assert good.ok and good.height == 2
    bad = verify_chain(GENESIS, [encode_block(first[0]), encode_block(old_signers[0])])
    assert not bad.ok and bad.height == 2 and "certificate" in bad.error


def test_validate_block_for_proposals() -> None:
    executor = Executor(GENESIS)
    tip = ChainTip.of_genesis(GENESIS)
    proposal, state = executor.build_block(
        tip, [kv(0), kv(1)], timestamp=2_000, view=1, proposer=VALIDATORS[1].public_key
    )
    assert proposal.certificate is None
    assert executor.validate_block(tip, proposal).root == state.root
    assert decode_block(encode_block(proposal)) == proposal
    with pytest.raises(InvalidCertificate):
        executor.check_certificate(tip, proposal)
    with pytest.raises(InvalidBlock, match="height"):
        executor.validate_block(replace(tip, height=5), proposal)
    late = replace(tip, timestamp=proposal.header.timestamp + 1)
    with pytest.raises(InvalidBlock, match="timestamp"):
        executor.validate_block(late, proposal)
    # the proposer's clock cannot go back: build clamps to the parent's time
    early, _ = executor.build_block(tip, [], timestamp=5, view=0, proposer=b"\x01" * 32)
    assert early.header.timestamp == GENESIS.genesis_time
    with pytest.raises(ValueError):
        executor.build_block(tip, [kv(0)] * 51, timestamp=0, view=0, proposer=b"\x01" * 32)


def test_validation_reuses_mempool_signature_checks() -> None:
    executor = Executor(GENESIS)
    tip = ChainTip.of_genesis(GENESIS)
    pool = Mempool(CHAIN)
    for nonce in range(3):
        pool.add(kv(nonce))
    proposal, _ = executor.build_block(
        tip, pool.reap(10, 10**6), timestamp=0, view=0, proposer=VALIDATORS[0].public_key
    )
    checked = []

    def verified(tx: Transaction) -> bool:
        checked.append(tx.digest)
        return pool.verified(tx)

    executor.validate_block(tip, proposal, verified=verified)
    assert len(checked) == 3
    pool.remove_committed(tx.digest for tx in proposal.txs)
    assert len(pool) == 0


def test_a_custom_registry_changes_what_verifies() -> None:
    blocks, _ = three_blocks()
    no_kv = ContractRegistry()
    report = verify_chain(GENESIS, [encode_block(b) for b in blocks], no_kv)
    assert not report.ok and report.height == 1
    same = ContractRegistry({"kv": KvContract()})
    assert verify_chain(GENESIS, [encode_block(b) for b in blocks], same).ok


def test_a_block_over_the_byte_limit_is_refused() -> None:
    genesis = Genesis.create(
        CHAIN, 0, [v.public_key for v in VALIDATORS], params=ConsensusParams(max_block_bytes=300)
    )
    executor = Executor(genesis)
    tip = ChainTip.of_genesis(genesis)
    block, _ = executor.build_block(
        tip, [kv(0), kv(1), kv(2)], timestamp=0, view=0, proposer=VALIDATORS[0].public_key
    )
    with pytest.raises(InvalidBlock, match="byte limit"):
        executor.validate_block(tip, block)
    assert msgpack.unpackb(encode_block(block))[3] is None


def test_a_shared_executor_executes_each_block_once_and_still_checks_the_body() -> None:
    executor = Executor(GENESIS, cache_blocks=4)
    tip = ChainTip.of_genesis(GENESIS)
    block, state = executor.build_block(
        tip, [kv(0), kv(1)], timestamp=0, view=0, proposer=VALIDATORS[0].public_key
    )
    for _replica in range(3):
        assert executor.validate_block(tip, block) is state
    assert executor.cache_hits == 3
    # An equal body decoded from bytes (other objects) is checked again in full.
    copy = decode_block(encode_block(block))
    assert copy.txs is not block.txs and executor.validate_block(tip, copy) is state
    forged = replace(block, txs=block.txs[::-1])  # same header, other body
    with pytest.raises(InvalidBlock, match="Merkle root"):
        executor.validate_block(tip, forged)
    other_parent = replace(tip, state=tip.state.update({"hello": "there"}))
    with pytest.raises(InvalidBlock, match="state root"):
        executor.validate_block(other_parent, block)


def test_a_shared_signature_cache_serves_validation() -> None:
    cache = SignatureCache(CHAIN)
    executor = Executor(GENESIS, signatures=cache)
    tip = ChainTip.of_genesis(GENESIS)
    block, _ = executor.build_block(
        tip, [kv(0), kv(1)], timestamp=0, view=0, proposer=VALIDATORS[0].public_key
    )
    for _replica in range(3):
        executor.validate_block(tip, block)
    assert (cache.misses, cache.hits) == (2, 4)
    with pytest.raises(ValueError):
        Executor(GENESIS, signatures=SignatureCache("other"))


def certify_null(block: Block, signers: list[Identity], view: int) -> Block:
    votes = [
        (s.public_key, sign_commit_vote(s, CHAIN, block.height, NULL_DIGEST, view=view))
        for s in signers
    ]
    return block.with_certificate(CommitCertificate.of(block.height, NULL_DIGEST, votes, view=view))


def test_a_null_height_verifies_as_the_canonical_empty_block() -> None:
    """A NEW-VIEW's null request takes a height: its certificate signs
    NULL_DIGEST, and the block is the one canonical empty block for its
    parent, so the chain still verifies from its bytes alone."""
    executor = Executor(GENESIS)
    blocks, tip = three_blocks()
    null = certify_null(executor.null_block(tip, view=2), VALIDATORS[:3], view=2)
    assert null.is_null and null.hash != NULL_DIGEST
    decoded = decode_block(encode_block(null))
    assert decoded == null and decoded.certificate.block_hash == NULL_DIGEST
    after = executor.apply_final(tip, decoded)
    assert after.state.root == tip.state.root and after.height == tip.height + 1
    more, _ = grow(executor, after, [[kv(4)]])
    chain = [encode_block(b) for b in [*blocks, null, *more]]
    report = verify_chain(GENESIS, chain)
    assert report.ok, report.error
    assert report.height == 5


def test_a_null_block_that_is_not_canonical_or_not_null_certified_breaks_the_chain() -> None:
    executor = Executor(GENESIS)
    blocks, tip = three_blocks()
    canonical = executor.null_block(tip, view=1)
    variants = {
        "state root": replace(canonical.header, state_root=bytes(range(32))),
        "timestamp": replace(canonical.header, timestamp=tip.timestamp + 1),
        "view": replace(canonical.header, view=2),  # certificate from view 1
    }
    for what, header in variants.items():
        bad = certify_null(Block(header, (), ()), VALIDATORS[:3], view=1)
        report = verify_chain(GENESIS, [encode_block(b) for b in [*blocks, bad]])
        assert not report.ok and report.height == 4, what
    # With a transaction in it, a "null" block is not canonical either.
    tx = kv(4)
    body = Block(
        replace(
            canonical.header, tx_root=tx_root([tx]), results_root=results_root([TxResult(0, "")])
        ),
        (tx,),
        (TxResult(0, ""),),
    )
    report = verify_chain(
        GENESIS, [encode_block(b) for b in [*blocks, certify_null(body, VALIDATORS[:3], 1)]]
    )
    assert not report.ok and report.height == 4
    # Votes for the header hash do not certify a null block: they sign NULL_DIGEST.
    with pytest.raises(ValueError):
        certify(canonical, VALIDATORS[:3])
    # Too few null votes.
    report = verify_chain(
        GENESIS, [encode_block(b) for b in [*blocks, certify_null(canonical, VALIDATORS[:2], 1)]]
    )
    assert not report.ok and "quorum" in report.error


def test_the_null_marker_is_no_validator_key() -> None:
    with pytest.raises(MalformedMessage):
        Genesis.create(CHAIN, 0, [bytes(32), VALIDATORS[0].public_key])
