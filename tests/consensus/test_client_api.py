"""The client protocol's decoders: strict on anything a peer can send, and
proofs that round-trip through their wire form and still verify."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_mutations import mutated

from fedchain.consensus import merkle
from fedchain.consensus.block import NULL_DIGEST, NULL_PROPOSER, encode_block
from fedchain.consensus.chain import ChainTip, Executor
from fedchain.consensus.client import TrustedValidators
from fedchain.consensus.client_api import (
    MAX_EPOCH_ANSWERS,
    MAX_HEADERS,
    ClientOp,
    CommitProof,
    HeaderChain,
    QueryAnswer,
    decode_client_message,
    encode_client_message,
)
from fedchain.consensus.contracts import TxResult, kv_key, kv_set
from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.genesis import ConsensusParams, Genesis
from fedchain.consensus.tx import sign_transaction
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity

CHAIN = "client-api"
VALIDATORS = [Identity(bytes([i + 1]) * 32) for i in range(4)]
KEYS = sorted(v.public_key for v in VALIDATORS)
ALICE = Identity(b"a" * 32)
GENESIS = Genesis.create(CHAIN, 0, KEYS, params=ConsensusParams(state_buckets=8))


def _certified_block():
    executor = Executor(GENESIS)
    txs = [
        sign_transaction(ALICE, CHAIN, type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0)
        for n in range(5)
    ]
    tip = ChainTip.of_genesis(GENESIS)
    block, state = executor.build_block(tip, txs, timestamp=1, view=0, proposer=KEYS[0])
    votes = [(v.public_key, sign_commit_vote(v, CHAIN, 1, block.hash, view=0)) for v in VALIDATORS]
    return (
        block.with_certificate(CommitCertificate.of(1, block.hash, votes[:3], view=0)),
        state,
        txs,
    )


def test_a_commit_proof_round_trips_and_verifies_only_its_transaction() -> None:
    block, _, txs = _certified_block()
    for index, tx in enumerate(txs):
        proof = CommitProof.from_list(
            msgpack.unpackb(msgpack.packb(CommitProof.of_block(block, index).as_list()))
        )
        assert proof.verify(tx.encoded, CHAIN, KEYS)
        assert not proof.verify(txs[(index + 1) % 5].encoded, CHAIN, KEYS)
        assert not proof.verify(tx.encoded, "another-chain", KEYS)
    assert encode_block(block)  # the block itself is well formed


def test_a_query_answer_round_trips_and_proves_presence_and_absence() -> None:
    block, state, _ = _certified_block()
    for key in (kv_key(ALICE.public_key, "k3"), "absent"):
        value, proof = state.prove(key)
        answer = QueryAnswer(key, value, block.header, block.certificate, proof)
        wire = msgpack.unpackb(msgpack.packb(answer.as_list(state.get_encoded(key))))
        back = QueryAnswer.from_list(wire)
        assert back.value == value and back.verify(CHAIN, KEYS)
    assert QueryAnswer(key, 3, block.header, block.certificate, proof).verify(CHAIN, KEYS) is False


def _null_certificate(height: int) -> CommitCertificate:
    """A real quorum's votes for a null request at ``height``: they sign
    NULL_DIGEST, which names no header."""
    votes = [
        (v.public_key, sign_commit_vote(v, CHAIN, height, NULL_DIGEST, view=1))
        for v in VALIDATORS[:3]
    ]
    return CommitCertificate.of(height, NULL_DIGEST, votes, view=1)


@pytest.mark.parametrize(("index", "claimed_index", "claimed_size"), [(2, 2, 6), (4, 1, 2)])
def test_a_commit_proof_cannot_misstate_the_blocks_size_or_the_transactions_place(
    index: int, claimed_index: int, claimed_size: int
) -> None:
    """RFC 6962 paths alone verify for several (index, size) pairs: in a block
    of 5, leaf 2's path is also one for leaf 2 of 6, and leaf 4's for leaf 1
    of 2. The header's tx_count binds them, as Certificate Transparency's
    signed tree size does. (A deep run of the structural-mutation property
    test below found a proof with its size changed from 5 to 6 accepted.)"""
    block, _, txs = _certified_block()
    assert block.header.tx_count == len(txs) == 5
    honest = CommitProof.of_block(block, index)
    tx = txs[index].encoded
    assert honest.verify(tx, CHAIN, KEYS)
    lie = dataclasses.replace(honest, index=claimed_index, size=claimed_size)
    # Both paths still verify as Merkle paths under the lie...
    assert merkle.verify_inclusion(
        tx, claimed_index, claimed_size, lie.tx_path, block.header.tx_root
    )
    result = lie.result.encode()
    root = block.header.results_root
    assert merkle.verify_inclusion(result, claimed_index, claimed_size, lie.result_path, root)
    # ...but the proof is refused: the certified header says 5.
    assert not lie.includes(tx) and not lie.verify(tx, CHAIN, KEYS)


def test_a_null_certificate_vouches_for_no_header() -> None:
    """A node holding a real null height's certificate could otherwise pass
    off any header carrying the null marker: a transaction never committed,
    or any state. The client refuses headers of null blocks outright."""
    block, state, _ = _certified_block()
    stranger = sign_transaction(
        ALICE, CHAIN, type="kv", content=kv_set("never", 1), nonce=99, timestamp=0
    )
    result = TxResult(0)
    forged_header = dataclasses.replace(
        block.header,
        height=2,
        prev_hash=block.hash,
        proposer=NULL_PROPOSER,
        tx_count=1,
        tx_root=merkle.root([stranger.encoded]),
        results_root=merkle.root([result.encode()]),
    )
    certificate = _null_certificate(2)
    assert certificate.is_valid(CHAIN, KEYS)  # the votes themselves are genuine
    proof = CommitProof(forged_header, certificate, 0, 1, (), result, ())
    assert proof.includes(stranger.encoded)
    assert not proof.verify(stranger.encoded, CHAIN, KEYS)
    key = kv_key(ALICE.public_key, "k3")
    value, state_proof = state.prove(key)
    answer = QueryAnswer(
        key,
        value,
        dataclasses.replace(forged_header, tx_root=block.header.tx_root),
        certificate,
        state_proof,
    )
    assert not answer.verify(CHAIN, KEYS)
    assert answer._replace(header=block.header, certificate=block.certificate).verify(CHAIN, KEYS)
    chain = HeaderChain((block.header, forged_header), certificate)
    assert chain.linked() and not TrustedValidators(CHAIN, KEYS).certifies(chain)


def test_requests_decode_and_bad_shapes_are_refused() -> None:
    assert decode_client_message(encode_client_message(ClientOp.SUBMIT, 1, [b"x"]))[2] == [b"x"]
    assert decode_client_message(encode_client_message(ClientOp.WAIT, 2, bytes(32), 5))[3] == 5
    assert decode_client_message(encode_client_message(ClientOp.EPOCHS, 3, 0))[2] == 0
    assert decode_client_message(encode_client_message(ClientOp.EPOCH_PROOFS, 3, [[]]))[2] == [[]]
    assert decode_client_message(encode_client_message(ClientOp.HEADERS, 4, 1, 9))[2:] == [1, 9]
    assert decode_client_message(encode_client_message(ClientOp.HEADER_CHAIN, 4, [[]], None))
    statuses = [[0, bytes(32)], [1, bytes(32)], [2, "busy"], [3, "refused: why"]]
    assert decode_client_message(encode_client_message(ClientOp.SUBMITTED, 1, statuses))[2]
    for bad in (
        encode_client_message(ClientOp.SUBMITTED, 1, [[4, "no such status"]]),
        encode_client_message(ClientOp.SUBMITTED, 1, [[2, b"busy carries a reason"]]),
        encode_client_message(ClientOp.SUBMITTED, 1, [[True, bytes(32)]]),
        encode_client_message(ClientOp.HEADERS, 4, 0, 9),
        encode_client_message(ClientOp.HEADERS, 4, 5, 4),
        encode_client_message(ClientOp.HEADERS, 4, 1),
        encode_client_message(ClientOp.HEADER_CHAIN, 4, [[]] * (MAX_HEADERS + 1), None),
        encode_client_message(ClientOp.HEADER_CHAIN, 4, [[]], b"votes"),
        encode_client_message(ClientOp.EPOCHS, 3, -1),
        encode_client_message(ClientOp.EPOCH_PROOFS, 3, [b"not an answer"]),
        encode_client_message(ClientOp.EPOCH_PROOFS, 3, [[]] * (MAX_EPOCH_ANSWERS + 1)),
        encode_client_message(ClientOp.SUBMIT, 1, [3]),
        encode_client_message(ClientOp.SUBMIT, -1, []),
        encode_client_message(ClientOp.WAIT, 2, b"short", 5),
        encode_client_message(ClientOp.QUERY, 2, 7),
        encode_client_message(99, 1),
        encode_client_message(ClientOp.SUBMITTED, 1, [[0, "not a digest"]]),
        encode_client_message(ClientOp.FORWARD, [b"a"] * 11),
        b"\xc1",
    ):
        with pytest.raises(MalformedMessage):
            decode_client_message(bad, max_txs=10)


def test_a_top_path_of_the_wrong_shape_is_malformed() -> None:
    """The decoder bounds a state proof's top path before anything hashes
    it: at most 5 levels (2**20 buckets) of at most 15 whole hashes each."""
    block, state, _ = _certified_block()
    key = kv_key(ALICE.public_key, "k3")
    value, proof = state.prove(key)
    wire = QueryAnswer(key, value, block.header, block.certificate, proof).as_list(
        state.get_encoded(key)
    )
    assert QueryAnswer.from_list(wire).verify(CHAIN, KEYS)
    for path in ([bytes(32)] * 6, [bytes(33)], [bytes(16 * 32)], [[bytes(32)]], b"x" * 32):
        raw_proof = list(wire[4])  # type: ignore[arg-type]
        raw_proof[2] = path
        with pytest.raises(MalformedMessage):
            QueryAnswer.from_list([*wire[:4], raw_proof])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_client_message(data)


_leaf = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.binary(max_size=40)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=8),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(_leaf)
def test_any_structure_is_a_proof_or_malformed(value: object) -> None:
    for parse in (CommitProof.from_list, QueryAnswer.from_list):
        with contextlib.suppress(MalformedMessage):
            parse(value)
    for votes in (None, value):
        with contextlib.suppress(MalformedMessage):
            HeaderChain.from_fields(value, votes)
        with contextlib.suppress(MalformedMessage):
            HeaderChain.from_fields([value], votes)


_WIRE_ERRORS = (
    MalformedMessage,
    ValueError,
    msgpack.ExtraData,
    msgpack.FormatError,
    msgpack.StackError,
)


def _mutated(wire: bytes, position: int, noise: bytes) -> bytes:
    position %= len(wire)
    flipped = bytes(
        b ^ n for b, n in zip(wire[position : position + len(noise)], noise, strict=False)
    )
    return wire[:position] + flipped + wire[position + len(noise) :]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_a_mutated_proof_is_malformed_or_does_not_verify(position: int, noise: bytes) -> None:
    block, _, txs = _certified_block()
    wire = msgpack.packb(CommitProof.of_block(block, 2).as_list())
    mutated = _mutated(wire, position, noise)
    try:
        proof = CommitProof.from_list(msgpack.unpackb(mutated))
    except _WIRE_ERRORS:
        return
    if mutated != wire:
        assert not proof.verify(txs[2].encoded, CHAIN, KEYS) or proof == CommitProof.of_block(
            block, 2
        )


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.integers(0, 4000), st.binary(min_size=1, max_size=8))
def test_a_mutated_query_answer_is_malformed_or_does_not_verify(
    present: bool, position: int, noise: bytes
) -> None:
    """State proofs (since v3: the bucket's leaf hashes travel whole, and each top
    level's 16-way sibling group) under bit flips anywhere: refused, or
    what they prove is true of the state (a flipped key may still be
    proved absent when it is)."""
    block, state, _ = _certified_block()
    key = kv_key(ALICE.public_key, "k3") if present else kv_key(ALICE.public_key, "nope")
    value, proof = state.prove(key)
    answer = QueryAnswer(key, value, block.header, block.certificate, proof)
    wire = msgpack.packb(answer.as_list(state.get_encoded(key)))
    try:
        back = QueryAnswer.from_list(msgpack.unpackb(_mutated(wire, position, noise)))
    except _WIRE_ERRORS:
        return
    if back.verify(CHAIN, KEYS):
        assert back.value == state.get(back.key)


@settings(max_examples=300, deadline=None)
@given(present=st.booleans(), data=st.data())
def test_a_structurally_mutated_answer_is_malformed_or_proves_only_the_truth(
    present: bool, data
) -> None:
    """The same, with changes to the decoded structure (a field of another
    type or size, a sibling dropped or repeated) instead of bit flips: a
    node that lies in any shape gets MalformedMessage or a proof that fails,
    never an exception the client did not ask for."""
    block, state, txs = _certified_block()
    key = kv_key(ALICE.public_key, "k3") if present else kv_key(ALICE.public_key, "nope")
    value, proof = state.prove(key)
    answer = QueryAnswer(key, value, block.header, block.certificate, proof)
    wire = msgpack.unpackb(msgpack.packb(answer.as_list(state.get_encoded(key))))
    try:
        back = QueryAnswer.from_list(data.draw(mutated(wire)))
    except MalformedMessage:
        return
    if back.verify(CHAIN, KEYS):
        assert back.value == state.get(back.key)
    commit = msgpack.unpackb(msgpack.packb(CommitProof.of_block(block, 2).as_list()))
    try:
        proof = CommitProof.from_list(data.draw(mutated(commit)))
    except MalformedMessage:
        return
    if proof.verify(txs[2].encoded, CHAIN, KEYS):
        assert proof == CommitProof.of_block(block, 2)
