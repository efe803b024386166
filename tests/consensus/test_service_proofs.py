"""What a ledger node's service proves to clients when its chain holds null
heights: queries are answered with the last block whose certificate binds
its header, and header chains come straight from the store (real
Executor, real signatures, a real block store and node)."""

from __future__ import annotations

import pytest

from fedchain.consensus.block import NULL_DIGEST, Block, encode_block
from fedchain.consensus.chain import ChainTip, Executor
from fedchain.consensus.client import TrustedValidators
from fedchain.consensus.contracts import kv_key, kv_set
from fedchain.consensus.genesis import ConsensusParams, Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.replica import LedgerReplica
from fedchain.consensus.service import LedgerService, NothingCommitted
from fedchain.consensus.store import SqliteBlockStore, StoredBlock
from fedchain.consensus.tx import sign_transaction
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import Node
from fedchain.p2p.simnet import SimNetwork

CHAIN = "service-proofs"
VALIDATORS = sorted((Identity(bytes([i + 1]) * 32) for i in range(4)), key=lambda v: v.public_key)
KEYS = [v.public_key for v in VALIDATORS]
ALICE = Identity(b"a" * 32)
GENESIS = Genesis.create(CHAIN, 0, KEYS, params=ConsensusParams(state_buckets=8))


def _certify(block: Block, view: int = 0) -> Block:
    digest = block.certified_digest
    votes = [
        (v.public_key, sign_commit_vote(v, CHAIN, block.height, digest, view=view))
        for v in VALIDATORS[:3]
    ]
    return block.with_certificate(CommitCertificate.of(block.height, digest, votes, view=view))


def _chain_ending_in_null_blocks(store: SqliteBlockStore) -> list[Block]:
    """Heights 1 and 2 carry a transaction each; 3 and 4 are null requests
    (a view change found nothing prepared at either)."""
    executor = Executor(GENESIS)
    tip = ChainTip.of_genesis(GENESIS)
    blocks = []
    for n in range(2):
        tx = sign_transaction(
            ALICE, CHAIN, type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0
        )
        block, _ = executor.build_block(tip, [tx], timestamp=n, view=0, proposer=KEYS[0])
        blocks.append(_certify(block))
        tip = executor.apply_final(tip, blocks[-1])
    for _ in range(2):
        blocks.append(_certify(executor.null_block(tip, view=1), view=1))
        tip = executor.apply_final(tip, blocks[-1])
    store.append(StoredBlock(0, GENESIS.hash, GENESIS.encode()))
    for block in blocks:
        store.append(StoredBlock(block.height, block.hash, encode_block(block)))
    return blocks


def _service(store: SqliteBlockStore) -> LedgerService:
    net = SimNetwork(1)
    node = Node(VALIDATORS[0], net.add_node(KEYS[0]))
    return LedgerService(LedgerReplica(node, Executor(GENESIS), store, Mempool(CHAIN)))


def test_queries_at_a_null_tip_are_proved_by_the_last_block_that_binds_its_header(
    tmp_path,
) -> None:
    store = SqliteBlockStore(tmp_path / "chain.sqlite")
    blocks = _chain_ending_in_null_blocks(store)
    assert [b.is_null for b in blocks] == [False, False, True, True]
    service = _service(store)
    assert service.ledger.tip.height == 4
    trusted = TrustedValidators(CHAIN, KEYS)
    answer = service.query(kv_key(ALICE.public_key, "k1"))
    assert answer.value == 1 and answer.height == 2
    assert trusted.verifies_answer(answer)
    # The null tip's own header and certificate would prove nothing.
    null_tip = blocks[-1]
    assert null_tip.header.state_root == answer.header.state_root
    assert not trusted.verifies_answer(
        answer._replace(header=null_tip.header, certificate=null_tip.certificate)
    )
    store.close()


def test_a_header_chain_comes_from_the_store_and_a_null_top_certifies_nothing(
    tmp_path,
) -> None:
    store = SqliteBlockStore(tmp_path / "chain.sqlite")
    blocks = _chain_ending_in_null_blocks(store)
    service = _service(store)
    trusted = TrustedValidators(CHAIN, KEYS)
    chain = service.header_chain(1, 2)
    assert chain.headers == (blocks[0].header, blocks[1].header)
    assert chain.linked() and trusted.certifies(chain)
    across = service.header_chain(1, 4)
    assert across.linked() and across.certificate.block_hash == NULL_DIGEST
    assert not trusted.certifies(across)  # the walk must anchor on a block that binds its header
    service.max_headers = 2
    assert [h.height for h in service.header_chain(1, 4).headers] == [3, 4]
    with pytest.raises(NothingCommitted):
        service.header_chain(1, 5)
    store.close()
