"""The mempool: bounded, deduplicated, signature-checked once, fair.

Why these choices:

- Bounded in transactions and bytes, and per sender, with an explicit
  :class:`MempoolFull` (the client's "busy") instead of growing: the
  paper's throughput collapses past saturation; ours refuses early and
  cheaply so the node keeps its peak.
- Checks run cheapest first (size, decode, duplicate, room) and the
  Ed25519 signature last, once; :meth:`Mempool.verified` then lets block
  validation skip that exact transaction, so a replica verifies each
  signature once whether it saw the transaction from a client or in a
  proposal.
- :meth:`Mempool.reap` takes one transaction per sender per pass (round
  robin in order of arrival), each sender's in nonce order, so a flood from
  one key delays only that key.
- A bounded memory of recently committed digests refuses a replayed
  transaction before it costs a signature check; the state's nonces refuse
  it for good.
"""

from __future__ import annotations

from bisect import insort
from collections import OrderedDict
from collections.abc import Iterable

from fedchain.p2p.identity import PeerId

from .errors import DuplicateTransaction, InvalidSignature, MempoolFull
from .tx import MAX_TX_BYTES, Transaction, decode_transaction

__all__ = ["Mempool"]


class Mempool:
    def __init__(
        self,
        chain_id: str,
        *,
        max_txs: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_per_sender: int = 1_000,
        max_tx_bytes: int = MAX_TX_BYTES,
        remember_committed: int = 100_000,
    ) -> None:
        self.chain_id = chain_id
        self.max_txs = max_txs
        self.max_bytes = max_bytes
        self.max_per_sender = max_per_sender
        self.max_tx_bytes = max_tx_bytes
        self.remember_committed = remember_committed
        self._txs: dict[bytes, Transaction] = {}
        self._queues: OrderedDict[PeerId, list[tuple[int, bytes]]] = OrderedDict()
        self._nonces: dict[tuple[PeerId, int], bytes] = {}
        self._committed: OrderedDict[bytes, None] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._txs)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._txs

    def get(self, digest: bytes) -> Transaction | None:
        return self._txs.get(digest)

    def add(self, tx: bytes | Transaction) -> Transaction:
        """Admit one transaction (bytes from a client or peer, or decoded).

        Raises MalformedMessage, DuplicateTransaction, MempoolFull or
        InvalidSignature; nothing is kept unless it returns."""
        if not isinstance(tx, Transaction):
            tx = decode_transaction(tx, max_bytes=self.max_tx_bytes)
        elif len(tx.encoded) > self.max_tx_bytes:
            raise MempoolFull("transaction larger than this mempool admits")
        digest = tx.digest
        if digest in self._txs or digest in self._committed:
            raise DuplicateTransaction(f"transaction {digest.hex()[:16]} already seen")
        if (tx.sender, tx.nonce) in self._nonces:
            raise DuplicateTransaction(f"nonce {tx.nonce} already pending for this sender")
        size = len(tx.encoded)
        if len(self._txs) >= self.max_txs or self._bytes + size > self.max_bytes:
            raise MempoolFull("mempool is full")
        queue = self._queues.get(tx.sender)
        if queue is not None and len(queue) >= self.max_per_sender:
            raise MempoolFull("this sender has too many pending transactions")
        if not tx.verify(self.chain_id):
            raise InvalidSignature(f"transaction {digest.hex()[:16]} has a bad signature")
        self._txs[digest] = tx
        self._nonces[(tx.sender, tx.nonce)] = digest
        self._bytes += size
        if queue is None:
            self._queues[tx.sender] = [(tx.nonce, digest)]
        else:
            insort(queue, (tx.nonce, digest))
        return tx

    def verified(self, tx: Transaction) -> bool:
        """Whether this exact transaction (digest and signature) was admitted."""
        pending = self._txs.get(tx.digest)
        return pending is not None and pending.signature == tx.signature

    def reap(self, max_txs: int, max_bytes: int) -> list[Transaction]:
        """Up to ``max_txs`` transactions within ``max_bytes`` for a proposal:
        one per sender per pass, each sender's in nonce order. Nothing is
        removed (that happens on commit)."""
        chosen: list[Transaction] = []
        total = 0
        depth = 0
        active = list(self._queues.values())
        while active and len(chosen) < max_txs:
            still = []
            for queue in active:
                if depth >= len(queue):
                    continue
                tx = self._txs[queue[depth][1]]
                if total + len(tx.encoded) > max_bytes:
                    continue  # a smaller one from another sender may still fit
                chosen.append(tx)
                total += len(tx.encoded)
                if len(chosen) >= max_txs:
                    break
                still.append(queue)
            active = still
            depth += 1
        return chosen

    def remove_committed(self, digests: Iterable[bytes]) -> None:
        """Forget committed (or rejected-in-a-block) transactions and
        remember their digests, so a replay is refused on sight."""
        for digest in digests:
            self._committed[digest] = None
            self._committed.move_to_end(digest)
            tx = self._txs.pop(digest, None)
            if tx is None:
                continue
            self._bytes -= len(tx.encoded)
            del self._nonces[(tx.sender, tx.nonce)]
            queue = self._queues[tx.sender]
            queue.remove((tx.nonce, digest))
            if not queue:
                del self._queues[tx.sender]
        while len(self._committed) > self.remember_committed:
            self._committed.popitem(last=False)
