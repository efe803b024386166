"""Transactions: canonical encoding, digest, signature, strict decoding."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus.errors import InvalidSignature, MalformedMessage
from fedchain.consensus.tx import (
    MAX_TX_BYTES,
    SignatureCache,
    Transaction,
    check_signature,
    decode_transaction,
    sign_transaction,
    signing_bytes,
)
from fedchain.p2p.identity import Identity, verify

ALICE = Identity(b"a" * 32)
CHAIN = "test-chain"


def make(**overrides: object) -> Transaction:
    fields: dict = dict(type="kv", content=b"\x01\x02", nonce=7, timestamp=1_700_000_000_000)
    fields.update(overrides)
    return sign_transaction(ALICE, CHAIN, **fields)


def test_encoding_is_the_msgpack_array_of_seven_fields() -> None:
    tx = make(oid="1.2.156.1")
    assert msgpack.unpackb(tx.encoded) == [
        "kv",
        "1.2.156.1",
        b"\x01\x02",
        1_700_000_000_000,
        7,
        ALICE.public_key,
        tx.signature,
    ]


def test_digest_is_sha256_of_the_unsigned_fields() -> None:
    tx = make()
    unsigned = msgpack.packb(
        ["kv", "", b"\x01\x02", 1_700_000_000_000, 7, ALICE.public_key], use_bin_type=True
    )
    assert tx.unsigned_bytes == unsigned
    assert tx.digest == hashlib.sha256(unsigned).digest()


def test_signature_covers_domain_chain_and_unsigned_bytes() -> None:
    tx = make()
    assert verify(ALICE.public_key, signing_bytes(CHAIN, tx.unsigned_bytes), tx.signature)
    assert tx.verify(CHAIN)
    assert not tx.verify("other-chain")  # no replay across chains
    check_signature(tx, CHAIN)
    with pytest.raises(InvalidSignature):
        check_signature(tx, "other-chain")


def test_digest_does_not_depend_on_the_signature() -> None:
    tx = make()
    forged = tx.encoded[:-64] + bytes(64)
    decoded = decode_transaction(forged)
    assert decoded.digest == tx.digest
    assert not decoded.verify(CHAIN)


def test_different_fields_give_different_digests() -> None:
    base = make()
    for change in (
        {"nonce": 8},
        {"content": b"\x01"},
        {"type": "kv2"},
        {"oid": "1.2"},
        {"timestamp": 1},
    ):
        assert make(**change).digest != base.digest


def test_roundtrip_keeps_bytes_and_digest() -> None:
    tx = make(content=b"x" * 1000, oid="1.2.3")
    decoded = decode_transaction(tx.encoded)
    assert decoded == tx
    assert decoded.encoded == tx.encoded and decoded.digest == tx.digest
    assert decode_transaction(bytearray(tx.encoded)) == tx


@pytest.mark.parametrize(
    "fields",
    [
        {"type": ""},
        {"type": "x" * 65},
        {"oid": "1" * 257},
        {"nonce": -1},
        {"nonce": 2**63},
        {"timestamp": -5},
        {"content": "text"},
        {"content": b"x" * MAX_TX_BYTES},
    ],
)
def test_signing_refuses_bad_fields(fields: dict) -> None:
    with pytest.raises(MalformedMessage):
        make(**fields)


def _raw(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def test_decoder_refuses_wrong_shapes() -> None:
    tx = make()
    good = msgpack.unpackb(tx.encoded)
    bad = [
        good[:6],
        [*good, 0],
        {"a": 1},
        ["kv", "", "str-content", 1, 7, ALICE.public_key, tx.signature],
        ["kv", "", b"", 1, True, ALICE.public_key, tx.signature],
        ["kv", "", b"", 1, 7, ALICE.public_key[:31], tx.signature],
        ["kv", "", b"", 1, 7, ALICE.public_key, tx.signature[:63]],
        [b"kv", "", b"", 1, 7, ALICE.public_key, tx.signature],
    ]
    for fields in bad:
        with pytest.raises(MalformedMessage):
            decode_transaction(_raw(fields))


def test_decoder_refuses_non_canonical_and_trailing_bytes() -> None:
    tx = make()
    with pytest.raises(MalformedMessage):
        decode_transaction(tx.encoded + b"\x00")
    # nonce 7 as a uint64 (0xcf) instead of a fixint: same value, other bytes
    wide = tx.encoded.replace(b"\x07" + b"\xc4\x20", b"\xcf" + (7).to_bytes(8, "big") + b"\xc4\x20")
    assert wide != tx.encoded
    with pytest.raises(MalformedMessage):
        decode_transaction(wide)
    # the type as str8 (0xd9) instead of fixstr: same string, other bytes
    long_str = b"\x97\xd9\x02kv" + tx.encoded[4:]
    assert msgpack.unpackb(long_str) == msgpack.unpackb(tx.encoded)
    with pytest.raises(MalformedMessage):
        decode_transaction(long_str)


def test_decoder_refuses_oversized_input_before_parsing() -> None:
    with pytest.raises(MalformedMessage):
        decode_transaction(b"\x90" * (MAX_TX_BYTES + 1))
    with pytest.raises(MalformedMessage):
        decode_transaction("not bytes")  # type: ignore[arg-type]


txs = st.builds(
    lambda t, o, c, ts, n: sign_transaction(
        ALICE, CHAIN, type=t, oid=o, content=c, timestamp=ts, nonce=n
    ),
    st.text(min_size=1, max_size=64),
    st.text(max_size=64),
    st.binary(max_size=300),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
)


@settings(max_examples=150, deadline=None)
@given(txs)
def test_property_decode_encode_roundtrip(tx: Transaction) -> None:
    decoded = decode_transaction(tx.encoded)
    assert decoded == tx and decoded.digest == tx.digest and decoded.verify(CHAIN)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_property_any_bytes_decode_or_raise_malformed(data: bytes) -> None:
    try:
        tx = decode_transaction(data)
    except MalformedMessage:
        return
    assert tx.encoded == data


@settings(max_examples=200, deadline=None)
@given(txs, st.data())
def test_property_any_single_byte_change_is_caught(tx: Transaction, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(tx.encoded) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = bytearray(tx.encoded)
    mutated[index] ^= flip
    try:
        decoded = decode_transaction(bytes(mutated))
    except MalformedMessage:
        return
    assert not decoded.verify(CHAIN)


def test_signature_cache_verifies_each_transaction_once() -> None:
    cache = SignatureCache(CHAIN, max_entries=2)
    good = make()
    forged = decode_transaction(good.encoded[:-64] + bytes(64))
    assert cache.verify(good) and cache.verify(good) and good in cache
    assert (cache.hits, cache.misses) == (1, 1)
    assert not cache.verify(forged) and forged not in cache  # failures are not kept
    assert not SignatureCache("other").verify(good)
    for nonce in (1, 2):
        cache.verify(make(nonce=nonce))
    assert good not in cache  # bounded: the oldest went
