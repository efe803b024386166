"""The mempool: bounds with an explicit busy error, dedup, one signature
check per transaction, round-robin reaping, forgetting on commit."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus.contracts import kv_set
from fedchain.consensus.errors import (
    DuplicateTransaction,
    InvalidSignature,
    MalformedMessage,
    MempoolFull,
)
from fedchain.consensus.mempool import Mempool
from fedchain.consensus.tx import (
    SignatureCache,
    Transaction,
    decode_transaction,
    sign_transaction,
)
from fedchain.p2p.identity import Identity

CHAIN = "mempool-test"
USERS = {name: Identity(name.encode() * 32) for name in "abc"}


def tx(who: str, nonce: int, size: int = 1) -> Transaction:
    content = kv_set("k", "x" * size)
    return sign_transaction(USERS[who], CHAIN, type="kv", content=content, nonce=nonce, timestamp=0)


def test_add_from_bytes_and_objects() -> None:
    pool = Mempool(CHAIN)
    first = pool.add(tx("a", 0).encoded)
    pool.add(tx("a", 1))
    assert len(pool) == 2 and first.digest in pool and pool.get(first.digest) == first
    assert pool.size_bytes == sum(len(t.encoded) for t in (tx("a", 0), tx("a", 1)))


def test_duplicates_are_refused() -> None:
    pool = Mempool(CHAIN)
    pool.add(tx("a", 0))
    with pytest.raises(DuplicateTransaction):
        pool.add(tx("a", 0).encoded)
    with pytest.raises(DuplicateTransaction):
        pool.add(tx("a", 0, size=5))  # same sender and nonce, other content
    assert len(pool) == 1


def test_bad_signature_and_bad_bytes_are_refused_and_not_kept() -> None:
    pool = Mempool(CHAIN)
    forged = decode_transaction(tx("a", 0).encoded[:-64] + bytes(64))
    with pytest.raises(InvalidSignature):
        pool.add(forged)
    other_chain = sign_transaction(
        USERS["a"], "other", type="kv", content=b"", nonce=0, timestamp=0
    )
    with pytest.raises(InvalidSignature):
        pool.add(other_chain)
    with pytest.raises(MalformedMessage):
        pool.add(b"\x00garbage")
    assert len(pool) == 0 and pool.size_bytes == 0
    pool.add(tx("a", 0))  # the honest one is still welcome


def test_bounds_give_an_explicit_busy_error() -> None:
    pool = Mempool(CHAIN, max_txs=3, max_per_sender=2)
    pool.add(tx("a", 0))
    pool.add(tx("a", 1))
    with pytest.raises(MempoolFull, match="this sender"):
        pool.add(tx("a", 2))
    pool.add(tx("b", 0))
    with pytest.raises(MempoolFull, match="full"):
        pool.add(tx("c", 0))
    assert len(pool) == 3

    one = len(tx("a", 0).encoded)
    by_bytes = Mempool(CHAIN, max_bytes=2 * one)
    by_bytes.add(tx("a", 0))
    by_bytes.add(tx("b", 0))
    with pytest.raises(MempoolFull):
        by_bytes.add(tx("c", 0))
    with pytest.raises(MempoolFull):
        Mempool(CHAIN, max_tx_bytes=10).add(tx("a", 0))


def test_oldest_pending_follows_admission_order_and_pending_rules() -> None:
    """The request a backup's PBFT request timer follows: the first admitted
    of those that count as pending, so not one in a live proposal nor one
    behind a nonce gap (no primary may propose it)."""
    committed = {USERS[w].public_key: 0 for w in "abc"}
    pool = Mempool(CHAIN)
    pool.track_nonces(lambda sender: committed[sender])
    assert pool.oldest_pending() is None
    gapped = pool.add(tx("a", 1))  # waits for a's nonce 0
    first = pool.add(tx("b", 0))
    second = pool.add(tx("c", 0))
    assert not pool.is_pending(gapped.digest) and pool.oldest_pending() == first.digest
    pool.mark_in_flight([first.digest])  # a proposal carries it
    assert not pool.is_pending(first.digest) and pool.oldest_pending() == second.digest
    pool.release([first.digest])  # that proposal was void
    assert pool.oldest_pending() == first.digest
    pool.remove_committed([first.digest, second.digest])
    assert pool.oldest_pending() is None and not pool.is_pending(b"\x00" * 32)
    filler = pool.add(tx("a", 0))  # fills the gap: both of a's are pending now
    assert pool.is_pending(gapped.digest) and pool.is_pending(filler.digest)
    assert pool.oldest_pending() == gapped.digest  # admitted first
    assert Mempool(CHAIN).oldest_pending() is None
    untracked = Mempool(CHAIN)  # without nonce tracking every held one counts
    held = untracked.add(tx("a", 5))
    assert untracked.oldest_pending() == held.digest


def test_reap_is_round_robin_by_sender_in_nonce_order() -> None:
    pool = Mempool(CHAIN)
    for nonce in (2, 0, 1, 3):  # arrival order is not nonce order
        pool.add(tx("a", nonce))
    pool.add(tx("b", 0))
    pool.add(tx("c", 1))
    pool.add(tx("c", 0))
    order = [(t.sender, t.nonce) for t in pool.reap(100, 10**9)]
    a, b, c = (USERS[n].public_key for n in "abc")
    assert order == [(a, 0), (b, 0), (c, 0), (a, 1), (c, 1), (a, 2), (a, 3)]
    assert len(pool) == 7  # reaping removes nothing
    assert [t.nonce for t in pool.reap(4, 10**9)] == [0, 0, 0, 1]


def test_reap_respects_bytes_without_leaving_nonce_gaps() -> None:
    pool = Mempool(CHAIN)
    pool.add(tx("a", 0))
    pool.add(tx("a", 1, size=500))
    pool.add(tx("a", 2))
    pool.add(tx("b", 0))
    pool.add(tx("b", 1))
    small = len(tx("a", 0).encoded)
    chosen = pool.reap(100, 4 * small)
    a, b = USERS["a"].public_key, USERS["b"].public_key
    assert [(t.sender, t.nonce) for t in chosen] == [(a, 0), (b, 0), (b, 1)]
    assert pool.reap(0, 10**9) == []


UNIVERSE = {
    (who, nonce, size): tx(who, nonce, size)
    for who in "abc"
    for nonce in range(5)
    for size in (1, 300)
}


def _reference_reap(pool, order, held, exclude, next_nonce, max_txs, max_bytes):
    """The round robin written plainly: every sender's run (from its next
    nonce, no gaps, in-flight ones skipped) built first, then one from each
    per pass; a run whose next does not fit in the bytes left ends."""
    runs = deque()
    for who in order:
        sender = USERS[who].public_key
        expected, run = next_nonce(sender), []
        for t in sorted((t for t in held if t.sender == sender), key=lambda t: t.nonce):
            if t.nonce < expected:
                continue
            if t.nonce > expected:
                break
            expected += 1
            if t.digest not in exclude:
                run.append(t)
        runs.append(iter(run))
    chosen, total = [], 0
    while runs and len(chosen) < max_txs:
        run = runs.popleft()
        t = next(run, None)
        if t is None or total + len(t.encoded) > max_bytes:
            continue
        chosen.append(t)
        total += len(t.encoded)
        runs.append(run)
    return chosen


pairs = st.tuples(st.sampled_from("abc"), st.integers(0, 4))


@settings(max_examples=300, deadline=None)
@given(
    counts=st.tuples(*[st.integers(0, 5)] * 3),
    dropped=st.sets(pairs, max_size=2),
    large=st.sets(pairs, max_size=4),
    arrival=st.permutations(range(15)),
    in_flight=st.sets(st.integers(0, 14), max_size=4),
    committed=st.dictionaries(st.sampled_from("abc"), st.integers(0, 3)),
    max_txs=st.integers(0, 16),
    max_bytes=st.integers(0, 4_000),
)
def test_reap_matches_a_plain_round_robin(
    counts, dropped, large, arrival, in_flight, committed, max_txs, max_bytes
) -> None:
    """Whatever is held (runs of nonces with gaps, small and large, in any
    arrival order), in flight or committed, and whatever the bounds, the
    reap (lazy first pass, in-flight senders skipped) picks exactly what
    the plain round robin picks, in the same order."""
    keys = [
        (who, n, 300 if (who, n) in large else 1)
        for who, count in zip("abc", counts, strict=True)
        for n in range(count)
        if (who, n) not in dropped
    ]
    picks = [keys[i] for i in arrival if i < len(keys)]
    pool = Mempool(CHAIN)
    held = [pool.add(UNIVERSE[key]) for key in picks]
    order = list(dict.fromkeys(key[0] for key in picks))  # senders by first arrival
    exclude = {held[i].digest for i in in_flight if i < len(held)}

    def next_nonce(sender: bytes) -> int:
        return next((n for who, n in committed.items() if USERS[who].public_key == sender), 0)

    got = pool.reap(max_txs, max_bytes, exclude=exclude, next_nonce=next_nonce)
    want = _reference_reap(pool, order, held, exclude, next_nonce, max_txs, max_bytes)
    assert [t.digest for t in got] == [t.digest for t in want]


def test_remove_committed_forgets_and_refuses_replays() -> None:
    pool = Mempool(CHAIN, remember_committed=2)
    txs = [tx("a", 0), tx("a", 1), tx("b", 0)]
    for t in txs:
        pool.add(t)
    pool.remove_committed([txs[0].digest, txs[2].digest, b"\x00" * 32])
    assert [t.digest for t in pool.reap(10, 10**9)] == [txs[1].digest]
    assert pool.size_bytes == len(txs[1].encoded)
    with pytest.raises(DuplicateTransaction):
        pool.add(txs[2])
    pool.add(tx("b", 1))  # the sender's next one is fine
    pool.remove_committed([tx("c", 9).digest])  # the memory is bounded: oldest forgotten
    pool.add(txs[0])


def test_verified_names_the_exact_transaction() -> None:
    pool = Mempool(CHAIN)
    good = pool.add(tx("a", 0))
    forged = decode_transaction(good.encoded[:-64] + bytes(64))
    assert forged.digest == good.digest
    assert pool.verified(good) and not pool.verified(forged)
    assert not pool.verified(tx("a", 1))


def test_reap_skips_transactions_in_flight() -> None:
    pool = Mempool(CHAIN)
    txs = [pool.add(tx("a", n)) for n in range(3)] + [pool.add(tx("b", 0))]
    in_flight = {txs[0].digest, txs[3].digest}
    assert [t.nonce for t in pool.reap(10, 10**9, exclude=in_flight)] == [1, 2]


def test_reap_with_committed_nonces_proposes_no_gap_and_no_stale() -> None:
    pool = Mempool(CHAIN)
    for who, nonce in [("a", 3), ("a", 4), ("a", 6), ("b", 1), ("c", 0), ("a", 2)]:
        pool.add(tx(who, nonce))
    committed = {USERS["a"].public_key: 3, USERS["b"].public_key: 0}

    def next_nonce(sender: bytes) -> int:
        return committed.get(sender, 0)

    chosen = pool.reap(10, 10**9, next_nonce=next_nonce)
    a, c = USERS["a"].public_key, USERS["c"].public_key
    # a: 2 is stale, 3 and 4 run, 6 waits for 5; b: 1 waits for 0; c: 0 runs
    assert [(t.sender, t.nonce) for t in chosen] == [(a, 3), (c, 0), (a, 4)]
    assert pool.drop_stale(next_nonce) == 1 and len(pool) == 5
    pool.add(tx("a", 5))
    chosen = pool.reap(10, 10**9, next_nonce=next_nonce)
    assert [t.nonce for t in chosen if t.sender == a] == [3, 4, 5, 6]


def test_a_nonce_the_state_has_used_is_refused_before_its_signature() -> None:
    """With committed nonces tracked, a transaction below its sender's next
    nonce can never commit: it is refused (not held for good, as a
    restarted validator that lost its memory of committed digests once
    held one sent to it again), and its signature is never checked."""
    cache = SignatureCache(CHAIN)
    pool = Mempool(CHAIN, signatures=cache)
    committed = {USERS["a"].public_key: 2}
    pool.track_nonces(lambda sender: committed.get(sender, 0))
    for nonce in (0, 1):
        with pytest.raises(DuplicateTransaction, match="already committed") as refused:
            pool.add(tx("a", nonce).encoded)
        assert refused.value.digest is None
    assert len(pool) == 0 and cache.misses == 0
    held = pool.add(tx("a", 3))  # behind a gap: held, not pending
    assert held.digest in pool and pool.pending == 0
    pool.add(tx("a", 2))
    assert pool.pending == 2
    committed[USERS["a"].public_key] = 4  # both commit elsewhere (say, fetched)
    pool.advance([USERS["a"].public_key])
    assert len(pool) == 0
    with pytest.raises(DuplicateTransaction):
        pool.add(tx("a", 3))


def test_mempools_sharing_a_signature_cache_verify_once() -> None:
    cache = SignatureCache(CHAIN)
    pools = [Mempool(CHAIN, signatures=cache) for _ in range(4)]
    t = tx("a", 0)
    for pool in pools:
        pool.add(t.encoded)
    assert (cache.misses, cache.hits) == (1, 3)
    with pytest.raises(ValueError):
        Mempool("other", signatures=cache)


def test_pending_counts_only_transactions_that_can_commit_next() -> None:
    """A nonce gap holds later transactions without making them pending (a
    backup's view timer runs while anything is pending)."""
    committed = {USERS["a"].public_key: 0, USERS["b"].public_key: 5}
    pool = Mempool(CHAIN)
    pool.track_nonces(lambda sender: committed.get(sender, 0))
    pool.add(tx("a", 1))
    pool.add(tx("a", 2))
    assert len(pool) == 2 and pool.pending == 0  # nonce 0 is missing
    pool.add(tx("a", 0))
    assert pool.pending == 3
    pool.add(tx("b", 5))
    pool.add(tx("b", 7))
    assert pool.pending == 4
    pool.mark_in_flight([tx("a", 0).digest])
    assert pool.pending == 3
    # a0 and b5 commit; b6 was taken by another transaction elsewhere.
    committed[USERS["a"].public_key] = 1
    committed[USERS["b"].public_key] = 7
    pool.remove_committed([tx("a", 0).digest, tx("b", 5).digest])
    pool.release([tx("a", 0).digest])
    pool.advance([USERS["a"].public_key, USERS["b"].public_key])
    assert pool.pending == 3  # a1, a2, b7
    committed[USERS["b"].public_key] = 9  # b7 and b8 went elsewhere
    pool.advance([USERS["b"].public_key])
    assert tx("b", 7).digest not in pool, "a nonce another transaction took is dropped"
    assert pool.pending == 2


def test_the_client_limit_counts_and_refuses_clients_only() -> None:
    pool = Mempool(CHAIN, max_txs=10)
    pool.client_limit = 2
    pool.add(tx("a", 0))
    pool.add(tx("a", 1))
    with pytest.raises(MempoolFull):
        pool.add(tx("a", 2))
    pool.add(tx("b", 0), forwarded=True)  # another validator admitted it
    pool.add(tx("b", 1), forwarded=True)
    pool.client_limit = 3  # forwards take none of the clients' room
    pool.add(tx("a", 2))
    assert len(pool) == 5
    pool.remove_committed([tx("a", 0).digest, tx("a", 1).digest])
    pool.add(tx("c", 0))  # what committed frees its room
    pool.add(tx("c", 1))
    with pytest.raises(MempoolFull):
        pool.add(tx("c", 2))


def test_a_full_pool_refuses_clients_before_decoding_them() -> None:
    """Full for clients, every client's submission is refused (a gap filler
    too), so it is refused before its bytes are decoded: past saturation
    that is most submissions. Forwards keep their headroom."""
    pool = Mempool(CHAIN, max_txs=2)
    assert pool.client_refusal() is None
    pool.add(tx("a", 0), forwarded=True)
    pool.add(tx("b", 0), forwarded=True)
    refusal = pool.client_refusal()
    assert isinstance(refusal, MempoolFull) and str(refusal) == "mempool is full"
    with pytest.raises(MempoolFull):
        pool.add(b"\xc1 not a transaction")  # refused, never decoded (no MalformedMessage)
    pool.add(tx("c", 0), forwarded=True)
    pool.remove_committed([tx("a", 0).digest, tx("b", 0).digest])
    assert pool.client_refusal() is None
    pool.add(tx("a", 1))


def test_the_clients_room_counts_submissions_waiting_to_be_handled() -> None:
    """``waiting``: clients' transactions a node holds queued, not yet
    admitted. They count against the clients' room as if admitted (the
    door's check, ``LedgerService``), at the static bound too (where the
    commit-paced limit reached it), but not against the pool's own bound,
    which forwards share: at a busy primary they would crowd its clients out."""
    pool = Mempool(CHAIN, max_txs=4)
    pool.client_limit = 4  # pacing reached the static bound
    pool.add(tx("a", 0))
    assert pool.client_refusal() is None and pool.client_refusal(waiting=2) is None
    refusal = pool.client_refusal(waiting=3)
    assert isinstance(refusal, MempoolFull) and str(refusal) != "mempool is full"
    pool.add(tx("b", 0), forwarded=True)
    pool.add(tx("c", 0), forwarded=True)
    assert pool.client_refusal(waiting=2) is None  # 1 + 2 of the clients' 4
    pool.client_limit = 2
    paced = pool.client_refusal(waiting=1)
    assert isinstance(paced, MempoolFull) and str(paced) != "mempool is full"
    assert pool.client_refusal() is None  # nothing waiting: one more fits


def test_a_transaction_filling_a_nonce_gap_is_never_paced() -> None:
    """Held transactions behind a gap take the clients' room; refusing the
    one that fills the gap would strand them all."""
    pool = Mempool(CHAIN, max_txs=10)
    pool.track_nonces(lambda sender: 0)
    pool.client_limit = 2
    pool.add(tx("a", 1))
    pool.add(tx("a", 2))
    assert pool.pending == 0
    with pytest.raises(MempoolFull):
        pool.add(tx("a", 3))  # beyond the run: paced
    pool.add(tx("a", 0))  # fills the gap
    assert pool.pending == 3


def test_a_paced_pool_with_no_gap_refuses_before_decoding() -> None:
    """Past saturation most submissions are refused; with no held
    transaction behind a gap none could be exempt, so not even the bytes
    are decoded (garbage hears busy). With a gap, they are."""
    pool = Mempool(CHAIN, max_txs=10)
    pool.track_nonces(lambda sender: 0)
    pool.client_limit = 1
    pool.add(tx("a", 0))
    with pytest.raises(MempoolFull):
        pool.add(b"\xc1 not a transaction")
    pool.add(tx("b", 1), forwarded=True)  # b waits for nonce 0: a gap
    with pytest.raises(MalformedMessage):
        pool.add(b"\xc1 not a transaction")
    pool.add(tx("b", 0))  # and the gap filler is admitted
    assert pool.pending == 3
