"""PBFT's durable log (``pbft_journal``): what a restarted replica remembers.

A replica built with a journal emits ``Persist`` before each message that
binds it; these tests replay those records into a fresh replica, as a
restart from its store does, and check what it may and may not sign then.
The whole-cluster case (2f+1 replicas restarted at once) is in
``test_pbft_faults.py``.
"""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_mutations import mutated_msgpack

from fedchain.consensus.errors import StoreCorrupted
from fedchain.consensus.pbft import (
    Mode,
    PbftConfig,
    Persist,
    Receive,
    Replica,
    RequestsPending,
    Send,
)
from fedchain.consensus.pbft_journal import (
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
    load_journal,
    seq_key,
)
from fedchain.consensus.pbft_messages import (
    Checkpoint,
    Commit,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    ViewChange,
)
from fedchain.p2p.identity import Identity

CHAIN = "journal-test"
RNG = np.random.default_rng(5)
KEYS = [Identity.from_rng(RNG) for _ in range(4)]
VALIDATORS = [k.public_key for k in KEYS]
CONFIG = PbftConfig(checkpoint_interval=4)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class App:
    """Any non-empty payload is valid; proposes ``pending`` one-byte payloads."""

    def __init__(self, pending: int = 0) -> None:
        self.count = pending

    def pending(self) -> int:
        return self.count

    def oldest_pending(self) -> None:
        return None  # counts, not requests: no request timer

    def is_pending(self, request: object) -> bool:
        return False

    def propose(self, seq: int) -> tuple[bytes, bytes] | None:
        if not self.count:
            return None
        self.count -= 1
        payload = b"p%d" % seq
        return payload, sha(payload)

    def validate(self, seq: int, payload: bytes) -> bytes | None:
        return sha(payload) if payload else None

    def abandon(self) -> None:
        pass


class Disk:
    """A replica's journal as its store would hold it; restarts read it back."""

    def __init__(self) -> None:
        self.meta: dict[str, bytes] = {}

    def boot(self, i: int, app: App | None = None, config: PbftConfig = CONFIG) -> Replica:
        journal = load_journal(self.meta.get, CHAIN, config.window)
        replica = Replica(KEYS[i], VALIDATORS, CHAIN, app or App(), config, journal=journal)
        self.keep(replica.start())
        return replica

    def keep(self, actions: list) -> list:
        """Write the Persist actions in order, checking that the record which
        binds each PREPARE and COMMIT is on disk before it is sent."""
        for action in actions:
            if isinstance(action, Persist):
                self.meta[action.key] = action.value
            elif isinstance(action, Send) and isinstance(action.message, Prepare | Commit):
                message = action.message
                record = load_journal(self.meta.get, CHAIN, CONFIG.window).records[message.seq]
                assert (record.view, record.digest) == (message.view, message.digest)
                assert isinstance(message, Prepare) or record.prepared is not None
        return actions


def pp(seq: int, payload: bytes, view: int = 0) -> PrePrepare:
    return PrePrepare.create(KEYS[view % 4], CHAIN, view, seq, sha(payload), payload)


def sent(actions: list, kind: type) -> list:
    return [a.message for a in actions if isinstance(a, Send) and isinstance(a.message, kind)]


def step(disk: Disk, replica: Replica, sender: int, message: object) -> list:
    return disk.keep(replica.step(Receive(VALIDATORS[sender], message)))


def view_change_by_others(disk: Disk, replica: Replica, view: int) -> list:
    """f+1 others move to ``view``: the replica joins (PBFT's liveness rule)."""
    actions = []
    for i in (0, 3):
        if VALIDATORS[i] != replica.me:
            actions += step(disk, replica, i, ViewChange.create(KEYS[i], CHAIN, view, 0, (), ()))
    return actions


def test_a_restarted_backup_never_prepares_a_second_digest() -> None:
    """The restarted backup PREPAREd d at (0, 1) before the crash: a
    PRE-PREPARE for d' there is the primary equivocating, refused and
    suspected; the same d is prepared again."""
    disk = Disk()
    backup = disk.boot(1)
    assert sent(step(disk, backup, 0, pp(1, b"d")), Prepare)
    restarted = disk.boot(1)
    assert restarted.signed == {1: (0, sha(b"d"))}
    assert sent(step(disk, restarted, 0, pp(1, b"d")), Prepare)

    restarted = disk.boot(1)
    actions = step(disk, restarted, 0, pp(1, b"other"))
    assert not sent(actions, Prepare)
    assert restarted.refused["conflicts_with_signed"] == 1
    assert restarted.mode is Mode.VIEW_CHANGE  # it suspected the primary


def test_without_a_journal_the_restarted_backup_would_prepare_it() -> None:
    """The contrast: restarted from its blocks alone it has no record of d."""
    backup = Replica(KEYS[1], VALIDATORS, CHAIN, App(), CONFIG)
    backup.start()
    assert sent(backup.step(Receive(VALIDATORS[0], pp(1, b"d"))), Prepare)
    fresh = Replica(KEYS[1], VALIDATORS, CHAIN, App(), CONFIG)
    fresh.start()
    assert sent(fresh.step(Receive(VALIDATORS[0], pp(1, b"other"))), Prepare)


def test_a_restarted_backup_keeps_its_prepared_certificate_for_the_view_change() -> None:
    """Prepared before the crash: its VIEW-CHANGE after restart still
    carries the certificate (the PRE-PREPARE with payload, 2f PREPAREs)."""
    disk = Disk()
    backup = disk.boot(1)
    step(disk, backup, 0, pp(1, b"d"))
    prepare = Prepare.create(KEYS[2], CHAIN, 0, 1, sha(b"d"))
    assert sent(step(disk, backup, 2, prepare), Commit)
    restarted = disk.boot(1)
    assert restarted.prepared[1].pre_prepare == pp(1, b"d")
    (vc,) = sent(view_change_by_others(disk, restarted, 1), ViewChange)
    assert vc.replica == restarted.me
    assert [p.pre_prepare.seq for p in vc.prepared] == [1]
    assert vc.prepared[0].pre_prepare.payload == b"d"


def test_a_replica_restarted_in_a_view_change_resumes_it() -> None:
    """It sent VIEW-CHANGE for view 1: restarted, it is in view 1's view
    change (never back in view 0) and sends its VIEW-CHANGE again."""
    disk = Disk()
    backup = disk.boot(2)
    assert sent(view_change_by_others(disk, backup, 1), ViewChange)
    journal = load_journal(disk.meta.get, CHAIN, CONFIG.window)
    restarted = Replica(KEYS[2], VALIDATORS, CHAIN, App(), CONFIG, journal=journal)
    (again,) = sent(disk.keep(restarted.start()), ViewChange)
    assert (restarted.view, restarted.mode) == (1, Mode.VIEW_CHANGE)
    assert again.new_view == 1
    assert not sent(step(disk, restarted, 0, pp(1, b"late")), Prepare)
    assert restarted.refused["stale_view"] == 1


def test_a_restarted_primary_resumes_its_proposals_and_never_reuses_a_seq() -> None:
    """The primary signed PRE-PREPAREs for seqs 1 and 2; restarted with
    nothing executed, it proposes them again from its journal and its next
    proposal is seq 3, never a second one at 1."""
    disk = Disk()
    one_per_batch = PbftConfig(checkpoint_interval=4, batch_size=1)
    primary = disk.boot(0, App(pending=2), one_per_batch)
    first = sent(disk.keep(primary.step(RequestsPending(2))), PrePrepare)
    assert [p.seq for p in first] == [1, 2]
    restarted = disk.boot(0, App(pending=1), one_per_batch)
    # It holds its proposals for 1 and 2 again (validated anew by the
    # application), so the backups' PREPAREs complete them, no view change.
    assert [restarted.log[(0, seq)].pre_prepare for seq in (1, 2)] == first
    (proposal,) = sent(disk.keep(restarted.step(RequestsPending(1))), PrePrepare)
    assert proposal.seq == 3
    for i in (1, 2):
        prepare = Prepare.create(KEYS[i], CHAIN, 0, 1, first[0].digest)
        actions = step(disk, restarted, i, prepare)
    assert [c.seq for c in sent(actions, Commit)] == [1]


def test_the_stable_checkpoint_survives_and_old_slots_are_ignored() -> None:
    """A record below the stable checkpoint is stale (its slot is reused
    seqs later); the checkpoint proof comes back whole."""
    proof = tuple(Checkpoint.create(k, CHAIN, 4, bytes(32)) for k in KEYS[:3])
    meta = {
        STABLE_KEY: encode_stable(CHAIN, 4, proof),
        VIEW_KEY: encode_view(CHAIN, 2, False, CONFIG.window),
        seq_key(3, CONFIG.window): encode_seq_record(CHAIN, SeqRecord(3, 0, bytes(32))),
        seq_key(6, CONFIG.window): encode_seq_record(CHAIN, SeqRecord(6, 2, sha(b"x"))),
    }
    journal = load_journal(meta.get, CHAIN, CONFIG.window)
    assert (journal.view, journal.view_changing, journal.stable_seq) == (2, False, 4)
    assert journal.stable_proof == proof
    assert set(journal.records) == {6}
    replica = Replica(KEYS[1], VALIDATORS, CHAIN, App(), CONFIG, executed=5, journal=journal)
    assert (replica.low, replica.stable_seq, replica.view) == (4, 4, 2)
    assert load_journal(meta.get, "another-epoch", CONFIG.window) == Journal()


def test_records_round_trip_with_a_prepared_certificate() -> None:
    cert = PreparedProof(
        pp(7, b"payload"),
        tuple(Prepare.create(KEYS[i], CHAIN, 0, 7, sha(b"payload")) for i in (1, 2)),
    )
    record = SeqRecord(7, 0, sha(b"payload"), cert)
    meta = {seq_key(7, CONFIG.window): encode_seq_record(CHAIN, record)}
    assert load_journal(meta.get, CHAIN, CONFIG.window).records == {7: record}


@pytest.mark.parametrize("key", [VIEW_KEY, STABLE_KEY, NEW_VIEW_KEY, seq_key(1, CONFIG.window)])
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_in_a_journal_record_load_or_raise_store_corrupted(key: str, data: bytes) -> None:
    """A damaged record is named, never half-trusted or an untyped crash."""
    try:
        load_journal({key: data}.get, CHAIN, CONFIG.window)
    except StoreCorrupted as exc:
        assert repr(key) in str(exc)


@pytest.mark.parametrize(
    "key, value",
    [
        (VIEW_KEY, b"\x94\xacjournal-test\x01\x02\x08"),  # changing is not a bool
        (STABLE_KEY, b"\x93\xacjournal-test\x04\x01"),  # the proof is not an array
        (seq_key(1, CONFIG.window), b"\x95\xacjournal-test\x01\x00\xc4\x01x\xc0"),  # short digest
        (NEW_VIEW_KEY, b"\x92\xacjournal-test\x92\x05\x01"),  # not a NEW-VIEW
        # A view past the wire's 2**63 - 1 (the next VIEW-CHANGE could not be signed):
        (VIEW_KEY, msgpack.packb(["journal-test", 2**64 - 1, False, CONFIG.window])),
        (seq_key(1, CONFIG.window), encode_seq_record(CHAIN, SeqRecord(2**63 + 1, 0, bytes(32)))),
    ],
)
def test_malformed_records_are_store_corrupted(key: str, value: bytes) -> None:
    with pytest.raises(StoreCorrupted, match="journal record"):
        load_journal({key: value}.get, CHAIN, CONFIG.window)


def test_a_window_past_the_bound_is_refused_both_in_config_and_on_disk() -> None:
    """A restart reads every slot of the window on disk, so a damaged window
    of 2**32 would hang it: it is StoreCorrupted instead."""
    with pytest.raises(ValueError, match="checkpoint_interval"):
        PbftConfig(checkpoint_interval=MAX_WINDOW // 2 + 1)
    meta = {VIEW_KEY: encode_view(CHAIN, 1, False, 2**32)}
    with pytest.raises(StoreCorrupted, match="window"):
        load_journal(meta.get, CHAIN, CONFIG.window)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_mutated_journal_loads_and_restarts_or_is_store_corrupted(data) -> None:
    """A real journal (view, prepared slot, NEW-VIEW) with one record's
    structure changed (structure_mutations): StoreCorrupted, or a journal
    a replica restarts from and runs on without raising."""
    disk = Disk()
    _, _, actions = _new_primary_sends_new_view(disk)
    disk.keep(actions)
    key = data.draw(st.sampled_from(sorted(disk.meta)))
    disk.meta[key] = data.draw(mutated_msgpack(msgpack.unpackb(disk.meta[key])))
    try:
        journal = load_journal(disk.meta.get, CHAIN, CONFIG.window)
    except StoreCorrupted as exc:
        assert repr(key) in str(exc)
        return
    replica = Replica(KEYS[1], VALIDATORS, CHAIN, App(1), CONFIG, journal=journal)
    replica.start()
    replica.step(Receive(VALIDATORS[2], pp(2, b"x", view=journal.view)))
    replica.step(Receive(VALIDATORS[2], _prepared_vc(2, journal.view + 1, b"d")))


def _prepared_vc(sender: int, view: int, payload: bytes) -> ViewChange:
    """A VIEW-CHANGE to ``view`` carrying a certificate for seq 1 = payload."""
    proof = PreparedProof(
        pp(1, payload),
        tuple(Prepare.create(KEYS[i], CHAIN, 0, 1, sha(payload)) for i in (2, 3)),
    )
    return ViewChange.create(KEYS[sender], CHAIN, view, 0, (), (proof,))


def _new_primary_sends_new_view(disk: Disk) -> tuple[Replica, NewView, list]:
    """Replica 1, view 1's primary, receives two VIEW-CHANGEs carrying d at
    seq 1 and sends its NEW-VIEW; its actions are not yet on disk."""
    primary = disk.boot(1)
    actions = []
    for sender in (0, 2):
        actions += primary.step(Receive(VALIDATORS[sender], _prepared_vc(sender, 1, b"d")))
    (nv,) = sent(actions, NewView)
    assert [p.digest for p in nv.pre_prepares] == [sha(b"d")]
    return primary, nv, actions


def test_a_damaged_journaled_new_view_is_neither_sent_nor_installed() -> None:
    """Its own NEW-VIEW read back with no VIEW-CHANGEs (found by the
    mutation test above: installing it raised ValueError at restart)."""
    disk = Disk()
    _, nv, actions = _new_primary_sends_new_view(disk)
    disk.keep(actions)
    bare = NewView.create(KEYS[1], CHAIN, nv.view, (), nv.pre_prepares)
    disk.meta[NEW_VIEW_KEY] = encode_new_view(CHAIN, bare)
    journal = load_journal(disk.meta.get, CHAIN, CONFIG.window)
    restarted = Replica(KEYS[1], VALIDATORS, CHAIN, App(), CONFIG, journal=journal)
    assert not sent(restarted.start(), NewView)
    assert restarted.refused["bad_journal_new_view"] == 1 and restarted.view == 1


def test_a_new_primary_restarted_after_its_new_view_sends_it_again() -> None:
    """Killed right after its NEW-VIEW left (before installing it), view 1's
    primary restarts into view 1 with the same NEW-VIEW: sent again (so a
    backup that missed it installs it instead of timing out to view 2) and
    installed, its re-issued PRE-PREPARE back in the log. VIEW-CHANGEs with
    another plan get no second NEW-VIEW."""
    disk = Disk()
    _, nv, actions = _new_primary_sends_new_view(disk)
    upto = next(i for i, a in enumerate(actions) if isinstance(a, Send) and a.message is nv)
    disk.keep(actions[: upto + 1])
    assert load_journal(disk.meta.get, CHAIN, CONFIG.window).new_view == nv

    journal = load_journal(disk.meta.get, CHAIN, CONFIG.window)
    restarted = Replica(KEYS[1], VALIDATORS, CHAIN, App(), CONFIG, journal=journal)
    booted = disk.keep(restarted.start())
    assert sent(booted, NewView) == [nv]
    assert (restarted.view, restarted.mode) == (1, Mode.NORMAL)
    assert restarted.log[(1, 1)].pre_prepare == nv.pre_prepares[0]
    assert restarted.next_seq == 2

    backup = Disk().boot(2)  # missed the first send, in view 1's view change
    view_change_by_others(Disk(), backup, 1)
    assert (backup.view, backup.mode) == (1, Mode.VIEW_CHANGE)
    prepares = sent(backup.step(Receive(VALIDATORS[1], nv)), Prepare)
    assert (backup.view, backup.mode) == (1, Mode.NORMAL)
    assert [(p.view, p.seq, p.digest) for p in prepares] == [(1, 1, sha(b"d"))]

    later = []
    for sender in (2, 3):
        later += step(disk, restarted, sender, _prepared_vc(sender, 1, b"e"))
    assert not sent(later, NewView)


def test_a_new_primary_restarted_before_its_new_view_was_journaled_sends_no_other_plan() -> None:
    """Killed after journaling the digests its NEW-VIEW re-issues but before
    the NEW-VIEW itself: restarted in view 1's view change and shown
    VIEW-CHANGEs whose plan puts d' at seq 1, it sends no NEW-VIEW (the view
    timer moves on to view 2 instead), because it signed d there."""
    disk = Disk()
    _, _, actions = _new_primary_sends_new_view(disk)
    upto = next(
        i for i, a in enumerate(actions) if isinstance(a, Persist) and a.key == NEW_VIEW_KEY
    )
    disk.keep(actions[:upto])
    assert load_journal(disk.meta.get, CHAIN, CONFIG.window).new_view is None

    restarted = disk.boot(1)
    assert (restarted.view, restarted.mode) == (1, Mode.VIEW_CHANGE)
    actions = []
    for sender in (2, 3):
        actions += step(disk, restarted, sender, _prepared_vc(sender, 1, b"e"))
    assert not sent(actions, NewView)
    assert restarted.refused["conflicts_with_signed"] >= 1


_fields = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=7),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from([VIEW_KEY, STABLE_KEY, NEW_VIEW_KEY, seq_key(1, CONFIG.window)]),
    rest=st.lists(_fields, min_size=2, max_size=4),
)
def test_any_record_of_the_right_chain_loads_or_raises_store_corrupted(
    key: str, rest: list
) -> None:
    """Structured junk (the chain id right, every other field arbitrary)
    reaches every field check: still StoreCorrupted or a journal."""
    value = msgpack.packb([CHAIN, *rest], use_bin_type=True)
    try:
        load_journal({key: value}.get, CHAIN, CONFIG.window)
    except StoreCorrupted as exc:
        assert repr(key) in str(exc)


def test_a_restart_with_a_smaller_window_still_reads_every_slot() -> None:
    """Records of a run with window 8 sit in slots up to 7; restarted with
    checkpoint interval 2 (window 4) the replica still finds them, since the
    view record written at start names the window they were written with."""
    disk = Disk()
    backup = disk.boot(1)
    for seq in range(1, 8):
        step(disk, backup, 0, pp(seq, b"d%d" % seq))
    small = PbftConfig(checkpoint_interval=2)
    journal = load_journal(disk.meta.get, CHAIN, small.window)
    assert sorted(journal.records) == list(range(1, 8))
    restarted = Replica(KEYS[1], VALIDATORS, CHAIN, App(), small, journal=journal)
    for seq in (1, 2, 3):  # the same proposals again: prepared again
        assert sent(restarted.step(Receive(VALIDATORS[0], pp(seq, b"d%d" % seq))), Prepare)
    # seq 4 is inside the new window (0, 4] and its record is in slot 4.
    assert not sent(restarted.step(Receive(VALIDATORS[0], pp(4, b"other"))), Prepare)
    assert restarted.refused["conflicts_with_signed"] == 1
