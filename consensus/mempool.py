"""The mempool: bounded, deduplicated, signature-checked once, fair.

Why these choices:

- Bounded in transactions and bytes, and per sender, with an explicit
  :class:`MempoolFull` (the client's "busy") instead of growing: the
  paper's throughput collapses past saturation; ours refuses early and
  cheaply so the node keeps its peak. Clients' room (``client_limit``) is
  further paced by the commit rate (:mod:`.admission`), so what is
  admitted under overload commits within a target delay.
- Checks run cheapest first (size, decode, duplicate, room) and the
  Ed25519 signature last, once; :meth:`Mempool.verified` then lets block
  validation skip that exact transaction, so a replica verifies each
  signature once whether it saw the transaction from a client or in a
  proposal.
- :meth:`Mempool.reap` takes one transaction per sender per pass (round
  robin in order of arrival), each sender's in nonce order, so a flood from
  one key delays only that key. Given the committed nonces, a sender's
  run starts at its next nonce and stops at a gap (a later nonce waits in
  the pool, bounded per sender, until the gap fills); given the digests of
  proposals in flight, those are not proposed twice.
- A bounded memory of recently committed digests refuses a replayed
  transaction before it costs a signature check; the state's nonces refuse
  it for good.
"""

from __future__ import annotations

from bisect import insort
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Hashable, Iterable, Iterator

from fedchain.p2p.identity import PeerId

from .errors import DuplicateTransaction, InvalidSignature, MempoolFull
from .tx import MAX_TX_BYTES, SignatureCache, Transaction, decode_transaction

__all__ = ["Mempool"]

_PACED = "busy: more queued than the chain commits in its target delay"
_FULL = "mempool is full"


class Mempool:
    def __init__(
        self,
        chain_id: str,
        *,
        max_txs: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        forwarded_headroom: int = 1,
        max_per_sender: int = 1_000,
        max_tx_bytes: int = MAX_TX_BYTES,
        remember_committed: int = 100_000,
        signatures: SignatureCache | None = None,
    ) -> None:
        if signatures is not None and signatures.chain_id != chain_id:
            raise ValueError("the signature cache is for another chain")
        self.chain_id = chain_id
        self.signatures = signatures
        self.max_txs = max_txs
        self.max_bytes = max_bytes
        self.forwarded_headroom = forwarded_headroom
        """Forwarded transactions may fill (1 + this) x the bounds; see :meth:`add`."""
        self.client_limit = max_txs
        """Clients' submissions are refused (busy) while this many of the
        held transactions came from clients rather than as forwards;
        :class:`~fedchain.consensus.admission.CommitPacedLimit` moves it."""
        self.max_per_sender = max_per_sender
        self.max_tx_bytes = max_tx_bytes
        self.remember_committed = remember_committed
        self._txs: dict[bytes, Transaction] = {}
        self._queues: OrderedDict[PeerId, list[tuple[int, bytes]]] = OrderedDict()
        self._nonces: dict[tuple[PeerId, int], bytes] = {}
        self._committed: OrderedDict[bytes, None] = OrderedDict()
        self._bytes = 0
        self._by_encoding: dict[bytes, Transaction] = {}
        self._from_clients: set[bytes] = set()
        self._in_flight: set[bytes] = set()
        self._in_flight_here = 0
        """How many of ``_in_flight`` this pool holds, kept as both change."""
        self._next_nonce: Callable[[PeerId], int] | None = None
        self._expected: dict[PeerId, int] = {}
        self._ready: dict[PeerId, int] = {}
        self._ready_total = 0

    def __len__(self) -> int:
        return len(self._txs)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def from_clients(self) -> int:
        """Held transactions that came from clients (not as forwards): what
        ``client_limit`` bounds."""
        return len(self._from_clients)

    def clients_waiting(self) -> list[Transaction]:
        """The held transactions from clients that no proposal in flight
        carries, in order of arrival: what a new primary must be sent."""
        from_clients, in_flight = self._from_clients, self._in_flight
        return [tx for d, tx in self._txs.items() if d in from_clients and d not in in_flight]

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._txs

    def known(self, encoded: bytes) -> Transaction | None:
        """The held transaction with exactly these bytes (``decode_block``'s
        ``known``: a proposal's transactions are mostly here already)."""
        return self._by_encoding.get(encoded)

    def get(self, digest: bytes) -> Transaction | None:
        return self._txs.get(digest)

    def client_refusal(self, waiting: int = 0) -> MempoolFull | None:
        """The busy answer any client's submission would get now, known
        before it is even decoded, or None: the pool is full for clients
        (:meth:`add` then refuses every one, gap fillers included), or it is
        paced and nothing held waits behind a nonce gap, so no submission
        could fill one. Past saturation most submissions end here (a
        resubmitted one hears busy rather than duplicate), so a batch can
        be refused wholesale: only an admission or a commit changes it.

        (The full case was left to :meth:`add`, which decoded each
        submission first: with the bench's static bound below the paced
        limit, past saturation every refused submission cost a decode and
        an exception, ~10,000 a second at 16,000 offered, and the committed
        rate fell to 85% of its peak.)"""
        if len(self._txs) >= self.max_txs:
            return MempoolFull(_FULL)
        paced = len(self._from_clients) + waiting >= self.client_limit
        if paced and self._ready_total >= len(self._txs):
            return MempoolFull(_PACED)
        return None

    def add(self, tx: bytes | Transaction, *, forwarded: bool = False) -> Transaction:
        """Admit one transaction (bytes from a client or peer, or decoded).

        Raises MalformedMessage, DuplicateTransaction, MempoolFull or
        InvalidSignature; nothing is kept unless it returns.

        ``forwarded``: another validator admitted it from its client and
        sent it on. It gets ``forwarded_headroom`` times more room than a
        client's submission, because a forward refused for room is lost:
        the transaction then waits at the validator that forwarded it until
        that forward goes stale and is sent again (seconds, see
        :class:`~.service.LedgerService`).
        Clients are refused (busy) first, so under overload the room that is
        left goes to what other validators already accepted."""
        if not forwarded:
            refusal = self.client_refusal()
            if refusal is not None:
                raise refusal
        if not isinstance(tx, Transaction):
            tx = decode_transaction(tx, max_bytes=self.max_tx_bytes)
        elif len(tx.encoded) > self.max_tx_bytes:
            raise MempoolFull("transaction larger than this mempool admits")
        digest = tx.digest
        if digest in self._txs or digest in self._committed:
            raise DuplicateTransaction(f"transaction {digest.hex()[:16]} already seen", digest)
        if (tx.sender, tx.nonce) in self._nonces:
            raise DuplicateTransaction(f"nonce {tx.nonce} already pending for this sender")
        expected = None
        if self._next_nonce is not None:
            # A nonce the committed state has used can never commit again:
            # refused before its signature is checked. Held, it would stay
            # for good once its sender is done (a restarted validator, whose
            # memory of committed digests is empty, was sent a committed
            # transaction again and kept it: found by a seeded sweep).
            expected = self._expected.get(tx.sender)
            if expected is None:
                expected = self._next_nonce(tx.sender)
            if tx.nonce < expected:
                raise DuplicateTransaction(f"nonce {tx.nonce} already committed for this sender")
        size = len(tx.encoded)
        scale = 1 + self.forwarded_headroom if forwarded else 1
        if len(self._txs) >= self.max_txs * scale or self._bytes + size > self.max_bytes * scale:
            raise MempoolFull(_FULL)
        queue = self._queues.get(tx.sender)
        if queue is not None and len(queue) >= self.max_per_sender:
            raise MempoolFull("this sender has too many pending transactions")
        # A transaction below its sender's highest held nonce fills a gap:
        # never paced, or held transactions behind gaps could take all the
        # clients' room and refuse the very ones that would let them commit.
        fills_gap = queue is not None and tx.nonce < queue[-1][0]
        if not forwarded and not fills_gap and len(self._from_clients) >= self.client_limit:
            raise MempoolFull(_PACED)
        ok = self.signatures.verify(tx) if self.signatures is not None else tx.verify(self.chain_id)
        if not ok:
            raise InvalidSignature(f"transaction {digest.hex()[:16]} has a bad signature")
        self._txs[digest] = tx
        self._by_encoding[tx.encoded] = tx
        if not forwarded:
            self._from_clients.add(digest)
        if digest in self._in_flight:
            self._in_flight_here += 1
        self._nonces[(tx.sender, tx.nonce)] = digest
        self._bytes += size
        if queue is None:
            self._queues[tx.sender] = [(tx.nonce, digest)]
        else:
            insort(queue, (tx.nonce, digest))
        if expected is not None:
            self._expected[tx.sender] = expected  # the sender holds a queue now
        self._recount(tx.sender)
        return tx

    # -- proposals in flight ---------------------------------------------------

    @property
    def in_flight(self) -> Container[bytes]:
        """Digests in uncommitted proposals (PBFT keeps several in flight)."""
        return self._in_flight

    @property
    def pending(self) -> int:
        """Proposable transactions in no proposal in flight: O(1), since
        PBFT asks on every step (and runs its view timer while it is > 0).

        With :meth:`track_nonces`, proposable means contiguous from the
        sender's committed next nonce: a transaction behind a nonce gap
        waits here but is not pending, or any client could make the backups'
        view timers run (and the views change) for a transaction no primary
        may propose. Without it, every held transaction counts."""
        return max(0, self._ready_total - self._in_flight_here)

    def oldest_pending(self) -> bytes | None:
        """The digest of the pending transaction admitted first, or None
        (PBFT's request timer follows it on a backup). A scan from the
        oldest held: the ones before it are in flight or behind a gap, and
        PBFT asks only when it arms the timer, once per ``request_timeout``."""
        for digest in self._txs:  # admission order
            if self.is_pending(digest):
                return digest
        return None

    def is_pending(self, digest: Hashable) -> bool:
        """Whether the held transaction ``digest`` counts in :attr:`pending`:
        in no proposal in flight and, with :meth:`track_nonces`, within its
        sender's proposable run (from the committed next nonce, no gap)."""
        tx = self._txs.get(digest)  # type: ignore[arg-type]
        if tx is None or digest in self._in_flight:
            return False
        if self._next_nonce is None:
            return True
        expected = self._expected.get(tx.sender)
        ready = self._ready.get(tx.sender, 0)
        return expected is not None and expected <= tx.nonce < expected + ready

    def track_nonces(self, next_nonce: Callable[[PeerId], int]) -> None:
        """Count as pending only transactions at their sender's next nonce
        (``next_nonce``: from the committed state) or contiguous after it;
        call :meth:`advance` for the senders of each committed block."""
        self._next_nonce = next_nonce
        self._expected.clear()
        for sender in list(self._queues):
            self._recount(sender)

    def advance(self, senders: Iterable[PeerId]) -> None:
        """The committed state moved these senders' nonces: drop what can
        never commit (a nonce another transaction took) and recount."""
        for sender in set(senders):
            self._expected.pop(sender, None)
            queue = self._queues.get(sender)
            if queue is None or self._next_nonce is None:
                continue
            expected = self._next_nonce(sender)
            stale = [digest for nonce, digest in queue if nonce < expected]
            if stale:
                self._forget(stale)
            self._recount(sender)

    def _recount(self, sender: PeerId) -> None:
        """How many of ``sender``'s held transactions are proposable now."""
        old = self._ready.pop(sender, 0)
        queue = self._queues.get(sender)
        if not queue:
            self._expected.pop(sender, None)
            self._ready_total -= old
            return
        if self._next_nonce is None:
            new = len(queue)
        else:
            expected = self._expected.get(sender)
            if expected is None:
                expected = self._expected[sender] = self._next_nonce(sender)
            new = 0
            for nonce, _ in queue:
                if nonce < expected:
                    continue
                if nonce != expected:
                    break
                expected += 1
                new += 1
        if new:
            self._ready[sender] = new
        self._ready_total += new - old

    def mark_in_flight(self, digests: Iterable[bytes]) -> None:
        """These are in a proposal now (possibly ones this pool never held)."""
        for digest in digests:
            if digest not in self._in_flight:
                self._in_flight.add(digest)
                if digest in self._txs:
                    self._in_flight_here += 1

    def release(self, digests: Iterable[bytes] | None = None) -> None:
        """Their proposal committed or was void (None: every proposal)."""
        if digests is None:
            self._in_flight.clear()
            self._in_flight_here = 0
            return
        for digest in digests:
            if digest in self._in_flight:
                self._in_flight.discard(digest)
                if digest in self._txs:
                    self._in_flight_here -= 1

    def verified(self, tx: Transaction) -> bool:
        """Whether this exact transaction (digest and signature) was admitted."""
        pending = self._txs.get(tx.digest)
        return pending is not None and pending.signature == tx.signature

    def reap(
        self,
        max_txs: int,
        max_bytes: int,
        *,
        exclude: Container[bytes] = (),
        next_nonce: Callable[[PeerId], int] | None = None,
    ) -> list[Transaction]:
        """Up to ``max_txs`` transactions within ``max_bytes`` for a proposal:
        one per sender per pass, each sender's in nonce order. Nothing is
        removed (that happens on commit).

        ``exclude`` names digests already in proposals still in flight
        (PBFT has several); they are skipped but count as coming first.
        With ``next_nonce`` (the committed state's next nonce per sender) a
        sender's run starts at that nonce and stops at the first gap, so a
        proposal never carries a transaction bound to fail its nonce check;
        stale ones are skipped (:meth:`drop_stale` removes them)."""
        chosen: list[Transaction] = []
        later: deque[Iterator[Transaction]] = deque()
        """The runs that gave one so far, in order: the next pass."""
        total = 0

        def take(run: Iterator[Transaction]) -> None:
            nonlocal total
            tx = next(run, None)
            if tx is not None and total + len(tx.encoded) <= max_bytes:
                chosen.append(tx)
                total += len(tx.encoded)
                later.append(run)
            # else this sender is done (a smaller one from another may fit)

        # The first pass walks the senders and stops once the proposal is
        # full: 1,000 from a pool of 10,000 senders (one key each, as in
        # ``fedchain bench consensus``) start 1,000 runs, each a state read
        # for the sender's nonce, not 10,000 (0.5 ms a reap instead of 3.1).
        txs = self._txs
        for sender, queue in self._queues.items():
            if len(chosen) >= max_txs:
                return chosen
            if len(queue) == 1:
                # One pending (a client with one transaction out, as each
                # of the bench's is): what _run would give, without a
                # generator and a copy of the queue (the primary's reap was
                # ~5% of its CPU at 8,000 offered tx/s).
                nonce, digest = queue[0]
                if digest in exclude or (next_nonce is not None and next_nonce(sender) != nonce):
                    continue
                tx = txs[digest]
                if total + len(tx.encoded) <= max_bytes:
                    chosen.append(tx)
                    total += len(tx.encoded)
                continue
            # Under load most senders have everything in flight: skip them
            # with a plain loop (no generator, no state read).
            for _, digest in queue:
                if digest not in exclude:
                    take(self._run(sender, queue, exclude, next_nonce))
                    break
        while later and len(chosen) < max_txs:
            take(later.popleft())
        return chosen

    def _run(
        self,
        sender: PeerId,
        queue: list[tuple[int, bytes]],
        exclude: Container[bytes],
        next_nonce: Callable[[PeerId], int] | None,
    ) -> Iterator[Transaction]:
        expected = None if next_nonce is None else next_nonce(sender)
        for nonce, digest in list(queue):
            if expected is not None:
                if nonce < expected:
                    continue
                if nonce > expected:
                    return
                expected += 1
            if digest not in exclude:
                yield self._txs[digest]

    def drop_stale(self, next_nonce: Callable[[PeerId], int]) -> int:
        """Remove pending transactions whose nonce the committed state has
        already used (another transaction took it); how many went."""
        stale = [
            digest
            for sender, queue in self._queues.items()
            for nonce, digest in queue
            if nonce < next_nonce(sender)
        ]
        self._forget(stale)
        return len(stale)

    def remove_committed(self, digests: Iterable[bytes]) -> int:
        """Forget committed (or rejected-in-a-block) transactions and
        remember their digests, so a replay is refused on sight; how many
        of those held came from this node's clients (admission's share)."""
        digests = list(digests)
        for digest in digests:
            self._committed[digest] = None
            self._committed.move_to_end(digest)
        own = self._forget(digests)
        while len(self._committed) > self.remember_committed:
            self._committed.popitem(last=False)
        return own

    def _forget(self, digests: Iterable[bytes]) -> int:
        """Drop held transactions; how many of them came from clients."""
        senders = set()
        from_clients = self._from_clients
        own = 0
        for digest in digests:
            tx = self._txs.pop(digest, None)
            if tx is None:
                continue
            del self._by_encoding[tx.encoded]
            if digest in from_clients:
                from_clients.remove(digest)
                own += 1
            if digest in self._in_flight:
                self._in_flight_here -= 1
            self._bytes -= len(tx.encoded)
            del self._nonces[(tx.sender, tx.nonce)]
            queue = self._queues[tx.sender]
            queue.remove((tx.nonce, digest))
            if not queue:
                del self._queues[tx.sender]
            senders.add(tx.sender)
        for sender in senders:
            # A committed run moves the sender's next nonce past it.
            self._expected.pop(sender, None)
            self._recount(sender)
        return own
