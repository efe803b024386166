"""Blocks: canonical encoding, header hash, strict decoding, body roots."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus import merkle
from fedchain.consensus.block import (
    Block,
    BlockHeader,
    check_body,
    decode_block,
    decode_certificate,
    encode_block,
    encode_certificate,
    header_and_votes,
    results_root,
    tx_root,
)
from fedchain.consensus.contracts import TxResult, kv_set
from fedchain.consensus.errors import InvalidBlock, MalformedMessage
from fedchain.consensus.tx import sign_transaction
from fedchain.consensus.votes import CommitCertificate, sign_commit_vote
from fedchain.p2p.identity import Identity

CHAIN = "block-test"
ALICE = Identity(b"a" * 32)
VALIDATORS = [Identity(bytes([i + 1]) * 32) for i in range(4)]


def sample(n_txs: int = 3, certified: bool = True) -> Block:
    txs = tuple(
        sign_transaction(ALICE, CHAIN, type="kv", content=kv_set(f"k{i}", i), nonce=i, timestamp=9)
        for i in range(n_txs)
    )
    results = tuple(TxResult(i % 2, "no" if i % 2 else "") for i in range(n_txs))
    header = BlockHeader(
        height=5,
        prev_hash=b"\x11" * 32,
        timestamp=1234,
        view=2,
        proposer=VALIDATORS[0].public_key,
        tx_count=n_txs,
        tx_root=tx_root(txs),
        results_root=results_root(results),
        state_root=b"\x22" * 32,
    )
    block = Block(header, txs, results)
    if certified:
        votes = [
            (v.public_key, sign_commit_vote(v, CHAIN, 5, header.hash, view=0))
            for v in VALIDATORS[:3]
        ]
        block = block.with_certificate(CommitCertificate.of(5, header.hash, votes, view=0))
    return block


def test_hash_is_sha256_of_the_canonical_header() -> None:
    header = sample().header
    raw = msgpack.packb(header.as_list(), use_bin_type=True)
    assert header.encode() == raw
    assert header.hash == hashlib.sha256(raw).digest()
    assert replace(header, view=3).hash != header.hash


def test_roots_are_rfc6962_over_tx_bytes_and_results() -> None:
    block = sample()
    assert block.header.tx_root == merkle.root([t.encoded for t in block.txs])
    assert block.header.results_root == merkle.root(
        [msgpack.packb([r.status, r.reason]) for r in block.results]
    )
    assert tx_root(()) == merkle.EMPTY_ROOT


@pytest.mark.parametrize("certified", [True, False])
@pytest.mark.parametrize("n_txs", [0, 1, 5])
def test_roundtrip(n_txs: int, certified: bool) -> None:
    block = sample(n_txs, certified)
    data = encode_block(block)
    decoded = decode_block(data)
    assert decoded == block
    assert encode_block(decoded) == data
    assert decoded.certificate == block.certificate
    check_body(decoded)
    header, votes = header_and_votes(data)
    assert header == block.header
    if certified:
        assert decode_certificate(votes, header.height, header.hash) == block.certificate
        assert votes == encode_certificate(block.certificate)
    else:
        assert votes is None


def test_with_certificate_refuses_another_blocks_certificate() -> None:
    block = sample(certified=False)
    with pytest.raises(ValueError):
        block.with_certificate(CommitCertificate.of(6, block.hash, [], view=0))


def _fields(block: Block) -> list:
    return msgpack.unpackb(encode_block(block))


def _pack(fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def test_decoder_refuses_bad_shapes() -> None:
    good = _fields(sample())
    mutations = []
    for index, bad in [
        (0, good[0][:7]),
        (0, [*good[0][:1], b"short", *good[0][2:]]),
        (0, [-1, *good[0][1:]]),
        (0, [*good[0][:4], b"\x00" * 31, *good[0][5:]]),
        (0, [*good[0][:5], -1, *good[0][6:]]),  # tx_count
        (0, [*good[0][:5], "3", *good[0][6:]]),
        (1, good[1][:2]),  # one result per transaction
        (1, [*good[1][:2], b"junk"]),
        (2, [[0, ""], [2, "x"], [0, ""]]),
        (2, [[0, "reason on success"], [1, "no"], [0, ""]]),
        (2, [[0, ""], [1, "x" * 201], [0, ""]]),
        (3, [good[3][0], list(reversed(good[3][1]))]),  # votes unsorted
        (3, [good[3][0], [good[3][1][0], good[3][1][0]]]),  # duplicate voter
        (3, [good[3][0], [[good[3][1][0][0], b"\x00" * 63]]]),
        (3, [-1, good[3][1]]),  # no such view
        (3, good[3][1]),  # votes without their view
        (3, "votes"),
    ]:
        fields = list(good)
        fields[index] = bad
        mutations.append(fields)
    mutations += [good[:3], [*good, None], {"a": 1}, "block"]
    for fields in mutations:
        with pytest.raises(MalformedMessage):
            decode_block(_pack(fields))


def test_decoder_refuses_trailing_bytes_non_canonical_and_oversize() -> None:
    data = encode_block(sample())
    with pytest.raises(MalformedMessage):
        decode_block(data + b"\xc0")
    with pytest.raises(MalformedMessage):
        decode_block(b"\xdc\x00\x04" + data[1:])  # array16 header for 4 fields
    with pytest.raises(MalformedMessage):
        decode_block(data, max_bytes=len(data) - 1)
    with pytest.raises(MalformedMessage):
        decode_block(data, max_tx_bytes=50)


def test_check_body_catches_swapped_transactions_and_results() -> None:
    block = sample()
    check_body(block)
    with pytest.raises(InvalidBlock, match="transaction Merkle root"):
        check_body(replace(block, txs=block.txs[::-1]))
    with pytest.raises(InvalidBlock, match="results root"):
        check_body(replace(block, results=block.results[1:] + block.results[:1]))
    with pytest.raises(InvalidBlock, match="one result per transaction"):
        check_body(replace(block, results=block.results[:2]))
    # The roots match, the count does not: what a commit proof's size is checked against.
    for count in (len(block.txs) - 1, len(block.txs) + 1):
        with pytest.raises(InvalidBlock, match="tx_count"):
            check_body(replace(block, header=replace(block.header, tx_count=count)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_property_any_bytes_decode_or_raise_malformed(data: bytes) -> None:
    try:
        header, _ = header_and_votes(data)
    except MalformedMessage:
        header = None
    try:
        block = decode_block(data)
    except MalformedMessage:
        return
    assert encode_block(block) == data
    assert header == block.header  # a block's header reads the same either way


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_property_single_byte_changes_are_refused_or_change_the_block(data: st.DataObject) -> None:
    original = sample(2)
    raw = bytearray(encode_block(original))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    try:
        block = decode_block(bytes(raw))
    except MalformedMessage:
        return
    assert block != original  # canonical: other bytes, other block


def test_known_transactions_are_reused_and_the_rest_decoded() -> None:
    block = sample(4)
    held = {tx.encoded: tx for tx in block.txs[:2]}
    again = decode_block(encode_block(block), known=held.get)
    assert again == block
    assert again.txs[0] is block.txs[0] and again.txs[1] is block.txs[1]
    assert again.txs[2] is not block.txs[2]  # decoded afresh
