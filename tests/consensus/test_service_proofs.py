"""What a ledger node's service proves to clients when its chain holds null
heights: queries are answered with the last block whose certificate binds
its header, and header chains come straight from the store (real
Executor, real signatures, a real block store and node)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedchain.consensus.block import NULL_DIGEST, Block, encode_block
from fedchain.consensus.chain import ChainTip, Executor
from fedchain.consensus.client import LedgerClient, TrustedValidators
from fedchain.consensus.client_api import HeaderChain
from fedchain.consensus.contracts import (
    epoch_chain_id,
    kv_key,
    kv_set,
    validator_change_transaction,
)
from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.genesis import ConsensusParams, Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.replica import LedgerReplica
from fedchain.consensus.service import LedgerService, NothingCommitted
from fedchain.consensus.store import BlockStore, MemoryBlockStore, SqliteBlockStore, StoredBlock
from fedchain.consensus.tx import sign_transaction
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import Node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork

CHAIN = "service-proofs"
VALIDATORS = sorted((Identity(bytes([i + 1]) * 32) for i in range(4)), key=lambda v: v.public_key)
KEYS = [v.public_key for v in VALIDATORS]
ALICE = Identity(b"a" * 32)
GENESIS = Genesis.create(CHAIN, 0, KEYS, params=ConsensusParams(state_buckets=8))


def _certify_by(block: Block, signers: list[Identity], chain_id: str, view: int) -> Block:
    digest = block.certified_digest
    votes = [
        (v.public_key, sign_commit_vote(v, chain_id, block.height, digest, view=view))
        for v in signers
    ]
    return block.with_certificate(CommitCertificate.of(block.height, digest, votes, view=view))


def _certify(block: Block, view: int = 0) -> Block:
    return _certify_by(block, VALIDATORS[:3], CHAIN, view)


def _certified_chain(store: BlockStore, *, full: int = 2, nulls: int = 2) -> list[Block]:
    """Certified blocks in ``store``: ``full`` heights of one transaction
    each, then ``nulls`` null requests (a view change found nothing
    prepared at either)."""
    executor = Executor(GENESIS)
    tip = ChainTip.of_genesis(GENESIS)
    blocks = []
    for n in range(full):
        tx = sign_transaction(
            ALICE, CHAIN, type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0
        )
        block, _ = executor.build_block(tip, [tx], timestamp=n, view=0, proposer=KEYS[0])
        blocks.append(_certify(block))
        tip = executor.apply_final(tip, blocks[-1])
    for _ in range(nulls):
        blocks.append(_certify(executor.null_block(tip, view=1), view=1))
        tip = executor.apply_final(tip, blocks[-1])
    store.append(StoredBlock(0, GENESIS.hash, GENESIS.encode()))
    for block in blocks:
        store.append(StoredBlock(block.height, block.hash, encode_block(block)))
    return blocks


def _service(store: BlockStore) -> LedgerService:
    net = SimNetwork(1)
    node = Node(VALIDATORS[0], net.add_node(KEYS[0]))
    return LedgerService(LedgerReplica(node, Executor(GENESIS), store, Mempool(CHAIN)))


@pytest.mark.parametrize(
    "bad",
    [
        {"forward_batch": 0},
        {"forward_delay": -0.1},
        {"reforward_interval": 0},
        {"stale_forward": float("nan")},
        {"stale_forward": -1.0},
    ],
)
def test_forwarding_settings_are_checked(bad: dict) -> None:
    """A stale_forward of 0 or less would send every forward again at each
    tick; NaN would never: both are refused when the service is made."""
    net = SimNetwork(1)
    node = Node(VALIDATORS[0], net.add_node(KEYS[0]))
    ledger = LedgerReplica(node, Executor(GENESIS), MemoryBlockStore(), Mempool(CHAIN))
    with pytest.raises(ValueError):
        LedgerService(ledger, **bad)


def test_queries_at_a_null_tip_are_proved_by_the_last_block_that_binds_its_header(
    tmp_path,
) -> None:
    store = SqliteBlockStore(tmp_path / "chain.sqlite")
    blocks = _certified_chain(store)
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


def test_a_restarted_node_still_proves_what_committed_before_it_stopped(tmp_path) -> None:
    """The service indexes the last stored transactions when it starts, so
    a client waiting for one that committed just before a restart gets its
    proof at once; past ``index_on_start`` a digest waits like an unknown one."""
    store = SqliteBlockStore(tmp_path / "chain.sqlite")
    blocks = _certified_chain(store)
    first, second = blocks[0].txs[0], blocks[1].txs[0]
    service = _service(store)
    assert service.committed_at(first.digest) == (1, 0)
    assert service.committed_at(second.digest) == (2, 0)
    proof = service.proof_of(first.digest)
    assert proof is not None and proof.verify(first.encoded, CHAIN, KEYS)
    net = SimNetwork(2)
    node = Node(VALIDATORS[1], net.add_node(KEYS[1]))
    ledger = LedgerReplica(node, Executor(GENESIS), store, Mempool(CHAIN))
    recent_only = LedgerService(ledger, index_on_start=1)
    assert recent_only.committed_at(second.digest) == (2, 0)
    assert recent_only.committed_at(first.digest) is None
    store.close()


def test_a_header_chain_links_each_header_to_the_one_below() -> None:
    blocks = _certified_chain(MemoryBlockStore(), full=4, nulls=0)
    headers = [block.header for block in blocks]
    chain = HeaderChain(tuple(headers), blocks[-1].certificate)
    wire = msgpack.unpackb(msgpack.packb(chain.as_fields()))
    back = HeaderChain.from_fields(*wire)
    assert back == chain and back.linked()
    trusted = TrustedValidators(CHAIN, KEYS)
    assert trusted.certifies(back)
    assert not TrustedValidators(CHAIN, [*KEYS[1:], bytes(range(32))]).certifies(back)
    assert not trusted.certifies(back._replace(certificate=None))
    # A header swapped in the middle breaks the link above it.
    swapped = dataclasses.replace(headers[1], timestamp=77)
    assert not HeaderChain((headers[0], swapped, *headers[2:]), None).linked()
    with pytest.raises(MalformedMessage):  # heights must be consecutive
        HeaderChain.from_fields([headers[0].as_list(), headers[2].as_list()], None)
    with pytest.raises(MalformedMessage):
        HeaderChain.from_fields([], None)


def test_a_header_chain_comes_from_the_store_and_a_null_top_certifies_nothing(
    tmp_path,
) -> None:
    store = SqliteBlockStore(tmp_path / "chain.sqlite")
    blocks = _certified_chain(store)
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
    # Full blocks are read to find headers: past the read budget an answer
    # stops, keeping the top (and its certificate) whatever the budget.
    service.max_headers = 512
    service.header_read_bytes = 1
    one = service.header_chain(1, 4)
    assert [h.height for h in one.headers] == [4] and one.certificate == blocks[3].certificate
    service.header_read_bytes = len(encode_block(blocks[3])) + 1
    assert [h.height for h in service.header_chain(1, 4).headers] == [3, 4]
    with pytest.raises(NothingCommitted):
        service.header_chain(1, 5)
    store.close()


def test_a_client_of_a_later_set_walks_back_past_a_null_first_block() -> None:
    """Block 1 changes the validator set; the new set's first block (2) is a
    null request, whose certificate binds no header, so a client that
    trusts only the new set anchors its walk on block 3 and walks down to 1
    over the network. A header that is not the stored one is refused."""
    newcomer = Identity(b"n" * 32)
    new_set = sorted([newcomer.public_key, *KEYS[1:]])
    signers = [v for v in [newcomer, *VALIDATORS] if v.public_key in new_set][:3]
    change = validator_change_transaction(ALICE, CHAIN, new_set, VALIDATORS[:3], epoch=0, nonce=0)
    executor = Executor(GENESIS)
    tip = ChainTip.of_genesis(GENESIS)
    first, _ = executor.build_block(tip, [change], timestamp=1, view=0, proposer=KEYS[0])
    blocks = [_certify(first)]
    tip = executor.apply_final(tip, blocks[0])
    assert tip.epoch == 1
    epoch1 = epoch_chain_id(CHAIN, 1)
    blocks.append(_certify_by(executor.null_block(tip, view=1), signers, epoch1, view=1))
    tip = executor.apply_final(tip, blocks[1])
    kv = sign_transaction(ALICE, CHAIN, type="kv", content=kv_set("k", 1), nonce=1, timestamp=0)
    third, _ = executor.build_block(tip, [kv], timestamp=2, view=1, proposer=newcomer.public_key)
    blocks.append(_certify_by(third, signers, epoch1, view=1))
    tip = executor.apply_final(tip, blocks[2])
    store = MemoryBlockStore()
    store.append(StoredBlock(0, GENESIS.hash, GENESIS.encode()))
    for block in blocks:
        store.append(StoredBlock(block.height, block.hash, encode_block(block)))
    seen: dict[str, object] = {}

    async def main() -> None:
        net = SimNetwork(3, LinkModel(latency=Constant(0.01)))
        reader = Identity(b"r" * 32)
        async with trio.open_nursery() as nursery:
            nodes = {}
            for identity in (VALIDATORS[1], reader):
                node = Node(identity, net.add_node(identity.public_key))
                node.bind(nursery)
                net.drive(node)
                nodes[identity.public_key] = node
            server = nodes[VALIDATORS[1].public_key]
            service = LedgerService(LedgerReplica(server, Executor(GENESIS), store, Mempool(CHAIN)))
            service.header_read_bytes = 1  # one header per answer: a three-page walk
            client = LedgerClient(nodes[reader.public_key], server.id, CHAIN, new_set, epoch=1)
            nursery.start_soon(net.run)
            seen["ancestor"] = await client.is_trusted_ancestor(blocks[0].header)
            forged = dataclasses.replace(blocks[0].header, timestamp=99)
            seen["forged"] = await client.is_trusted_ancestor(forged)
            seen["anchor_itself"] = await client.is_trusted_ancestor(blocks[2].header)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert blocks[1].is_null
    assert seen == {"ancestor": True, "forged": False, "anchor_itself": False}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3000))
def test_any_header_request_is_a_linked_page_ending_at_high_or_nothing_committed(
    low: int, high: int, max_headers: int, read_bytes: int
) -> None:
    assume(low <= high)  # the decoder refuses the rest before the service sees them
    store = MemoryBlockStore()
    blocks = _certified_chain(store)
    service = _service(store)
    service.max_headers, service.header_read_bytes = max_headers, read_bytes
    try:
        chain = service.header_chain(low, high)
    except NothingCommitted:
        assert high > len(blocks)
        return
    heights = [h.height for h in chain.headers]
    assert heights[-1] == high and heights[0] >= low and len(heights) <= max_headers
    assert heights == list(range(heights[0], high + 1)) and chain.linked()
    assert chain.headers == tuple(b.header for b in blocks[heights[0] - 1 : high])
    assert chain.certificate == blocks[high - 1].certificate
