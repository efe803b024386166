"""PBFT (Castro and Liskov, OSDI'99) as a pure state machine.

``Replica.step(event) -> list[Action]`` is the whole protocol: no trio, no
clock, no I/O. Time arrives as ``TimerFired`` events, peer traffic as
``Receive``, and everything the replica wants done comes back as actions
(send, arm a timer, deliver a committed proposal, fetch blocks). That is
what lets the fault tests drive a cluster in seeded virtual time and what a
trio reactor wraps for real nodes (CometBFT's split of state machine and
reactor).

PBFT here orders opaque proposals. The application (``Application``) batches
requests into a payload when the primary asks, checks a payload before a
backup prepares it, and receives ``Committed(seq, digest, payload,
certificate)`` in sequence order without gaps; the sequence number doubles as
the block height and the certificate is the 2f+1 commit votes the COMMIT
messages carried. A PRE-PREPARE is validated only once its predecessor is
executed or pre-prepared (``Replica.parked`` holds the ones that overtook
it), so the application may validate on top of a speculative parent. Two
departures from the paper keep such chained proposals safe: a replica
COMMITs a seq only after its COMMIT for the seq before (P-CHAINED-COMMIT),
and a NEW-VIEW re-issues prepared proposals only up to the first seq
without one, instead of filling gaps with null requests.
``consensus/SPEC.md`` (section PBFT) names the invariants.

Two phase enums: ``Phase`` orders one sequence number's progress in a view
(every ``_enter_*`` returns early unless the slot is exactly one phase
behind), ``Mode`` says whether the replica runs the normal case or a view
change. Messages that fail a guard are dropped and counted in ``refused`` by
reason, so a test (or a dashboard) sees what a Byzantine peer tried.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedchain.p2p.identity import Identity, PeerId, SignatureMemo

from .pbft_journal import (
    MAX_WINDOW,
    NEW_VIEW_KEY,
    STABLE_KEY,
    VIEW_KEY,
    Journal,
    SeqRecord,
    encode_new_view,
    encode_seq_record,
    encode_stable,
    encode_view,
    seq_key,
)
from .pbft_messages import (
    NULL_DIGEST,
    Checkpoint,
    Commit,
    Message,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    ViewChange,
)
from .votes import CommitCertificate, max_faulty, quorum

__all__ = [
    "GENESIS_STATE",
    "Action",
    "Application",
    "BlocksFetched",
    "CancelTimer",
    "Committed",
    "Event",
    "FetchBlocks",
    "Follower",
    "Mode",
    "PbftConfig",
    "Persist",
    "Phase",
    "Receive",
    "Replica",
    "RequestsPending",
    "Send",
    "SetTimer",
    "Suspect",
    "TimerFired",
    "advance_state",
]

GENESIS_STATE = bytes(32)


def advance_state(state: bytes, seq: int, digest: bytes) -> bytes:
    """The chained state digest a CHECKPOINT names: SHA-256 over the previous
    one, the sequence number and the executed digest. Block-agnostic, and two
    replicas agree on it exactly when they executed the same digests."""
    return hashlib.sha256(state + seq.to_bytes(8, "big") + digest).digest()


def _payload_matches(app: Application, seq: int, digest: bytes, payload: bytes) -> bool:
    """A null request is empty; anything else is what the application says."""
    if digest == NULL_DIGEST:
        return payload == b""
    return app.validate(seq, payload) == digest


class Phase(enum.IntEnum):
    """Progress of one sequence number in one view (ordered)."""

    IDLE = 0
    PRE_PREPARED = 1
    PREPARED = 2
    COMMITTED = 3


class Mode(enum.IntEnum):
    """Whether the replica runs the normal case or waits for a NEW-VIEW."""

    NORMAL = 0
    VIEW_CHANGE = 1


# -- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Receive:
    """``message`` arrived in an envelope whose sender, ``sender``, the p2p
    layer authenticated (by its signature or by the link it came over)."""

    sender: PeerId
    message: Message


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str
    token: int


@dataclass(frozen=True, slots=True)
class RequestsPending:
    """The application holds ``count`` requests not yet in any proposal."""

    count: int


@dataclass(frozen=True, slots=True)
class BlocksFetched:
    """State transfer's answer: ``(seq, digest, payload, certificate)`` entries."""

    blocks: tuple[tuple[int, bytes, bytes, CommitCertificate], ...]


Event = Receive | TimerFired | RequestsPending | BlocksFetched


# -- actions ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to ``to``, or to every other validator when ``to`` is None."""

    to: PeerId | None
    message: Message


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Fire ``TimerFired(name, token)`` after ``delay``; a newer token for the
    same name makes older ones stale, so cancelling is optional."""

    name: str
    delay: float
    token: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class Committed:
    """``payload`` (``digest``) is final at ``seq``; emitted in order, no gaps.

    A null request has ``digest == NULL_DIGEST`` and an empty payload; it
    still has a certificate and takes its height. NEW-VIEWs no longer
    issue them (their plan stops at the first gap), but a state transfer
    may still deliver one from an older chain.
    """

    seq: int
    digest: bytes
    payload: bytes
    certificate: CommitCertificate


@dataclass(frozen=True, slots=True)
class FetchBlocks:
    """Ask ``peers`` for committed blocks ``from_seq..to_seq`` with certificates."""

    from_seq: int
    to_seq: int
    peers: tuple[PeerId, ...]


@dataclass(frozen=True, slots=True)
class Suspect:
    """``peer`` misbehaved (or the primary looks faulty): ``reason`` says how."""

    peer: PeerId
    reason: str


@dataclass(frozen=True, slots=True)
class Persist:
    """Store ``value`` under ``key`` durably *before* carrying out any action
    after this one (the write-ahead rule of :mod:`.pbft_journal`: a message
    that binds the replica leaves only once the record of it is on disk).
    Only a replica built with a journal emits these."""

    key: str
    value: bytes


Action = Send | SetTimer | CancelTimer | Committed | FetchBlocks | Suspect | Persist


class Application(Protocol):
    """What PBFT needs from the ledger above it. Calls are synchronous and
    deterministic; none of them may do I/O that the replica waits on."""

    def pending(self) -> int:
        """Requests received and not yet in a live proposal or committed."""

    def oldest_pending(self) -> Hashable | None:
        """A name for the pending request received first, or None: the
        request a backup's request timer follows (see ``request_timeout``)."""

    def is_pending(self, request: Hashable) -> bool:
        """Whether the request :meth:`oldest_pending` named still waits for
        a proposal (not committed, not in a live proposal)."""

    def propose(self, seq: int) -> tuple[bytes, bytes] | None:
        """A batch for ``seq`` as ``(payload, digest)``, or None if nothing to do."""

    def validate(self, seq: int, payload: bytes) -> bytes | None:
        """The payload's digest if it is an acceptable proposal for ``seq``.

        PBFT asks only once ``seq - 1`` is settled (P-PARENT-FIRST in
        consensus/SPEC.md): executed (its ``Committed`` came out of an
        earlier step, or it is a fetched block just validated through this
        method), or pre-prepared in the current view (validated through this
        method, or a null request a NEW-VIEW re-issued, which is never shown
        here). A PRE-PREPARE that overtook its predecessor is held until
        then, so an application that builds on a speculative parent has one
        unless it dropped it since (it validated a lower seq, or the parent
        is a null): a None while the predecessor is only pre-prepared is
        asked once more after the predecessor is executed, and only a None
        with the predecessor executed suspects the primary."""

    def abandon(self) -> None:
        """A new view started: proposals not yet committed are void (the
        re-issued ones are validated again right after)."""


@dataclass(frozen=True)
class PbftConfig:
    checkpoint_interval: int = 16
    """K: a CHECKPOINT every K sequence numbers; the window is L = 2K."""
    batch_size: int = 64
    """The primary proposes at once when this many requests are pending."""
    batch_timeout: float = 0.025
    """...and otherwise this long after the first pending request, if fewer
    than ``max_partial_in_flight`` proposals are in flight.

    25 ms since a block got cheap. It was 50 ms when a block cost each
    validator ~7 ms of CPU whatever it held (then 20 ms ran more blocks
    than the cores could carry: p50 at 1,000 tx/s 140-210 ms against
    102-108). At ~5 ms a block (CPU per transaction at 250 tx/s, ~15 per
    block, ~510-640 µs), the shorter wait wins at every load below
    saturation; ``fedchain bench consensus``, two alternating full sweeps
    each, 25 against 50 ms: p50 30-34 against 48-52 ms at 250 tx/s, 37-43
    against 57-59 at 1,000, 73-87 against 94-111 at 4,000, and a peak of
    5,563-5,710 against 5,235-5,612 tx/s (batches fill to ``batch_size``
    past saturation either way)."""
    max_partial_in_flight: int = 1
    """Adaptive batching (Nagle's rule): a batch short of ``batch_size`` waits
    while this many proposals are unexecuted, so under load batches grow
    toward ``batch_size`` (per-block costs amortized) instead of the window
    filling with small ones; when idle, a request waits ``batch_timeout``."""
    view_change_timeout: float = 1.0
    """Base timeout; doubles with each view change that fails to finish."""
    request_timeout: float = 10.0
    """A backup suspects the primary when the request it has waited longest
    for still waits this long later (doubled like the view timer). This is
    Castro and Liskov's per-request timer: the view timer alone restarts at
    every execution, so a primary that commits others' requests could
    censor one client's forever. Long beside ``view_change_timeout``,
    since under load a request rightly waits its turn: ``fedchain bench
    consensus`` at 16,000 offered tx/s has p99 commit latencies of 3-5 s."""
    retransmit_interval: float = 0.25
    """Resend own messages for unfinished work (PBFT assumes fair links)."""
    idle_retransmit_interval: float = 4.0
    """The interval doubles up to this while the replica is idle (nothing
    pending, nothing above its execution, nobody known to be ahead), and
    drops back at once when that changes; see :meth:`Replica._retransmit`."""
    max_future_views: int = 32
    """VIEW-CHANGEs further ahead than this are refused."""

    def __post_init__(self) -> None:
        if not 0 < self.window <= MAX_WINDOW:
            raise ValueError(f"checkpoint_interval must be 1..{MAX_WINDOW // 2}")

    @property
    def window(self) -> int:
        return 2 * self.checkpoint_interval


@dataclass(slots=True)
class _Slot:
    """One (view, seq): the PRE-PREPARE and the PREPAREs and COMMITs seen."""

    view: int
    seq: int
    phase: Phase = Phase.IDLE
    pre_prepare: PrePrepare | None = None
    prepares: dict[PeerId, Prepare] = field(default_factory=dict)
    commits: dict[PeerId, Commit] = field(default_factory=dict)
    own: list[Message] = field(default_factory=list)
    prepare_counts: dict[bytes, int] = field(default_factory=dict)
    """How many of ``prepares`` name each digest (kept by ``add_prepare``)."""
    commit_counts: dict[bytes, int] = field(default_factory=dict)
    """How many of ``commits`` name each digest (kept by ``add_commit``)."""

    def add_prepare(self, prepare: Prepare) -> None:
        old = self.prepares.get(prepare.replica)
        if old is not None:
            self.prepare_counts[old.digest] -= 1
        self.prepares[prepare.replica] = prepare
        self.prepare_counts[prepare.digest] = self.prepare_counts.get(prepare.digest, 0) + 1

    def add_commit(self, commit: Commit) -> None:
        old = self.commits.get(commit.replica)
        if old is not None:
            self.commit_counts[old.digest] -= 1
        self.commits[commit.replica] = commit
        self.commit_counts[commit.digest] = self.commit_counts.get(commit.digest, 0) + 1


@dataclass(slots=True)
class _Parked:
    """A PRE-PREPARE of the current view held until its predecessor is ready."""

    pre_prepare: PrePrepare
    reissued: bool
    """Re-issued by the NEW-VIEW: a refusal never suspects the primary."""
    until_executed: bool = False
    """Refused once with the predecessor only pre-prepared: asked again
    once the predecessor is executed (see ``Replica._try_pre_prepare``)."""


class Replica:
    """One PBFT validator. See the module docstring; ``step`` is the API."""

    def __init__(
        self,
        identity: Identity,
        validators: Sequence[PeerId],
        chain_id: str,
        app: Application,
        config: PbftConfig | None = None,
        *,
        executed: int = 0,
        state: bytes = GENESIS_STATE,
        signatures: SignatureMemo | None = None,
        journal: Journal | None = None,
        base: int = 0,
    ) -> None:
        """``executed`` and ``state`` restore a replica restarted from its
        store (the last height it holds and its chained state digest).

        ``base`` is the height this instance orders above: 0 for the
        genesis set, the height of the block that changed the set for a
        later validator epoch. Every replica of the epoch reads it from
        the chain, so it is the first stable checkpoint without a
        CHECKPOINT proof. The low watermark is always the stable
        checkpoint, never a height rounded down from ``executed``: a
        replica must not prepare a seq its VIEW-CHANGE could not carry
        (P holds seqs up to the stable checkpoint + L). Before this, a
        new epoch's replicas started at h - h % K with the stable
        checkpoint at 0, prepared seqs above L that their VIEW-CHANGEs
        left out, and a view change could commit a second block at a
        height (found by a seeded sweep: a byzantine validator across a
        set change).

        ``journal`` makes the replica durable (:mod:`.pbft_journal`): it
        resumes the view, stable checkpoint, signed digests and prepared
        certificates the journal holds (``Journal()`` for a fresh one) and
        emits ``Persist`` before every message that binds it. Without one
        it journals nothing and a restart counts against f.

        ``signatures`` verifies message signatures and fetched certificates
        through a memo of successes: give the block executor's certificate
        check the same memo and a commit vote is verified once, as a COMMIT;
        a simulation may share one among all its validators (verification
        is pure; every message is still checked before use)."""
        self.identity = identity
        self.signatures = signatures
        self.me = identity.public_key
        self.validators = tuple(validators)
        if self.me not in self.validators:
            raise ValueError("a replica is one of the validators")
        self.chain_id = chain_id
        self.app = app
        self.config = config or PbftConfig()
        self.f = max_faulty(len(self.validators))
        self.quorum = quorum(len(self.validators))
        self.view = 0
        self.mode = Mode.NORMAL
        self.executed = executed
        self.state = state
        if not 0 <= base <= executed:
            raise ValueError(f"base {base} must be between 0 and executed {executed}")
        self.base = base
        self.low = base
        """h: the low watermark, always the stable checkpoint (see ``base``)."""
        self.stable_proof: tuple[Checkpoint, ...] = ()
        self.stable_seq = base
        self.next_seq = executed + 1
        self.log: dict[tuple[int, int], _Slot] = {}
        self.prepared: dict[int, PreparedProof] = {}
        self.committed: dict[int, Committed] = {}
        self.executed_digests: dict[int, bytes] = {}
        """What was executed above h (GC'd with the log): a PRE-PREPARE for
        such a seq is checked against it, not the application's ``validate``."""
        self.checkpoints: dict[int, dict[PeerId, Checkpoint]] = {}
        self.own_states: dict[int, bytes] = {}
        self.view_changes: dict[PeerId, ViewChange] = {}
        self.new_view_msg: NewView | None = None
        self.view_change_attempts = 0
        self.views_without_execution = 0
        self.fetch_target = 0
        self.fetch_round = 0
        self.fetch_peers: tuple[PeerId, ...] = ()
        self._executed_at_tick = -1
        self._retransmit_delay = self.config.retransmit_interval
        """The retransmission timer's current interval (backs off while idle)."""
        self.timers: dict[str, int] = {}
        self._token = 0
        self._watched: Hashable | None = None
        """The request the "request" timer follows (a backup in normal mode)."""
        self.refused: Counter[str] = Counter()
        self._batch_due = False
        """The batch timer fired with a short batch held back (adaptive batching)."""
        self.parked: dict[int, _Parked] = {}
        """PRE-PREPAREs of the current view that overtook their predecessor, by seq."""
        self.parked_total = 0
        """How many PRE-PREPAREs were ever parked (an observation for tests)."""
        self._out: list[Action] = []
        self.journaling = journal is not None
        self.signed: dict[int, tuple[int, bytes]] = {}
        """By seq above h: the (view, digest) of the last PRE-PREPARE or
        PREPARE this replica signed; never another digest in that view."""
        self.proposals: dict[int, PrePrepare] = {}
        """By seq above h: our own PRE-PREPAREs as primary (journaled)."""
        self._resume: list[PrePrepare] = []
        """Own PRE-PREPAREs of the current view from the journal, for start()."""
        self._resume_new_view: NewView | None = None
        """Our own NEW-VIEW for the current view from the journal, for start()."""
        if journal is not None:
            self._restore(journal)

    def _restore(self, journal: Journal) -> None:
        """Resume from a journal: the view (and view change), the stable
        checkpoint if this replica executed it, the signed digests and the
        prepared certificates above it. A primary resumes proposing after
        the seqs it already signed in this view (never re-proposing one)."""
        self.view = journal.view
        self.mode = Mode.VIEW_CHANGE if journal.view_changing else Mode.NORMAL
        if self.base < journal.stable_seq <= self.executed:
            self.low = self.stable_seq = journal.stable_seq
            self.stable_proof = journal.stable_proof
        for seq, record in journal.records.items():
            if seq <= self.stable_seq:
                continue
            self.signed[seq] = (record.view, record.digest)
            if record.prepared is not None:
                self.prepared[seq] = record.prepared
            mine = record.proposal or (record.prepared and record.prepared.pre_prepare)
            if (
                mine
                and mine.replica == self.me
                and mine.view == self.view == record.view
                and seq > self.executed
            ):
                self.proposals[seq] = mine
        self.next_seq = self._after_signed(self.view, self.next_seq)
        if self.mode is Mode.NORMAL:
            self._resume = [self.proposals[seq] for seq in sorted(self.proposals)]
        nv = journal.new_view
        if nv is not None and nv.view == self.view and nv.replica == self.me:
            # Sent before the crash (installed or not): this view is ours.
            # Checked like anyone's: a damaged record must not be re-sent
            # or installed (one with no VIEW-CHANGEs crashed the restart).
            if self._new_view_ok(nv):
                self._resume_new_view = nv
            else:
                self._refuse("bad_journal_new_view")

    def _after_signed(self, view: int, floor: int) -> int:
        """The next seq to propose in ``view``: ``floor`` or past every seq
        signed in it (after a restart, the journal's), so none twice."""
        return max([floor, *(seq + 1 for seq, (v, _) in self.signed.items() if v == view)])

    # -- helpers --------------------------------------------------------------

    def primary(self, view: int) -> PeerId:
        return self.validators[view % len(self.validators)]

    @property
    def is_primary(self) -> bool:
        return self.primary(self.view) == self.me

    @property
    def high(self) -> int:
        return self.low + self.config.window

    @property
    def changing_view_alone(self) -> bool:
        """Changing views with fewer than f+1 VIEW-CHANGEs (its own
        included) for the view it wants: the others, as far as it knows,
        stay in the old view, and only they can commit until they time out
        too (PBFT's f+1 rule makes them join only then)."""
        if self.mode is not Mode.VIEW_CHANGE:
            return False
        wanting = sum(1 for vc in self.view_changes.values() if vc.new_view == self.view)
        return wanting <= self.f

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def _broadcast(self, message: Message) -> None:
        self._out.append(Send(None, message))

    def _set_timer(self, name: str, delay: float) -> None:
        self._token += 1
        self.timers[name] = self._token
        self._out.append(SetTimer(name, delay, self._token))

    def _cancel_timer(self, name: str) -> None:
        if self.timers.pop(name, None) is not None:
            self._out.append(CancelTimer(name))

    def _persist_seq(self, seq: int) -> None:
        """Journal what this replica signed for ``seq`` (before it is sent)."""
        if not self.journaling:
            return
        view, digest = self.signed[seq]
        prepared = self.prepared.get(seq)
        proposal = self.proposals.get(seq) if prepared is None else None
        record = SeqRecord(seq, view, digest, prepared, proposal)
        self._out.append(
            Persist(seq_key(seq, self.config.window), encode_seq_record(self.chain_id, record))
        )

    def _persist_view(self) -> None:
        if self.journaling:
            changing = self.mode is Mode.VIEW_CHANGE
            value = encode_view(self.chain_id, self.view, changing, self.config.window)
            self._out.append(Persist(VIEW_KEY, value))

    def _conflicts(self, view: int, seq: int, digest: bytes) -> bool:
        """We signed another digest for (view, seq) (before a restart)."""
        held = self.signed.get(seq)
        return held is not None and held[0] == view and held[1] != digest

    def _sign_for(self, view: int, seq: int, digest: bytes) -> bool:
        """Record that we sign (view, seq, digest), journaled; False (and
        nothing recorded) if we already signed another digest there."""
        if self._conflicts(view, seq, digest):
            return False
        held = self.signed.get(seq)
        self.signed[seq] = (view, digest)
        if held != (view, digest):
            self._persist_seq(seq)
        return True

    def _slot(self, view: int, seq: int) -> _Slot:
        slot = self.log.get((view, seq))
        if slot is None:
            slot = self.log[(view, seq)] = _Slot(view, seq)
        return slot

    # -- the one entry point --------------------------------------------------

    def start(self) -> list[Action]:
        """Actions to run once at boot (arms the retransmission timer; a
        replica restored in a view change sends its VIEW-CHANGE again, a new
        primary restored after its NEW-VIEW sends and installs it again, and
        a primary re-installs its own unfinished PRE-PREPAREs)."""
        self._set_timer("retransmit", self.config.retransmit_interval)
        # The view record names this run's window, so a restart with another
        # checkpoint interval still reads every slot this run writes.
        self._persist_view()
        nv, self._resume_new_view = self._resume_new_view, None
        if nv is not None:
            # Restarted after sending our NEW-VIEW: the backups that missed
            # it would otherwise wait out their view timers for the next view.
            self._broadcast(nv)
            self._install_new_view(nv)
        elif self.mode is Mode.VIEW_CHANGE:
            self._send_view_change()
        resume, self._resume = self._resume, []
        for pp in resume:  # in seq order: each one's predecessor comes first
            slot = self.log.get((pp.view, pp.seq))
            if slot is None or slot.pre_prepare is None:  # not re-issued by the NEW-VIEW
                self._install_pre_prepare(pp)
        return self._flush()

    def step(self, event: Event) -> list[Action]:
        """Apply one event; return what to do. The only mutator."""
        if self.parked:
            # Predecessors executed in an earlier step: the application has
            # run those Committed actions by now, so it holds the parent.
            self._retry_parked()
        if isinstance(event, Receive):
            self._on_receive(event.sender, event.message)
        elif isinstance(event, TimerFired):
            self._on_timer(event.name, event.token)
        elif isinstance(event, RequestsPending):
            self._on_requests(event.count)
        elif isinstance(event, BlocksFetched):
            self._on_blocks(event.blocks)
        self._update_view_timer()
        if self._retransmit_delay > self.config.retransmit_interval and not self._idle():
            self._retransmit_delay = self.config.retransmit_interval
            self._set_timer("retransmit", self._retransmit_delay)
        return self._flush()

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _on_receive(self, sender: PeerId, message: Message) -> None:
        if sender not in self.validators or message.replica != sender:
            self._refuse("not_from_sender")
            return
        if isinstance(message, PrePrepare):
            self._on_pre_prepare(message)
        elif isinstance(message, Prepare):
            self._on_prepare(message)
        elif isinstance(message, Commit):
            self._on_commit(message)
        elif isinstance(message, Checkpoint):
            self._on_checkpoint(message)
        elif isinstance(message, ViewChange):
            self._on_view_change(message)
        elif isinstance(message, NewView):
            self._on_new_view(message)

    # -- batching (primary) ---------------------------------------------------

    def _on_requests(self, count: int) -> None:
        if count <= 0 or not self.is_primary or self.mode is not Mode.NORMAL:
            return
        self._propose(force=self._batch_due)
        if self.app.pending() > 0 and "batch" not in self.timers:
            self._set_timer("batch", self.config.batch_timeout)

    def _propose(self, *, force: bool) -> None:
        """Issue PRE-PREPAREs while the window has room and batching says so:
        full batches at once; a short one (``force``: the batch timer fired)
        only while fewer than ``max_partial_in_flight`` are in flight, else
        it stays due until a commit drains the pipeline."""
        self.next_seq = max(self.next_seq, self.executed + 1, self.low + 1)
        while self.next_seq <= self.high:
            pending = self.app.pending()
            in_flight = self.next_seq - 1 - self.executed
            short_ok = force and in_flight < self.config.max_partial_in_flight
            if pending == 0 or (pending < self.config.batch_size and not short_ok):
                self._batch_due = force and pending > 0
                return
            proposal = self.app.propose(self.next_seq)
            if proposal is None:
                return
            payload, digest = proposal
            pp = PrePrepare.create(
                self.identity, self.chain_id, self.view, self.next_seq, digest, payload
            )
            self.next_seq += 1
            self.proposals[pp.seq] = pp
            if not self._sign_for(pp.view, pp.seq, pp.digest):
                # Unreachable: a restored primary resumes past its signed seqs.
                self._refuse("conflicts_with_signed")
                return
            self._broadcast(pp)
            self._accept_pre_prepare(pp)
            force = self._batch_due = False

    # -- normal case ----------------------------------------------------------

    def _in_window(self, seq: int) -> bool:
        return self.low < seq <= self.high

    def _normal_guard(self, view: int, seq: int) -> bool:
        """Stale or future view, view change in progress, or outside h..h+L."""
        if self.mode is not Mode.NORMAL or view != self.view:
            self._refuse("stale_view" if view < self.view else "other_view")
            return False
        if not self._in_window(seq):
            self._refuse("watermark")
            return False
        return True

    def _on_pre_prepare(self, pp: PrePrepare) -> None:
        if not self._normal_guard(pp.view, pp.seq):
            return
        if pp.replica != self.primary(pp.view):
            self._refuse("not_primary")
            return
        slot = self.log.get((pp.view, pp.seq))
        held = slot.pre_prepare if slot is not None else None
        if held is None and pp.seq in self.parked:
            held = self.parked[pp.seq].pre_prepare
        if held is not None:
            if held.digest != pp.digest and pp.verify(self.chain_id, memo=self.signatures):
                self._suspect_primary("equivocation")
            else:
                self._refuse("duplicate")
            return
        if not pp.verify(self.chain_id, memo=self.signatures):
            self._refuse("bad_signature")
            return
        if not self._predecessor_ready(pp.seq):
            self._park(pp, reissued=False)
            return
        self._try_pre_prepare(pp, reissued=False)

    # -- parent first: parked PRE-PREPAREs (P-PARENT-FIRST) -------------------

    def _predecessor_ready(self, seq: int) -> bool:
        """``seq - 1`` is executed, or pre-prepared (or further) in this view."""
        if seq - 1 <= self.executed:
            return True
        slot = self.log.get((self.view, seq - 1))
        return slot is not None and slot.phase >= Phase.PRE_PREPARED

    def _try_pre_prepare(self, pp: PrePrepare, *, reissued: bool) -> None:
        """Validate a signed PRE-PREPARE whose predecessor is ready.

        Accepted if ``_verdict`` agrees. Refused, and the primary suspected
        (unless a NEW-VIEW re-issued it: a quorum prepared it), if the
        digest is not the payload's, or if the application answers None
        with the predecessor executed. None with the predecessor only
        pre-prepared may be the application's missing speculative parent
        (it validated a lower seq since, for a state transfer, or the
        predecessor is a null request it never saw): parked, and asked once
        more after the predecessor is executed.
        """
        verdict = self._verdict(pp)
        if verdict:
            self._accept_pre_prepare(pp)
        elif verdict is None and pp.seq - 1 > self.executed:
            self._park(pp, reissued=reissued, until_executed=True)
        else:
            self._refuse("wrong_digest")
            if not reissued:
                self._suspect_primary("invalid_proposal")

    def _verdict(self, pp: PrePrepare) -> bool | None:
        """Whether ``pp`` proposes a valid payload; None when the application
        refused it without naming a digest. For a seq executed here (a
        retransmission, a re-issue after a state transfer) the executed
        digest decides: the application is past that height."""
        if pp.seq in self.executed_digests:
            return pp.digest == self.executed_digests[pp.seq]
        if pp.digest == NULL_DIGEST:
            return pp.payload == b""
        digest = self.app.validate(pp.seq, pp.payload)
        return None if digest is None else digest == pp.digest

    def _park(self, pp: PrePrepare, *, reissued: bool, until_executed: bool = False) -> None:
        """Hold ``pp`` until its predecessor is ready. Only signed PRE-PREPAREs
        of the current view from its primary inside the window get here, and
        only the first per seq (a second with another digest is
        equivocation), so this holds at most L messages; it is emptied when
        the view changes. Retransmission (of the predecessor) and the view
        timer (which runs while anything is parked) take care of one whose
        predecessor never comes."""
        if pp.seq not in self.parked:
            self.parked_total += 1
        self.parked[pp.seq] = _Parked(pp, reissued, until_executed)

    def _retry_parked(self) -> None:
        """At the start of a step: try, in seq order, the parked PRE-PREPAREs
        whose predecessor became ready in an earlier step. Executions are
        only acted on here, not in the step that made them: by now the
        reactor has run those ``Committed`` actions, so the application
        holds the parent."""
        for seq in sorted(self.parked):
            entry = self.parked.get(seq)
            if entry is None:  # tried by the chain in _accept_pre_prepare
                continue
            if seq <= self.executed or self.mode is not Mode.NORMAL:
                del self.parked[seq]  # executed meanwhile (state transfer): moot
                continue
            if entry.until_executed and seq - 1 > self.executed:
                continue
            if self._predecessor_ready(seq):
                del self.parked[seq]
                self._try_pre_prepare(entry.pre_prepare, reissued=entry.reissued)

    def _accept_pre_prepare(self, pp: PrePrepare) -> None:
        """Enter PRE_PREPARED; a backup then PREPAREs."""
        slot = self._slot(pp.view, pp.seq)
        if slot.phase is not Phase.IDLE:
            return
        if pp.replica != self.me and not self._sign_for(pp.view, pp.seq, pp.digest):
            # We PREPAREd another digest here before a restart: the primary
            # proposed twice for one (view, seq).
            self._refuse("conflicts_with_signed")
            self._suspect_primary("equivocation")
            return
        slot.pre_prepare = pp
        slot.phase = Phase.PRE_PREPARED
        if pp.replica == self.me:
            slot.own.append(pp)
        else:
            prepare = Prepare.create(self.identity, self.chain_id, pp.view, pp.seq, pp.digest)
            slot.add_prepare(prepare)
            slot.own.append(prepare)
            self._broadcast(prepare)
        self._check_conflicts(slot)
        self._enter_prepared(slot)
        # The application validated pp just now (or it is a null): the one
        # parked behind it can be validated in this step (and so on, in order).
        nxt = self.parked.get(pp.seq + 1)
        if nxt is not None and not nxt.until_executed and pp.view == self.view:
            del self.parked[pp.seq + 1]
            self._try_pre_prepare(nxt.pre_prepare, reissued=nxt.reissued)

    def _on_prepare(self, prepare: Prepare) -> None:
        if not self._normal_guard(prepare.view, prepare.seq):
            return
        if prepare.replica == self.primary(prepare.view):
            self._refuse("prepare_from_primary")
            return
        slot = self._slot(prepare.view, prepare.seq)
        if prepare.replica in slot.prepares:
            self._refuse("duplicate")
            return
        if not prepare.verify(self.chain_id, memo=self.signatures):
            self._refuse("bad_signature")
            return
        slot.add_prepare(prepare)
        self._check_conflicts(slot)
        self._enter_prepared(slot)

    def _check_conflicts(self, slot: _Slot) -> None:
        """f+1 PREPAREs for another digest than our PRE-PREPARE: at least one
        honest backup got a different PRE-PREPARE, so the primary equivocated."""
        if slot.pre_prepare is None:
            return
        others = len(slot.prepares) - slot.prepare_counts.get(slot.pre_prepare.digest, 0)
        if others > self.f:
            self._suspect_primary("equivocation")

    def _matching_prepares(self, slot: _Slot) -> list[Prepare]:
        assert slot.pre_prepare is not None
        digest = slot.pre_prepare.digest
        return [p for p in slot.prepares.values() if p.digest == digest]

    def _enter_prepared(self, slot: _Slot) -> None:
        """PRE_PREPARED -> PREPARED with quorum - 1 (2f when n = 3f + 1)
        matching PREPAREs: with the PRE-PREPARE, a quorum; send COMMIT."""
        if slot.phase is not Phase.PRE_PREPARED or slot.pre_prepare is None:
            return
        if slot.prepare_counts.get(slot.pre_prepare.digest, 0) < self.quorum - 1:
            return
        matching = self._matching_prepares(slot)
        if len(matching) < self.quorum - 1:
            return
        slot.phase = Phase.PREPARED
        pp = slot.pre_prepare
        chosen = sorted(matching, key=lambda p: p.replica)[: self.quorum - 1]
        proof = PreparedProof(pp, tuple(chosen))
        self.prepared[pp.seq] = proof
        self._persist_seq(pp.seq)
        self._send_commits_from(slot)
        # Our COMMIT may wait for the seq before; 2f+1 others' may be in.
        self._enter_committed(slot)

    def _commit_ready(self, view: int, seq: int) -> bool:
        """P-CHAINED-COMMIT: COMMIT for ``seq`` only after our COMMIT for
        ``seq - 1`` in the same view, or once ``seq - 1`` is executed.

        Each proposal is validated on a speculative parent (P-PARENT-FIRST),
        and PBFT's view change keeps per seq only what a quorum prepared. A
        block could commit while its parent was only pre-prepared, and the
        next view then fill the parent's height with another block or a null
        request: two committed blocks that do not chain (found by a seeded
        sweep with a byzantine validator across a set change). With this
        rule an honest COMMIT for ``seq`` means this replica prepared every
        height from its executed one up to ``seq`` in that view, so 2f+1
        COMMITs (f+1 of them honest) leave each of those heights committed in
        PBFT's sense, and every later view keeps them."""
        if seq - 1 <= self.executed:
            return True
        before = self.log.get((view, seq - 1))
        return before is not None and self.me in before.commits

    def _send_commits_from(self, slot: _Slot | None) -> None:
        """Send the COMMIT of ``slot`` if it is prepared and may (above), then
        those of the prepared slots after it that waited on it."""
        while (
            slot is not None
            and slot.phase is Phase.PREPARED
            and slot.pre_prepare is not None
            and self.me not in slot.commits
            and self._commit_ready(slot.view, slot.seq)
        ):
            pp = slot.pre_prepare
            commit = Commit.create(self.identity, self.chain_id, pp.view, pp.seq, pp.digest)
            slot.add_commit(commit)
            slot.own.append(commit)
            self._broadcast(commit)
            self._enter_committed(slot)
            slot = self.log.get((slot.view, slot.seq + 1))

    def _on_commit(self, commit: Commit) -> None:
        """COMMITs count in any recent view: 2f+1 of them in *one* view is
        PBFT's committed predicate, which lets a replica that is stuck in a
        view change (or restarted at view 0) still learn what committed."""
        if commit.seq <= self.executed:
            # The normal fate of the COMMITs past the 2f+1st (a replica
            # executes on 2f+1): counted apart, so "watermark" keeps
            # meaning traffic outside the window.
            self._refuse("executed")
            return
        if commit.seq > self.high:
            self._refuse("watermark")
            return
        if commit.view > self.view + self.config.max_future_views:
            self._refuse("future_view")
            return
        slot = self._slot(commit.view, commit.seq)
        if commit.replica in slot.commits:
            self._refuse("duplicate")
            return
        if not commit.verify(self.chain_id, memo=self.signatures):
            self._refuse("bad_signature")
            return
        slot.add_commit(commit)
        if commit.view == self.view and self.mode is Mode.NORMAL:
            self._enter_committed(slot)
        if slot.phase is not Phase.COMMITTED:
            self._observe_commit_quorum(slot, commit.digest)

    def _observe_commit_quorum(self, slot: _Slot, digest: bytes) -> None:
        """2f+1 same-view COMMITs seen outside our own normal case: take the
        payload we hold for that digest, or fetch the block."""
        if slot.commit_counts.get(digest, 0) < self.quorum or slot.seq in self.committed:
            return
        votes = [(c.replica, c.vote) for c in slot.commits.values() if c.digest == digest]
        payload = next(
            (
                s.pre_prepare.payload
                for s in self.log.values()
                if s.seq == slot.seq
                and s.pre_prepare is not None
                and s.pre_prepare.digest == digest
            ),
            None,
        )
        if payload is None:
            self._fetch(slot.seq, tuple(r for r, _ in votes), now=True)
            return
        cert = CommitCertificate.of(slot.seq, digest, votes, view=slot.view)
        self.committed[slot.seq] = Committed(slot.seq, digest, payload, cert)
        self._execute_ready()

    def _enter_committed(self, slot: _Slot) -> None:
        """PREPARED -> COMMITTED with 2f+1 matching COMMITs (own included)."""
        if slot.phase is not Phase.PREPARED or slot.pre_prepare is None:
            return
        pp = slot.pre_prepare
        if slot.commit_counts.get(pp.digest, 0) < self.quorum:
            return
        votes = [(c.replica, c.vote) for c in slot.commits.values() if c.digest == pp.digest]
        slot.phase = Phase.COMMITTED
        if pp.seq > self.executed and pp.seq not in self.committed:
            cert = CommitCertificate.of(pp.seq, pp.digest, votes, view=slot.view)
            self.committed[pp.seq] = Committed(pp.seq, pp.digest, pp.payload, cert)
        self._execute_ready()

    def _execute_ready(self) -> None:
        """Deliver committed proposals in sequence order, without gaps."""
        while (done := self.committed.pop(self.executed + 1, None)) is not None:
            self._execute(done)

    def _execute(self, done: Committed) -> None:
        self.executed = done.seq
        self.executed_digests[done.seq] = done.digest
        self.state = advance_state(self.state, done.seq, done.digest)
        self._out.append(done)
        # A prepared successor may have waited for this (P-CHAINED-COMMIT).
        self._send_commits_from(self.log.get((self.view, done.seq + 1)))
        self.view_change_attempts = 0
        self._reset_view_timer()
        if done.seq % self.config.checkpoint_interval == 0:
            self._take_checkpoint(done.seq)
            # Back off the doubled timeout one step per checkpoint, not all
            # at once: a cluster that just needed a longer timeout to make
            # progress would otherwise fall straight back into the view
            # changes that made it slow.
            self.views_without_execution = max(0, self.views_without_execution - 1)

    # -- checkpoints and garbage collection --------------------------------

    def _take_checkpoint(self, seq: int) -> None:
        self.own_states[seq] = self.state
        checkpoint = Checkpoint.create(self.identity, self.chain_id, seq, self.state)
        self.checkpoints.setdefault(seq, {})[self.me] = checkpoint
        self._broadcast(checkpoint)
        self._check_stable(seq)

    def _on_checkpoint(self, checkpoint: Checkpoint) -> None:
        if checkpoint.seq <= self.low or checkpoint.seq % self.config.checkpoint_interval:
            self._refuse("stale_checkpoint")
            return
        known = self.checkpoints.get(checkpoint.seq, {})
        if checkpoint.replica in known:
            self._refuse("duplicate")
            return
        if not checkpoint.verify(self.chain_id, memo=self.signatures):
            self._refuse("bad_signature")
            return
        self.checkpoints.setdefault(checkpoint.seq, {})[checkpoint.replica] = checkpoint
        self._bound_checkpoints(checkpoint.replica)
        self._check_stable(checkpoint.seq)

    def _bound_checkpoints(self, replica: PeerId) -> None:
        """Keep at most window/K + 2 checkpoints per sender (Byzantine spam)."""
        held = sorted(s for s, by in self.checkpoints.items() if replica in by)
        for seq in held[
            : max(0, len(held) - (self.config.window // self.config.checkpoint_interval + 2))
        ]:
            del self.checkpoints[seq][replica]

    def _check_stable(self, seq: int) -> None:
        """2f+1 matching CHECKPOINTs: stable (and GC), or fetch if we are behind."""
        by_state: dict[bytes, list[Checkpoint]] = {}
        for c in self.checkpoints.get(seq, {}).values():
            by_state.setdefault(c.state, []).append(c)
        for state, proof in by_state.items():
            if len(proof) < self.quorum:
                continue
            if seq > self.executed:
                self._fetch(seq, tuple(c.replica for c in proof))
            elif self.own_states.get(seq, state) == state and seq > self.low:
                # No own state for seq: executed before a restart. What it
                # executed carried certificates, so it is the agreed state.
                self._make_stable(seq, tuple(sorted(proof, key=lambda c: c.replica)))
            return

    def _make_stable(self, seq: int, proof: tuple[Checkpoint, ...]) -> None:
        self.low = seq
        self.stable_seq = seq
        self.stable_proof = proof[: self.quorum]
        if self.journaling:
            self._out.append(
                Persist(STABLE_KEY, encode_stable(self.chain_id, seq, self.stable_proof))
            )
        self.signed = {s: signed for s, signed in self.signed.items() if s > seq}
        self.proposals = {s: pp for s, pp in self.proposals.items() if s > seq}
        self.log = {key: slot for key, slot in self.log.items() if key[1] > seq}
        self.parked = {s: entry for s, entry in self.parked.items() if s > seq}
        self.executed_digests = {s: d for s, d in self.executed_digests.items() if s > seq}
        self.prepared = {s: p for s, p in self.prepared.items() if s > seq}
        self.checkpoints = {s: c for s, c in self.checkpoints.items() if s >= seq}
        self.own_states = {s: d for s, d in self.own_states.items() if s >= seq}
        if self.is_primary and self.mode is Mode.NORMAL:
            self._propose(force=False)

    # -- state transfer -------------------------------------------------------

    def _fetch(self, to_seq: int, peers: tuple[PeerId, ...], *, now: bool = False) -> None:
        """Plan a state transfer up to ``to_seq``. A replica only a little
        behind usually catches up by itself (its COMMITs are in flight), so
        it waits one retransmission interval first; one beyond its window
        fetches at once."""
        if to_seq <= self.fetch_target:
            return
        self.fetch_target = to_seq
        self.fetch_peers = tuple(p for p in peers if p != self.me)
        if now or to_seq > self.high:
            self._emit_fetch()
        elif "fetch" not in self.timers:
            self._set_timer("fetch", self.config.retransmit_interval)

    def _emit_fetch(self) -> None:
        others = self.fetch_peers or tuple(v for v in self.validators if v != self.me)
        rotation = self.fetch_round % max(1, len(others))
        self.fetch_round += 1
        self._out.append(
            FetchBlocks(self.executed + 1, self.fetch_target, others[rotation:] + others[:rotation])
        )
        self._set_timer("fetch", 4 * self.config.retransmit_interval)

    def _fetch_if_stalled(self) -> None:
        """No execution for a whole retransmission interval, yet f+1 others
        (so at least one honest) say they are further: fetch from them.

        This catches what neither rule above sees: the quorum that committed
        a seq may be gone (a voter crashed and forgot its COMMIT), leaving
        fewer than 2f+1 COMMITs or CHECKPOINTs to observe. Asking is always
        safe: fetched blocks count only with a valid certificate.
        """
        stalled = self.executed == self._executed_at_tick
        self._executed_at_tick = self.executed
        if not stalled:
            return
        ahead: dict[int, set[PeerId]] = {}
        for slot in self.log.values():
            if slot.seq > self.executed:
                others = {r for r in slot.commits if r != self.me}
                ahead.setdefault(slot.seq, set()).update(others)
        for seq, by in self.checkpoints.items():
            if seq > self.executed:
                ahead.setdefault(seq, set()).update(r for r in by if r != self.me)
        # A replica waiting alone in a view change retransmits its
        # VIEW-CHANGE, not its COMMITs: the slots it prepared (P) say as
        # much as a COMMIT would, and its stable checkpoint's proof names
        # 2f+1 replicas that executed that far. Without this a replica
        # that missed the last block before the cluster went quiet stayed
        # a block behind for good whenever only one peer still resent its
        # COMMIT (the others had fetched the block, or were in a view
        # change): found by a seeded sweep of restarts under 5% loss.
        for vc in self.view_changes.values():
            if vc.replica == self.me:
                continue
            if vc.stable_seq > self.executed:
                signers = {c.replica for c in vc.checkpoint_proof} | {vc.replica}
                ahead.setdefault(vc.stable_seq, set()).update(signers - {self.me})
            for proof in vc.prepared:
                if proof.pre_prepare.seq > self.executed:
                    ahead.setdefault(proof.pre_prepare.seq, set()).add(vc.replica)
        known = [(seq, by) for seq, by in ahead.items() if len(by) > self.f]
        if known:
            seq, by = max(known, key=lambda item: item[0])
            self._fetch(seq, tuple(sorted(by)), now=True)

    def _on_blocks(self, blocks: tuple[tuple[int, bytes, bytes, CommitCertificate], ...]) -> None:
        """Accept fetched blocks in order, each only with a valid certificate."""
        for seq, digest, payload, cert in sorted(blocks, key=lambda b: b[0]):
            if seq <= self.executed:
                continue
            if seq != self.executed + 1:
                self._refuse("fetch_gap")
                break
            if not self._fetched_ok(seq, digest, payload, cert):
                self._refuse("bad_certificate")
                break
            self.committed.pop(seq, None)
            self._execute(Committed(seq, digest, payload, cert))
        self._execute_ready()
        for seq in sorted(s for s in self.checkpoints if s <= self.executed):
            self._check_stable(seq)
        if self.executed >= self.fetch_target:
            self._cancel_timer("fetch")

    def _fetched_ok(self, seq: int, digest: bytes, payload: bytes, cert: CommitCertificate) -> bool:
        if cert.height != seq or cert.block_hash != digest:
            return False
        ok = _payload_matches(self.app, seq, digest, payload)
        return ok and cert.is_valid(self.chain_id, self.validators, memo=self.signatures)

    # -- timers ---------------------------------------------------------------

    def _on_timer(self, name: str, token: int) -> None:
        if self.timers.get(name) != token:
            return
        del self.timers[name]
        if name == "batch":
            if self.is_primary and self.mode is Mode.NORMAL:
                self._propose(force=True)
                if self.app.pending() > 0:
                    self._set_timer("batch", self.config.batch_timeout)
        elif name == "view":
            self._start_view_change(self.view + 1)
        elif name == "request":
            watched, self._watched = self._watched, None
            if (
                self.mode is Mode.NORMAL
                and not self.is_primary
                and watched is not None
                and self.app.is_pending(watched)
            ):
                self._suspect_primary("request timeout")
        elif name == "retransmit":
            progressed = self.executed != self._executed_at_tick
            self._fetch_if_stalled()
            self._retransmit(slots=not progressed)
            base, cap = self.config.retransmit_interval, self.config.idle_retransmit_interval
            idle = not progressed and self._idle()
            self._retransmit_delay = min(2 * self._retransmit_delay, cap) if idle else base
            self._set_timer("retransmit", self._retransmit_delay)
        elif name == "fetch" and self.executed < self.fetch_target:
            self._emit_fetch()

    def _idle(self) -> bool:
        """Nothing for this replica to finish and nobody known to be ahead:
        its retransmissions then serve only a peer that lost messages, so
        they back off (as TCP's do) instead of costing every peer a
        signature check four times a second: measured, an idle 4-validator
        testnet exchanged ~150 refused COMMITs a second per node."""
        if self.mode is not Mode.NORMAL or self.parked or self.app.pending() > 0:
            return False
        executed = self.executed
        return all(seq <= executed for _, seq in self.log) and all(
            seq <= executed for seq in self.checkpoints
        )

    def _has_work(self) -> bool:
        if self.app.pending() > 0 or self.parked:
            return True
        return any(
            slot.pre_prepare is not None and slot.seq > self.executed
            for slot in self.log.values()
            if slot.view == self.view
        )

    def _update_view_timer(self) -> None:
        """Normal mode: the view timer runs exactly while work is outstanding,
        and a backup's request timer while a request waits for a proposal."""
        if self.mode is not Mode.NORMAL:
            self._cancel_timer("request")
            return
        if not self._has_work():
            self._cancel_timer("view")
        elif "view" not in self.timers:
            self._set_timer("view", self._normal_timeout())
        if self.is_primary:
            self._cancel_timer("request")
        elif "request" not in self.timers and self.app.pending() > 0:
            self._watched = self.app.oldest_pending()
            if self._watched is not None:
                self._set_timer("request", self._request_timeout())

    def _request_timeout(self) -> float:
        return self.config.request_timeout * 2 ** min(self.views_without_execution, 6)

    def _reset_view_timer(self) -> None:
        if self.mode is Mode.NORMAL and "view" in self.timers:
            self._set_timer("view", self._normal_timeout())

    def _normal_timeout(self) -> float:
        """The base timeout, doubled for each new view installed, halved
        again at each checkpoint (Tendermint-style timeout increase).

        With a fixed timer, when one batch takes longer to validate than the
        base timeout (a loaded machine, a big block) views would change
        forever with hardly any execution (measured: view 48 and one block
        in 60 s with a 0.3 s timeout)."""
        return self.config.view_change_timeout * 2 ** min(self.views_without_execution, 6)

    def _retransmit(self, *, slots: bool) -> None:
        """Resend own messages that a peer may still need (links may drop).

        Own CHECKPOINTs from the stable one up always go (so a replica that
        fell behind learns where the others are and fetches), and so does
        our VIEW-CHANGE during a view change. With ``slots`` (nothing
        executed for a whole interval), for the current view's slots,
        everything own until the slot commits in this view (a re-issued
        slot we executed in an earlier view still needs our PREPARE at the
        others) and only the COMMIT after (enough for a laggard to observe
        the quorum). While execution progresses slots are not resent: under
        load a PRE-PREPARE resent with its payload every interval costs
        every replica a signature over megabytes, and a replica that lost
        one catches up from the CHECKPOINTs instead. The timer that calls
        this backs off while the replica is :meth:`_idle`.
        """
        for by in self.checkpoints.values():
            if self.me in by:
                self._broadcast(by[self.me])
        if self.mode is Mode.VIEW_CHANGE:
            own = self.view_changes.get(self.me)
            if own is not None:
                self._broadcast(own)
            return
        if not slots:
            return
        for (view, _seq), slot in sorted(self.log.items()):
            if view != self.view:
                continue
            for message in slot.own:
                if slot.phase < Phase.COMMITTED or isinstance(message, Commit):
                    self._broadcast(message)
        nv = self.new_view_msg
        if self.is_primary and nv is not None and nv.view == self.view and self.log:
            self._broadcast(nv)

    # -- view change ----------------------------------------------------------

    def _suspect_primary(self, reason: str) -> None:
        self._out.append(Suspect(self.primary(self.view), reason))
        if self.mode is Mode.NORMAL:
            self._start_view_change(self.view + 1)

    def _start_view_change(self, view: int) -> None:
        """Leave the normal case for ``view``: send a VIEW-CHANGE, arm the timer."""
        if view <= self.view and self.mode is Mode.VIEW_CHANGE:
            return
        self.view = view
        self.mode = Mode.VIEW_CHANGE
        self.parked.clear()
        self._cancel_timer("batch")
        self._persist_view()
        self._send_view_change()

    def _send_view_change(self) -> None:
        """Broadcast our VIEW-CHANGE for ``self.view`` (stable checkpoint and P set)."""
        top = self.stable_seq + self.config.window
        prepared = tuple(p for s, p in sorted(self.prepared.items()) if self.stable_seq < s <= top)
        vc = ViewChange.create(
            self.identity, self.chain_id, self.view, self.stable_seq, self.stable_proof, prepared
        )
        self.view_changes[self.me] = vc
        self._broadcast(vc)
        self._cancel_timer("view")
        self._arm_view_change_timer()
        self._try_new_view()

    def _arm_view_change_timer(self) -> None:
        """PBFT's rule: wait for view ``v``'s NEW-VIEW only once 2f+1
        VIEW-CHANGEs for ``v`` are in; the timeout doubles per attempt.

        Arming it on entry instead lets two groups of honest replicas, one a
        view ahead, time out in lockstep forever; with this rule the group
        ahead waits (retransmitting) until the others catch up.
        """
        if self.mode is not Mode.VIEW_CHANGE or "view" in self.timers:
            return
        votes = sum(1 for vc in self.view_changes.values() if vc.new_view == self.view)
        if votes < self.quorum:
            return
        delay = self.config.view_change_timeout * 2 ** min(self.view_change_attempts, 6)
        self.view_change_attempts += 1
        self._set_timer("view", delay)

    def _on_view_change(self, vc: ViewChange) -> None:
        if vc.new_view < self.view or (vc.new_view == self.view and self.mode is Mode.NORMAL):
            self._refuse("stale_view")
            return
        if vc.new_view > self.view + self.config.max_future_views:
            self._refuse("future_view")
            return
        held = self.view_changes.get(vc.replica)
        if held is not None and held.new_view >= vc.new_view:
            self._refuse("duplicate")
            return
        if not self._view_change_ok(vc):
            self._refuse("bad_view_change")
            return
        self.view_changes[vc.replica] = vc
        self._join_higher_view()
        self._arm_view_change_timer()
        self._try_new_view()

    def _join_higher_view(self) -> None:
        """f+1 replicas want views above ours: join the smallest (PBFT's
        liveness rule, so a replica never lags forever behind a view change)."""
        ahead = sorted(
            vc.new_view
            for vc in self.view_changes.values()
            if vc.new_view > self.view or (vc.new_view == self.view and self.mode is Mode.NORMAL)
        )
        if len(ahead) > self.f:
            self._start_view_change(ahead[-(self.f + 1)])

    def _view_change_ok(self, vc: ViewChange) -> bool:
        """A VIEW-CHANGE's signature and every proof inside it check out."""
        if not vc.verify(self.chain_id, memo=self.signatures):
            return False
        if vc.stable_seq < self.base:
            return False
        if vc.stable_seq == self.base:  # the epoch's start needs no proof
            if vc.checkpoint_proof:
                return False
        elif not self._checkpoint_proof_ok(vc.stable_seq, vc.checkpoint_proof):
            return False
        seqs = [p.pre_prepare.seq for p in vc.prepared]
        if len(set(seqs)) != len(seqs):
            return False
        return all(self._prepared_proof_ok(p, vc) for p in vc.prepared)

    def _checkpoint_proof_ok(self, seq: int, proof: tuple[Checkpoint, ...]) -> bool:
        signers = {c.replica for c in proof}
        if len(signers) != len(proof) or len(proof) < self.quorum:
            return False
        if len({c.state for c in proof}) != 1 or any(c.seq != seq for c in proof):
            return False
        return all(
            c.replica in self.validators and c.verify(self.chain_id, memo=self.signatures)
            for c in proof
        )

    def _prepared_proof_ok(self, proof: PreparedProof, vc: ViewChange) -> bool:
        pp = proof.pre_prepare
        if not vc.stable_seq < pp.seq <= vc.stable_seq + self.config.window:
            return False
        if pp.view >= vc.new_view or pp.replica != self.primary(pp.view):
            return False
        backups = {p.replica for p in proof.prepares}
        if len(backups) != len(proof.prepares) or len(backups) < self.quorum - 1:
            return False
        if pp.replica in backups or not backups <= set(self.validators):
            return False
        if any((p.view, p.seq, p.digest) != (pp.view, pp.seq, pp.digest) for p in proof.prepares):
            return False
        return pp.verify(self.chain_id, memo=self.signatures) and all(
            p.verify(self.chain_id, memo=self.signatures) for p in proof.prepares
        )

    def _new_view_plan(
        self, changes: Sequence[ViewChange]
    ) -> tuple[int, list[tuple[int, bytes, bytes]]]:
        """PBFT's O set, for proposals that chain: from the highest stable
        checkpoint up, the prepared proposal of the highest view for each
        seq, as far as every seq has one.

        Castro and Liskov fill a seq without a prepared certificate with a
        null request and go on; here the proposals above it were validated
        on top of a parent that the null now replaces, so they could never
        validate again, and a NEW-VIEW that re-issued them stalled every
        later view. None of them can have committed: with P-CHAINED-COMMIT
        a committed seq has f+1 honest replicas that prepared every seq
        below it down to what they executed, and any 2f+1 VIEW-CHANGEs
        include one of them, so every seq from the stable checkpoint up to
        a committed one has a certificate here. The plan ends at the first
        seq without one, and the new primary proposes afresh from there."""
        min_s = max(vc.stable_seq for vc in changes)
        best: dict[int, PrePrepare] = {}
        for vc in changes:
            for proof in vc.prepared:
                pp = proof.pre_prepare
                if pp.seq > min_s and (pp.seq not in best or pp.view > best[pp.seq].view):
                    best[pp.seq] = pp
        plan = []
        seq = min_s + 1
        while (pp := best.get(seq)) is not None:
            plan.append((seq, pp.digest, pp.payload))
            seq += 1
        return min_s, plan

    def _try_new_view(self) -> None:
        """As the new primary, send NEW-VIEW once 2f+1 VIEW-CHANGEs are in."""
        if self.mode is not Mode.VIEW_CHANGE or not self.is_primary:
            return
        changes = sorted(
            (vc for vc in self.view_changes.values() if vc.new_view == self.view),
            key=lambda vc: (vc.replica != self.me, vc.replica),
        )[: self.quorum]
        if len(changes) < self.quorum:
            return
        _, plan = self._new_view_plan(changes)
        pre_prepares = tuple(
            PrePrepare.create(self.identity, self.chain_id, self.view, seq, digest, payload)
            for seq, digest, payload in plan
        )
        if any(self._conflicts(pp.view, pp.seq, pp.digest) for pp in pre_prepares):
            # Restarted after sending a NEW-VIEW with another plan (other
            # VIEW-CHANGEs): a second one would equivocate. The view timer
            # moves everyone to the next view instead.
            self._refuse("conflicts_with_signed")
            return
        for pp in pre_prepares:
            self._sign_for(pp.view, pp.seq, pp.digest)
        nv = NewView.create(self.identity, self.chain_id, self.view, tuple(changes), pre_prepares)
        if self.journaling:
            self._out.append(Persist(NEW_VIEW_KEY, encode_new_view(self.chain_id, nv)))
        self._broadcast(nv)
        self._install_new_view(nv)

    def _on_new_view(self, nv: NewView) -> None:
        if nv.view < self.view or (nv.view == self.view and self.mode is Mode.NORMAL):
            self._refuse("stale_view")
            return
        if nv.replica != self.primary(nv.view):
            self._refuse("not_primary")
            return
        if not nv.verify(self.chain_id, memo=self.signatures) or not self._new_view_ok(nv):
            self._refuse("bad_new_view")
            return
        self._install_new_view(nv)

    def _new_view_ok(self, nv: NewView) -> bool:
        senders = {vc.replica for vc in nv.view_changes}
        if len(senders) != len(nv.view_changes) or len(senders) < self.quorum:
            return False
        if any(vc.new_view != nv.view for vc in nv.view_changes):
            return False
        if not all(self._view_change_ok(vc) for vc in nv.view_changes):
            return False
        _, plan = self._new_view_plan(nv.view_changes)
        issued = [(p.seq, p.digest, p.payload) for p in nv.pre_prepares]
        if issued != plan:
            return False
        return all(
            p.view == nv.view
            and p.replica == nv.replica
            and p.verify(self.chain_id, memo=self.signatures)
            for p in nv.pre_prepares
        )

    def _install_new_view(self, nv: NewView) -> None:
        """Enter the normal case of ``nv.view`` with its re-issued PRE-PREPAREs."""
        self.view = nv.view
        self.mode = Mode.NORMAL
        self._persist_view()
        self.parked.clear()
        self.new_view_msg = nv
        self.view_change_attempts = 0
        self.views_without_execution += 1
        self._cancel_timer("view")
        self.log = {key: slot for key, slot in self.log.items() if key[0] >= nv.view}
        self.view_changes = {r: vc for r, vc in self.view_changes.items() if vc.new_view > nv.view}
        min_s, plan = self._new_view_plan(nv.view_changes)
        self._adopt_checkpoint(min_s, nv.view_changes)
        self.app.abandon()
        for pp in nv.pre_prepares:
            if self._in_window(pp.seq) or pp.seq > self.executed:
                self._install_pre_prepare(pp)
        self.next_seq = self._after_signed(nv.view, max(self.executed, min_s + len(plan)) + 1)
        if self.is_primary:
            self._propose(force=False)
            if self.app.pending() > 0:
                self._set_timer("batch", self.config.batch_timeout)

    def _install_pre_prepare(self, pp: PrePrepare) -> None:
        """Validate even our own re-issues: it tells the app the batch is live
        again. In seq order, so each one's predecessor is normally ready; a
        refusal never suspects (see ``_try_pre_prepare``)."""
        if not self._predecessor_ready(pp.seq):
            self._park(pp, reissued=True)
            return
        self._try_pre_prepare(pp, reissued=True)

    def _adopt_checkpoint(self, min_s: int, changes: Sequence[ViewChange]) -> None:
        """The NEW-VIEW proves a stable checkpoint at ``min_s``: use it or fetch up to it."""
        if min_s <= self.low:
            return
        proof = next(vc.checkpoint_proof for vc in changes if vc.stable_seq == min_s)
        for c in proof:
            self.checkpoints.setdefault(min_s, {})[c.replica] = c
        if min_s > self.executed:
            self._fetch(min_s, tuple(c.replica for c in proof))
        else:
            self._check_stable(min_s)


class Follower:
    """A non-validator that follows the chain: it accepts the next block only
    with a valid commit certificate of the validators."""

    def __init__(
        self,
        chain_id: str,
        validators: Sequence[PeerId],
        app: Application,
        *,
        signatures: SignatureMemo | None = None,
    ) -> None:
        """``signatures``: a memo for certificate checks, as for :class:`Replica`."""
        self.chain_id = chain_id
        self.signatures = signatures
        self.validators = tuple(validators)
        self.app = app
        self.height = 0
        self.state = GENESIS_STATE
        self.refused: Counter[str] = Counter()

    def accept(
        self, seq: int, digest: bytes, payload: bytes, certificate: CommitCertificate
    ) -> Committed | None:
        """The block as ``Committed`` if it is next and certified, else None (counted)."""
        if seq != self.height + 1:
            self.refused["not_next"] += 1
            return None
        if certificate.height != seq or certificate.block_hash != digest:
            self.refused["wrong_certificate"] += 1
            return None
        if not _payload_matches(self.app, seq, digest, payload):
            self.refused["wrong_digest"] += 1
            return None
        if not certificate.is_valid(self.chain_id, self.validators, memo=self.signatures):
            self.refused["bad_certificate"] += 1
            return None
        self.height = seq
        self.state = advance_state(self.state, seq, digest)
        return Committed(seq, digest, payload, certificate)
