"""Contracts and execution: nonces, atomic overlays, recorded rejections,
the kv and validators built-ins, and a registry that takes new contracts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus.contracts import (
    BlockContext,
    ContractRegistry,
    KvContract,
    StateView,
    TxResult,
    default_registry,
    execute_transactions,
    kv_delete,
    kv_key,
    kv_set,
    next_nonce,
    sign_validator_change,
    validator_change_content,
    validator_epoch,
    validators_of,
)
from fedchain.consensus.errors import ContractRejected
from fedchain.consensus.genesis import Genesis
from fedchain.consensus.state import MAX_KEY_BYTES, State, encode_value
from fedchain.consensus.tx import Transaction, sign_transaction
from fedchain.p2p.identity import Identity

CHAIN = "contracts-test"
ALICE = Identity(b"a" * 32)
BOB = Identity(b"b" * 32)
VALIDATORS = [Identity(bytes([i + 1]) * 32) for i in range(4)]
CONTEXT = BlockContext(CHAIN, 1, 1000, VALIDATORS[0].public_key)


def tx(who: Identity, nonce: int, content: bytes, kind: str = "kv") -> Transaction:
    return sign_transaction(who, CHAIN, type=kind, content=content, nonce=nonce, timestamp=0)


def run(
    state: State, txs: list[Transaction], registry: ContractRegistry | None = None
) -> tuple[State, list[TxResult]]:
    return execute_transactions(state, txs, registry or default_registry(), CONTEXT)


def genesis_state() -> State:
    return Genesis.create(CHAIN, 0, [v.public_key for v in VALIDATORS]).state()


def test_kv_set_and_delete_in_the_senders_namespace() -> None:
    state, results = run(
        State(),
        [
            tx(ALICE, 0, kv_set("x", {"n": 1})),
            tx(BOB, 0, kv_set("x", "bob's")),
            tx(ALICE, 1, kv_delete("x")),
        ],
    )
    assert results == [TxResult(0)] * 3
    assert kv_key(ALICE.public_key, "x") not in state
    assert state.get(kv_key(BOB.public_key, "x")) == "bob's"
    assert next_nonce(state, ALICE.public_key) == 2 and next_nonce(state, BOB.public_key) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=128),
    st.recursive(
        st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=10,
    ),
)
def test_property_a_kv_set_stores_the_values_canonical_encoding(key: str, value: object) -> None:
    """The stored bytes are a slice of the content (not a second encoding):
    whatever the key's and the value's msgpack widths, the slice is exactly
    the value's canonical encoding."""
    state, results = run(State(), [tx(ALICE, 0, kv_set(key, value))])
    full = kv_key(ALICE.public_key, key)
    if len(full.encode()) > MAX_KEY_BYTES:  # 128 characters may take 512 bytes
        assert results == [TxResult(1, "kv key too long: over 512 bytes with its namespace")]
        return
    assert results == [TxResult(0)]
    assert state.get_encoded(full) == encode_value(value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xc1", "malformed kv content"),
        (encode_value(["put", "k", 1]), "kv content is [set, key, value] or [del, key]"),
        (encode_value(["set", "k"]), "kv content is [set, key, value] or [del, key]"),
        (encode_value(["set", "", 1]), "kv key is a string of 1..128 characters"),
        (encode_value(["set", "k", None]), "kv value is not nil"),
        (kv_delete("missing"), "no such key"),
        (
            kv_set("\N{GRINNING FACE}" * 128, 1),
            "kv key too long: over 512 bytes with its namespace",
        ),
    ],
)
def test_kv_rejections_are_recorded_with_their_reason(content: bytes, reason: str) -> None:
    state, results = run(State(), [tx(ALICE, 0, content)])
    assert results == [TxResult(1, reason)]
    assert state.keys() == [f"sys/nonce/{ALICE.public_key.hex()}"]  # the nonce is used


wide = st.characters(min_codepoint=0x10000, max_codepoint=0x1F9FF)  # 4 bytes each in UTF-8
wide_text = st.text(wide, max_size=130)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | wide_text,
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)
kv_shaped = st.builds(
    lambda op, key, value: [op, key, value] if op == "set" else [op, key],
    st.sampled_from(["set", "del"]),
    st.text(max_size=130) | wide_text | st.text(wide, min_size=100, max_size=130),
    values,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["kv", "validators"]), values | kv_shaped), max_size=6))
def test_property_any_content_for_any_contract_is_a_result_never_an_error(ops) -> None:
    """Whatever a client puts in a transaction (wide Unicode keys
    included), execution gives one result per transaction and never
    raises: a raise here would fail the whole proposal."""
    txs = [tx(ALICE, n, encode_value(value), kind) for n, (kind, value) in enumerate(ops)]
    state, results = run(genesis_state(), txs)
    assert len(results) == len(txs)
    assert next_nonce(state, ALICE.public_key) == len(txs)


def test_nonces_refuse_replays_and_gaps_without_consuming() -> None:
    first = tx(ALICE, 0, kv_set("k", 1))
    state, results = run(State(), [first, first, tx(ALICE, 5, kv_set("k", 2))])
    assert results == [
        TxResult(0),
        TxResult(1, "bad nonce: expected 1"),
        TxResult(1, "bad nonce: expected 1"),
    ]
    assert next_nonce(state, ALICE.public_key) == 1
    assert state.get(kv_key(ALICE.public_key, "k")) == 1
    _, again = run(state, [first])
    assert again == [TxResult(1, "bad nonce: expected 1")]


class WritesThenRefuses:
    def apply(self, view: StateView, tx: Transaction) -> None:
        view.set("half", "applied")
        raise ContractRejected("changed my mind")


class Buggy:
    def apply(self, view: StateView, tx: Transaction) -> None:
        view.set("half", "applied")
        {}["missing"]  # a contract bug


class WritesALongKey:
    def apply(self, view: StateView, tx: Transaction) -> None:
        view.set("k" * (MAX_KEY_BYTES + 1), 1)


class ReadsContext:
    def apply(self, view: StateView, tx: Transaction) -> None:
        view.set("seen", [view.context.height, view.context.timestamp, view.get("seen", 0)])


def test_nothing_is_half_applied() -> None:
    registry = default_registry()
    registry.register("refuse", WritesThenRefuses())
    registry.register("bug", Buggy())
    state, results = run(
        State(),
        [tx(ALICE, 0, b"", "refuse"), tx(ALICE, 1, b"", "bug"), tx(ALICE, 2, b"", "nope")],
        registry,
    )
    assert results == [
        TxResult(1, "changed my mind"),
        TxResult(1, "contract error: KeyError"),
        TxResult(1, "unknown type 'nope'"),
    ]
    assert "half" not in state
    assert next_nonce(state, ALICE.public_key) == 3


def test_a_key_the_state_cannot_hold_rejects_the_transaction_not_the_block() -> None:
    """A contract's write is checked as it is made: a key over the state's
    bound is that transaction's error, recorded, and the block builds (it
    used to fail the block's State.apply: one client could stall the
    primary with a kv key of 128 four-byte characters)."""
    registry = default_registry()
    registry.register("long", WritesALongKey())
    state, results = run(
        State(), [tx(ALICE, 0, b"", "long"), tx(ALICE, 1, kv_set("k", 1))], registry
    )
    assert results == [TxResult(1, "contract error: ValueError"), TxResult(0)]
    assert state.get(kv_key(ALICE.public_key, "k")) == 1


def test_a_transaction_sees_earlier_writes_of_its_block() -> None:
    registry = ContractRegistry({"ctx": ReadsContext()})
    state, results = run(State(), [tx(ALICE, 0, b"", "ctx"), tx(BOB, 0, b"", "ctx")], registry)
    assert all(r.ok for r in results)
    assert state.get("seen") == [1, 1000, [1, 1000, 0]]


def test_registry_is_explicit() -> None:
    registry = ContractRegistry()
    registry.register("kv", KvContract())
    assert "kv" in registry and registry.get("validators") is None
    with pytest.raises(ValueError):
        registry.register("kv", KvContract())
    assert list(default_registry()) == ["kv", "validators"]


def test_execution_is_deterministic() -> None:
    txs = [tx(ALICE, i, kv_set(f"k{i}", i)) for i in range(20)]
    a, ra = run(State(), txs)
    b, rb = run(State(), txs)
    assert a.root == b.root and ra == rb


def change(new_set: list[bytes], signers: list[Identity], epoch: int = 0) -> bytes:
    approvals = [(s.public_key, sign_validator_change(s, CHAIN, epoch, new_set)) for s in signers]
    return validator_change_content(new_set, approvals)


def test_validator_set_changes_with_a_quorum_of_approvals() -> None:
    state = genesis_state()
    assert validators_of(state) == sorted(v.public_key for v in VALIDATORS)
    new_set = sorted([VALIDATORS[0].public_key, ALICE.public_key, BOB.public_key])
    state, results = run(state, [tx(ALICE, 0, change(new_set, VALIDATORS[:3]), "validators")])
    assert results == [TxResult(0)]
    assert validators_of(state) == new_set and validator_epoch(state) == 1


def test_validator_change_refusals() -> None:
    state = genesis_state()
    new_set = sorted([ALICE.public_key])
    outsiders = [ALICE, BOB, Identity(b"c" * 32)]
    cases = [
        (change(new_set, VALIDATORS[:2]), "2 approvals, 3 needed"),
        (change(new_set, outsiders), "0 approvals, 3 needed"),
        (change(new_set, VALIDATORS[:3], epoch=1), "0 approvals, 3 needed"),
        (encode_value([[b"x"], []]), "validators are sorted distinct 32-byte keys"),
        (encode_value([[], []]), "validators are sorted distinct 32-byte keys"),
        (encode_value([[ALICE.public_key] * 2, []]), "validators are sorted distinct 32-byte keys"),
        (encode_value([new_set, [[b"k"]]]), "approvals are [key, signature] pairs"),
        (encode_value([new_set]), "content is [validators, approvals]"),
    ]
    for nonce, (content, reason) in enumerate(cases):
        state, results = run(state, [tx(BOB, nonce, content, "validators")])
        assert results == [TxResult(1, reason)]
    assert validator_epoch(state) == 0
    _, results = run(State(), [tx(BOB, 0, change(new_set, outsiders), "validators")])
    assert results == [TxResult(1, "no validator set to approve a change")]


def test_validator_approvals_are_single_use() -> None:
    state = genesis_state()
    new_set = sorted([ALICE.public_key] + [v.public_key for v in VALIDATORS[1:]])
    content = change(new_set, VALIDATORS[:3])
    state, results = run(state, [tx(ALICE, 0, content, "validators")])
    assert results[0].ok and validator_epoch(state) == 1
    _, results = run(state, [tx(ALICE, 1, content, "validators")])
    assert results == [TxResult(1, "0 approvals, 3 needed")]  # replayed approvals
    back = sorted(v.public_key for v in VALIDATORS)
    _, results = run(state, [tx(ALICE, 1, change(back, VALIDATORS[1:], epoch=1), "validators")])
    assert results[0].ok  # the current set, signing the current epoch
    _, results = run(state, [tx(ALICE, 1, change(back, VALIDATORS[:1], epoch=1), "validators")])
    assert results == [TxResult(1, "0 approvals, 3 needed")]  # a removed validator
