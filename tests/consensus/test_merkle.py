"""RFC 6962 Merkle trees, checked against the RFC's recursive definitions
(written here as plainly as the RFC states them) and against published
Certificate Transparency test vectors."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.consensus import merkle


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(d: list[bytes]) -> bytes:
    """RFC 6962 2.1: MTH(D[n])."""
    n = len(d)
    if n == 0:
        return sha(b"")
    if n == 1:
        return sha(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return sha(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 6962 2.1.1: PATH(m, D[n])."""
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    """RFC 6962 2.1.2: SUBPROOF(m, D[n], b)."""
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


leaf_lists = st.lists(st.binary(max_size=8), min_size=1, max_size=40)

# RFC 6962's reference test data (as used by Certificate Transparency's
# implementations): eight leaves and the roots of their prefixes.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_published_roots():
    assert merkle.root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    for size, expected in enumerate(CT_ROOTS, start=1):
        assert merkle.root(CT_LEAVES[:size]).hex() == expected


def test_published_inclusion_and_consistency_paths():
    assert [p.hex() for p in merkle.inclusion_proof(CT_LEAVES, 0)] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [p.hex() for p in merkle.consistency_proof(CT_LEAVES, 1)] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]


@given(leaf_lists)
@settings(max_examples=200, deadline=None)
def test_root_matches_the_rfc_definition(leaves):
    assert merkle.root(leaves) == mth(leaves)
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    assert merkle.root_of_leaf_hashes(hashes) == mth(leaves)


@given(st.lists(st.sampled_from([b"ok", b"no", b""]), max_size=80))
@settings(max_examples=200, deadline=None)
def test_a_root_over_repeated_leaves_matches_the_rfc_definition(leaves):
    """Repeated leaves (a block's results) hash each distinct pair once."""
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    assert merkle.root_of_leaf_hashes(hashes) == mth(leaves) == merkle.root(leaves)


@given(leaf_lists, st.data())
@settings(max_examples=200, deadline=None)
def test_inclusion_proofs_match_and_verify(leaves, data):
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle.inclusion_proof(leaves, index)
    assert proof == path(index, leaves)
    top = merkle.root(leaves)
    assert merkle.verify_inclusion(leaves[index], index, len(leaves), proof, top)
    assert not merkle.verify_inclusion(leaves[index] + b"x", index, len(leaves), proof, top)
    if len(leaves) > 1:
        assert not merkle.verify_inclusion(leaves[index], index, len(leaves), proof[:-1], top)


@given(leaf_lists, st.data())
@settings(max_examples=200, deadline=None)
def test_consistency_proofs_match_and_verify(leaves, data):
    old = data.draw(st.integers(1, len(leaves)))
    proof = merkle.consistency_proof(leaves, old)
    expected = [] if old == len(leaves) else subproof(old, leaves, True)
    assert proof == expected
    old_root, new_root = merkle.root(leaves[:old]), merkle.root(leaves)
    assert merkle.verify_consistency(old, len(leaves), old_root, new_root, proof)
    assert not merkle.verify_consistency(old, len(leaves), sha(b"no"), new_root, proof)
    if proof:
        bent = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
        assert not merkle.verify_consistency(old, len(leaves), old_root, new_root, bent)


def test_the_empty_tree_is_a_prefix_of_every_tree():
    leaves = [b"a", b"b"]
    assert merkle.consistency_proof(leaves, 0) == []
    assert merkle.verify_consistency(0, 2, merkle.EMPTY_ROOT, merkle.root(leaves), [])
    assert not merkle.verify_consistency(0, 2, sha(b"x"), merkle.root(leaves), [])


@given(
    st.integers(-3, 50),
    st.integers(-3, 50),
    st.lists(st.binary(max_size=40), max_size=8),
    st.binary(max_size=40),
)
@settings(max_examples=300, deadline=None)
def test_verifiers_never_raise_on_garbage(index, size, proof, top):
    assert merkle.verify_inclusion(b"leaf", index, size, proof, top) in (True, False)
    assert merkle.verify_consistency(index, size, top, top, proof) in (True, False)


def test_out_of_range_requests_are_errors():
    with pytest.raises(IndexError):
        merkle.inclusion_proof([b"a"], 1)
    with pytest.raises(ValueError):
        merkle.consistency_proof([b"a"], 2)


def test_no_second_preimage_by_duplicating_the_last_leaf():
    """Bitcoin's odd-level duplication made [a, b, c] and [a, b, c, c] collide."""
    assert merkle.root([b"a", b"b", b"c"]) != merkle.root([b"a", b"b", b"c", b"c"])
