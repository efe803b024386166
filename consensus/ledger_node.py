"""A real ledger node: one validator (or follower-to-be) over encrypted TCP.

:func:`open_ledger_node` composes what the simulator composes on its
virtual network, on the real clock and sockets instead: a
:class:`~fedchain.p2p.tcp.TcpTransport`, a :class:`~fedchain.p2p.node.Node`
running as its own trio task, a :class:`~.replica.LedgerReplica` on a block
store (SQLite for a real node) and the :class:`~.service.LedgerService`
client API. Restarting on the same store resumes where the node stopped
(``replica`` module docstring). ``fedchain node`` and ``fedchain bench
consensus`` run exactly this.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import trio

from fedchain.p2p.identity import Identity, PeerId, SignatureMemo
from fedchain.p2p.node import Node
from fedchain.p2p.tcp import Address, TcpConfig, TcpTransport, open_tcp_transport
from fedchain.p2p.wire import MessageType

from .chain import Executor
from .genesis import Genesis
from .mempool import Mempool
from .pbft import PbftConfig
from .replica import LedgerReplica
from .service import LedgerService
from .store import BlockStore
from .tx import SignatureCache

__all__ = ["LedgerNode", "open_ledger_node"]


@dataclass(frozen=True, slots=True)
class LedgerNode:
    node: Node
    transport: TcpTransport
    ledger: LedgerReplica
    service: LedgerService


@asynccontextmanager
async def open_ledger_node(
    identity: Identity,
    genesis: Genesis,
    store: BlockStore,
    *,
    listen: Address | None = ("127.0.0.1", 0),
    peers: Mapping[PeerId, Address] | None = None,
    pbft: PbftConfig | None = None,
    tcp: TcpConfig | None = None,
    mempool_txs: int = 20_000,
    queue_seconds: float | None = 2.0,
    journal_fsync: bool = True,
    open_to_clients: bool = True,
    seed: int = 0,
) -> AsyncIterator[LedgerNode]:
    """Run a ledger node for the ``async with`` block.

    ``peers`` are the other validators' addresses (dialled and kept
    connected). With ``open_to_clients`` any key may connect (clients and
    followers; only validators' CONSENSUS messages count, which PBFT
    checks); otherwise only validators may. The node's sequence numbers
    start from the wall clock, so a restarted node is never taken for a
    replay. ``queue_seconds``, ``journal_fsync``: see :class:`LedgerReplica`."""
    validators = frozenset(genesis.validators)

    def allowed(peer: PeerId) -> bool:
        return open_to_clients or peer in validators

    signatures = SignatureCache(genesis.chain_id)
    rng = np.random.Generator(np.random.PCG64(seed))
    async with open_tcp_transport(
        identity, allowed=allowed, rng=rng, listen=listen, peers=peers, config=tcp
    ) as transport:
        node = Node(
            identity,
            transport,
            start_seq=time.time_ns() // 1000,
            priority=(MessageType.CONSENSUS, MessageType.BLOCK_SYNC),
            contain_handler_errors=True,  # on a real network: see Node
        )
        ledger = LedgerReplica(
            node,
            Executor(genesis, cache_blocks=16, signatures=signatures, votes=SignatureMemo()),
            store,
            Mempool(genesis.chain_id, max_txs=mempool_txs, signatures=signatures),
            pbft,
            queue_seconds=queue_seconds,
            journal_fsync=journal_fsync,
        )
        service = LedgerService(ledger)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            ledger.start()
            try:
                yield LedgerNode(node, transport, ledger, service)
            finally:
                nursery.cancel_scope.cancel()
