"""The ledger over real TCP: four validators on loopback sockets (each its
own transport, node and SQLite store) and a client that trusts none of
them: it submits, waits for commit and queries, and checks every proof."""

from __future__ import annotations

import gc
from contextlib import AsyncExitStack
from dataclasses import replace

import numpy as np
import pytest
import trio

from fedchain.consensus.client import LedgerClient, TrustedValidators, UntrustedAnswer
from fedchain.consensus.client_api import ClientOp, SubmitStatus, encode_client_message
from fedchain.consensus.contracts import kv_key, kv_set
from fedchain.consensus.errors import MempoolFull
from fedchain.consensus.genesis import Genesis
from fedchain.consensus.ledger_node import open_ledger_node
from fedchain.consensus.pbft import PbftConfig
from fedchain.consensus.store import SqliteBlockStore
from fedchain.consensus.tx import Transaction, sign_transaction
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import open_node
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport
from fedchain.p2p.wire import MessageType

CHAIN = "tcp-ledger"
TCP = TcpConfig(backoff_initial=0.02, backoff_max=0.2)
PBFT = PbftConfig(batch_size=16, batch_timeout=0.01)


def _identities(seed: int, n: int) -> list[Identity]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [Identity(rng.bytes(32)) for _ in range(n)]


async def _cluster(stack: AsyncExitStack, tmp_path, validators, genesis, *, names=range(4)):
    """Start validators ``names`` listening on fixed-by-OS ports, all
    connected to all (addresses learned as each starts)."""
    nodes = {}
    for index in names:
        store = SqliteBlockStore(tmp_path / f"v{index}.sqlite")
        stack.callback(store.close)
        nodes[index] = await stack.enter_async_context(
            open_ledger_node(validators[index], genesis, store, pbft=PBFT, tcp=TCP, seed=index)
        )
    for a in nodes.values():
        for b in nodes.values():
            if a is not b:
                a.transport.connect(b.node.id, b.transport.listen_address)
    return nodes


async def test_a_client_submits_waits_and_queries_with_checked_proofs(tmp_path) -> None:
    validators = sorted(_identities(1, 4), key=lambda i: i.public_key)
    keys = [v.public_key for v in validators]
    genesis = Genesis.create(CHAIN, 1_000, keys)
    alice = Identity(b"a" * 32)
    txs = [
        sign_transaction(alice, CHAIN, type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0)
        for n in range(40)
    ]
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            nodes = await _cluster(stack, tmp_path, validators, genesis)
            server = nodes[1]
            transport = await stack.enter_async_context(
                open_tcp_transport(
                    alice,
                    allowed=keys,
                    rng=np.random.default_rng(9),
                    listen=None,
                    peers={server.node.id: server.transport.listen_address},
                    config=TCP,
                )
            )
            node = await stack.enter_async_context(open_node(alice, transport))
            client = LedgerClient(node, server.node.id, CHAIN, keys)
            await transport.wait_connected(server.node.id)

            digest = await client.submit(txs[0].encoded)
            assert digest == txs[0].digest
            statuses = await client.submit_many([t.encoded for t in txs[1:]] + [txs[0].encoded])
            assert [s for s, _ in statuses[:-1]] == [SubmitStatus.ACCEPTED] * 39
            assert statuses[-1] == (SubmitStatus.DUPLICATE, txs[0].digest)
            assert (await client.submit_many([b"\x93junk"]))[0][0] == SubmitStatus.REFUSED

            proofs = [await client.wait_committed(t.encoded) for t in txs]
            assert all(p.result.ok for p in proofs)
            assert [p.height for p in proofs] == sorted(p.height for p in proofs)

            # Requests sent to a client (here by its own server) are counted
            # and dropped, never taken for replies, even while a request of
            # the client's own is pending (its ids are looked up then).
            never = sign_transaction(
                alice, CHAIN, type="kv", content=kv_set("never", 0), nonce=99, timestamp=0
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: client.wait_committed(never.encoded, timeout=20))
                await trio.sleep(0.05)
                for body in (
                    encode_client_message(ClientOp.FORWARD, [b"x"]),
                    encode_client_message(ClientOp.SUBMIT, 1, []),
                ):
                    server.node.send(alice.public_key, MessageType.CLIENT, body)
                while node.counters["client.unexpected"] < 2:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            # A FORWARD from a non-validator (a follower passing its
            # clients' transactions on, or a client posing as a validator)
            # is admitted as a client's: it takes the clients' paced room.
            posing = sign_transaction(
                alice, CHAIN, type="kv", content=kv_set("fwd", 0), nonce=98, timestamp=0
            )
            held = server.ledger.mempool.from_clients
            forward = encode_client_message(ClientOp.FORWARD, [posing.encoded])
            node.send(server.node.id, MessageType.CLIENT, forward)
            while server.node.counters["client.forward_not_validator"] < 1:
                await trio.sleep(0.01)
            assert posing.digest in server.ledger.mempool
            assert server.ledger.mempool.from_clients == held + 1
            answer = await client.query(kv_key(alice.public_key, "k7"))
            assert answer.value == 7 and answer.height >= proofs[7].height
            missing = await client.query(kv_key(alice.public_key, "nope"))
            assert missing.value is None

            # Every validator holds the same chain, and each answers alike.
            for other in nodes.values():
                await other.service.wait_committed(txs[-1].digest, timeout=10)
            tips = {n.ledger.store.tip() for n in nodes.values()}
            heights = min(tips)
            for h in range(1, heights + 1):
                assert len({n.ledger.store.get(h).block_hash for n in nodes.values()}) == 1
            # Real nodes contain a handler's exception (Node N1b): none happened.
            errors = [k for n in nodes.values() for k in n.node.counters if "handler_error" in k]
            assert not errors

            # A lie does not pass: a changed value, result or validator set.
            assert not answer._replace(value=8).verify(CHAIN, keys)
            bad = replace(proofs[3], index=(proofs[3].index + 1) % proofs[3].size)
            assert not bad.verify(txs[3].encoded, CHAIN, keys)
            # A client that trusts another set (only two of these) refuses the answer.
            client.trusted = TrustedValidators(
                CHAIN, (*keys[:2], alice.public_key, bytes(range(32)))
            )
            with pytest.raises(UntrustedAnswer):
                await client.query(kv_key(alice.public_key, "k7"))


def _validators_and_one_senders_txs(seed: int, count: int) -> tuple[list, Genesis, list]:
    """Four validators, their genesis, and ``count`` transactions of one
    sender (nonces 0, 1, ...): what a validator alone (never committing) gets."""
    validators = sorted(_identities(seed, 4), key=lambda i: i.public_key)
    genesis = Genesis.create(CHAIN, 1_000, [v.public_key for v in validators])
    sender = Identity(bytes([seed]) * 32)
    txs = [
        sign_transaction(sender, CHAIN, type="kv", content=kv_set("k", n), nonce=n, timestamp=0)
        for n in range(count)
    ]
    return validators, genesis, txs


async def test_a_full_mempool_answers_busy_and_keeps_its_bound(tmp_path) -> None:
    validators, genesis, txs = _validators_and_one_senders_txs(2, 30)
    store = SqliteBlockStore(tmp_path / "alone.sqlite")
    # One validator alone never commits; a mempool of 10 fills.
    async with open_ledger_node(validators[0], genesis, store, mempool_txs=10, tcp=TCP) as alone:
        statuses = alone.service.submit_many([t.encoded for t in txs])
        assert [s for s, _ in statuses].count(SubmitStatus.ACCEPTED) == 10
        assert all(s == SubmitStatus.BUSY for s, _ in statuses[10:])
        assert len(alone.ledger.mempool) == 10
        with pytest.raises(MempoolFull):
            alone.service.submit(txs[29].encoded)
    store.close()


async def test_a_paced_validator_refuses_the_rest_of_a_batch_at_once(tmp_path) -> None:
    """Past saturation a client's batch is refused from the first
    submission the pacing refuses: every later one hears busy without
    being decoded (garbage included) and is counted; forwards still enter."""
    validators, genesis, txs = _validators_and_one_senders_txs(4, 12)
    store = SqliteBlockStore(tmp_path / "alone.sqlite")
    async with open_ledger_node(validators[0], genesis, store, mempool_txs=100, tcp=TCP) as alone:
        ledger = alone.ledger
        ledger.mempool.client_limit = 4  # as the commit pacing would set it
        statuses = alone.service.submit_many([t.encoded for t in txs[:6]] + [b"\xc1 junk"])
        assert [s for s, _ in statuses] == [SubmitStatus.ACCEPTED] * 4 + [SubmitStatus.BUSY] * 3
        assert ledger.node.counters["tx.busy"] == 3
        assert ledger.node.counters["tx.malformed_consensus"] == 0, "junk was not decoded"
        forwarded = ledger.admit_many([t.encoded for t in txs[4:8]], forwarded=True)
        assert all(isinstance(entry, Transaction) for entry in forwarded)
        assert len(ledger.mempool) == 8
    store.close()


async def test_refused_submissions_leave_no_garbage_cycles(tmp_path) -> None:
    """A refusal is returned without its traceback: kept with it, the
    exception held the admitting frame, which held the list holding the
    exception, garbage only the cyclic collector frees (late forwards made
    thousands of such cycles a second under load)."""
    validators, genesis, txs = _validators_and_one_senders_txs(5, 4)
    store = SqliteBlockStore(tmp_path / "alone.sqlite")
    async with open_ledger_node(validators[0], genesis, store, tcp=TCP) as alone:
        ledger = alone.ledger
        ledger.admit_many([t.encoded for t in txs], forwarded=True)
        gc.collect()
        gc.disable()
        try:
            refused = ledger.admit_many([t.encoded for t in txs] + [b"\xc1 junk"], forwarded=True)
            refused += alone.service.submit_many([t.encoded for t in txs])
            assert len(refused) == 9
            del refused
            assert gc.collect() == 0, "a refusal left a reference cycle behind"
        finally:
            gc.enable()
    store.close()


async def test_waiters_are_bounded_and_time_out(tmp_path) -> None:
    validators = sorted(_identities(3, 4), key=lambda i: i.public_key)
    genesis = Genesis.create(CHAIN, 1_000, [v.public_key for v in validators])
    store = SqliteBlockStore(tmp_path / "alone.sqlite")
    async with open_ledger_node(validators[0], genesis, store, tcp=TCP) as alone:
        alone.service.max_waiters = 1
        with pytest.raises(trio.TooSlowError):
            await alone.service.wait_committed(bytes(32), timeout=0.05)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alone.service.wait_committed, bytes(32), 5.0)
            await trio.sleep(0.01)
            with pytest.raises(MempoolFull):
                await alone.service.wait_committed(bytes(range(32)), timeout=1.0)
            nursery.cancel_scope.cancel()
        assert alone.service._waiting == 0
    store.close()
