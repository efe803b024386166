"""P-PARENT-FIRST: PBFT asks the application to validate the proposal for
``s`` only once ``s - 1`` is executed or pre-prepared in the current view.

An application that validates on top of a speculative parent (the ledger's
``LedgerReplica`` does: it refuses ``s`` when it did not validate ``s - 1``)
would otherwise refuse a PRE-PREPARE that overtook its predecessor, and PBFT
would read that as an invalid proposal and suspect an honest primary. These
tests drive single replicas message by message and whole clusters
(``pbft_harness``) with such an application (``ParentApp``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from pbft_harness import CHAIN_ID, Cluster, LogApp, Network

from fedchain.consensus.pbft import (
    Committed,
    Mode,
    PbftConfig,
    Phase,
    Receive,
    Replica,
    SetTimer,
    Suspect,
    TimerFired,
)
from fedchain.consensus.pbft_messages import Commit, NewView, Prepare, PrePrepare, ViewChange
from fedchain.p2p.identity import Identity

RNG = np.random.default_rng(7)
KEYS = [Identity.from_rng(RNG) for _ in range(4)]
VALIDATORS = [k.public_key for k in KEYS]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class ParentApp(LogApp):
    """``LogApp`` that, like ``LedgerReplica``, needs a parent: it validates
    (or proposes) ``s`` only when ``s`` is the next height after its
    committed log or it validated ``s - 1`` since the last new view, and
    validating ``s`` voids what it validated above ``s``."""

    def __init__(self, batch_size: int, log: list[Committed] | None = None) -> None:
        super().__init__(batch_size, log)
        self.spec: set[int] = set()
        self.calls: list[int] = []
        self.no_parent = 0

    def _has_parent(self, seq: int) -> bool:
        return seq == len(self.log) + 1 or seq - 1 in self.spec

    def _speculate(self, seq: int) -> None:
        self.spec = {s for s in self.spec if s < seq} | {seq}

    def propose(self, seq: int) -> tuple[bytes, bytes] | None:
        if not self._has_parent(seq):
            return None
        proposal = super().propose(seq)
        if proposal is not None:
            self._speculate(seq)
        return proposal

    def validate(self, seq: int, payload: bytes) -> bytes | None:
        self.calls.append(seq)
        if not self._has_parent(seq):
            self.no_parent += 1
            return None
        digest = super().validate(seq, payload)
        if digest is not None:
            self._speculate(seq)
        return digest

    def abandon(self) -> None:
        super().abandon()
        self.spec.clear()

    def commit(self, done: Committed) -> None:
        super().commit(done)
        self.spec.discard(done.seq)


class ParentCluster(Cluster):
    """The harness cluster with ``ParentApp`` on every replica."""

    def _make_app(self, log: list[Committed]) -> ParentApp:
        return ParentApp(self.config.batch_size, log)


def backup(i: int = 1, config: PbftConfig | None = None) -> tuple[Replica, ParentApp]:
    app = ParentApp(16)
    r = Replica(KEYS[i], VALIDATORS, CHAIN_ID, app, config or PbftConfig())
    r.start()
    return r, app


def pre_prepare(seq: int, payload: bytes, view: int = 0) -> PrePrepare:
    return PrePrepare.create(KEYS[view % 4], CHAIN_ID, view, seq, sha(payload), payload)


def batch(*ids: int) -> bytes:
    return b"".join(i.to_bytes(8, "big") for i in ids)


def prepares(actions: list) -> list[tuple[int, int]]:
    return [
        (a.message.view, a.message.seq)
        for a in actions
        if hasattr(a, "message") and isinstance(a.message, Prepare)
    ]


def suspects(actions: list) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Suspect)]


# -- one replica, message by message -----------------------------------------


def test_overtaken_pre_prepare_is_parked_then_validated_in_order() -> None:
    """P-PARENT-FIRST: PRE-PREPARE 2 before 1 is held (no validate, no
    PREPARE, no suspicion, the view timer runs); when 1 arrives both are
    validated and PREPAREd in seq order and the primary is not suspected."""
    r, app = backup()
    first = r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(3, 4))))
    assert app.calls == [] and not prepares(first) and not suspects(first)
    assert set(r.parked) == {2} and r.parked_total == 1
    assert any(isinstance(a, SetTimer) and a.name == "view" for a in first)
    second = r.step(Receive(VALIDATORS[0], pre_prepare(1, batch(1, 2))))
    assert app.calls == [1, 2] and app.no_parent == 0
    assert prepares(second) == [(0, 1), (0, 2)]
    assert not suspects(second) and r.mode is Mode.NORMAL and r.view == 0
    assert r.parked == {}
    assert r.log[(0, 2)].phase is Phase.PRE_PREPARED


def test_a_chain_of_overtaken_pre_prepares_unparks_in_order() -> None:
    """P-PARENT-FIRST: 4, 3, 2 parked behind a missing 1 are released in
    order by 1; a retransmitted duplicate of a parked one is only counted."""
    r, app = backup()
    for seq in (4, 3, 2):
        r.step(Receive(VALIDATORS[0], pre_prepare(seq, batch(seq))))
    r.step(Receive(VALIDATORS[0], pre_prepare(3, batch(3))))
    assert r.refused["duplicate"] == 1 and set(r.parked) == {2, 3, 4}
    actions = r.step(Receive(VALIDATORS[0], pre_prepare(1, batch(1))))
    assert app.calls == [1, 2, 3, 4]
    assert prepares(actions) == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert not suspects(actions) and r.parked == {}


def test_executed_predecessor_unparks_on_the_next_step() -> None:
    """P-PARENT-FIRST: a predecessor committed without this replica seeing
    its PRE-PREPARE (2f+1 COMMITs for a payload it lacks, then fetched)
    releases the parked PRE-PREPARE on the next step, once the application
    applied the commit."""
    from fedchain.consensus.pbft import BlocksFetched
    from fedchain.consensus.votes import CommitCertificate, sign_commit_vote

    r, app = backup(3)
    r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(2))))
    assert set(r.parked) == {2}
    d1 = sha(batch(1))
    votes = [(VALIDATORS[i], sign_commit_vote(KEYS[i], CHAIN_ID, 1, d1, view=0)) for i in range(3)]
    cert = CommitCertificate.of(1, d1, votes, view=0)
    actions = r.step(BlocksFetched(((1, d1, batch(1), cert),)))
    done = [a for a in actions if isinstance(a, Committed)]
    assert [c.seq for c in done] == [1] and r.executed == 1
    for c in done:
        app.commit(c)
    actions = r.step(TimerFired("none", 0))
    assert prepares(actions) == [(0, 2)] and not suspects(actions)
    assert r.parked == {}


def test_wrong_digest_behind_a_parked_seq_still_suspects_the_primary() -> None:
    """P-VALID-PROPOSAL with parking: a parked PRE-PREPARE whose digest is
    not its payload's is refused and its primary suspected as soon as it is
    tried (the application named another digest: no parent can fix that)."""
    r, _ = backup()
    bad = PrePrepare.create(KEYS[0], CHAIN_ID, 0, 2, sha(b"other"), batch(2))
    r.step(Receive(VALIDATORS[0], bad))
    assert set(r.parked) == {2}
    actions = r.step(Receive(VALIDATORS[0], pre_prepare(1, batch(1))))
    assert prepares(actions) == [(0, 1)]
    assert r.refused["wrong_digest"] == 1 and "invalid_proposal" in suspects(actions)
    assert r.mode is Mode.VIEW_CHANGE and r.parked == {}


def test_refused_proposal_is_asked_again_once_the_predecessor_executed() -> None:
    """P-PARENT-FIRST, P-VALID-PROPOSAL: the application refusing (None) a
    proposal whose predecessor is only pre-prepared may only lack the
    parent, so it is asked once more after the predecessor is executed;
    refused then, the primary is suspected."""
    r, app = backup()
    unusable = b"abc"  # ParentApp refuses a payload that is not whole ids
    r.step(
        Receive(VALIDATORS[0], PrePrepare.create(KEYS[0], CHAIN_ID, 0, 2, sha(unusable), unusable))
    )
    actions = r.step(Receive(VALIDATORS[0], pre_prepare(1, batch(1))))
    assert prepares(actions) == [(0, 1)] and not suspects(actions)
    assert app.calls == [1, 2] and r.parked[2].until_executed
    d1 = sha(batch(1))
    r.step(Receive(VALIDATORS[2], Prepare.create(KEYS[2], CHAIN_ID, 0, 1, d1)))
    done = []
    for i in (0, 2):
        actions = r.step(Receive(VALIDATORS[i], Commit.create(KEYS[i], CHAIN_ID, 0, 1, d1)))
        done += [a for a in actions if isinstance(a, Committed)]
        assert not suspects(actions)
    assert [c.seq for c in done] == [1]
    app.commit(done[0])
    actions = r.step(TimerFired("none", 0))
    assert app.calls == [1, 2, 2]
    assert r.refused["wrong_digest"] == 1 and "invalid_proposal" in suspects(actions)
    assert r.mode is Mode.VIEW_CHANGE and r.parked == {}


def test_equivocation_on_a_parked_seq_is_detected() -> None:
    """P-EQUIVOCATION with parking: a second PRE-PREPARE for a parked
    (view, seq) with another digest suspects the primary; one with a bad
    signature is refused first and cannot take the parked place."""
    r, app = backup()
    forged = PrePrepare(0, 2, sha(batch(9)), batch(9), VALIDATORS[0], bytes(64))
    r.step(Receive(VALIDATORS[0], forged))
    assert r.refused["bad_signature"] == 1 and r.parked == {}
    r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(2))))
    assert set(r.parked) == {2}
    actions = r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(7))))
    assert "equivocation" in suspects(actions)
    assert r.mode is Mode.VIEW_CHANGE and r.view == 1
    assert app.calls == [] and not prepares(actions)


def test_equivocation_after_unparking_is_detected() -> None:
    """P-EQUIVOCATION: once the parked PRE-PREPARE was accepted, another
    digest for that seq still suspects the primary (the usual check)."""
    r, _ = backup()
    r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(2))))
    r.step(Receive(VALIDATORS[0], pre_prepare(1, batch(1))))
    assert r.log[(0, 2)].phase is Phase.PRE_PREPARED
    actions = r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(5))))
    assert "equivocation" in suspects(actions) and r.mode is Mode.VIEW_CHANGE


def test_parked_pre_prepares_are_dropped_on_view_change() -> None:
    """P-PARENT-FIRST: parked PRE-PREPAREs belong to their view. A view
    change empties them; the old view's predecessor arriving late neither
    prepares nor commits the parked one; the new view starts from a clean
    slate and commits seq 1 exactly once."""
    r, app = backup(3)
    r.step(Receive(VALIDATORS[0], pre_prepare(2, batch(2))))
    assert set(r.parked) == {2}
    new_primary, _ = backup(1)
    vcs = [ViewChange.create(KEYS[i], CHAIN_ID, 1, 0, (), ()) for i in (2, 0)]
    for vc in vcs:
        r.step(Receive(vc.replica, vc))
    assert r.mode is Mode.VIEW_CHANGE and r.view == 1 and r.parked == {}
    late = r.step(Receive(VALIDATORS[0], pre_prepare(1, batch(1))))
    assert r.refused["stale_view"] >= 1 and not prepares(late) and app.calls == []
    nv_actions = []
    for vc in (*vcs, r.view_changes[r.me]):
        nv_actions += new_primary.step(Receive(vc.replica, vc))
    (nv,) = [a.message for a in nv_actions if isinstance(getattr(a, "message", None), NewView)]
    assert nv.pre_prepares == ()
    r.step(Receive(VALIDATORS[1], nv))
    assert r.mode is Mode.NORMAL and r.view == 1 and r.parked == {}
    payload = batch(1, 2)
    d = sha(payload)
    pp = PrePrepare.create(KEYS[1], CHAIN_ID, 1, 1, d, payload)
    actions = r.step(Receive(VALIDATORS[1], pp))
    assert prepares(actions) == [(1, 1)]
    r.step(Receive(VALIDATORS[2], Prepare.create(KEYS[2], CHAIN_ID, 1, 1, d)))
    done = []
    for i in (1, 2, 0):
        done += [
            a
            for a in r.step(Receive(VALIDATORS[i], Commit.create(KEYS[i], CHAIN_ID, 1, 1, d)))
            if isinstance(a, Committed)
        ]
    assert [(c.seq, c.payload) for c in done] == [(1, payload)]
    assert r.executed == 1 and r.parked == {}


# -- whole clusters -------------------------------------------------------------


def _run(cluster: Cluster, *, settle: float = 4.0, limit: float = 40.0) -> None:
    assert cluster.run_until(lambda c: c.now >= settle and c.all_committed(), limit), (
        cluster.now,
        cluster.views(),
        [len(cluster.log_of(i)) for i in range(len(cluster.nodes))],
    )
    cluster.check_all()


def _suspicions(cluster: Cluster, reason: str) -> int:
    return sum(cluster.nodes[i].suspects[reason] for i in cluster.honest)


def _parked(cluster: Cluster) -> int:
    return sum(cluster.nodes[i].replica.parked_total for i in cluster.honest)


@pytest.mark.parametrize("seed", [0, 3, 9])
def test_ten_percent_loss_with_a_parent_needing_app_keeps_view_0(seed: int) -> None:
    """P-PARENT-FIRST, P-LIVENESS: with 10% message loss and an application
    that needs the parent, everything commits with at most one view change
    (a timeout) and no honest primary is suspected of an invalid proposal.
    Before parking the same runs never finished: every lost PRE-PREPARE
    made a backup refuse the next one and suspect the primary, past view
    1000 in 60 s of virtual time."""
    cluster = ParentCluster(4, seed=seed, network=Network(loss=0.10))
    cluster.submit_stream(600, rate=300)
    _run(cluster)
    assert cluster.dropped["loss"] > 100
    assert _parked(cluster) > 0, "no PRE-PREPARE overtook its predecessor"
    assert _suspicions(cluster, "invalid_proposal") == 0
    assert max(cluster.views()) <= 1


def test_primary_crash_under_loss_commits_each_seq_once() -> None:
    """P-PARENT-FIRST across a view change: 10% loss, a parent-needing app
    and a primary crash (so PRE-PREPAREs are parked when the view changes
    and dropped with it). Every seq is delivered once, in order
    (P-ORDER), the same everywhere (P-AGREEMENT), and all requests commit."""
    cluster = ParentCluster(4, seed=5, network=Network(loss=0.10))
    cluster.submit_stream(600, rate=300)
    cluster.at(1.0, lambda c: c.crash(0))
    _run(cluster, settle=5.0, limit=60.0)
    assert min(cluster.views()) >= 1
    assert _suspicions(cluster, "invalid_proposal") == 0
    for i in cluster.live_honest:
        ids = [r for done in cluster.log_of(i) for r in np.frombuffer(done.payload, ">u8")]
        assert len(ids) == len(set(ids)), "a request committed twice"


def test_equivocating_primary_with_a_parent_needing_app() -> None:
    """P-EQUIVOCATION still holds with parking: the equivocating primary is
    suspected and replaced; P-AGREEMENT, P-DURABILITY, P-LIVENESS."""
    cluster = ParentCluster(4, seed=13, byzantine={0: "equivocate"})
    cluster.submit_stream(400, rate=300)
    _run(cluster)
    assert min(cluster.views()) >= 1
    assert _suspicions(cluster, "equivocation") >= 1
