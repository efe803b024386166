"""The verification and decoding memos and PBFT's incremental vote counts.

A memo may only save work: a forged or replayed signature is refused with
one present exactly as without, only successes are remembered, and every
memo is bounded. The per-slot counts must equal a recount at every step,
and a cluster that shares one memo and one message cache among all its
replicas commits exactly what a cluster without them commits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import msgpack
import numpy as np
import pbft_harness
import pytest
from pbft_harness import CHAIN_ID, Cluster

from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.pbft import _Slot
from fedchain.consensus.pbft_messages import (
    Checkpoint,
    Commit,
    MessageCache,
    Prepare,
    decode_message,
    encode_message,
)
from fedchain.consensus.votes import CommitCertificate, commit_vote_bytes
from fedchain.p2p.identity import Identity, SignatureMemo, verify_with

RNG = np.random.default_rng(7)
KEYS = [Identity.from_rng(RNG) for _ in range(4)]
VALIDATORS = [k.public_key for k in KEYS]
BLOCK = bytes(range(32))


def flip(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 1]) + signature[1:]


# -- SignatureMemo ------------------------------------------------------------


def test_memo_refuses_a_forgery_after_remembering_the_genuine_signature() -> None:
    memo = SignatureMemo()
    key = KEYS[0].public_key
    signature = KEYS[0].sign(b"hello")
    assert memo.verify(key, b"hello", signature)
    assert memo.verify(key, b"hello", signature)
    assert (memo.hits, memo.misses) == (1, 1)
    assert not memo.verify(key, b"hello", flip(signature))  # another signature
    assert not memo.verify(key, b"hullo", signature)  # another message
    assert not memo.verify(KEYS[1].public_key, b"hello", signature)  # another key
    assert not memo.verify(key[:31], b"hello", signature)  # hostile sizes never raise
    assert not memo.verify(key, b"hello", signature[:63])


def test_memo_remembers_only_successes() -> None:
    memo = SignatureMemo()
    key = KEYS[0].public_key
    bad = flip(KEYS[0].sign(b"m"))
    for _ in range(3):
        assert not memo.verify(key, b"m", bad)
        assert not verify_with(memo, key, b"m", bad)
    assert len(memo) == 0
    assert memo.hits == 0 and memo.misses == 6
    assert (key, b"m", bad) not in memo


def test_memo_is_bounded_oldest_first() -> None:
    memo = SignatureMemo(max_entries=2)
    key = KEYS[0].public_key
    signed = [(m, KEYS[0].sign(m)) for m in (b"a", b"b", b"c")]
    for message, signature in signed:
        assert memo.verify(key, message, signature)
    assert len(memo) == 2
    assert (key, b"a", signed[0][1]) not in memo
    assert (key, b"c", signed[2][1]) in memo
    assert memo.verify(key, b"a", signed[0][1])  # forgotten: verified again, still good
    assert memo.misses == 4
    with pytest.raises(ValueError):
        SignatureMemo(max_entries=0)


def test_a_full_memo_keeps_the_newest_through_many_evictions() -> None:
    """Past its bound, every success pushes out the oldest, for as long as
    it runs (a node's memo is full after its first 200,000 checks)."""
    memo = SignatureMemo(max_entries=3)
    calls = []

    def verifier(n: int) -> bool:
        calls.append(n)
        return n % 5 != 0  # every fifth fails and is not remembered

    for n in range(1, 1000):
        memo.check(n, verifier, n)
    assert len(memo) == 3 and [memo.remembers(n) for n in (996, 997, 998, 999)] == [
        False,  # the fourth newest success is gone
        True,
        True,
        True,
    ]
    assert not memo.remembers(995)  # failed, never kept
    checked = len(calls)
    assert memo.check(999, verifier, 999) and len(calls) == checked  # a hit: not checked again
    assert (memo.hits, memo.misses) == (1, 999)


# -- messages and certificates through a memo ----------------------------------


def test_a_commit_vote_is_verified_once_for_the_commit_and_the_certificate() -> None:
    memo = SignatureMemo()
    commits = [Commit.create(k, CHAIN_ID, 2, 5, BLOCK) for k in KEYS[:3]]
    assert all(c.verify(CHAIN_ID, memo=memo) for c in commits)
    misses = memo.misses
    cert = CommitCertificate.of(5, BLOCK, [(c.replica, c.vote) for c in commits], view=2)
    assert cert.is_valid(CHAIN_ID, VALIDATORS, memo=memo)
    assert cert.valid_signers(CHAIN_ID, VALIDATORS, memo=memo) == set(VALIDATORS[:3])
    assert memo.misses == misses  # no vote verified twice
    # The same votes name only what they signed: other height, view, chain.
    assert not CommitCertificate.of(6, BLOCK, cert.votes, view=2).is_valid(
        CHAIN_ID, VALIDATORS, memo=memo
    )
    assert not CommitCertificate.of(5, BLOCK, cert.votes, view=3).is_valid(
        CHAIN_ID, VALIDATORS, memo=memo
    )
    assert not cert.is_valid("other chain", VALIDATORS, memo=memo)


def test_a_forged_vote_is_refused_with_a_memo_present() -> None:
    memo = SignatureMemo()
    good = [Commit.create(k, CHAIN_ID, 0, 3, BLOCK) for k in KEYS[:3]]
    assert all(c.verify(CHAIN_ID, memo=memo) for c in good)
    forged = dataclasses.replace(good[2], vote=flip(good[2].vote))
    assert not forged.verify(CHAIN_ID, memo=memo)
    assert not forged.verify(CHAIN_ID, memo=memo)  # and again: never remembered
    votes = [(c.replica, c.vote) for c in good[:2]] + [(forged.replica, forged.vote)]
    cert = CommitCertificate.of(3, BLOCK, votes, view=0)
    assert not cert.is_valid(CHAIN_ID, VALIDATORS, memo=memo)
    assert cert.valid_signers(CHAIN_ID, VALIDATORS, memo=memo) == set(VALIDATORS[:2])
    # A vote by a key outside the validator set does not count, memo or not.
    outsider = Identity.from_rng(np.random.default_rng(99))
    extra = Commit.create(outsider, CHAIN_ID, 0, 3, BLOCK)
    assert extra.verify(CHAIN_ID, memo=memo)
    votes = [(c.replica, c.vote) for c in good[:2]] + [(extra.replica, extra.vote)]
    assert not CommitCertificate.of(3, BLOCK, votes, view=0).is_valid(
        CHAIN_ID, VALIDATORS, memo=memo
    )


def test_signed_messages_through_a_memo_refuse_any_change() -> None:
    memo = SignatureMemo()
    prepare = Prepare.create(KEYS[1], CHAIN_ID, 0, 1, BLOCK)
    checkpoint = Checkpoint.create(KEYS[2], CHAIN_ID, 16, BLOCK)
    for message in (prepare, checkpoint):
        assert message.verify(CHAIN_ID, memo=memo)
        assert message.verify(CHAIN_ID, memo=memo)
        assert not dataclasses.replace(message, signature=flip(message.signature)).verify(
            CHAIN_ID, memo=memo
        )
        assert not message.verify("other chain", memo=memo)
        assert not dataclasses.replace(message, replica=VALIDATORS[3]).verify(CHAIN_ID, memo=memo)
    assert not dataclasses.replace(prepare, seq=2).verify(CHAIN_ID, memo=memo)
    assert not dataclasses.replace(checkpoint, state=bytes(32)).verify(CHAIN_ID, memo=memo)


def test_the_vote_bytes_a_memo_keys_on_bind_every_field() -> None:
    a = commit_vote_bytes(CHAIN_ID, 5, BLOCK, view=2)
    assert a != commit_vote_bytes(CHAIN_ID, 5, BLOCK, view=3)
    assert a != commit_vote_bytes(CHAIN_ID, 6, BLOCK, view=2)
    assert a != commit_vote_bytes(CHAIN_ID + "x", 5, BLOCK, view=2)


# -- MessageCache -------------------------------------------------------------


def test_message_cache_decodes_each_body_once() -> None:
    cache = MessageCache()
    prepare = Prepare.create(KEYS[1], CHAIN_ID, 0, 1, BLOCK)
    body = encode_message(prepare)
    first = decode_message(body, cache=cache)
    again = decode_message(bytes(body), cache=cache)  # an equal body, another object
    assert first == prepare and again is first
    assert (cache.hits, cache.misses) == (1, 1)


def test_message_cache_never_remembers_a_malformed_body() -> None:
    cache = MessageCache()
    bad = msgpack.packb([2, 0, 1, b"short", VALIDATORS[0], bytes(64)], use_bin_type=True)
    for _ in range(2):
        with pytest.raises(MalformedMessage):
            decode_message(bad, cache=cache)
    assert len(cache) == 0 and cache.misses == 2


def test_message_cache_is_bounded() -> None:
    bodies = [encode_message(Prepare.create(KEYS[1], CHAIN_ID, 0, s, BLOCK)) for s in (1, 2, 3)]
    by_count = MessageCache(max_entries=2)
    for body in bodies:
        by_count.decode(body)
    assert len(by_count) == 2
    by_bytes = MessageCache(max_bytes=2 * len(bodies[0]))
    for body in bodies:
        by_bytes.decode(body)
    assert len(by_bytes) == 2
    by_bytes.decode(bodies[0])  # evicted: decoded again
    assert by_bytes.misses == 4
    with pytest.raises(ValueError):
        MessageCache(max_bytes=0)


# -- incremental counts ---------------------------------------------------------


def assert_counts(slot: _Slot) -> None:
    prepares = Counter(p.digest for p in slot.prepares.values())
    commits = Counter(c.digest for c in slot.commits.values())
    assert {d: n for d, n in slot.prepare_counts.items() if n} == dict(prepares)
    assert {d: n for d, n in slot.commit_counts.items() if n} == dict(commits)


def test_slot_counts_match_a_recount_under_replacement() -> None:
    rng = np.random.default_rng(3)
    digests = [bytes([i]) * 32 for i in range(3)]
    slot = _Slot(0, 1)
    for _ in range(200):
        key = KEYS[int(rng.integers(4))]
        digest = digests[int(rng.integers(3))]
        if rng.random() < 0.5:
            slot.add_prepare(Prepare(0, 1, digest, key.public_key, bytes(64)))
        else:
            slot.add_commit(Commit(0, 1, digest, key.public_key, bytes(64)))
        assert_counts(slot)


def _run(
    byzantine: dict[int, str], *, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Cluster, SignatureMemo | None]:
    cluster = Cluster(4, seed=21, byzantine=byzantine)
    memo = None
    if shared:
        memo = SignatureMemo()
        cache = MessageCache()
        for node in cluster.nodes:
            node.replica.signatures = memo
        monkeypatch.setattr(
            pbft_harness, "decode_message", lambda body: decode_message(body, cache=cache)
        )
    cluster.submit_stream(120, rate=400.0)
    cluster.run(3.0)
    for node in cluster.nodes:
        for slot in node.replica.log.values():
            assert_counts(slot)
    monkeypatch.undo()
    return cluster, memo


@pytest.mark.parametrize("behaviour", ["bad_signature", "equivocate", "wrong_digest"])
def test_a_cluster_sharing_the_memos_behaves_exactly_the_same(
    behaviour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, _ = _run({0: behaviour}, shared=False, monkeypatch=monkeypatch)
    shared, memo = _run({0: behaviour}, shared=True, monkeypatch=monkeypatch)
    assert memo is not None and memo.hits > 0 and memo.misses > 0
    for i in range(4):
        assert plain.log_of(i) == shared.log_of(i)
        assert plain.nodes[i].replica.refused == shared.nodes[i].replica.refused
        assert plain.nodes[i].suspects == shared.nodes[i].suspects
    assert plain.delivered == shared.delivered
    shared.check_agreement()
    shared.check_certified()
    assert len(shared.log_of(1)) > 0
    if behaviour == "bad_signature":
        assert shared.refused("bad_signature") > 0
