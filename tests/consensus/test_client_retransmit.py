"""LedgerClient.commit: PBFT's client retransmission. Four validators and a
client on a SimNetwork in virtual time; the client's server is the primary
of view 0, which censors the client (or has crashed). Sent only to it, the
transaction never commits; handed to the other validators after
``patience``, it commits once, with a proof the client checks."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing
from hostile import CensoringMempool

from fedchain.consensus.block import decode_block
from fedchain.consensus.chain import ChainTip, Executor
from fedchain.consensus.client import LedgerClient, SubmitRefused, UntrustedAnswer
from fedchain.consensus.client_api import (
    ClientOp,
    CommitProof,
    SubmitStatus,
    decode_client_message,
    encode_client_message,
)
from fedchain.consensus.contracts import kv_set
from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.genesis import Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.pbft import PbftConfig
from fedchain.consensus.replica import LedgerReplica
from fedchain.consensus.service import LedgerService
from fedchain.consensus.store import MemoryBlockStore
from fedchain.consensus.tx import sign_transaction
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import Node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork
from fedchain.p2p.wire import MessageType

CHAIN = "retransmit-test"


def _forger(rng: np.random.Generator, nursery: trio.Nursery, net: SimNetwork, tx) -> bytes:
    """Start a node that accepts ``tx`` and proves it committed, falsely:
    its proof is of a real, certified block that holds ``tx``, on a chain
    named like the client's but run by four validators of its own. It
    says no validator change happened. Its key (for the fallbacks)."""
    fakes = sorted((Identity(rng.bytes(32)) for _ in range(4)), key=lambda i: i.public_key)
    fake_genesis = Genesis.create(CHAIN, 1_000, [f.public_key for f in fakes])
    block, _ = Executor(fake_genesis).build_block(
        ChainTip.of_genesis(fake_genesis),
        [tx],
        timestamp=fake_genesis.genesis_time,
        view=0,
        proposer=fakes[0].public_key,
    )
    votes = [
        (f.public_key, sign_commit_vote(f, CHAIN, block.height, block.hash, view=0))
        for f in fakes[:3]
    ]
    block = block.with_certificate(CommitCertificate.of(block.height, block.hash, votes, view=0))
    proof = CommitProof.of_block(block, 0)
    assert proof.verify(tx.encoded, CHAIN, [f.public_key for f in fakes])  # a true proof, elsewhere
    me = Identity(rng.bytes(32))
    node = Node(me, net.add_node(me.public_key))
    node.bind(nursery)
    net.drive(node)

    def answer(peer, envelope) -> None:
        fields = decode_client_message(envelope.body)
        op, request = fields[:2]
        if op == ClientOp.SUBMIT:
            reply = [ClientOp.SUBMITTED, request, [[SubmitStatus.ACCEPTED, tx.digest]]]
        elif op == ClientOp.WAIT:
            reply = [ClientOp.COMMIT, request, proof.as_list()]
        elif op == ClientOp.EPOCHS:
            reply = [ClientOp.EPOCH_PROOFS, request, []]
        else:
            return
        node.send(peer, MessageType.CLIENT, encode_client_message(*reply))

    node.register(MessageType.CLIENT, answer)
    return me.public_key


def _commit(
    *,
    fallbacks: bool,
    censor: bool = True,
    crash_server: bool = False,
    signed_for: str = CHAIN,
    forge_reply: bool = False,
    liar: bool = False,
    forger: bool = False,
    only_forger: bool = False,
    seed: int = 3,
):
    """Run the cluster; what ``commit`` gave (a proof or the exception), the
    live validators' views, the heights holding the transaction, the
    transaction and the validators' keys."""
    rng = np.random.Generator(np.random.PCG64(seed))
    validators = sorted((Identity(rng.bytes(32)) for _ in range(4)), key=lambda i: i.public_key)
    ids = [v.public_key for v in validators]
    genesis = Genesis.create(CHAIN, 1_000, ids)
    alice, bob = Identity(rng.bytes(32)), Identity(rng.bytes(32))
    mine = sign_transaction(
        alice, signed_for, type="kv", content=kv_set("k", 1), nonce=0, timestamp=0
    )
    net = SimNetwork(seed, LinkModel(latency=Constant(0.01)))
    config = PbftConfig(batch_size=16, batch_timeout=0.02, request_timeout=1.0)
    ledgers: list[LedgerReplica] = []
    services: list[LedgerService] = []
    outcome: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index, identity in enumerate(validators):
                node = Node(
                    identity,
                    net.add_node(identity.public_key),
                    wakeup=net.wakeup_for(identity.public_key),
                )
                node.bind(nursery)
                net.drive(node)
                pool = (
                    CensoringMempool(CHAIN, censored=alice.public_key)
                    if censor and index == 0
                    else Mempool(CHAIN)
                )
                ledger = LedgerReplica(
                    node,
                    Executor(genesis),
                    MemoryBlockStore(),
                    pool,
                    config,
                    timestamp_ms=lambda: genesis.genesis_time + int(trio.current_time() * 1000),
                )
                services.append(LedgerService(ledger))
                ledgers.append(ledger)
                if crash_server and index == 0:
                    net.crash(ids[0])
                    node.crash()
                else:
                    ledger.start()
            me = Node(alice, net.add_node(alice.public_key))
            me.bind(nursery)
            net.drive(me)
            client = LedgerClient(me, ids[0], CHAIN, ids)
            nursery.start_soon(net.run)
            # Someone else's traffic keeps blocks committing, so the view
            # timers never fire: only a request timer can act.
            for n in range(120):
                other = sign_transaction(
                    bob, CHAIN, type="kv", content=kv_set("b", n), nonce=n, timestamp=0
                )
                net.schedule(0.1 * n, lambda tx=other: services[1].submit(tx.encoded))
            if forge_reply:  # another validator answers the submission first
                forged = encode_client_message(
                    ClientOp.SUBMITTED, 1, [[SubmitStatus.REFUSED, "forged"]]
                )
                ledgers[2].node.send(alice.public_key, MessageType.CLIENT, forged)
            liars = []
            if liar:  # a node in the fallbacks that answers every request with nonsense
                fake = Identity(rng.bytes(32))
                liar_node = Node(fake, net.add_node(fake.public_key))
                liar_node.bind(nursery)
                net.drive(liar_node)

                def answer(peer, envelope) -> None:
                    op, request = decode_client_message(envelope.body)[:2]
                    reply = (
                        [ClientOp.SUBMITTED, request, [[SubmitStatus.ACCEPTED, b"x"]] * 2]
                        if op == ClientOp.SUBMIT
                        else [ClientOp.COMMIT, request, [1, 2, 3]]
                    )
                    liar_node.send(peer, MessageType.CLIENT, encode_client_message(*reply))

                liar_node.register(MessageType.CLIENT, answer)
                liars.append(fake.public_key)
            if forger or only_forger:
                # A node among the fallbacks that answers with a well-formed
                # proof of this very transaction: a real block on a chain of
                # the same name, certified by validators the client does not trust.
                liars.append(_forger(rng, nursery, net, mine))
            asked = liars if only_forger else [*liars, *ids[1:]] if fallbacks else []
            started = trio.current_time()
            try:
                outcome["proof"] = await client.commit(
                    mine.encoded, timeout=12.0, patience=1.0, fallbacks=asked
                )
            except (trio.TooSlowError, SubmitRefused, UntrustedAnswer) as exc:
                outcome["error"] = exc
            outcome["seconds"] = trio.current_time() - started
            outcome["counters"] = me.counters
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    live = ledgers[1:] if crash_server else ledgers
    store = live[1].store
    heights = [
        h
        for h in range(1, store.tip() + 1)
        if mine.digest in {tx.digest for tx in decode_block(store.get(h).data).txs}
    ]
    outcome["tip"] = store.tip()
    return outcome, [ledger.replica.view for ledger in live], heights, mine, ids


def test_a_censored_transaction_sent_only_to_the_primary_never_commits() -> None:
    """The control: without fallbacks nothing watches it but its censor."""
    outcome, views, heights, _, _ = _commit(fallbacks=False)
    assert isinstance(outcome.get("error"), trio.TooSlowError)
    assert outcome["seconds"] >= 12.0
    # The honest validators never held it; the censor itself changes view
    # alone (its view timer sees work it does not propose), to no effect.
    assert views[1:] == [0, 0, 0] and heights == []
    assert outcome["tip"] >= 10  # bob's transactions committed all along


def test_a_censored_transaction_goes_to_the_backups_and_commits_once() -> None:
    """After ``patience`` the backups hold it too; their request timers
    replace the censor (view 1) and the proof that comes back verifies."""
    outcome, views, heights, mine, ids = _commit(fallbacks=True)
    proof = outcome.get("proof")
    assert proof is not None, outcome
    assert proof.result.ok and proof.verify(mine.encoded, CHAIN, ids)
    assert all(view >= 1 for view in views)
    assert heights == [proof.height]
    assert outcome["tip"] >= 10  # bob's transactions committed all along


def test_a_crashed_server_is_bypassed() -> None:
    """The server never answers the submission: after ``patience`` the
    others get it, their view change replaces the dead primary, and it
    commits."""
    outcome, views, heights, mine, ids = _commit(fallbacks=True, censor=False, crash_server=True)
    proof = outcome.get("proof")
    assert proof is not None, outcome
    assert proof.verify(mine.encoded, CHAIN, ids) and heights == [proof.height]
    assert all(view >= 1 for view in views)


@pytest.mark.parametrize("fallbacks", [False, True])
def test_a_transaction_the_server_refuses_fails_at_once(fallbacks: bool) -> None:
    """A refusal is about the transaction (here its signature, made for
    another chain), not the node: no retransmission, no wait."""
    outcome, _, heights, _, _ = _commit(fallbacks=fallbacks, signed_for="another-chain")
    assert isinstance(outcome.get("error"), SubmitRefused)
    assert outcome["seconds"] < 0.5 and heights == []


def test_only_the_node_asked_answers_a_request() -> None:
    """A validator the client did not ask answers its submission (request
    1) first, with a refusal: counted and dropped; the server's answer
    counts, and the transaction commits."""
    outcome, _, heights, mine, ids = _commit(fallbacks=True, censor=False, forge_reply=True)
    proof = outcome.get("proof")
    assert proof is not None, outcome
    assert proof.verify(mine.encoded, CHAIN, ids) and heights == [proof.height]
    assert outcome["counters"]["client.not_from_server"] == 1


@pytest.mark.parametrize(
    ("tx", "options", "error"),
    [
        (b"\x93junk", {}, MalformedMessage),
        (None, {"patience": 0.0}, ValueError),
        (None, {"timeout": -1.0}, ValueError),
    ],
)
def test_commit_refuses_bad_arguments_before_sending_anything(tx, options, error) -> None:
    """Nothing reaches any node: the client's node sends no frame."""
    net = SimNetwork(1, LinkModel(latency=Constant(0.01)))
    alice, server = Identity(b"a" * 32), Identity(b"s" * 32)
    good = sign_transaction(alice, CHAIN, type="kv", content=kv_set("k", 1), nonce=0, timestamp=0)
    raised: list[BaseException] = []
    link = net.add_node(alice.public_key)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            me = Node(alice, link)
            net.add_node(server.public_key)
            me.bind(nursery)
            net.drive(me)
            client = LedgerClient(me, server.public_key, CHAIN, [server.public_key])
            try:
                await client.commit(good.encoded if tx is None else tx, **options)
            except (MalformedMessage, ValueError) as exc:
                raised.append(exc)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(raised) == 1 and isinstance(raised[0], error)
    assert link.stats().get("frames_sent", 0) == 0


def test_a_fallback_that_answers_nonsense_is_survived() -> None:
    """A node among the fallbacks answers the hand-over and the wait with
    malformed replies: it is given up, the validators carry on, and their
    proof is the answer (a malformed submission reply once escaped the
    client as an exception group)."""
    outcome, views, heights, mine, ids = _commit(fallbacks=True, liar=True)
    proof = outcome.get("proof")
    assert proof is not None, outcome
    assert proof.verify(mine.encoded, CHAIN, ids) and heights == [proof.height]
    assert all(view >= 1 for view in views)


def test_a_fallback_that_proves_a_false_commit_is_not_believed() -> None:
    """A node among the fallbacks answers the wait first with a well-formed
    proof that does not verify against the client's validators (a real
    block of a look-alike chain): the client sets it aside, and the
    validators' proof is the answer."""
    outcome, _, heights, mine, ids = _commit(fallbacks=True, forger=True)
    proof = outcome.get("proof")
    assert proof is not None, outcome
    assert proof.verify(mine.encoded, CHAIN, ids) and heights == [proof.height]


def test_a_false_commit_proof_alone_is_refused_as_untrusted() -> None:
    """With only the censor and the forger to ask, the transaction never
    commits, and what the client reports is the forger's lie, not a proof
    and not a plain timeout."""
    outcome, _, heights, _, _ = _commit(fallbacks=True, only_forger=True)
    assert "proof" not in outcome, outcome
    assert isinstance(outcome["error"], UntrustedAnswer), outcome
    assert heights == []
