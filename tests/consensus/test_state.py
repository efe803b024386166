"""The state: canonical values, a deterministic two-level root, proofs of
presence and absence that a client checks with the root alone."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus import merkle
from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.state import (
    State,
    StateProof,
    bucket_of,
    decode_value,
    encode_value,
    packed_key,
    verify_state_proof,
)

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
stored = values.filter(lambda v: v is not None)
keys = st.text(min_size=1, max_size=12)


def test_encoding_sorts_map_keys_and_turns_tuples_into_arrays() -> None:
    assert encode_value({"b": 1, "a": (2, 3)}) == msgpack.packb({"a": [2, 3], "b": 1})
    assert encode_value({"b": 1, "a": 2}) == encode_value({"a": 2, "b": 1})


@pytest.mark.parametrize("bad", [1.5, {1: 2}, {b"k": 1}, 2**64, -(2**63) - 1, {1, 2}, object()])
def test_encoding_refuses_what_is_not_a_state_value(bad: object) -> None:
    with pytest.raises(ValueError):
        encode_value(bad)


def test_decoding_is_strict() -> None:
    for data in (
        msgpack.packb({"b": 1, "a": 2}),  # unsorted map
        b"\xcf" + (1).to_bytes(8, "big"),  # wide int
        b"\x92\xa1k\xcf" + (1).to_bytes(8, "big"),  # wide int in a flat array
        b"\x92\xd9\x01k\x01",  # str 8 for a short string, in a flat array
        msgpack.packb(["k", 1.5]),  # a float in a flat array
        msgpack.packb(["k", {"b": 1, "a": 2}]),  # unsorted map inside an array
        msgpack.packb(1.5),
        b"\x01\x02",  # trailing bytes
        b"\xc1",  # never used
    ):
        with pytest.raises(MalformedMessage):
            decode_value(data)


@settings(max_examples=200, deadline=None)
@given(values)
def test_property_value_roundtrip(value: object) -> None:
    data = encode_value(value)
    assert encode_value(decode_value(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_property_any_bytes_decode_or_raise_malformed(data: bytes) -> None:
    try:
        value = decode_value(data)
    except MalformedMessage:
        return
    assert encode_value(value) == data


def _bucket_hash(leaves: list[bytes]) -> bytes:
    """From the definition: SHA-256(0x02 || size (8 bytes) || leaf hashes),
    the leaves in byte order."""
    hashes = b"".join(merkle.leaf_hash(leaf) for leaf in sorted(leaves))
    return hashlib.sha256(b"\x02" + len(leaves).to_bytes(8, "big") + hashes).digest()


def _domain_root(buckets: int, top: bytes) -> bytes:
    return hashlib.sha256(b"fedchain/state/v4\x00" + buckets.to_bytes(4, "big") + top).digest()


def _reference_top(bucket_hashes: list[bytes]) -> bytes:
    """The top root from its definition, one level at a time: the buckets'
    hashes, then SHA-256(0x01 || up to 16 children) per parent, 16 to a
    group while 16 or more remain, then one group of the rest."""
    level = list(bucket_hashes)
    while len(level) > 1:
        group = 16 if len(level) >= 16 else len(level)
        level = [
            hashlib.sha256(b"\x01" + b"".join(level[i : i + group])).digest()
            for i in range(0, len(level), group)
        ]
    return level[0]


def test_root_in_closed_form_with_one_bucket() -> None:
    state = State({"b": 2, "a": [1]}, buckets=1)
    leaves = [msgpack.packb(["a", [1]]), msgpack.packb(["b", 2])]
    top = _bucket_hash(leaves)
    assert state.root == _domain_root(1, top)


def test_empty_state_root_matches_an_explicit_empty_tree() -> None:
    for buckets in (2, 8, 16, 64, 16384):
        top = _reference_top([_bucket_hash([])] * buckets)
        assert State(buckets=buckets).root == _domain_root(buckets, top)


def test_root_depends_only_on_content_not_history() -> None:
    a = State({"x": 1, "y": 2})
    b = State().update({"y": 2}).update({"z": 3}).update({"x": 1, "z": None})
    assert a.root == b.root and len(a) == len(b) == 2
    assert a.update({"x": 2}).root != a.root
    assert State({"x": 1}, buckets=64).root != State({"x": 1}, buckets=128).root


def test_snapshots_are_immutable() -> None:
    parent = State({"k": [1, 2]})
    root = parent.root
    child = parent.update({"k": [3], "new": "v"})
    assert parent.get("k") == [1, 2] and "new" not in parent and parent.root == root
    assert child.get("k") == [3] and child.get("new") == "v"
    got = child.get("k")
    got.append(99)  # type: ignore[union-attr]
    assert child.get("k") == [3]


def test_keys_items_and_limits() -> None:
    state = State({"b/2": 2, "a": 1, "b/1": 1})
    assert state.keys() == ["a", "b/1", "b/2"]
    assert state.items("b/") == [("b/1", 1), ("b/2", 2)]
    for bad in ("", "k" * 513):
        with pytest.raises(ValueError):
            state.update({bad: 1})
    with pytest.raises(ValueError):
        state.apply({"k": "not encoded"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        State(buckets=3)


def test_proofs_of_presence_and_absence() -> None:
    state = State({f"k{i:03d}": i for i in range(200)}, buckets=4)
    for key in ("k000", "k137", "k199"):
        value, proof = state.prove(key)
        assert value == int(key[1:])
        assert verify_state_proof(key, value, proof, state.root)
        assert not verify_state_proof(key, value + 1, proof, state.root)
        assert not verify_state_proof(key, None, proof, state.root)
        assert not verify_state_proof(key, value, proof, State().root)
        # Proofs hold bytes, whatever buffer the state keeps its levels in.
        assert type(proof.top_root) is bytes and {type(h) for h in proof.top_path} == {bytes}
    for key in ("a", "k0005", "k1", "zzz"):  # before, between, after
        value, proof = state.prove(key)
        assert value is None
        assert verify_state_proof(key, None, proof, state.root)
        assert not verify_state_proof(key, 0, proof, state.root)
    empty = State(buckets=4)
    value, proof = empty.prove("anything")
    assert value is None and verify_state_proof("anything", None, proof, empty.root)


def test_absence_cannot_be_claimed_for_a_present_key() -> None:
    state = State({f"k{i}": i for i in range(50)}, buckets=1)
    _, before = state.prove("k10")
    (leaf,) = before.leaves
    in_bucket_order = sorted(state.keys(), key=packed_key)
    assert in_bucket_order[leaf.index] == "k10"
    _, low = state.prove(in_bucket_order[leaf.index - 1])
    _, high = state.prove(in_bucket_order[leaf.index + 1])
    skipping = before._replace(leaves=(low.leaves[0], high.leaves[0]))  # genuine, not neighbours
    assert not verify_state_proof("k10", None, skipping, state.root)
    # a neighbour's proof for another key in its gap does not transfer
    _, gap = state.prove("k10a")
    assert verify_state_proof("k10a", None, gap, state.root)
    assert not verify_state_proof("k10", None, gap, state.root)


def test_a_bucket_orders_keys_by_their_packed_bytes_not_as_str() -> None:
    """Leaves sit in byte order, and a packed key starts with its length:
    "b" (0xa1 ...) comes before "aa" (0xa2 ...), and every fixstr before a
    str8 ("x" * 40). Absence is proved, and only proved, by neighbours in
    that order."""
    long = "x" * 40
    state = State({"b": 1, "aa": 2, long: 3, "é": 4}, buckets=1)
    order = ["b", "aa", "é", long]  # "é" is two bytes in UTF-8
    assert sorted(state.keys(), key=packed_key) == order
    assert [state.prove(k)[1].leaves[0].index for k in order] == [0, 1, 2, 3]
    for absent, neighbours in (
        ("a", (None, "b")),  # packed before everything
        ("c", ("b", "aa")),  # after "b", before "aa": in str order it would follow "aa"
        ("ab", ("aa", "é")),
        ("y" * 31, ("é", long)),  # the longest fixstr, before any str8
        ("y" * 40, (long, None)),
    ):
        value, proof = state.prove(absent)
        assert value is None and verify_state_proof(absent, None, proof, state.root)
        assert tuple(leaf.key for leaf in proof.leaves) == tuple(k for k in neighbours if k)
    # neighbours in str order ("aa" < "b") prove nothing about "ab"
    _, aa = state.prove("aa")
    _, b = state.prove("b")
    str_order = aa._replace(leaves=(aa.leaves[0], b.leaves[0]))
    assert not verify_state_proof("ab", None, str_order, state.root)


# Keys whose packed headers differ: fixstr (< 32 bytes), str8 (< 256) and
# str16, so one bucket orders them across header kinds.
wide_keys = st.text(alphabet="ab\u00e9\u4e2d", min_size=1, max_size=3) | st.builds(
    lambda base, extra: base * extra, st.sampled_from(["a", "b", "\u00e9"]), st.integers(15, 140)
)


@settings(max_examples=150, deadline=None)
@given(st.sets(wide_keys, min_size=1, max_size=12), st.lists(wide_keys, max_size=6))
def test_property_one_bucket_across_key_widths(present: set, probes: list) -> None:
    """Whatever the keys' widths, one bucket's leaves read back as its keys
    and values, each key's presence and every other key's absence (by its
    neighbours in the bucket's byte order) verify against the root, and
    nothing verifies the other way round."""
    content = {key: i for i, key in enumerate(sorted(present))}
    state = State(content, buckets=1)
    assert state.keys() == sorted(content) and state.items() == sorted(content.items())
    for key in [*content, *probes]:
        value, proof = state.prove(key)
        assert value == content.get(key)
        assert verify_state_proof(key, value, proof, state.root)
        assert not verify_state_proof(key, None if key in content else 0, proof, state.root)


def test_an_altered_bucket_does_not_verify() -> None:
    """The proof carries the bucket's leaf hashes: dropping, adding or
    reordering one changes the bucket's commitment, and a leaf must hash to
    the entry at its index."""
    state = State({f"k{i}": i for i in range(30)}, buckets=2)
    value, proof = state.prove("k7")
    hashes = proof.bucket_hashes
    (leaf,) = proof.leaves
    for forged in (
        proof._replace(bucket_hashes=hashes[1:]),
        proof._replace(bucket_hashes=(*hashes, hashes[0])),
        proof._replace(bucket_hashes=hashes[::-1]),
        proof._replace(leaves=(leaf._replace(index=leaf.index + 1),)),
    ):
        assert not verify_state_proof("k7", value, forged, state.root)
    # absence without a neighbour holds only for an empty bucket
    assert not verify_state_proof("k7a", None, proof._replace(leaves=()), state.root)


def test_an_altered_top_path_does_not_verify() -> None:
    """Each level of the top path holds the other members of the key's
    16-way group (the last level: what is left), in order: flipping a bit,
    moving the slot, cutting a hash or a level, or claiming another bucket
    count refuses the proof. 512 buckets: groups of 16, 16, then 2."""
    state = State({f"k{i}": i for i in range(600)}, buckets=512)
    value, proof = state.prove("k7")
    assert [len(level) for level in proof.top_path] == [15 * 32, 15 * 32, 32]
    assert verify_state_proof("k7", value, proof, state.root)
    path = proof.top_path
    for level in range(3):
        flipped = bytes([path[level][0] ^ 1]) + path[level][1:]
        rotated = path[level][32:] + path[level][:32]
        for changed in {flipped, rotated, path[level][32:]} - {path[level]}:
            forged = proof._replace(top_path=(*path[:level], changed, *path[level + 1 :]))
            assert not verify_state_proof("k7", value, forged, state.root)
    assert not verify_state_proof("k7", value, proof._replace(top_path=path[:-1]), state.root)
    assert not verify_state_proof("k7", value, proof._replace(buckets=1024), state.root)
    assert not verify_state_proof("k7", value, proof._replace(top_path=list(path)), state.root)


def test_verify_never_raises_on_garbage() -> None:
    state = State({"a": 1})
    _, proof = state.prove("a")
    junk = StateProof(3, b"", ("x",), (b"",), ())  # type: ignore[arg-type]
    assert not verify_state_proof("a", 1, junk, state.root)
    assert not verify_state_proof("", 1, proof, state.root)
    assert not verify_state_proof("a", 1.5, proof, state.root)
    assert not verify_state_proof("a", 1, None, state.root)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(keys, stored, max_size=30), keys, st.sampled_from([1, 2, 8, 32, 512]))
def test_property_every_key_proves(content: dict, probe: str, buckets: int) -> None:
    state = State(content, buckets=buckets)
    for key in [*content, probe]:
        value, proof = state.prove(key)
        assert value == (state.get(key))
        assert verify_state_proof(key, value, proof, state.root)
        if value is None:
            assert key not in content
            assert not verify_state_proof(key, "other", proof, state.root)
        else:
            assert not verify_state_proof(key, None, proof, state.root)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(keys, stored, max_size=20), st.dictionaries(keys, stored | st.none()))
def test_property_apply_equals_building_from_scratch(base: dict, changes: dict) -> None:
    merged = {**base, **changes}
    merged = {k: v for k, v in merged.items() if v is not None}
    assert State(base, buckets=4).update(changes).root == State(merged, buckets=4).root


def _reference_root(content: dict, buckets: int) -> bytes:
    """The root from its definition alone: per bucket the hash of its size
    and its [key, value] leaves' hashes in byte order, then the 16-way tree
    over the buckets' hashes."""
    hashes = []
    for index in range(buckets):
        members = [k for k in content if bucket_of(k, buckets) == index]
        hashes.append(_bucket_hash([encode_value([k, content[k]]) for k in members]))
    return _domain_root(buckets, _reference_top(hashes))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.dictionaries(keys, stored | st.none(), max_size=12), max_size=6),
    st.sampled_from([1, 2, 8, 32, 64, 512]),
)
def test_property_many_small_applies_match_a_plain_reference(batches: list, buckets: int) -> None:
    """The incremental bucket and top-tree hashing (in place, flat levels)
    gives the root of the plain definition, built in one go or block by block."""
    state = State(buckets=buckets)
    merged: dict = {}
    for batch in batches:
        state = state.update(batch)
        merged.update(batch)
    content = {k: v for k, v in merged.items() if v is not None}
    assert state.root == State(content, buckets=buckets).root == _reference_root(content, buckets)
    assert len(state) == len(content)
    for key in [*list(content)[:3], "absent?"]:
        value, proof = state.prove(key)
        assert value == content.get(key)
        assert verify_state_proof(key, value, proof, state.root)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=200) | st.text(min_size=100, max_size=512))
def test_property_packed_key_is_msgpacks_encoding(key: str) -> None:
    assert packed_key(key) == msgpack.packb(key)


@pytest.mark.parametrize("size", [31, 32, 255, 256, 65535, 65536])
def test_packed_key_at_each_msgpack_string_width(size: int) -> None:
    assert packed_key("k" * size) == msgpack.packb("k" * size)
