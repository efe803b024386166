"""``fedchain bench consensus`` (virtual time): N PBFT validators commit B
blocks on the simulated network, in one process, in trio's virtual time.

What it measures is the cost of *simulating* consensus: the wall time a run
takes, the simulated frames delivered per wall second, and the peak RSS.
Network time is free under ``MockClock(autojump_threshold=0)``, so the
figures are the Python work of every validator (decoding, checking,
voting, executing) and nothing else.

The run. ``validators`` identities and ``clients`` client keys come from one
seeded numpy Generator. The genesis caps a block at ``txs_per_block``
transactions and PBFT batches exactly that many, so the
``blocks * txs_per_block`` kv transactions the clients sign (before the
clock starts) need at least ``blocks`` blocks. Every ``interval`` virtual
seconds one block's worth of them (round robin over the clients, each
client's in nonce order) reaches every validator at once: clients multicast
their requests, as PBFT's clients may, so the primary can fill a block at
once and a backup holding a request can watch the primary. Transaction
dissemination is not what this measures, and it keeps the run about the
``blocks`` blocks asked for. The run stops at the first poll (every
``poll_s`` virtual seconds) at which every validator's store holds
``blocks`` blocks, and fails loudly if that has not happened by
``max_virtual_s``.

Links: constant ``latency`` and 1 Gbit/s uplinks (validators in data
centres). At 100 Mbit/s the primary's uplink alone, sending each ~3 KB
proposal to 99 others, would cap 100 validators near 30 blocks per second.

Sharing in one process. Verification is a pure function of the bytes
verified, so all validators share one :class:`~fedchain.p2p.wire.FrameCache`
(a frame broadcast to 99 peers has its envelope signature checked once),
one :class:`~fedchain.consensus.tx.SignatureCache` (a transaction's
signature is checked once, not once per validator) and one
:class:`~fedchain.consensus.chain.Executor` with a block cache (a block is
executed once; every other validator still checks its link, limits, body
and signatures, and gets the cached state only for the same parent state
root and block hash), one :class:`~fedchain.p2p.identity.SignatureMemo`
for PBFT's message signatures and the commit votes in certificates (a
COMMIT broadcast to 99 validators is verified once, and its vote is not
verified again in the block's certificate), and one
:class:`~fedchain.consensus.pbft_messages.MessageCache` (a broadcast body
is decoded once). Every message is still checked before any validator uses
it: the caches remember only successes. Together they took the 100 x 100
run from 468 to about 150 CPU seconds.

Determinism: identities, transactions, network draws and block timestamps
(virtual clock) all follow from ``seed``, so a seed fixes the chain;
``tip_hash`` in the result names it.

Top-level imports stay light: ``fedchain --help`` imports this module.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .arguments import int_at_least

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import trio

    from fedchain.consensus.genesis import Genesis
    from fedchain.consensus.pbft import PbftConfig
    from fedchain.consensus.replica import LedgerReplica
    from fedchain.p2p.identity import Identity
    from fedchain.p2p.simnet import SimNetwork

CHAIN_ID = "bench-consensus"
GENESIS_TIME_MS = 1_700_000_000_000
BANDWIDTH_BPS = 1e9
CACHE_BLOCKS = 256
"""Executor cache entries: a window of 32 proposals in flight, with room to spare."""


_COLUMNS = (
    ("validators", "validators"),
    ("blocks", "blocks"),
    ("txs", "committed_txs"),
    ("view", "view"),
    ("agree", "agreement"),
    ("verifies", "chain_verifies"),
    ("virtual s", "virtual_s"),
    ("wall s", "wall_s"),
    ("CPU s", "cpu_s"),
    ("msgs/wall s", "messages_per_wall_s"),
    ("peak MiB", "peak_rss_bytes"),
)
"""Table column titles and the result keys they show (RSS shown in MiB)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--validators", type=int_at_least(1), default=100, help="validators (default 100)"
    )
    parser.add_argument(
        "--blocks", type=int_at_least(1), default=100, help="blocks to commit (default 100)"
    )
    parser.add_argument(
        "--txs-per-block",
        type=int_at_least(1),
        default=20,
        help="transactions per block (default 20)",
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0)


def run(args: argparse.Namespace) -> int:
    from fedchain.sims.report import emit_json, print_table, progress

    with progress() as bar:
        task = bar.add_task(f"{args.validators} validators", total=args.blocks)
        result = run_virtual(
            args.validators,
            args.blocks,
            txs_per_block=args.txs_per_block,
            seed=args.seed,
            on_progress=lambda height: bar.update(task, completed=height),
        )
    print_table(
        "PBFT consensus (virtual time)",
        [title for title, _ in _COLUMNS],
        [[result[key] for _, key in _COLUMNS[:-1]] + [result["peak_rss_bytes"] / 2**20]],
    )
    figures = {k: v for k, v in result.items() if k != "peak_rss_bytes"}
    emit_json("consensus_virtual", figures)
    return 0 if result["agreement"] and result["chain_verifies"] else 1


@dataclass(frozen=True)
class _Setup:
    """Everything fixed before the clock starts."""

    genesis: Genesis
    identities: list[Identity]
    """Validators in genesis order (sorted keys): index 0 is view 0's primary."""
    rounds: list[tuple[float, list[bytes]]]
    """(virtual time, signed transactions every validator then receives)."""


def run_virtual(
    validators: int = 100,
    blocks: int = 100,
    *,
    txs_per_block: int = 20,
    seed: int = 0,
    latency: float = 0.01,
    clients: int = 20,
    interval: float = 0.01,
    poll_s: float = 0.005,
    max_virtual_s: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``validators`` PBFT validators until each has ``blocks`` blocks.

    Returns the figures named in the module docstring. Raises RuntimeError
    if the slowest validator has not reached ``blocks`` by ``max_virtual_s``
    (default: twice the submission time plus 30 s). ``on_progress`` hears
    the slowest validator's height whenever it grows (a progress bar).
    """
    if validators < 1 or blocks < 1 or txs_per_block < 1 or clients < 1 or interval <= 0:
        raise ValueError("validators, blocks, txs per block, clients and interval are positive")
    setup = _prepare(validators, blocks, txs_per_block, seed, clients, interval)
    if max_virtual_s is None:
        max_virtual_s = 2 * setup.rounds[-1][0] + 30.0
    ledgers, net, virtual_s, timing = _simulate(
        setup, seed, latency, txs_per_block, blocks, poll_s, max_virtual_s, on_progress
    )
    return _figures(setup.genesis, ledgers, net, virtual_s, timing)


# -- before the clock ---------------------------------------------------------


def _prepare(
    validators: int, blocks: int, txs_per_block: int, seed: int, clients: int, interval: float
) -> _Setup:
    """Keys, genesis and every transaction, signed in advance (not timed)."""
    import numpy as np

    from fedchain.consensus.genesis import ConsensusParams, Genesis

    rng = np.random.Generator(np.random.PCG64(seed))
    identities = sorted(_identities(rng, validators), key=lambda i: i.public_key)
    params = ConsensusParams(max_block_txs=txs_per_block)
    genesis = Genesis.create(
        CHAIN_ID, GENESIS_TIME_MS, [i.public_key for i in identities], params=params
    )
    keys = _identities(rng, clients)
    txs = _sign_transactions(keys, blocks * txs_per_block)
    rounds = [
        (r * interval, txs[r * txs_per_block : (r + 1) * txs_per_block]) for r in range(blocks)
    ]
    return _Setup(genesis, identities, rounds)


def _identities(rng: np.random.Generator, count: int) -> list[Identity]:
    from fedchain.p2p.identity import Identity

    return [Identity(rng.bytes(32)) for _ in range(count)]


def _sign_transactions(keys: list[Identity], count: int) -> list[bytes]:
    """``count`` kv writes, round robin over the clients, each client's in
    nonce order (the order its validator will see them)."""
    from fedchain.consensus.contracts import kv_set
    from fedchain.consensus.tx import sign_transaction

    out = []
    for k in range(count):
        client, nonce = keys[k % len(keys)], k // len(keys)
        content = kv_set(f"k{nonce}", nonce)
        tx = sign_transaction(
            client, CHAIN_ID, type="kv", content=content, nonce=nonce, timestamp=GENESIS_TIME_MS
        )
        out.append(tx.encoded)
    return out


# -- the timed part -----------------------------------------------------------


def _simulate(
    setup: _Setup,
    seed: int,
    latency: float,
    txs_per_block: int,
    blocks: int,
    poll_s: float,
    max_virtual_s: float,
    on_progress: Callable[[int], None] | None,
) -> tuple[list[LedgerReplica], SimNetwork, float, tuple[float, float]]:
    """Build the validators inside one trio run and run until done; the
    ledgers, the network, the virtual seconds and the (wall, CPU) seconds
    it took (CPU time tells a busy machine from a slow simulation)."""
    import trio
    import trio.testing

    from fedchain.consensus.pbft import PbftConfig
    from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork

    model = LinkModel(latency=Constant(latency), bandwidth_bps=BANDWIDTH_BPS)
    # Every validator is driven and the poller only sleeps: the network is
    # the sole actor, so it may advance the virtual clock itself.
    net = SimNetwork(seed, model, advance_clock=True)
    config = PbftConfig(batch_size=txs_per_block)
    ledgers: list[LedgerReplica] = []
    reached: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ledgers.extend(_build_validators(setup, net, config, nursery))
            for at, txs in setup.rounds:
                net.schedule(at, lambda txs=txs: _multicast(ledgers, txs))
            nursery.start_soon(net.run)
            reached.append(
                await _wait_for_blocks(ledgers, blocks, poll_s, max_virtual_s, on_progress)
            )
            nursery.cancel_scope.cancel()

    clock = trio.testing.MockClock(autojump_threshold=0)
    wall, cpu = time.perf_counter(), time.process_time()
    trio.run(main, clock=clock)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    slowest = min(ledger.store.tip() for ledger in ledgers)
    if not reached[0]:
        raise RuntimeError(
            f"after {max_virtual_s:g} s of virtual time the slowest validator holds "
            f"{slowest} of {blocks} blocks (views: {sorted({lg.replica.view for lg in ledgers})})"
        )
    return ledgers, net, clock.current_time(), (wall, cpu)


def _build_validators(
    setup: _Setup, net: SimNetwork, config: PbftConfig, nursery: trio.Nursery
) -> list[LedgerReplica]:
    """One driven node and ledger per validator, sharing the verification
    caches and the executor (see the module docstring)."""
    import trio

    from fedchain.consensus.chain import Executor
    from fedchain.consensus.mempool import Mempool
    from fedchain.consensus.pbft_messages import MessageCache
    from fedchain.consensus.replica import LedgerReplica
    from fedchain.consensus.store import MemoryBlockStore
    from fedchain.consensus.tx import SignatureCache
    from fedchain.p2p.identity import SignatureMemo
    from fedchain.p2p.node import Node
    from fedchain.p2p.wire import FrameCache

    genesis = setup.genesis
    frames = FrameCache()
    signatures = SignatureCache(CHAIN_ID)
    executor = Executor(
        genesis, cache_blocks=CACHE_BLOCKS, signatures=signatures, votes=SignatureMemo(2_000_000)
    )
    messages = MessageCache()
    transports = [net.add_node(identity.public_key) for identity in setup.identities]

    def virtual_ms() -> int:
        return genesis.genesis_time + int(trio.current_time() * 1000)

    ledgers = []
    for identity, transport in zip(setup.identities, transports, strict=True):
        peer = identity.public_key
        node = Node(
            identity, transport, frame_cache=frames, start_seq=0, wakeup=net.wakeup_for(peer)
        )
        node.bind(nursery)
        net.drive(node)
        mempool = Mempool(CHAIN_ID, signatures=signatures)
        ledger = LedgerReplica(
            node,
            executor,
            MemoryBlockStore(),
            mempool,
            config,
            timestamp_ms=virtual_ms,
            messages=messages,
            queue_seconds=None,  # the scripted load is admitted whole (see _multicast)
        )
        ledger.start()
        ledgers.append(ledger)
    return ledgers


def _multicast(ledgers: list[LedgerReplica], txs: list[bytes]) -> None:
    """Clients' requests reach every validator; each must admit them all."""
    for ledger in ledgers:
        for outcome in ledger.admit_many(txs):
            if isinstance(outcome, Exception):
                raise RuntimeError(f"a validator refused a client transaction: {outcome!r}")


async def _wait_for_blocks(
    ledgers: list[LedgerReplica],
    blocks: int,
    poll_s: float,
    max_virtual_s: float,
    on_progress: Callable[[int], None] | None,
) -> bool:
    """Poll the stores in virtual time; False if ``max_virtual_s`` came first."""
    import trio

    seen = 0
    while (slowest := min(ledger.store.tip() for ledger in ledgers)) < blocks:
        if on_progress is not None and slowest > seen:
            seen = slowest
            on_progress(slowest)
        if trio.current_time() >= max_virtual_s:
            return False
        await trio.sleep(poll_s)
    if on_progress is not None:
        on_progress(slowest)
    return True


# -- after the clock ----------------------------------------------------------


def _figures(
    genesis: Genesis,
    ledgers: list[LedgerReplica],
    net: SimNetwork,
    virtual_s: float,
    timing: tuple[float, float],
) -> dict[str, Any]:
    from fedchain.consensus.block import decode_block
    from fedchain.consensus.chain import verify_chain
    from fedchain.sims.report import peak_rss_bytes

    wall_s, cpu_s = timing
    height = min(ledger.store.tip() for ledger in ledgers)
    chain = [ledgers[0].store.get(h).data for h in range(1, height + 1)]
    report = verify_chain(genesis, chain)
    return {
        "validators": len(ledgers),
        "blocks": height,
        "committed_txs": sum(len(decode_block(data).txs) for data in chain),
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "virtual_s": round(virtual_s, 3),
        "messages_delivered": net.deliveries,
        "messages_per_wall_s": round(net.deliveries / wall_s, 1),
        "agreement": _agree(ledgers, height),
        "chain_verifies": report.ok and report.height == height,
        "view": max(ledger.replica.view for ledger in ledgers),
        "null_blocks": max(ledger.null_blocks for ledger in ledgers),
        "tip_hash": ledgers[0].store.get(height).block_hash.hex(),
        "peak_rss_bytes": peak_rss_bytes(children=False),
    }


def _agree(ledgers: list[LedgerReplica], height: int) -> bool:
    """Every validator holds the same block hash at every height up to
    ``height`` (certificates may differ: other 2f+1 subsets of the votes)."""
    for h in range(1, height + 1):
        if len({ledger.store.get(h).block_hash for ledger in ledgers}) != 1:
            return False
    return True
