"""Validator set changes (epochs) end to end: four genesis validators and one
extra node, following from the start, on a SimNetwork in virtual time. A
``validators`` transaction approved by a quorum replaces one validator with
the extra node under a steady stream of kv transactions; the set of epoch 1
certifies every later block (votes sign the epoch's chain id), the removed
validator follows, the newcomer votes, and every store verifies from the
genesis (``consensus/SPEC.md``, "Validator set changes")."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import trio
import trio.testing
from hostile import HostileTransport

from fedchain.consensus.block import Block, decode_block, encode_block
from fedchain.consensus.chain import ChainTip, Executor, verify_chain
from fedchain.consensus.client import LedgerClient, TrustedValidators, UntrustedAnswer
from fedchain.consensus.client_api import CommitProof
from fedchain.consensus.contracts import (
    TxResult,
    epoch_chain_id,
    kv_key,
    kv_set,
    validator_change_transaction,
)
from fedchain.consensus.errors import DuplicateTransaction, MempoolFull
from fedchain.consensus.genesis import Genesis
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.pbft import PbftConfig
from fedchain.consensus.replica import LedgerReplica
from fedchain.consensus.service import LedgerService
from fedchain.consensus.store import MemoryBlockStore
from fedchain.consensus.tx import SignatureCache, Transaction, sign_transaction
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import Node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork
from fedchain.p2p.wire import FrameCache, MessageType

CHAIN = "reconfig-test"
CLIENTS = 8
PER_CLIENT = 20
OUT = 3
"""The genesis validator (index in key order) the change removes."""
EXTRA = 4
"""The index of the node that follows from the start and joins the set."""
CHANGE_AT = 0.8


def _certify(block: Block, signers: list[Identity], chain_id: str) -> Block:
    votes = [
        (s.public_key, sign_commit_vote(s, chain_id, block.height, block.hash, view=0))
        for s in signers
    ]
    return block.with_certificate(CommitCertificate.of(block.height, block.hash, votes, view=0))


def _identities(seed: int) -> tuple[np.random.Generator, list[Identity]]:
    """The four genesis validators (in key order) and the extra node, and
    the generator the run goes on drawing from."""
    rng = np.random.Generator(np.random.PCG64(seed))
    identities = sorted((Identity(rng.bytes(32)) for _ in range(4)), key=lambda i: i.public_key)
    identities.append(Identity(rng.bytes(32)))
    return rng, identities


def _run(
    *,
    seed: int = 11,
    duration: float = 5.0,
    restarts=(),
    forge: bool = False,
    client_at: float | None = None,
    resubmit_after: float | None = None,
    tail_at: float | None = None,
    hostile: int | None = None,
    batch_size: int = 64,
):
    """Run the cluster; ``restarts`` are (index, down_at, up_at) crashes
    followed by a new process on the same store. ``client_at``: then a
    LedgerClient that trusts only the genesis set queries node 0 and waits
    for a late transaction (what it got lands in ``seen``).
    ``resubmit_after``: clients send again what has not committed that
    long after they sent it (a node that crashes loses its mempool, and
    what it had accepted with it). ``tail_at``: one more transaction then,
    so a block commits after every restart is over (it joins ``txs``).
    ``batch_size``: PBFT's, which also sets the validators' admission floor
    (two batches)."""
    rng, identities = _identities(seed)
    ids = [i.public_key for i in identities]
    genesis = Genesis.create(CHAIN, 1_000, ids[:4])
    new_set = sorted([ids[i] for i in range(4) if i != OUT] + [ids[EXTRA]])
    # Approved by a quorum (3 of 4) of the current set, the leaving one included.
    approvers = [identities[i] for i in (0, 1, 3)]
    admin = Identity(rng.bytes(32))
    change = validator_change_transaction(admin, CHAIN, new_set, approvers, epoch=0, nonce=0)
    clients = [Identity(rng.bytes(32)) for _ in range(CLIENTS)]
    txs = [
        sign_transaction(c, CHAIN, type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0)
        for c in clients
        for n in range(PER_CLIENT)
    ]
    tail = sign_transaction(
        Identity(b"t" * 32), CHAIN, type="kv", content=kv_set("tail", 1), nonce=0, timestamp=0
    )
    signatures = SignatureCache(CHAIN)
    net = SimNetwork(seed, LinkModel(latency=Constant(0.01)))
    transports = [net.add_node(peer) for peer in ids]
    forger = Identity(rng.bytes(32))
    frames = FrameCache()
    ledgers: list[LedgerReplica] = []
    services: dict[int, LedgerService] = {}
    config = PbftConfig(batch_size=batch_size, batch_timeout=0.02)
    seen: dict[str, object] = {"restarted": []}

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            def node_for(identity: Identity, transport) -> Node:
                node = Node(
                    identity,
                    transport,
                    frame_cache=frames,
                    start_seq=int(trio.current_time() * 1e6),
                    wakeup=net.wakeup_for(identity.public_key),
                )
                node.bind(nursery)
                net.drive(node)
                return node

            def boot(index: int, transport, store) -> LedgerReplica:
                if index == hostile:  # a byzantine validator: see hostile.py
                    transport = HostileTransport(
                        transport,
                        identities[index],
                        lambda: ledgers[index].chain_id,  # its epoch's, as it moves
                        random.Random(seed),
                    )
                ledger = LedgerReplica(
                    node_for(identities[index], transport),
                    Executor(genesis, cache_blocks=64, signatures=signatures),
                    store,
                    Mempool(CHAIN, signatures=signatures),
                    config,
                    timestamp_ms=lambda: genesis.genesis_time + int(trio.current_time() * 1000),
                )
                services[index] = LedgerService(ledger)
                return ledger

            for index in range(5):
                ledgers.append(boot(index, transports[index], MemoryBlockStore()))
                ledgers[index].start()
            assert [ledger.is_validator for ledger in ledgers] == [True] * 4 + [False]

            # Clients 0..5 use validators that stay; client 6 the one that
            # leaves (a follower after the change: it forwards to the new
            # set); client 7 the extra node (a follower, then a validator);
            # a client whose node is down uses a validator that stays.
            down: set[int] = set()

            def submit(client: int, tx: Transaction) -> None:
                via = {6: OUT, 7: EXTRA}.get(client, client % 3)
                try:
                    services[client % 3 if via in down else via].submit(tx)
                except MempoolFull:  # busy (paced by commits): ask again, as a client would
                    net.schedule(trio.current_time() + 0.2, lambda: submit(client, tx))
                    return
                except DuplicateTransaction:  # a forward brought it meanwhile
                    pass
                if resubmit_after is not None:

                    def again() -> None:
                        if services[0].committed_at(tx.digest) is None:
                            submit(client, tx)

                    net.schedule(trio.current_time() + resubmit_after, again)

            for k, tx in enumerate(txs):
                client, n = divmod(k, PER_CLIENT)
                at = n * 0.1 + client * 0.01
                net.schedule(at, lambda client=client, tx=tx: submit(client, tx))
            net.schedule(CHANGE_AT, lambda: services[0].submit(change))
            if tail_at is not None:
                net.schedule(tail_at, lambda: submit(0, tail))

            for index, down_at, up_at in restarts:

                def crash(index: int = index) -> None:
                    down.add(index)
                    net.crash(ids[index])
                    net.detach(ids[index])
                    ledgers[index].node.crash()

                def reboot(index: int = index) -> None:
                    net.restore(ids[index])
                    store = ledgers[index].store
                    seen["restarted"].append((index, store.tip()))
                    ledgers[index] = boot(index, net.reattach(ids[index]), store)
                    seen[f"role{index}"] = (ledgers[index].epoch, ledgers[index].is_validator)
                    ledgers[index].start()
                    down.discard(index)

                net.schedule(down_at, crash)
                net.schedule(up_at, reboot)

            if client_at is not None:
                reader = Identity(b"r" * 32)
                client = LedgerClient(
                    node_for(reader, net.add_node(reader.public_key)), ids[0], CHAIN, ids[:4]
                )

                newcomer = Identity(b"s" * 32)
                # A client that never trusted the genesis set: it starts
                # from epoch 1's, and its node pages headers four at a time.
                late_client = LedgerClient(
                    node_for(newcomer, net.add_node(newcomer.public_key)),
                    ids[1],
                    CHAIN,
                    new_set,
                    epoch=1,
                )
                services[1].max_headers = 4

                async def read_late() -> None:
                    await trio.sleep(client_at)
                    answer = await client.query(kv_key(clients[0].public_key, "k5"))
                    seen["client_query"] = (answer.value, answer.height, client.trusted.epoch)
                    proof = await client.wait_committed(txs[-1].encoded, timeout=5.0)
                    seen["client_proof_height"] = proof.height
                    # The first transaction committed in epoch 0: the late
                    # client checks it by walking back from epoch 1's first block.
                    early = await late_client.wait_committed(txs[0].encoded, timeout=5.0)
                    seen["early_proof"] = early
                    forged = dataclasses.replace(early.header, tx_root=bytes(32))
                    seen["forged_is_ancestor"] = await late_client.is_trusted_ancestor(forged)
                    seen["late_client_epoch"] = late_client.trusted.epoch

                nursery.start_soon(read_late)

            if forge:
                forger_node = node_for(forger, net.add_node(forger.public_key))
                fakes = [Identity(rng.bytes(32)) for _ in range(4)]

                def send_forged() -> None:
                    # The next block on the removed validator's tip (it
                    # follows by now), certified by four non-validators.
                    follower = ledgers[OUT]
                    seen["forged_at"] = follower.tip.height
                    block, _ = follower.executor.build_block(
                        follower.tip, [], timestamp=0, view=0, proposer=fakes[0].public_key
                    )
                    chain_id = epoch_chain_id(CHAIN, follower.tip.epoch)
                    forged = encode_block(_certify(block, fakes, chain_id))
                    for body in ([1, [forged]], [1, [b"\x93junk"]], [1, "nope"]):
                        forger_node.send(ids[OUT], MessageType.BLOCK_SYNC, _pack(body))

                net.schedule(1.5, send_forged)

            nursery.start_soon(net.run)
            await trio.sleep(duration)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if tail_at is not None:
        txs.append(tail)
    return genesis, ids, new_set, change, txs, ledgers, seen


def _pack(body: object) -> bytes:
    import msgpack

    return msgpack.packb(body)


def _check(genesis, ids, new_set, change: Transaction, txs, ledgers) -> int:
    """Everything the brief promises of a run with one change; the change's height."""
    tips = {ledger.store.tip() for ledger in ledgers}
    assert len(tips) == 1, f"nodes at different heights: {tips}"
    tip = tips.pop()
    for height in range(1, tip + 1):
        hashes = {ledger.store.get(height).block_hash for ledger in ledgers}
        assert len(hashes) == 1, f"nodes disagree at height {height}"
    blocks = [decode_block(ledgers[0].store.get(h).data) for h in range(1, tip + 1)]
    # The change commits at some height h, and succeeds.
    where = [(b.height, b.results[i]) for b in blocks for i, tx in enumerate(b.txs) if tx == change]
    assert len(where) == 1, "the change committed once"
    h, result = where[0]
    assert result == TxResult(0), result
    # Blocks followed it (how many varies: after a stall the backlog fills
    # a few large blocks; the new set's own certificates are checked below).
    assert h < tip - 1, "blocks followed the change"
    # Blocks up to h are certified by the genesis set, later ones by the new set.
    epoch1 = epoch_chain_id(CHAIN, 1)
    assert epoch1 != CHAIN
    newcomer_votes = 0
    for ledger in ledgers:
        for height in range(1, tip + 1):
            cert = decode_block(ledger.store.get(height).data).certificate
            if height <= h:
                assert cert.is_valid(CHAIN, ids[:4])
            else:
                assert cert.is_valid(epoch1, new_set), f"block {height} not by the new set"
                assert not cert.is_valid(CHAIN, ids[:4])
                assert {key for key, _ in cert.votes} <= set(new_set)
                newcomer_votes += ids[EXTRA] in {key for key, _ in cert.votes}
    assert newcomer_votes > 0, "the new validator takes part"
    # A client's commit proof from after the change verifies only against
    # the new set and epoch 1's chain id (LedgerClient(..., epoch=1)).
    late = next(b for b in blocks if b.height > h and b.txs)
    proof = CommitProof.of_block(decode_block(ledgers[0].store.get(late.height).data), 0)
    assert proof.verify(late.txs[0].encoded, epoch1, new_set)
    assert not proof.verify(late.txs[0].encoded, CHAIN, ids[:4])
    # Every store verifies from the genesis, across the change.
    for ledger in ledgers:
        report = verify_chain(genesis, [ledger.store.get(x).data for x in range(1, tip + 1)])
        assert report.ok, report.error
        assert report.height == tip and report.tip.validators == new_set
    # Roles: the removed validator follows, the extra node validates.
    assert all(ledger.epoch == 1 for ledger in ledgers)
    assert [ledger.is_validator for ledger in ledgers] == [True, True, True, False, True]
    assert ledgers[OUT].replica is None and ledgers[OUT].validators == tuple(new_set)
    assert ledgers[EXTRA].replica.validators == tuple(new_set)
    assert ledgers[EXTRA].replica.chain_id == epoch1
    # Every transaction committed exactly once; nothing left behind.
    committed = [tx.encoded for b in blocks for tx in b.txs]
    assert sorted(committed) == sorted([tx.encoded for tx in txs] + [change.encoded])
    assert all(len(ledger.mempool) == 0 for ledger in ledgers)
    return h


def test_a_validator_is_replaced_under_load_and_the_nodes_switch_roles() -> None:
    """The change commits at h; the new set (chain id of epoch 1) certifies
    every block after h; the removed validator keeps following, refusing a
    forged block and malformed answers; the extra node follows, then votes."""
    genesis, ids, new_set, change, txs, ledgers, seen = _run(forge=True, client_at=3.0)
    h = _check(genesis, ids, new_set, change, txs, ledgers)
    # A client given only the genesis set followed the change by proof
    # (EPOCHS over the network) and accepted answers of epoch 1.
    value, height, epoch = seen["client_query"]
    assert (value, epoch) == (5, 1) and height > h
    assert seen["client_proof_height"] > h
    # A client trusting only epoch 1's set accepted a commit from epoch 0
    # (below h) by walking back through pages of four headers, and refused
    # a header that is not on the chain at that height.
    early = seen["early_proof"]
    assert early.height + 4 < h, "the walk spans several pages"
    assert early.verify(txs[0].encoded, CHAIN, ids[:4])
    assert not early.verify(txs[0].encoded, epoch_chain_id(CHAIN, 1), new_set)
    assert seen["forged_is_ancestor"] is False and seen["late_client_epoch"] == 1
    assert ledgers[OUT].epoch_changes == 1 and ledgers[EXTRA].epoch_changes == 1
    assert ledgers[OUT].node.counters["follow.blocks"] > 0, "the removed validator follows"
    assert ledgers[EXTRA].node.counters["follow.blocks"] >= h
    # The forged block was refused and counted, not stored; following went on.
    assert seen["forged_at"] > h
    counters = ledgers[OUT].node.counters
    assert counters["follow.refused.invalid_certificate"] >= 1
    assert sum(v for k, v in counters.items() if k.startswith("rejected.")) >= 2
    assert ledgers[OUT].store.tip() > seen["forged_at"] + 1


def test_a_client_trusts_the_next_set_only_by_a_proof_the_current_set_certified() -> None:
    """``TrustedValidators``: every node holds the proof of the change (the
    state after block h, certified by the genesis set), restarted or not;
    it moves a client from the genesis set to the new one, and a forged or
    replayed change moves nothing."""
    genesis, ids, new_set, change, txs, ledgers, _ = _run(restarts=[(OUT, 1.2, 1.5)], duration=4.0)
    h = _check(genesis, ids, new_set, change, txs, ledgers)
    answers = {ledger.node.id: ledger.validator_changes for ledger in ledgers}
    assert all(list(changes) == [1] for changes in answers.values())
    (answer, _), (rebuilt, _) = ledgers[0].validator_changes[1], ledgers[OUT].validator_changes[1]
    assert answer == rebuilt and answer.height == h  # replay rebuilt it after the restart

    late = next(
        decode_block(ledgers[0].store.get(x).data)
        for x in range(h + 1, ledgers[0].store.tip() + 1)
        if decode_block(ledgers[0].store.get(x).data).txs
    )
    proof = CommitProof.of_block(late, 0)
    trusted = TrustedValidators(CHAIN, ids[:4])
    assert not trusted.verifies_commit(proof, late.txs[0].encoded)
    forged = answer._replace(value=[1, sorted([*ids[:3], bytes(32)])])
    with pytest.raises(UntrustedAnswer):
        trusted.advance(forged)
    assert (trusted.epoch, trusted.validators) == (0, tuple(ids[:4]))
    early = decode_block(ledgers[0].store.get(h).data)  # the change block itself
    early_proof = CommitProof.of_block(early, 0)
    assert trusted.verifies_commit(early_proof, early.txs[0].encoded)
    trusted.advance(answer)
    assert (trusted.epoch, trusted.validators, trusted.chain_id) == (
        1,
        tuple(new_set),
        f"{CHAIN}#1",
    )
    assert trusted.verifies_commit(proof, late.txs[0].encoded)
    # A proof from before the change still verifies, by the genesis set...
    assert trusted.verifies_commit(early_proof, early.txs[0].encoded)
    # ...but the genesis set certifies nothing above the change: the same
    # votes on a later height (a retired set forging) are refused.
    forged_late = CommitProof.of_block(_certify(late, _identities(11)[1][:3], CHAIN), 0)
    assert not trusted.verifies_commit(forged_late, late.txs[0].encoded)
    with pytest.raises(UntrustedAnswer):
        trusted.advance(answer)  # replayed: the genesis set's votes do not certify for epoch 1
    assert trusted.epoch == 1


def test_nodes_restarted_after_the_change_resume_in_their_epoch_and_role() -> None:
    """The removed validator (a follower now) and the new validator crash
    after the change, under load, and restart on their stores: replay lands
    each in epoch 1 with its role, and both catch up."""
    genesis, ids, new_set, change, txs, ledgers, seen = _run(
        restarts=[(OUT, 1.2, 1.5), (EXTRA, 1.3, 1.7)], duration=6.0
    )
    h = _check(genesis, ids, new_set, change, txs, ledgers)
    assert [index for index, _ in seen["restarted"]] == [OUT, EXTRA]
    assert all(height > h for _, height in seen["restarted"]), "restarted after the change"
    assert all(height < ledgers[0].store.tip() - 5 for _, height in seen["restarted"])
    assert seen[f"role{OUT}"] == (1, False)
    assert seen[f"role{EXTRA}"] == (1, True)
    assert ledgers[EXTRA].epoch_changes == 0, "the restart began in epoch 1"


def test_a_validator_restarted_in_the_epoch_the_others_left_learns_of_the_change() -> None:
    """Found by a seeded sweep of restarts around the change: the leaving
    validator crashes before the change commits and restarts after it, an
    idle validator of epoch 0 on its store. Nobody sends epoch 0's messages
    any more, so PBFT's own transfer never starts; it used to poll only
    with work in hand and stayed at its stored height for good. An idle
    stalled validator now polls too (backing off), follows the change and
    becomes a follower."""
    genesis, ids, new_set, change, txs, ledgers, seen = _run(
        seed=36, restarts=[(OUT, 0.619, 1.952), (EXTRA, 2.174, 3.309)], duration=10.0
    )
    h = _check(genesis, ids, new_set, change, txs, ledgers)
    restarted_at = dict(seen["restarted"])[OUT]
    assert restarted_at < h, "it restarted in epoch 0"
    assert seen[f"role{OUT}"] == (0, True)
    assert ledgers[OUT].epoch_changes == 1


def test_a_follower_sends_on_again_what_the_validators_refused() -> None:
    """Found by the same sweep: with the new validator down, the one that
    leaves (a follower from the change on) forwards its clients'
    transactions, which the validators admit as a client's, paced, and
    answered busy; the follower held them, its clients had heard
    "accepted", and they never committed. A follower now sends what it
    still holds again after a poll interval without a block. Batches of 8
    keep the validators' room small (two batches while the stall leaves no
    rate), so the stall behind the new primary's crash fills it whatever
    each validator's share of the commits was."""
    genesis, ids, new_set, change, txs, ledgers, _ = _run(
        seed=15, restarts=[(EXTRA, 1.099, 2.692)], duration=10.0, batch_size=8
    )
    _check(genesis, ids, new_set, change, txs, ledgers)
    assert ledgers[OUT].node.counters["client.reforwarded"] > 0
    refused = sum(ledgers[i].node.counters["tx.busy"] for i in range(3))
    assert refused > 0, "the validators answered some forward busy"


@pytest.mark.parametrize("seed", [23, 40, 118, 150])
def test_random_restarts_around_the_change(seed: int) -> None:
    """The sweep's mix: the leaving and the new validator each restart
    (or not) at random moments around the change, clients send again what
    has not committed after 2 s (a crashed node loses what it accepted),
    and one last transaction at 7 s makes every node that is back take
    part: the run ends agreeing, complete, and in its roles (``_check``)."""
    rng = np.random.default_rng(seed + 31)
    restarts = []
    for index in (OUT, EXTRA):
        if rng.random() < 0.7:
            down = float(rng.uniform(0.2, 3.5))
            restarts.append((index, down, down + float(rng.uniform(0.1, 2.5))))
    genesis, ids, new_set, change, txs, ledgers, _ = _run(
        seed=seed, restarts=restarts, duration=10.0, resubmit_after=2.0, tail_at=7.0
    )
    _check(genesis, ids, new_set, change, txs, ledgers)


def test_a_certificate_of_the_epoch_0_chain_id_does_not_certify_epoch_1() -> None:
    """Votes of one epoch never count in another: after a change, a
    certificate the new set signed with the genesis chain id is refused;
    signed with the epoch's chain id it verifies. Epoch 0 signs the plain
    chain id (chains from before epochs stay valid)."""
    validators = [Identity(bytes([i + 1]) * 32) for i in range(4)]
    newcomer = Identity(b"n" * 32)
    alice = Identity(b"a" * 32)
    genesis = Genesis.create(CHAIN, 1_000, [v.public_key for v in validators])
    executor = Executor(genesis)
    tip = ChainTip.of_genesis(genesis)
    new_set = sorted([newcomer.public_key] + [v.public_key for v in validators[1:]])
    change = validator_change_transaction(alice, CHAIN, new_set, validators[1:], epoch=0, nonce=0)
    assert epoch_chain_id(CHAIN, 0) == CHAIN and epoch_chain_id(CHAIN, 1) == f"{CHAIN}#1"
    with pytest.raises(ValueError):
        epoch_chain_id(CHAIN, -1)
    first, _ = executor.build_block(
        tip, [change], timestamp=1_000, view=0, proposer=validators[0].public_key
    )
    first = _certify(first, validators[:3], CHAIN)
    tip = executor.apply_final(tip, first)
    assert tip.epoch == 1 and tip.validators == new_set
    assert executor.vote_chain_id(tip) == f"{CHAIN}#1"
    kv = sign_transaction(alice, CHAIN, type="kv", content=kv_set("k", 1), nonce=1, timestamp=0)
    second, _ = executor.build_block(
        tip, [kv], timestamp=1_000, view=0, proposer=newcomer.public_key
    )
    signers = [newcomer, *validators[1:3]]
    stale = _certify(second, signers, CHAIN)
    fresh = _certify(second, signers, epoch_chain_id(CHAIN, 1))
    bad = verify_chain(genesis, [encode_block(first), encode_block(stale)])
    assert not bad.ok and bad.height == 2 and "certificate" in bad.error
    good = verify_chain(genesis, [encode_block(first), encode_block(fresh)])
    assert good.ok and good.height == 2
    # ...and the epoch-1 chain id does not certify an epoch-0 block.
    assert not verify_chain(
        genesis, [encode_block(_certify(first, validators[:3], f"{CHAIN}#1"))]
    ).ok


@pytest.mark.parametrize(("hostile", "seed", "duration"), [(0, 12, 8.0), (EXTRA, 4, 5.0)])
def test_a_validator_signing_garbage_across_the_change(
    hostile: int, seed: int, duration: float
) -> None:
    """One validator signs well-formed nonsense after each of its PBFT
    messages (hostile.py) under its current epoch's chain id: view 0's
    primary, in both epochs, or the newcomer once it votes. The change
    still commits and every node ends agreeing, complete and in its role.

    Seed 12 found a fork: epoch 1's replicas started with their low
    watermark at h - h % K but the stable checkpoint at 0, so their
    VIEW-CHANGEs left out what they prepared above L; and a block could
    commit on a parent only pre-prepared, which the next view replaced
    (Replica ``base``, P-CHAINED-COMMIT and the NEW-VIEW plan, SPEC)."""
    genesis, ids, new_set, change, txs, ledgers, _ = _run(
        seed=seed, hostile=hostile, duration=duration
    )
    assert ledgers[hostile].node.transport.sent > 300
    _check(genesis, ids, new_set, change, txs, ledgers)
