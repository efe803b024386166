"""The genesis: canonical encoding, hash, strict decoding, initial state."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from fedchain.consensus.contracts import validator_epoch, validators_of
from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.genesis import ConsensusParams, Genesis, decode_genesis
from fedchain.p2p.identity import Identity

KEYS = [Identity(bytes([i + 1]) * 32).public_key for i in range(4)]


def test_roundtrip_and_hash() -> None:
    genesis = Genesis.create("c", 5, KEYS[::-1], {"b": [1], "a": {"x": 2}})
    data = genesis.encode()
    assert decode_genesis(data) == genesis
    assert genesis.hash == hashlib.sha256(data).digest()
    assert genesis.validators == tuple(sorted(KEYS))
    assert msgpack.unpackb(data)[4] == [2000, 8 * 1024 * 1024, 64 * 1024, 16384]


def test_state_holds_the_initial_pairs_and_validators() -> None:
    genesis = Genesis.create("c", 5, KEYS, {"a": 1}, ConsensusParams(state_buckets=8))
    state = genesis.state()
    assert state.get("a") == 1 and state.buckets == 8
    assert validators_of(state) == sorted(KEYS) and validator_epoch(state) == 0
    assert Genesis.create("c", 5, KEYS, {"a": 2}).hash != genesis.hash


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chain_id": ""},
        {"chain_id": "x" * 65},
        {"genesis_time": -1},
        {"validators": []},
        {"validators": [b"short"]},
        {"validators": [KEYS[0], KEYS[0]]},
        {"initial_state": {"sys/validators": 1}},
        {"initial_state": {"": 1}},
        {"params": ConsensusParams(state_buckets=3)},
        {"params": ConsensusParams(max_block_txs=0)},
    ],
)
def test_create_refuses_bad_genesis(kwargs: dict) -> None:
    args = {"chain_id": "c", "genesis_time": 0, "validators": KEYS, **kwargs}
    with pytest.raises(MalformedMessage):
        Genesis.create(**args)


def test_decoder_is_strict() -> None:
    good = msgpack.unpackb(Genesis.create("c", 0, KEYS, {"a": 1}).encode())
    bad = [
        good[:4],
        [*good[:2], list(reversed(good[2])), *good[3:]],  # unsorted validators
        [*good[:3], [["a", b"\xc1"]], good[4]],  # not a value
        [*good[:3], [["a"]], good[4]],
        [*good[:4], good[4][:3]],
        [1, *good[1:]],
    ]
    for fields in bad:
        with pytest.raises(MalformedMessage):
            decode_genesis(msgpack.packb(fields, use_bin_type=True))
    with pytest.raises(MalformedMessage):
        decode_genesis(Genesis.create("c", 0, KEYS).encode() + b"\x00")
    with pytest.raises(MalformedMessage):
        decode_genesis(b"\xc1")
