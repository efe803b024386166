"""The ledger replica: the pure PBFT :class:`~.pbft.Replica` run on a node
(or, outside the current validator set, a follower of the chain).

:mod:`.pbft` orders opaque payloads and does no I/O; this module is the
reactor around it (CometBFT's split of state machine and reactor). It

* feeds the replica: CONSENSUS frames are decoded strictly and become
  ``Receive`` events; node timers become ``TimerFired``; client
  transactions become ``RequestsPending``;
* runs the replica's actions: sends, timers, committed blocks (executed,
  certified and appended to the block store), state transfer over
  BLOCK_SYNC;
* is the replica's :class:`~.pbft.Application`: a payload is an encoded
  block without certificate and its digest is the block hash, so the commit
  certificate PBFT assembles is exactly the one the block carries, and
  ``verify_chain`` can check the stored chain from its bytes alone.

Speculative execution. PBFT keeps up to a window of sequence numbers in
flight, so the primary proposes block ``s`` before ``s - 1`` is final, and a
backup validates it likewise. Each proposal built or validated is kept with
the tip after it (``_spec``); the parent of ``s`` is the committed tip when
``s`` is the next height, else the speculative tip of ``s - 1``. PBFT asks
only once ``s - 1`` is executed or pre-prepared in the view, and parks a
PRE-PREPARE that overtook its predecessor (P-PARENT-FIRST in SPEC.md); a
None while the parent is only speculative (a null request's, which is
never shown here, or one dropped for a state transfer) is asked again once
the parent is executed, so neither costs a view change.

Validator epochs. The validator set lives on chain: a committed
``validators`` transaction starts a new epoch at the next height (the
certificate of block h is checked against the set in the state after
h - 1), and votes and PBFT messages of epoch e sign
``contracts.epoch_chain_id(chain, e)``, so those of two epochs never mix.
Every honest node commits the same block h, so every one switches right
after it: the rest of the old replica's actions from that step are dropped
(a later ``Committed`` of the old set could not verify), its timers
cancelled (a timer's callback also checks that its replica is still the
current one) and its speculative proposals abandoned, their transactions
pending again. A node in the new set then starts a fresh PBFT
:class:`~.pbft.Replica` for it, with the epoch's chain id, ``executed=h``
and the chained state digest (as :func:`replay_store` computes it, chained
across epochs); a node not in it becomes a follower. Blocks fetched past
the change go on to the new role. A restart lands in the epoch and role of
its stored tip.

Following. A follower (a node outside the current set) asks a validator of
the epoch (rotating) every ``follow_interval`` for the blocks above its tip
(BLOCK_SYNC, as state transfer does), again at once after an answer that
brought blocks, and appends each block only if ``apply_final`` accepts it:
a certificate of the epoch's set with the epoch's chain id, valid
execution. A refused block ends the batch and is counted
(``follow.refused.<reason>``), a malformed answer is dropped by the node
(``rejected.malformed_consensus``); nothing a peer sends raises. It serves
BLOCK_SYNC from its store like a validator, its service answers queries
and waits from the stored blocks and forwards submissions to the
validators, and it becomes a validator when a later epoch includes it.
CONSENSUS frames reaching a follower are counted
(``consensus.not_validator``) and dropped. A validator polls too, every
four intervals, but only while PBFT is stalled (no block since the last
poll): at once while changing views or holding work, backing off to every
16th poll when idle. Should the quorum that committed a change block move
on to the new epoch before this replica saw enough COMMITs, or the replica
restart in an epoch the others have left, the old epoch's own state
transfer would never start. A follower also sends on again, after a poll
interval without a block, what its clients gave it and the validators
did not take (``LedgerService._reforward``).

Known gaps (documented, not hidden):

* A proposal for the seq right after a null request waits (parked) until
  the null commits, since this replica holds no speculative block for a
  null. Null heights themselves are ordinary certified blocks (``block``
  module docstring).
* Transactions reach the primary by one forward from the validator the
  client chose (:class:`~.service.LedgerService`, batched; the other
  backups get them in the proposal). A lost forward is repeated after
  ``stale_forward`` (4 s), or sooner by the relay after an interval
  without a commit; meanwhile the transaction waits, and the view timer of
  the backup holding it, restarted at every commit, fires only if nothing
  commits for a whole timeout (as before: a primary that commits others'
  transactions while it censors one client's is not replaced). If the
  validator the client chose crashes before its forward left, the
  transaction is lost with it (a client that hears no commit sends it
  again, to another validator).
* The stalled validator's poll above is forced by one test (a validator
  restarted in the epoch the others left); a validator that missed the
  change block's COMMITs while running is covered by the same path but
  not forced by a test.
* A follower checks blocks, not peers: it takes BLOCK_SYNC answers from
  anyone (unsolicited ones included) and asks only the current epoch's
  validators, so one far behind relies on retired validators still
  serving their stores (they follow and serve).

Restart. A replica built on a store that already holds blocks replays them
through the executor (:func:`replay_store`: certificates and execution
checked again) and resumes at its stored height, in that height's epoch
and role, with the chained state digest recomputed from the stored blocks;
whatever it missed meanwhile it fetches by state transfer (or follows).
PBFT's journal (view, stable checkpoint, signed digests, prepared
certificates: :mod:`.pbft_journal`) lives in the same store's meta,
written before the messages it binds (``Persist`` actions run in order),
and the replica of the stored height's epoch resumes from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Sequence

import msgpack

from fedchain.p2p.identity import PeerId
from fedchain.p2p.node import Node, Timer
from fedchain.p2p.wire import Envelope, MessageType, unpack_body

from .admission import CommitPacedLimit
from .block import Block, decode_block, encode_block
from .chain import ChainTip, Executor
from .client_api import QueryAnswer
from .contracts import VALIDATORS_KEY, epoch_chain_id, next_nonce
from .errors import (
    ConsensusError,
    InvalidBlock,
    MalformedMessage,
    StoreCorrupted,
)
from .mempool import Mempool
from .pbft import (
    GENESIS_STATE,
    Action,
    BlocksFetched,
    CancelTimer,
    Committed,
    Event,
    FetchBlocks,
    Mode,
    PbftConfig,
    Persist,
    Receive,
    Replica,
    RequestsPending,
    Send,
    SetTimer,
    Suspect,
    TimerFired,
    advance_state,
)
from .pbft_journal import load_journal
from .pbft_messages import NULL_DIGEST, MessageCache, decode_message, encode_message
from .store import BlockStore, StoredBlock
from .tx import Transaction

__all__ = ["LedgerReplica", "Refusal", "replay_store"]

_SYNC_REQUEST = 0
_SYNC_BLOCKS = 1
MAX_SYNC_BLOCKS = 64
"""Blocks per BLOCK_SYNC answer; PBFT's fetch timer asks again for the rest."""
MAX_SYNC_BYTES = 32 * 1024 * 1024


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


Refusal = ConsensusError | MalformedMessage
"""Why a transaction was not admitted (its ``reason`` names it)."""


def replay_store(
    executor: Executor,
    store: BlockStore,
    on_block: Callable[[Block, ChainTip, ChainTip], None] | None = None,
) -> tuple[ChainTip, bytes]:
    """Re-verify a replica's stored chain: its tip and PBFT's chained state
    digest after it (what a restarted replica resumes from).

    Every block's certificate (against the set, and with the chain id, of
    its epoch) and execution is checked again, as ``fedchain chain verify``
    would: the store's checksums catch a torn page, not a chain that was
    wrong when written. The digest chains across validator epochs. A block that fails raises
    :class:`~.errors.ConsensusError` naming its height. ``on_block`` hears
    each block with the tips before and after it.
    """
    tip = ChainTip.of_genesis(executor.genesis)
    state = GENESIS_STATE
    for height in range(1, store.tip() + 1):
        stored = store.get(height)
        if stored is None:
            raise InvalidBlock(f"the store has no block at height {height}")
        try:
            block = decode_block(
                stored.data, max_bytes=executor.params.max_block_bytes + 1024 * 1024
            )
        except MalformedMessage as exc:  # bytes no block decodes from: damage, or a format
            raise StoreCorrupted(f"stored block {height} does not decode: {exc}") from exc
        try:
            after = executor.apply_final(tip, block)
        except ConsensusError as exc:
            raise type(exc)(f"stored block {height}: {exc}") from exc
        if on_block is not None:
            on_block(block, tip, after)
        tip = after
        state = advance_state(state, height, block.certified_digest)
    return tip, state


class LedgerReplica:
    """One node's ledger: PBFT on ``node`` while it is a validator of the
    current epoch, a follower otherwise; blocks in ``store``.

    ``executor`` must be for the genesis whose validators run PBFT;
    ``timestamp_ms`` gives proposal timestamps (a simulation passes its
    virtual clock so runs are reproducible); ``follow_interval`` is how
    often a follower asks for blocks (default: PBFT's retransmission
    interval). ``queue_seconds`` paces clients' admissions by the commit
    rate (:mod:`.admission`; None: only the mempool's static bounds). Call
    :meth:`start` once the node is running.
    """

    def __init__(
        self,
        node: Node,
        executor: Executor,
        store: BlockStore,
        mempool: Mempool,
        config: PbftConfig | None = None,
        *,
        timestamp_ms: Callable[[], int] = _wall_ms,
        follow_interval: float | None = None,
        messages: MessageCache | None = None,
        queue_seconds: float | None = 2.0,
        journal_fsync: bool = True,
    ) -> None:
        """``executor.votes`` (a SignatureMemo) also serves PBFT's message
        checks, so a commit vote is verified once, as a COMMIT, and not again
        in the certificate; ``messages`` shares decoded PBFT bodies (in a
        simulation, across validators: a broadcast is decoded once)."""
        genesis = executor.genesis
        # Height 0 holds the genesis itself (as ``fedchain chain`` stores it).
        if store.tip() == -1:
            store.append(StoredBlock(0, genesis.hash, genesis.encode()))
        first = store.get(0)
        if first is None or first.block_hash != genesis.hash:
            raise ValueError("the store holds another chain")
        self.node = node
        self.executor = executor
        self.store = store
        self.mempool = mempool
        self.timestamp_ms = timestamp_ms
        self.messages = messages
        self.journal_fsync = journal_fsync
        """Whether PBFT's journal records are fsynced before the messages
        they bind (CometBFT's rule; False: a process crash is still covered,
        a power cut only from the next block append on)."""
        self.params = genesis.params
        self.config = config or PbftConfig()
        self.admission = (
            None
            if queue_seconds is None
            else CommitPacedLimit(floor=2 * self.config.batch_size, queue_seconds=queue_seconds)
        )
        self.follow_interval = (
            follow_interval if follow_interval is not None else self.config.retransmit_interval
        )
        self.validator_changes: dict[int, tuple[QueryAnswer, bytes]] = {}
        """By epoch from 1: the proof of ``sys/validators`` after the block
        that began it (with the value's encoding), certified by the set
        before; a client follows set changes with these (``client_api``)."""
        self.tip, self.pbft_state = replay_store(executor, store, self._note_change)
        # Pending (what PBFT proposes and backups' view timers wait for) is
        # what can commit next: contiguous from each sender's committed nonce.
        mempool.track_nonces(lambda sender: next_nonce(self.tip.state, sender))
        """The last final block's tip, and PBFT's chained state digest after it."""
        self.epoch = -1
        self.validators: tuple[PeerId, ...] = ()
        """The validator set of the current epoch (whom PBFT and forwards address)."""
        self.replica: Replica | None = None
        """This epoch's PBFT replica; None while this node is a follower."""
        self._spec: dict[int, tuple[Block, ChainTip]] = {}
        """Uncommitted proposals built or validated, by seq, with the tip after each."""
        self._timers: dict[str, Timer] = {}
        self._poll_timer: Timer | None = None
        self._poll_round = 0
        self._stalled_at = -1
        self._quiet_polls = 0
        self._started = False
        self.epoch_changes = 0
        """Epoch switches this process made (restarts land in an epoch without one)."""
        self.null_blocks = 0
        self.suspects: dict[str, int] = {}
        self._enter_epoch()
        node.register(MessageType.CONSENSUS, self._on_consensus)
        node.register(MessageType.BLOCK_SYNC, self._on_sync)
        self.on_start: list[Callable[[], None]] = []
        """Called once :meth:`start` runs (services arm their timers then)."""
        self.on_commit: list[Callable[[Block], None]] = []
        """Called with each certified block once it is stored."""
        self.on_epoch: list[Callable[[int, Sequence[PeerId]], None]] = []
        """Called with the new epoch and its set after each switch."""
        self.on_primary: list[Callable[[PeerId], None]] = []
        """Called with the primary each time this validator enters the
        normal case under another one (a new view installed, an epoch
        begun): the service sends it what its clients gave this node."""
        self._primary_seen: PeerId | None = None

    @property
    def me(self) -> PeerId:
        return self.node.id

    @property
    def is_validator(self) -> bool:
        """Whether this node runs PBFT in the current epoch (else it follows)."""
        return self.replica is not None

    @property
    def chain_id(self) -> str:
        """The chain id of this epoch's votes and PBFT messages."""
        return epoch_chain_id(self.executor.chain_id, self.epoch)

    def start(self) -> None:
        self._started = True
        self._start_role()
        for hook in self.on_start:
            hook()

    # -- epochs -------------------------------------------------------------------

    @property
    def epoch_start(self) -> int:
        """The height of the block that began this epoch (0: the genesis
        set): every node learns it from the chain, replayed or followed."""
        if self.epoch == 0:
            return 0
        answer, _ = self.validator_changes[self.epoch]
        return answer.header.height

    def _enter_epoch(self) -> None:
        """Take the set in force after the tip: a PBFT replica for it, with
        the epoch's chain id, resuming at the tip, if this node is in it."""
        self.epoch = self.tip.epoch
        self.validators = tuple(self.tip.validators)
        if self.me in self.validators:
            self.replica = Replica(
                self.node.identity,
                self.validators,
                self.chain_id,
                self,
                self.config,
                executed=self.tip.height,
                state=self.pbft_state,
                signatures=self.executor.votes,
                journal=load_journal(self.store.get_meta, self.chain_id, self.config.window),
                base=self.epoch_start,
            )
        else:
            self.replica = None

    def _start_role(self) -> None:
        # Followers ask for blocks every interval; validators only when stalled.
        interval = self.follow_interval if self.replica is None else 4 * self.follow_interval
        self._poll_timer = self.node.call_every(interval, self._poll)
        if self.replica is not None:
            self._run(self.replica.start())
            if self.replica is not None and self.pending() > 0:
                self._step(RequestsPending(self.pending()))
        else:
            self._poll()

    def _switch_epoch(self) -> None:
        """The tip's state has a new validator epoch: retire this epoch's
        PBFT (timers cancelled, speculative proposals void, their
        transactions pending again) and take the new role."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        self.abandon()
        self.replica = None
        self._enter_epoch()
        self.epoch_changes += 1
        self.node.counters["epoch.switches"] += 1
        for listener in self.on_epoch:
            listener(self.epoch, self.validators)
        if self._started:
            self._start_role()

    # -- what the client service uses -----------------------------------------

    def admit(self, tx: bytes | Transaction) -> Transaction:
        """Admit a transaction to the mempool and tell PBFT.

        Raises what :meth:`Mempool.add` raises: MempoolFull is the explicit
        "busy" answer, DuplicateTransaction / InvalidSignature /
        MalformedMessage a refusal. Reaching the other validators is the
        caller's job (:class:`~.service.LedgerService` forwards in batches)."""
        admitted = self.mempool.add(tx)
        self._step(RequestsPending(self.pending()))
        return admitted

    def admit_many(
        self, txs: Iterable[bytes], *, forwarded: bool = False
    ) -> list[Transaction | Refusal]:
        """Admit a batch, then tell PBFT once: each entry the transaction or
        the error that refused it. ``forwarded``: another validator
        admitted them from its clients and sent them on (see
        :meth:`Mempool.add`)."""
        out: list[Transaction | Refusal] = []
        mempool = self.mempool
        pending = iter(txs)
        for data in pending:
            busy = None if forwarded else mempool.client_refusal()
            if busy is not None:
                # Past saturation: the rest of the batch hears busy without
                # a decode or an exception each (raising one per refusal was
                # 4-5% of a validator's samples at 8,000 offered, py-spy).
                refused = 1 + sum(1 for _ in pending)
                out.extend([busy] * refused)
                self.node.counters[f"tx.{busy.reason}"] += refused
                break
            try:
                out.append(mempool.add(data, forwarded=forwarded))
            except (ConsensusError, MalformedMessage) as exc:
                self.node.counters[f"tx.{exc.reason}"] += 1
                # Kept without its traceback and cause: those hold this
                # frame (the cause's through its frames' callers), whose
                # ``out`` holds the exception, a cycle only the collector
                # frees. Late forwards (duplicates) made thousands of them
                # a second at 8,000 offered, a third of the collector's
                # young objects, with the transactions their frames held.
                exc.__cause__ = exc.__context__ = None
                out.append(exc.with_traceback(None))
        self._step(RequestsPending(self.pending()))
        return out

    # -- the reactor ------------------------------------------------------------

    def _on_consensus(self, peer: PeerId, envelope: Envelope) -> None:
        if self.replica is None:
            self.node.counters["consensus.not_validator"] += 1
            return
        # MalformedMessage is a MalformedBody: the node counts and drops it.
        self._step(Receive(envelope.sender, decode_message(envelope.body, cache=self.messages)))

    def _step(self, event: Event) -> None:
        if self.replica is not None:
            self._run(self.replica.step(event))

    def _run(self, actions: list[Action]) -> None:
        """Carry out one step's actions. A committed block that starts a new
        validator epoch ends the step: the old set's remaining actions
        (sends, timers, any later Committed, which could not verify under
        the new set) are dropped and the new role begins."""
        committed = False
        for action in actions:
            if isinstance(action, Send):
                self._send(action)
            elif isinstance(action, SetTimer):
                self._set_timer(action)
            elif isinstance(action, CancelTimer):
                old = self._timers.pop(action.name, None)
                if old is not None:
                    old.cancel()
            elif isinstance(action, Committed):
                self._commit(action)
                committed = True
                if self.tip.epoch != self.epoch:
                    self._switch_epoch()
                    return
            elif isinstance(action, FetchBlocks):
                self._fetch(action)
            elif isinstance(action, Suspect):
                self.suspects[action.reason] = self.suspects.get(action.reason, 0) + 1
            elif isinstance(action, Persist):
                self.store.put_meta(action.key, action.value, durable=self.journal_fsync)
        # The replica proposes only when poked; after a commit freed window
        # room, leftover transactions need a poke (a new step, not nested).
        replica = self.replica
        if committed and replica is not None and replica.is_primary and self.pending() > 0:
            self._step(RequestsPending(self.pending()))
        self._note_primary()

    def _note_primary(self) -> None:
        replica = self.replica
        if replica is None or replica.mode is not Mode.NORMAL:
            return
        primary = replica.primary(replica.view)
        if primary != self._primary_seen:
            self._primary_seen = primary
            for listener in self.on_primary:
                listener(primary)

    def _send(self, action: Send) -> None:
        frame = self.node.sign(MessageType.CONSENSUS, encode_message(action.message)).frame
        targets = [action.to] if action.to is not None else self.validators
        for peer in targets:
            if peer != self.me:
                self.node.send_frame(peer, frame)

    def _set_timer(self, action: SetTimer) -> None:
        old = self._timers.pop(action.name, None)
        if old is not None:
            old.cancel()
        event = TimerFired(action.name, action.token)
        replica = self.replica

        def fire() -> None:
            # A stale token is harmless (the replica ignores it, as in the
            # harness), but a token of a retired epoch's replica is not.
            if self.replica is replica:
                self._step(event)

        self._timers[action.name] = self.node.call_later(action.delay, fire)

    # -- the Application PBFT calls ---------------------------------------------

    def pending(self) -> int:
        return self.mempool.pending

    def oldest_pending(self) -> bytes | None:
        return self.mempool.oldest_pending()

    def is_pending(self, request: Hashable) -> bool:
        return self.mempool.is_pending(request)

    def _parent(self, seq: int) -> ChainTip | None:
        if seq == self.tip.height + 1:
            return self.tip
        entry = self._spec.get(seq - 1)
        return entry[1] if entry is not None else None

    def _speculate(self, seq: int, block: Block, after: ChainTip) -> None:
        """Remember a proposal; later ones built on a replaced one are void."""
        for later in [s for s in self._spec if s >= seq]:
            self._forget(later)
        self._spec[seq] = (block, after)
        # In flight: not pending, not reaped twice (the mempool keeps count).
        self.mempool.mark_in_flight(tx.digest for tx in block.txs)

    def _forget(self, seq: int) -> None:
        block, _ = self._spec.pop(seq)
        self.mempool.release(tx.digest for tx in block.txs)

    def propose(self, seq: int) -> tuple[bytes, bytes] | None:
        parent = self._parent(seq)
        if parent is None:
            return None
        txs = self.mempool.reap(
            self.params.max_block_txs,
            self.params.max_block_bytes,
            exclude=self.mempool.in_flight,
            next_nonce=lambda sender: next_nonce(parent.state, sender),
        )
        if not txs:
            return None
        block, state = self.executor.build_block(
            parent,
            txs,
            timestamp=self.timestamp_ms(),
            view=self.replica.view if self.replica is not None else 0,
            proposer=self.me,
        )
        self._speculate(seq, block, ChainTip(seq, block.hash, block.header.timestamp, state))
        return encode_block(block), block.hash

    def validate(self, seq: int, payload: bytes) -> bytes | None:
        parent = self._parent(seq)
        if parent is None:
            return None
        try:
            block = decode_block(
                payload,
                max_bytes=self.params.max_block_bytes + 1024 * 1024,
                max_tx_bytes=self.params.max_tx_bytes,
                known=self.mempool.known,
            )
            if block.height != seq or block.certificate is not None or block.is_null:
                return None
            state = self.executor.validate_block(parent, block, verified=self.mempool.verified)
        except (MalformedMessage, ConsensusError):
            return None
        self._speculate(seq, block, ChainTip(seq, block.hash, block.header.timestamp, state))
        return block.hash

    def abandon(self) -> None:
        """A new view voids every uncommitted proposal; their transactions
        are pending again (still in the mempool, which only commits remove)."""
        self._spec.clear()
        self.mempool.release()

    # -- committing -------------------------------------------------------------

    def _note_change(self, block: Block, before: ChainTip, after: ChainTip) -> None:
        """Keep the proof of a validator change (``validator_changes``)."""
        if after.epoch == before.epoch or block.certificate is None:
            return
        value, proof = after.state.prove(VALIDATORS_KEY)
        answer = QueryAnswer(VALIDATORS_KEY, value, block.header, block.certificate, proof)
        encoded = after.state.get_encoded(VALIDATORS_KEY)
        assert encoded is not None  # a new epoch is a write of this key
        self.validator_changes[after.epoch] = (answer, encoded)

    def _commit(self, done: Committed) -> None:
        if done.digest == NULL_DIGEST:
            # A null request's canonical block, certified like any other.
            self.null_blocks += 1
            block = self.executor.null_block(self.tip, done.certificate.view)
        else:
            entry = self._spec.get(done.seq)
            if entry is not None and entry[0].hash == done.digest:
                block = entry[0]
            else:  # PBFT validated it, so this cannot fail short of a bug
                block = decode_block(
                    done.payload, max_bytes=self.params.max_block_bytes + 1024 * 1024
                )
        certified = block.with_certificate(done.certificate)
        # apply_final re-checks certificate and block; the executor's block
        # cache makes the re-execution a lookup. A failure here means this
        # replica's state diverged from a quorum's: a bug, so it raises.
        self._append(certified, self.executor.apply_final(self.tip, certified))

    def _append(self, certified: Block, tip: ChainTip) -> None:
        """Store a final block (``tip`` is the tip after it) and tell the listeners."""
        self._note_change(certified, self.tip, tip)
        self.tip = tip
        self.store.append(StoredBlock(tip.height, certified.hash, encode_block(certified)))
        self.pbft_state = advance_state(self.pbft_state, tip.height, certified.certified_digest)
        own = 0
        if certified.txs:
            own = self.mempool.remove_committed(tx.digest for tx in certified.txs)
            self.mempool.advance(tx.sender for tx in certified.txs)
        if self.admission is not None:
            limit = self.admission.committed(
                self.node.now(), len(certified.txs), own, len(self.validators)
            )
            self.mempool.client_limit = min(self.mempool.max_txs, limit)
        if tip.height in self._spec:
            self._forget(tip.height)
        for listener in self.on_commit:
            listener(certified)

    # -- following --------------------------------------------------------------

    def _poll(self) -> None:
        """Ask a validator of the epoch for the blocks above the tip: always
        as a follower; as a validator only when PBFT has not executed since
        the last poll (the quorum that committed a block may have moved on
        to a new epoch whose messages this replica cannot verify, so PBFT's
        own transfer might never start). A stalled validator that is
        changing views or has work asks every time; an idle one asks after
        1, 2, 4, 8 and then every 16 quiet polls, so a quiet cluster costs
        one small request a validator every 16 polls, yet a validator
        restarted in an epoch the others have left (nothing to do, nobody
        left to send it that epoch's messages) still learns of the change:
        a seeded sweep of restarts around a validator change found one
        stuck at its stored height for good."""
        replica = self.replica
        if replica is not None:
            stalled = self.tip.height == self._stalled_at
            self._stalled_at = self.tip.height
            if not stalled:
                self._quiet_polls = 0
                return
            busy = replica.mode is not Mode.NORMAL or self.pending() > 0 or self._spec
            if not busy:
                self._quiet_polls += 1
                quiet = self._quiet_polls
                if quiet & (quiet - 1) and quiet % 16:  # neither a power of two nor a 16th
                    return
        peers = [v for v in self.validators if v != self.me]
        if not peers:
            return
        peer = peers[self._poll_round % len(peers)]
        self._poll_round += 1
        self.node.counters["sync.polls"] += 1
        height = self.tip.height
        body = msgpack.packb([_SYNC_REQUEST, height + 1, height + MAX_SYNC_BLOCKS])
        self.node.send(peer, MessageType.BLOCK_SYNC, body)

    def _follow(self, blocks: list[Block]) -> None:
        """A follower appends each next block that ``apply_final`` accepts
        (a certificate of the epoch's set, valid execution); the first one
        refused ends the batch (counted, never raised)."""
        appended = 0
        for block in blocks:
            if block.height <= self.tip.height:
                continue
            if block.height != self.tip.height + 1:
                self.node.counters["follow.gap"] += 1
                break
            try:
                tip = self.executor.apply_final(self.tip, block)
            except (ConsensusError, MalformedMessage, ValueError) as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                self.node.counters[f"follow.refused.{reason}"] += 1
                break
            self._append(block, tip)
            appended += 1
        self.node.counters["follow.blocks"] += appended
        if self.tip.epoch != self.epoch:
            self._switch_epoch()
        elif appended and self.replica is None:
            self._poll()  # there may be more: ask again at once

    # -- state transfer (BLOCK_SYNC) --------------------------------------------

    def _fetch(self, action: FetchBlocks) -> None:
        """Ask the first peer PBFT names; its fetch timer rotates the peers
        and asks again if the answer never comes or falls short."""
        if action.peers:
            body = msgpack.packb([_SYNC_REQUEST, action.from_seq, action.to_seq])
            self.node.send(action.peers[0], MessageType.BLOCK_SYNC, body)

    def _on_sync(self, peer: PeerId, envelope: Envelope) -> None:
        fields = unpack_body(envelope.body, error=MalformedMessage, what="a block sync body")
        if not isinstance(fields, list) or not fields or type(fields[0]) is not int:
            raise MalformedMessage("block sync body is [kind, ...]")
        if fields[0] == _SYNC_REQUEST and len(fields) == 3:
            if not all(type(x) is int and x >= 1 for x in fields[1:]):
                raise MalformedMessage("block sync request is [0, from, to]")
            self._serve(peer, fields[1], fields[2])
        elif fields[0] == _SYNC_BLOCKS and len(fields) == 2 and isinstance(fields[1], list):
            self._on_blocks(fields[1])
        else:
            raise MalformedMessage("unknown block sync message")

    def _serve(self, peer: PeerId, from_seq: int, to_seq: int) -> None:
        out: list[bytes] = []
        size = 0
        for height in range(
            from_seq, min(to_seq, self.store.tip(), from_seq + MAX_SYNC_BLOCKS - 1) + 1
        ):
            stored = self.store.get(height)
            if stored is None or size + len(stored.data) > MAX_SYNC_BYTES:
                break
            out.append(stored.data)
            size += len(stored.data)
        if out:
            self.node.send(peer, MessageType.BLOCK_SYNC, msgpack.packb([_SYNC_BLOCKS, out]))

    def _on_blocks(self, items: list[object]) -> None:
        """Certified blocks: a validator hands them to PBFT, which checks
        each certificate and calls ``validate`` before it commits them (a
        null block travels as PBFT's null request: NULL_DIGEST and an empty
        payload); a follower checks and appends them itself. Blocks past an
        epoch change go to the next epoch's role."""
        blocks = []
        for data in items:
            if type(data) is not bytes:
                raise MalformedMessage("a synced block is bytes")
            block = decode_block(
                data,
                max_bytes=self.params.max_block_bytes + 1024 * 1024,
                max_tx_bytes=self.params.max_tx_bytes,
            )
            if block.certificate is None:
                raise MalformedMessage("a synced block carries its commit certificate")
            blocks.append(block)
        if not blocks:
            return
        self.node.counters["sync.blocks_received"] += len(blocks)
        blocks.sort(key=lambda b: b.height)
        while blocks:
            replica = self.replica
            if replica is None:
                self._follow(blocks)
                return
            entries = []
            for block in blocks:
                cert = block.certificate
                assert cert is not None
                if block.is_null:
                    entries.append((block.height, NULL_DIGEST, b"", cert))
                else:
                    bare = Block(block.header, block.txs, block.results)
                    entries.append((block.height, block.hash, encode_block(bare), cert))
            self._step(BlocksFetched(tuple(entries)))
            if self.replica is replica:
                return
            blocks = [b for b in blocks if b.height > self.tip.height]
