"""The client API of a ledger node: submit, wait for commit, query.

One :class:`LedgerService` per :class:`~.replica.LedgerReplica`, serving
the same calls two ways: in process (methods, used by simulations and the
benchmark's query rate) and on the CLIENT channel (``client_api``'s
messages, used by :class:`~.client.LedgerClient` over TCP). Answers carry
proofs a client checks itself (``client_api`` module docstring).

Why these choices:

- Submissions are admitted in batches and forwarded in batches
  (``forward_batch`` transactions or ``forward_delay`` seconds, whichever
  comes first): one signed envelope per batch instead of one per
  transaction, since signing an envelope (and checking it, where the link
  does not vouch for its sender) costs as much as the transaction's own
  check.
- In the normal case a backup forwards to the primary alone, as PBFT's
  clients send to it, and the primary forwards nothing: the other backups
  meet the transaction once, in the proposal, instead of also admitting,
  holding and dropping a forward of it (forwarding to every validator
  cost each 6-9 µs more CPU per committed transaction at 8,000 offered
  tx/s). While the view changes, and from a follower, forwards go to
  every other validator of the epoch. A transaction then lives at the
  validator its client chose until it commits, so three rules keep it
  from being stranded there: a new
  primary (view or epoch) is sent what this node's clients gave it and
  no proposal carries (:meth:`_on_new_primary`); a forward still held
  ``stale_forward`` seconds later with no proposal carrying it is sent
  again (:meth:`_resend_stale`), since the others' commits keep the next
  rule and the view timer quiet; and a backup that saw no commit for
  ``reforward_interval`` while it holds pending transactions relays them
  to the primary (PBFT's rule), or to every other validator when it
  changes views alone (nobody joined), as a follower does.
- Forwards go to the validators of the ledger's current epoch (it follows
  validator set changes), so a follower's service admits submissions and
  forwards them likewise; queries and waits are answered from the stored
  blocks whatever the node's role.
- Back-pressure is explicit: a full mempool answers BUSY per transaction,
  and the number of waiters and subscribers is bounded (ERROR "busy").
- Which transaction committed where is kept for the last ``index_size``
  transactions (digest -> height, index), so a WAIT for a recent
  transaction is answered from memory and the block store; an older digest
  waits (or times out) like an unknown one. A restarted node indexes the
  last ``index_on_start`` stored transactions before it serves, so a
  transaction that committed just before the restart is still found.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable

import msgpack
import trio

from fedchain.p2p.identity import PeerId
from fedchain.p2p.node import Timer
from fedchain.p2p.wire import Envelope, MessageType, peek

from .block import Block, decode_block, decode_certificate, header_and_votes
from .client_api import (
    MAX_EPOCH_ANSWERS,
    MAX_HEADERS,
    ClientOp,
    CommitProof,
    HeaderChain,
    QueryAnswer,
    SubmitStatus,
    decode_client_message,
    encode_client_message,
)
from .contracts import next_nonce
from .errors import DuplicateTransaction, MempoolFull
from .pbft import Mode
from .replica import LedgerReplica
from .tx import Transaction

__all__ = ["LedgerService", "NothingCommitted"]


class NothingCommitted(LookupError):
    """A query before the first block: no certified state to prove against."""


class LedgerService:
    def __init__(
        self,
        ledger: LedgerReplica,
        *,
        forward_batch: int = 512,
        forward_delay: float = 0.005,
        index_size: int = 1_000_000,
        index_on_start: int = 10_000,
        max_waiters: int = 100_000,
        max_subscribers: int = 64,
        max_headers: int = MAX_HEADERS,
        header_read_bytes: int = 8 * 1024 * 1024,
        reforward_interval: float = 0.5,
        stale_forward: float = 4.0,
    ) -> None:
        if forward_batch < 1 or not forward_delay >= 0:
            raise ValueError("forward_batch >= 1 and forward_delay >= 0")
        if not reforward_interval > 0 or not stale_forward > 0:
            raise ValueError("reforward_interval and stale_forward are positive seconds")
        self.ledger = ledger
        self.node = ledger.node
        self.forward_batch = forward_batch
        self.forward_delay = forward_delay
        self.index_size = index_size
        self.max_waiters = max_waiters
        self.max_subscribers = max_subscribers
        self.max_headers = min(max_headers, MAX_HEADERS)
        self.header_read_bytes = header_read_bytes
        self._forward: list[Transaction] = []
        self._sent: deque[tuple[float, list[bytes]]] = deque()
        """Digests of the forwards sent, with when, oldest first (see
        :meth:`_resend_stale`)."""
        self.stale_forward = stale_forward
        self._forward_timer: Timer | None = None
        self._index: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._waiters: dict[bytes, list[tuple[PeerId | None, int | trio.Event]]] = {}
        self._waiting = 0
        self._subscribers: dict[tuple[PeerId, int], None] = {}
        self._last: Block | None = None
        """The last certified block that is not null, for queries (its header
        and certificate). A null block keeps its parent's state but its
        certificate binds no header (``client_api.certifies_header``), so
        queries are answered with the block below it, whose state root is
        the same."""
        self._load_stored(min(index_on_start, index_size))
        ledger.on_commit.append(self._on_commit)
        self.node.register(MessageType.CLIENT, self._on_client)
        self._held: dict[int, int] = {}
        """Client SUBMIT frames the node holds unhandled: id(frame) -> transactions."""
        self._held_txs = 0
        self.node.hold_check = self._hold
        self.node.on_release = self._release
        self._reforward_height = -1
        self.reforward_interval = reforward_interval
        ledger.on_start.append(
            lambda: self.node.call_every(self.reforward_interval, self._reforward)
        )
        ledger.on_primary.append(self._on_new_primary)

    def _load_stored(self, transactions: int) -> None:
        """From the stored chain (a restart): the last block that is not
        null, for queries, and where the last ``transactions`` committed
        transactions are, so a client waiting for one that committed just
        before the restart gets its proof, not a timeout (about 10 µs a
        transaction at start)."""
        found: list[tuple[int, tuple[bytes, ...]]] = []
        counted = 0
        for height in range(self.ledger.store.tip(), 0, -1):
            if self._last is not None and counted >= transactions:
                break
            stored = self.ledger.store.get(height)
            assert stored is not None
            block = decode_block(stored.data, max_bytes=2**31)
            if self._last is None and not block.is_null:
                self._last = block
            if counted < transactions:
                found.append((height, tuple(tx.digest for tx in block.txs)))
                counted += len(block.txs)
        for height, digests in reversed(found):
            for index, digest in enumerate(digests):
                self._index[digest] = (height, index)

    # -- in process --------------------------------------------------------------

    def submit(self, tx: bytes | Transaction) -> bytes:
        """Admit one transaction (forwarded to the primary, see the module
        docstring); its digest. Raises MempoolFull (busy: retry later) or
        the refusal."""
        admitted = self.ledger.admit(tx)
        self._queue_forward([admitted])
        return admitted.digest

    def submit_many(self, txs: Iterable[bytes]) -> list[tuple[SubmitStatus, bytes | str]]:
        """Admit a batch: per transaction ACCEPTED/DUPLICATE with its digest,
        BUSY or REFUSED with the reason."""
        statuses: list[tuple[SubmitStatus, bytes | str]] = []
        accepted = []
        for entry in self.ledger.admit_many(txs):
            if isinstance(entry, Transaction):
                accepted.append(entry)
                statuses.append((SubmitStatus.ACCEPTED, entry.digest))
            elif isinstance(entry, DuplicateTransaction) and entry.digest is not None:
                statuses.append((SubmitStatus.DUPLICATE, entry.digest))
            elif isinstance(entry, MempoolFull):
                statuses.append((SubmitStatus.BUSY, entry.reason))
            else:
                statuses.append((SubmitStatus.REFUSED, f"{entry.reason}: {entry}"[:200]))
        self._queue_forward(accepted)
        return statuses

    def committed_at(self, digest: bytes) -> tuple[int, int] | None:
        """(height, index in block) of a recently committed transaction."""
        return self._index.get(digest)

    def proof_of(self, digest: bytes) -> CommitProof | None:
        """The commit proof of a recently committed transaction, or None."""
        where = self._index.get(digest)
        if where is None:
            return None
        height, index = where
        if self._last is not None and self._last.height == height:
            block = self._last
        else:
            stored = self.ledger.store.get(height)
            if stored is None:
                return None
            block = decode_block(stored.data, max_bytes=2**31)
        return CommitProof.of_block(block, index)

    async def wait_committed(self, digest: bytes, timeout: float = math.inf) -> CommitProof:
        """Wait until ``digest`` commits; its proof. trio.TooSlowError on
        timeout, MempoolFull (busy) when ``max_waiters`` already wait."""
        proof = self.proof_of(digest)
        if proof is not None:
            return proof
        event = trio.Event()
        if not self._add_waiter(digest, None, event):
            raise MempoolFull(f"busy: {self.max_waiters} waiters already")
        try:
            with trio.fail_after(timeout):
                await event.wait()
        finally:
            self._drop_waiter(digest, None, event)
        proof = self.proof_of(digest)
        assert proof is not None
        return proof

    def query(self, key: str) -> QueryAnswer:
        """``key``'s value in the last committed state, with its proof."""
        block = self._last
        if block is None or block.certificate is None:
            raise NothingCommitted("no block is committed yet")
        value, proof = self.ledger.tip.state.prove(key)
        return QueryAnswer(key, value, block.header, block.certificate, proof)

    def validator_changes(self, since_epoch: int) -> list[tuple[QueryAnswer, bytes]]:
        """The proofs of the set changes after ``since_epoch``, in order, up
        to ``MAX_EPOCH_ANSWERS`` (with each value's encoding, for the wire)."""
        changes = self.ledger.validator_changes
        epochs = sorted(e for e in changes if e > since_epoch)[:MAX_EPOCH_ANSWERS]
        return [changes[e] for e in epochs]

    def header_chain(self, low: int, high: int) -> HeaderChain:
        """The stored headers from ``low`` (>= 1) to ``high``, at most the top
        ``max_headers`` of them, and the certificate of the one at ``high``:
        what a client walking back from a header it trusts asks for.
        NothingCommitted if ``high`` is above this node's tip.

        Headers live inside whole stored blocks, so an answer also stops
        once it has read ``header_read_bytes`` of them (the top block always
        counts): a page costs the node a bounded read however full the
        blocks are, and the client simply asks for the next page."""
        store = self.ledger.store
        if high > store.tip():
            raise NothingCommitted(f"no block at height {high} here yet")
        pairs = []
        read = 0
        for height in range(high, max(low, high - self.max_headers + 1) - 1, -1):
            if pairs and read >= self.header_read_bytes:
                break
            stored = store.get(height)
            if stored is None:  # pruned or missing: answer what is above it
                break
            read += len(stored.data)
            pairs.append(header_and_votes(stored.data))
        if not pairs:
            raise NothingCommitted(f"no block at height {high} here")
        pairs.reverse()
        headers = tuple(header for header, _ in pairs)
        top, votes = pairs[-1]
        certificate = (
            None if votes is None else decode_certificate(votes, high, top.certified_digest)
        )
        return HeaderChain(headers, certificate)

    # -- commits -----------------------------------------------------------------

    def _on_commit(self, block: Block) -> None:
        if not block.is_null:
            self._last = block
        index = self._index
        height = block.height
        for i, tx in enumerate(block.txs):
            index[tx.digest] = (height, i)
        while len(index) > self.index_size:
            index.popitem(last=False)
        if self._waiters:
            for tx in block.txs:
                for peer, token in self._waiters.pop(tx.digest, ()):
                    self._waiting -= 1
                    if peer is None:
                        token.set()  # type: ignore[union-attr]
                    else:
                        self._reply_commit(peer, token, tx.digest)  # type: ignore[arg-type]
        if self._subscribers:
            digests = [tx.digest for tx in block.txs]
            for peer, request in list(self._subscribers):
                body = encode_client_message(ClientOp.BLOCK, request, height, digests)
                if not self.node.send(peer, MessageType.CLIENT, body):
                    del self._subscribers[(peer, request)]
                    self.node.counters["client.subscriber_dropped"] += 1

    def _add_waiter(self, digest: bytes, peer: PeerId | None, token: int | trio.Event) -> bool:
        if self._waiting >= self.max_waiters:
            return False
        self._waiters.setdefault(digest, []).append((peer, token))
        self._waiting += 1
        return True

    def _drop_waiter(self, digest: bytes, peer: PeerId | None, token: int | trio.Event) -> None:
        waiters = self._waiters.get(digest)
        if waiters and (peer, token) in waiters:
            waiters.remove((peer, token))
            self._waiting -= 1
            if not waiters:
                del self._waiters[digest]

    # -- forwarding --------------------------------------------------------------

    def _queue_forward(self, txs: list[Transaction]) -> None:
        if not txs:
            return
        self._forward.extend(txs)
        if len(self._forward) >= self.forward_batch:
            self._flush_forward()
        elif self._forward_timer is None:
            self._forward_timer = self.node.call_later(self.forward_delay, self._flush_forward)

    def _flush_forward(self) -> None:
        if self._forward_timer is not None:
            self._forward_timer.cancel()
            self._forward_timer = None
        pending, self._forward = self._forward, []
        peers = self._forward_targets()
        if peers:
            self._send_forwards([tx.encoded for tx in pending], peers)
            self._sent.append((self.node.now(), [tx.digest for tx in pending]))

    def _forward_targets(self) -> list[PeerId]:
        """Whom this node's clients' transactions go to: in the normal case
        the primary alone (nobody, if this node is the primary), else
        (changing views, or a follower) every other validator of the epoch."""
        replica = self.ledger.replica
        if replica is not None and replica.mode is Mode.NORMAL:
            primary = replica.primary(replica.view)
            return [] if primary == self.node.id else [primary]
        return [v for v in self.ledger.validators if v != self.node.id]

    def _send_forwards(self, txs: list[bytes], peers: list[PeerId]) -> None:
        """FORWARD ``txs`` to ``peers`` in batches, one signed frame per batch."""
        for start in range(0, len(txs), self.forward_batch):
            body = encode_client_message(ClientOp.FORWARD, txs[start : start + self.forward_batch])
            frame = self.node.sign(MessageType.CLIENT, body).frame
            for peer in peers:
                self.node.send_frame(peer, frame)

    def _on_new_primary(self, primary: PeerId) -> None:
        """A view or an epoch began under ``primary``: send it what this
        node's clients gave and no proposal carries yet (the old primary
        had them, or they went out while the view was changing; a deposed
        primary sends its own clients' too)."""
        if primary == self.node.id:
            return
        waiting = self.ledger.mempool.clients_waiting()
        if waiting:
            self._queue_forward(waiting)
            self.node.counters["client.forwarded_to_new_primary"] += len(waiting)

    def _resend_stale(self) -> None:
        """Send again what was forwarded ``stale_forward`` seconds ago and is
        still held with no proposal carrying it: that forward was lost (a
        dropped link, a primary's full pool), and the others' commits keep
        both the no-commit relay below and this backup's view timer quiet,
        so short of the request timer's view change (PBFT's
        ``request_timeout``, meant for a censoring primary) nothing else
        would move it."""
        sent, horizon = self._sent, self.node.now() - self.stale_forward
        stale: list[bytes] = []
        while sent and sent[0][0] <= horizon:
            stale.extend(sent.popleft()[1])
        mempool = self.ledger.mempool
        in_flight = mempool.in_flight
        txs = [tx for d in stale if d not in in_flight and (tx := mempool.get(d)) is not None]
        if txs:
            self._queue_forward(txs)
            self.node.counters["client.forwarded_again"] += len(txs)

    def _reforward(self) -> None:
        """PBFT's rule for a backup that holds requests the primary does not
        act on: relay them to the primary. Forwards are sent once and may be
        lost (a link, or a primary's full mempool), which would strand a
        transaction at the backups until a view change; so after a whole
        interval without a commit and with no proposal in flight, a backup
        holding pending transactions sends what the primary could propose
        next straight to it. (Relaying while proposals are in flight fed a
        loop under overload: the primary spent its time refusing
        duplicates, commits slowed, and more relays followed.)

        A follower does the same towards every validator of the epoch: the
        validators admit its forwards as a client's, so paced admission may
        have answered them busy, and a validator that became a follower at
        an epoch change may hold transactions it forwarded to the old set
        alone. Without this, found by a seeded sweep of restarts around a
        validator change, those transactions waited in the follower for
        good while its clients had heard "accepted".

        So does a backup changing views alone (:attr:`~.pbft.Replica.changing_view_alone`):
        its timer ran on transactions the primary never got, say behind a
        nonce whose forward was lost, and the others, for whom those wait
        behind the gap and run no timer, never join; only they can commit,
        in the old view (found by a sweep with clients that send to one
        validator, under 10% loss).

        Every tick also sends again the forwards gone stale (:meth:`_resend_stale`)."""
        self._resend_stale()
        ledger = self.ledger
        replica = ledger.replica
        height = ledger.tip.height
        progressed, self._reforward_height = height != self._reforward_height, height
        if progressed or ledger.pending() == 0:
            return
        if replica is None:
            peers = [v for v in ledger.validators if v != self.node.id]
        elif replica.changing_view_alone:
            # Its view timer ran on requests the primary never got (their
            # forwards lost), and nobody joined: the others stay in the
            # old view, where only they can commit, so they get them.
            peers = [v for v in replica.validators if v != self.node.id]
        elif replica.is_primary:
            return
        elif replica.mode is not Mode.NORMAL:
            return  # the view is changing: the next primary proposes from its own pool
        elif len(ledger.mempool.in_flight):
            return  # the primary is proposing: it is slow, not idle
        else:
            peers = [replica.primary(replica.view)]
        txs = ledger.mempool.reap(
            4 * self.forward_batch,
            ledger.params.max_block_bytes,
            exclude=ledger.mempool.in_flight,
            next_nonce=lambda sender: next_nonce(ledger.tip.state, sender),
        )
        self._send_forwards([tx.encoded for tx in txs], peers)
        self.node.counters["client.reforwarded"] += len(txs)

    # -- at the door ---------------------------------------------------------------

    def _hold(self, peer: PeerId, frame: bytes) -> bool:
        """A client's SUBMIT as the node queues it: answered busy at once if
        the clients' room is full counting what the node already holds for
        them, else counted as held until handled (``Node.hold_check``).

        Why: a busy validator (past saturation, the primary: it checks every
        transaction's signature at admission) held its clients' submissions
        queued ~2 s before admitting them, and queued ones held no room, so
        its room never filled: a client of the primary was accepted ~3 times
        as often as a backup's, whose transactions hold the backup's room
        while their forwards wait in that same queue, and it waited ~2 s to
        hear busy (``fedchain bench consensus``, per entry)."""
        if peer in self.ledger.validators:
            return True  # forwards: room of their own (Mempool.add)
        counted = _submit_count(frame, peer, self.ledger.params.max_block_txs)
        if counted is None:
            return True  # not a client's SUBMIT, or for the handler to refuse
        request, count = counted
        refusal = self.ledger.mempool.client_refusal(waiting=self._held_txs)
        if refusal is not None:
            self._reply(
                peer, ClientOp.SUBMITTED, request, [[SubmitStatus.BUSY, refusal.reason]] * count
            )
            self.node.counters[f"tx.{refusal.reason}"] += count
            self.node.counters["client.busy_at_door"] += count
            return False
        self._held[id(frame)] = count
        self._held_txs += count
        return True

    @property
    def held_submissions(self) -> int:
        """Clients' transactions in SUBMIT frames the node holds unhandled."""
        return self._held_txs

    def _release(self, peer: PeerId, frame: bytes) -> None:
        self._held_txs -= self._held.pop(id(frame), 0)

    # -- the CLIENT channel ------------------------------------------------------

    def _reply(self, peer: PeerId, *fields: object) -> None:
        if not self.node.send(peer, MessageType.CLIENT, encode_client_message(*fields)):
            self.node.counters["client.reply_dropped"] += 1

    def _reply_commit(self, peer: PeerId, request: int, digest: bytes) -> None:
        proof = self.proof_of(digest)
        self._reply(peer, ClientOp.COMMIT, request, None if proof is None else proof.as_list())

    def _on_client(self, peer: PeerId, envelope: Envelope) -> None:
        # MalformedMessage is a MalformedBody: the node counts and drops it.
        fields = decode_client_message(envelope.body, max_txs=self.ledger.params.max_block_txs)
        op = fields[0]
        if op == ClientOp.FORWARD:
            # Only a validator of the epoch forwards with forwards' headroom;
            # from anyone else (a follower passing its clients' transactions
            # on) they are admitted as a client's, within the paced room.
            if peer in self.ledger.validators:
                self.node.counters["client.forwarded_in"] += len(fields[1])
                self.ledger.admit_many(fields[1], forwarded=True)
            else:
                self.node.counters["client.forward_not_validator"] += 1
                self.ledger.admit_many(fields[1])
        elif op == ClientOp.SUBMIT:
            statuses = self.submit_many(fields[2])
            self._reply(peer, ClientOp.SUBMITTED, fields[1], [list(s) for s in statuses])
        elif op == ClientOp.WAIT:
            self._on_wait(peer, fields[1], fields[2], fields[3])
        elif op == ClientOp.QUERY:
            try:
                answer = self.query(fields[2])
            except NothingCommitted as exc:
                self._reply(peer, ClientOp.ERROR, fields[1], str(exc))
                return
            encoded = self.ledger.tip.state.get_encoded(fields[2])
            self._reply(peer, ClientOp.ANSWER, fields[1], answer.as_list(encoded))
        elif op == ClientOp.EPOCHS:
            answers = [a.as_list(encoded) for a, encoded in self.validator_changes(fields[2])]
            self._reply(peer, ClientOp.EPOCH_PROOFS, fields[1], answers)
        elif op == ClientOp.HEADERS:
            try:
                chain = self.header_chain(fields[2], fields[3])
            except NothingCommitted as exc:
                self._reply(peer, ClientOp.ERROR, fields[1], str(exc))
                return
            self._reply(peer, ClientOp.HEADER_CHAIN, fields[1], *chain.as_fields())
        elif op == ClientOp.SUBSCRIBE:
            if len(self._subscribers) >= self.max_subscribers:
                self._reply(peer, ClientOp.ERROR, fields[1], "busy: too many subscribers")
            else:
                self._subscribers[(peer, fields[1])] = None
        else:  # a reply sent to a node
            self.node.counters["client.unexpected"] += 1

    def _on_wait(self, peer: PeerId, request: int, digest: bytes, timeout_ms: int) -> None:
        if digest in self._index:
            self._reply_commit(peer, request, digest)
            return
        if not self._add_waiter(digest, peer, request):
            self._reply(peer, ClientOp.ERROR, request, "busy: too many waiters")
            return

        def expire() -> None:
            waiters = self._waiters.get(digest, [])
            if (peer, request) in waiters:
                self._drop_waiter(digest, peer, request)
                self._reply(peer, ClientOp.COMMIT, request, None)

        self.node.call_later(timeout_ms / 1000, expire)


def _submit_count(frame: bytes, peer: PeerId, max_txs: int) -> tuple[int, int] | None:
    """(request id, transactions) of a client SUBMIT frame sent by ``peer``
    over its authenticated link, read without decoding the transactions or
    checking anything the handler checks (:func:`~fedchain.p2p.wire.peek`:
    the answer only sizes the room, and a frame that is not what it seems
    is refused by its handler in turn); None for anything else, more than
    ``max_txs`` transactions included."""
    peeked = peek(frame)
    if peeked is None or peeked[0] != MessageType.CLIENT or peeked[1] != peer:
        return None
    body = peeked[2]
    try:
        fields = msgpack.Unpacker(max_buffer_size=max(1, len(body)))
        fields.feed(body)
        if fields.read_array_header() != 3 or fields.unpack() != ClientOp.SUBMIT:
            return None
        request = fields.unpack()
        count = fields.read_array_header()
    except (ValueError, msgpack.UnpackException):
        return None
    if type(request) is not int or count > max_txs:
        return None
    return request, count
