"""Every consensus decoder against structure-aware mutations of valid input.

Each case starts from a real encoding, unpacks it, changes the structure a
little (``structure_mutations``) and packs it again. The decoder must either
raise MalformedMessage or return a value that encodes back to exactly the
same bytes: strict and canonical, so no two byte strings decode alike and
nothing else (TypeError, KeyError, ...) escapes to crash a node.
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_mutations import mutated_msgpack
from test_block import sample as sample_block

from fedchain.consensus import pbft_messages as pm
from fedchain.consensus.block import decode_block, encode_block
from fedchain.consensus.client_api import ClientOp, decode_client_message, encode_client_message
from fedchain.consensus.contracts import kv_set
from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.genesis import Genesis, decode_genesis
from fedchain.consensus.state import decode_value, encode_value
from fedchain.consensus.tx import decode_transaction, sign_transaction
from fedchain.p2p.identity import Identity

CHAIN = "mutation-test"
KEYS = [Identity(bytes([i + 1]) * 32) for i in range(4)]
TX = sign_transaction(
    KEYS[0], CHAIN, type="kv", content=kv_set("k", [1, "v"]), nonce=3, timestamp=9
)


def _pbft_messages() -> list[pm.Message]:
    digest = b"\x01" * 32
    pre_prepare = pm.PrePrepare.create(KEYS[0], CHAIN, 0, 1, digest, b"payload")
    prepares = tuple(pm.Prepare.create(k, CHAIN, 0, 1, digest) for k in KEYS[1:3])
    checkpoint = pm.Checkpoint.create(KEYS[1], CHAIN, 16, b"\x02" * 32)
    view_change = pm.ViewChange.create(
        KEYS[1], CHAIN, 1, 16, (checkpoint,), (pm.PreparedProof(pre_prepare, prepares),)
    )
    return [
        pre_prepare,
        prepares[0],
        pm.Commit.create(KEYS[2], CHAIN, 0, 1, digest),
        checkpoint,
        view_change,
        pm.NewView.create(KEYS[1], CHAIN, 1, (view_change,), (pre_prepare,)),
    ]


def _client_messages() -> list[bytes]:
    digest = TX.digest
    return [
        encode_client_message(ClientOp.SUBMIT, 1, [TX.encoded]),
        encode_client_message(ClientOp.SUBMITTED, 1, [[0, digest], [2, "busy"]]),
        encode_client_message(ClientOp.WAIT, 2, digest, 5000),
        encode_client_message(ClientOp.QUERY, 3, "k"),
        encode_client_message(ClientOp.BLOCK, 4, 7, [digest]),
        encode_client_message(ClientOp.FORWARD, [TX.encoded]),
        encode_client_message(ClientOp.HEADERS, 5, 1, 9),
        encode_client_message(ClientOp.HEADER_CHAIN, 5, [[1, 2]], None),
        encode_client_message(ClientOp.EPOCH_PROOFS, 6, [[1]]),
    ]


def _same(encode: Callable[[object], bytes]) -> Callable[[object, bytes], bool]:
    return lambda value, data: encode(value) == data


_pbft_same = _same(pm.encode_message)

CASES = {
    "transaction": (TX.encoded, decode_transaction, _same(lambda tx: tx.encoded)),
    "block": (encode_block(sample_block(2)), decode_block, _same(encode_block)),
    "genesis": (
        Genesis.create(
            CHAIN, 5, [k.public_key for k in KEYS], {"a": 1, "b": [2], "c": "x"}
        ).encode(),
        decode_genesis,
        _same(Genesis.encode),
    ),
    "state value": (
        encode_value({"a": [1, b"x", "s", None, True]}),
        decode_value,
        _same(encode_value),
    ),
    **{
        f"pbft {type(m).__name__}": (
            pm.encode_message(m),
            pm.decode_message,
            _same(pm.encode_message),
        )
        for m in _pbft_messages()
    },
    **{
        f"client op {msgpack.unpackb(body)[0]}": (
            body,
            decode_client_message,
            lambda fields, data: msgpack.packb(fields, use_bin_type=True) == data,
        )
        for body in _client_messages()
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_valid_sample_decodes_and_encodes_back(case: str) -> None:
    data, decode, same = CASES[case]
    assert same(decode(data), data)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_mutated_structure_decodes_canonically_or_raises_malformed(case: str, data) -> None:
    valid, decode, same = CASES[case]
    body = data.draw(mutated_msgpack(msgpack.unpackb(valid, raw=False, strict_map_key=False)))
    try:
        decoded = decode(body)
    except MalformedMessage:
        return
    assert same(decoded, body)
