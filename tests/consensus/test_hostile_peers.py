"""What any peer may send a ledger node on the client and block-sync
channels, in any shape, is answered, refused or counted; it never raises
out of the handler (which would end the node's task tree: one QUERY for
the empty key did exactly that before the decoder checked keys as the
state does)."""

from __future__ import annotations

import msgpack
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_mutations import mutated_msgpack

from fedchain.consensus.block import decode_block, encode_block
from fedchain.consensus.chain import ChainTip, Executor
from fedchain.consensus.client_api import ClientOp
from fedchain.consensus.contracts import kv_key, kv_set
from fedchain.consensus.errors import ConsensusError, MalformedMessage
from fedchain.consensus.genesis import Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.pbft import PbftConfig
from fedchain.consensus.replica import LedgerReplica
from fedchain.consensus.service import LedgerService
from fedchain.consensus.store import MemoryBlockStore
from fedchain.consensus.tx import sign_transaction
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import Node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork
from fedchain.p2p.wire import MessageType, sign

CHAIN = "hostile-peers"
VALIDATOR = Identity(b"v" * 32)
STRANGER = Identity(b"s" * 32)
ALICE = Identity(b"a" * 32)
GENESIS = Genesis.create(CHAIN, 0, [VALIDATOR.public_key])
TXS = [
    sign_transaction(ALICE, CHAIN, type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0)
    for n in range(3)
]
DIGEST = TXS[0].digest
CLIENT_SAMPLES = [
    [ClientOp.SUBMIT, 1, [TXS[0].encoded]],
    [ClientOp.WAIT, 2, DIGEST, 5000],
    [ClientOp.QUERY, 3, "k1"],
    [ClientOp.FORWARD, [TXS[1].encoded]],
    [ClientOp.HEADERS, 5, 1, 1],
    [ClientOp.EPOCHS, 6, 0],
    [ClientOp.SUBSCRIBE, 7],
    [ClientOp.SUBMITTED, 1, [[0, DIGEST]]],
    [ClientOp.BLOCK, 4, 7, [DIGEST]],
]


def _feed(frames: list[tuple[int, bytes]]) -> tuple[Node, MemoryBlockStore]:
    """A one-validator chain commits its first block, then takes ``frames``
    from a stranger, a virtual second apart; the node and store after."""
    net = SimNetwork(1, LinkModel(latency=Constant(0.01)))
    transport = net.add_node(VALIDATOR.public_key)
    net.add_node(STRANGER.public_key)
    out: list = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            wakeup = net.wakeup_for(VALIDATOR.public_key)
            node = Node(VALIDATOR, transport, start_seq=1, wakeup=wakeup)
            node.bind(nursery)
            net.drive(node)
            ledger = LedgerReplica(
                node,
                Executor(GENESIS),
                MemoryBlockStore(),
                Mempool(CHAIN),
                PbftConfig(batch_timeout=0.01),
                timestamp_ms=lambda: int(trio.current_time() * 1000),
            )
            service = LedgerService(ledger)
            ledger.start()
            nursery.start_soon(net.run)
            for tx in TXS:
                service.submit(tx.encoded)
            await trio.sleep(1)
            assert ledger.store.tip() == 1
            for seq, (msg_type, body) in enumerate(frames, start=2):
                node.handle_frame(STRANGER.public_key, sign(STRANGER, msg_type, seq, body).frame)
                await trio.sleep(1)
            out.extend([node, ledger.store])
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out[0], out[1]


FIRST_BLOCK = _feed([])[1].get(1).data
"""The same in every run (virtual time): a block a sync answer may carry."""
SYNC_SAMPLES = [[0, 1, 3], [1, [FIRST_BLOCK]]]
_channel = st.sampled_from(
    [(MessageType.CLIENT, s) for s in CLIENT_SAMPLES]
    + [(MessageType.BLOCK_SYNC, s) for s in SYNC_SAMPLES]
)
_frames = _channel.flatmap(lambda c: mutated_msgpack(c[1]).map(lambda body: (c[0], body)))


def test_the_samples_are_served() -> None:
    """The unmutated samples are valid: answered or counted, not refused."""
    frames = [(MessageType.CLIENT, msgpack.packb(s)) for s in CLIENT_SAMPLES]
    node, store = _feed(frames)
    assert store.tip() == 1
    assert not [k for k in node.counters if k.startswith("rejected")]
    assert node.counters["client.unexpected"] == 2  # SUBMITTED and BLOCK are replies


def test_a_query_for_a_key_no_state_holds_is_refused_not_raised() -> None:
    """The empty key, and 300 two-byte characters (600 bytes, over the
    state's 512 though under 512 characters), crashed the node before."""
    frames = [
        (MessageType.CLIENT, msgpack.packb([ClientOp.QUERY, 1, key])) for key in ("", "é" * 300)
    ]
    node, _ = _feed(frames)
    assert node.counters["rejected.malformed_consensus"] == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(_frames, min_size=1, max_size=8))
def test_any_client_or_sync_message_is_answered_refused_or_counted(frames) -> None:
    _, store = _feed(frames)
    assert store.get(1).data == FIRST_BLOCK  # nothing a stranger sent undid the chain


def _proposal() -> bytes:
    """A valid proposal for height 1 on the genesis (what validate takes)."""
    tip = ChainTip.of_genesis(GENESIS)
    block, _ = Executor(GENESIS).build_block(
        tip, TXS, timestamp=5, view=0, proposer=VALIDATOR.public_key
    )
    return encode_block(block)


PROPOSAL = _proposal()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_proposal_in_any_shape_is_refused_or_valid_never_raised(data) -> None:
    """What a backup's ``validate`` does with a primary's payload: decode it
    and re-execute it on its parent. A mutated block (a header field of
    another type or value, a transaction dropped or repeated, a result
    changed) is MalformedMessage or a ConsensusError (InvalidBlock...), or
    a block that still follows from the parent; nothing else escapes."""
    payload = data.draw(mutated_msgpack(msgpack.unpackb(PROPOSAL)))
    try:
        block = decode_block(payload)
        Executor(GENESIS).validate_block(ChainTip.of_genesis(GENESIS), block)
    except (MalformedMessage, ConsensusError):
        return
    assert encode_block(block) == payload  # accepted only if canonical


def test_the_proposal_sample_is_valid() -> None:
    block = decode_block(PROPOSAL)
    state = Executor(GENESIS).validate_block(ChainTip.of_genesis(GENESIS), block)
    assert state.get(kv_key(ALICE.public_key, "k2")) == 2
