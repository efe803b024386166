"""The ledger service's door: a client's SUBMIT frame, as the node queues
it, is answered busy at once when the clients' room is full counting what
the node already holds for them, and is counted as held until handled
(real frames, real signatures, a real node on a simulated network)."""

from __future__ import annotations

import msgpack
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus.chain import Executor
from fedchain.consensus.client_api import (
    ClientOp,
    SubmitStatus,
    decode_client_message,
    encode_client_message,
)
from fedchain.consensus.contracts import kv_set
from fedchain.consensus.genesis import Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.replica import LedgerReplica
from fedchain.consensus.service import LedgerService, _submit_count
from fedchain.consensus.store import MemoryBlockStore
from fedchain.consensus.tx import sign_transaction
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import Node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork
from fedchain.p2p.wire import MessageType, sign

CHAIN = "service-door"
VALIDATORS = sorted((Identity(bytes([i + 1]) * 32) for i in range(4)), key=lambda v: v.public_key)
KEYS = [v.public_key for v in VALIDATORS]
GENESIS = Genesis.create(CHAIN, 0, KEYS)
CLIENT = Identity(b"c" * 32)


def _txs(count: int, start: int = 0) -> list[bytes]:
    return [
        sign_transaction(
            Identity(bytes([200, n]) * 16), CHAIN, type="kv", content=kv_set("k", n), nonce=0,
            timestamp=0,
        ).encoded
        for n in range(start, start + count)
    ]  # fmt: skip


def _frame(identity: Identity, seq: int, *fields: object) -> bytes:
    return sign(identity, MessageType.CLIENT, seq, encode_client_message(*fields)).frame


def test_a_submission_is_refused_at_the_door_once_what_is_held_fills_the_room() -> None:
    answers: list[list] = []

    async def main() -> None:
        net = SimNetwork(1, LinkModel(latency=Constant(0.01)))
        async with trio.open_nursery() as nursery:
            server = Node(VALIDATORS[0], net.add_node(KEYS[0]))
            client = Node(CLIENT, net.add_node(CLIENT.public_key))
            for node in (server, client):
                node.bind(nursery)
                net.drive(node)
            client.register(
                MessageType.CLIENT,
                lambda peer, envelope: answers.append(decode_client_message(envelope.body)),
            )
            ledger = LedgerReplica(server, Executor(GENESIS), MemoryBlockStore(), Mempool(CHAIN))
            service = LedgerService(ledger)
            assert server.hold_check == service._hold and server.on_release == service._release
            ledger.mempool.client_limit = 3
            me = CLIENT.public_key
            first = _frame(CLIENT, 1, ClientOp.SUBMIT, 7, _txs(2))
            second = _frame(CLIENT, 2, ClientOp.SUBMIT, 8, _txs(1, 2))
            third = _frame(CLIENT, 3, ClientOp.SUBMIT, 9, _txs(1, 3))
            assert server.hold_check(me, first) and service.held_submissions == 2
            assert server.hold_check(me, second) and service.held_submissions == 3
            # 0 admitted + 3 held fill a room of 3: the next hears busy at once.
            assert not server.hold_check(me, third)
            assert service.held_submissions == 3
            assert server.counters["client.busy_at_door"] == 1
            # Not counted, and left to their handlers: a validator's
            # forward, a client's query, and bytes that are no frame.
            forward = _frame(VALIDATORS[1], 1, ClientOp.FORWARD, _txs(5, 10))
            assert server.hold_check(KEYS[1], forward)
            assert server.hold_check(me, _frame(CLIENT, 4, ClientOp.QUERY, 10, "k"))
            assert server.hold_check(me, b"\x96 not a frame")
            assert service.held_submissions == 3
            # As held frames go to their handler, their room is theirs again.
            server.on_release(me, first)
            assert service.held_submissions == 1
            server.on_release(me, first)  # once only
            assert service.held_submissions == 1
            assert server.hold_check(me, third) and service.held_submissions == 2
            nursery.start_soon(net.run)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    (busy,) = answers
    assert busy[:2] == [ClientOp.SUBMITTED, 9]
    assert [status for status, _ in busy[2]] == [SubmitStatus.BUSY]


def test_submit_count_reads_the_count_of_a_client_submit_only() -> None:
    me = CLIENT.public_key
    assert _submit_count(_frame(CLIENT, 1, ClientOp.SUBMIT, 5, _txs(3)), me, 10) == (5, 3)
    assert _submit_count(_frame(CLIENT, 1, ClientOp.SUBMIT, 5, _txs(3)), me, 2) is None
    other = Identity(b"o" * 32)  # a frame its link peer did not sign
    assert _submit_count(_frame(other, 1, ClientOp.SUBMIT, 5, _txs(1)), me, 10) is None
    assert _submit_count(_frame(CLIENT, 1, ClientOp.QUERY, 5, "k"), me, 10) is None


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.one_of(st.integers(-5, 2**40), st.binary(max_size=40), st.none()), max_size=5
        ).map(lambda fields: msgpack.packb(fields)),
    ),
    cut=st.integers(0, 400),
)
def test_submit_count_never_raises_on_any_frame_or_body(data: bytes, cut: int) -> None:
    """A peer's bytes as the frame, or as the body of a validly signed one
    (whole or cut short): None or a count within the bound, never an error."""
    me = CLIENT.public_key
    for frame in (data, sign(CLIENT, MessageType.CLIENT, 1, data[:cut]).frame):
        counted = _submit_count(frame, me, 50)
        assert counted is None or (type(counted[0]) is int and 0 <= counted[1] <= 50)
