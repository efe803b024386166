"""Merkle trees as RFC 6962 / RFC 9162 define them (Certificate Transparency).

Leaf hash ``SHA-256(0x00 || leaf)``, node hash ``SHA-256(0x01 || left ||
right)``, and a tree of any size split at the largest power of two below
it. Following the RFC exactly, rather than Bitcoin's duplicate-the-last-leaf
scheme, means no two different leaf lists share a root (Bitcoin's
CVE-2012-2459), and anyone can check our inclusion and consistency proofs
with any RFC 6962 verifier.

The functions take the whole leaf list; a block holds at most a few
thousand transactions, so recomputing is cheaper than maintaining a tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "root_of_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves, bottom-up (iterative, no recursion).

    Pairing adjacent nodes level by level and carrying an odd last node up
    unchanged builds exactly the RFC's left-balanced tree. The hash is
    inlined (no :func:`node_hash` call per node): every block computes two
    roots over ~1,000 leaves on every validator."""
    level = list(hashes)
    sha256 = hashlib.sha256
    while len(level) > 1:
        paired = [
            sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]); the empty tree's root is SHA-256 of the empty string."""
    if not leaves:
        return EMPTY_ROOT
    sha256 = hashlib.sha256
    return _root_of_hashes([sha256(b"\x00" + leaf).digest() for leaf in leaves])


def root_of_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """:func:`root` given the leaves' hashes (``leaf_hash`` of each), for
    callers whose leaves repeat (a block's results are mostly "ok") and
    hash each distinct leaf once. Repeated leaves make repeated pairs at
    every level, so each distinct pair is hashed once too: a block of
    1,000 "ok" results costs ~10 node hashes, not ~1,000."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    sha256 = hashlib.sha256
    known: dict[bytes, bytes] = {}
    while len(level) > 1:
        paired = []
        for i in range(0, len(level) - 1, 2):
            pair = level[i] + level[i + 1]
            node = known.get(pair)
            if node is None:
                node = known[pair] = sha256(b"\x01" + pair).digest()
            paired.append(node)
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf ``index`` (RFC 6962 2.1.1)."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} is not in a tree of {len(leaves)}")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return _path(index, hashes)


def _path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    n = len(hashes)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, hashes[:k]), _root_of_hashes(hashes[k:])]
    return [*_path(m - k, hashes[k:]), _root_of_hashes(hashes[:k])]


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows ``leaf`` at ``index`` of the tree of ``size``
    leaves with ``root`` (RFC 9162 2.1.3.2). Never raises on bad input."""
    if not 0 <= index < size or any(len(p) != 32 for p in proof):
        return False
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]): shows the first ``old_size`` leaves' tree is a prefix
    of this one (RFC 6962 2.1.2)."""
    n = len(leaves)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} is not within 0..{n}")
    if old_size in (0, n):
        return []
    return _subproof(old_size, [leaf_hash(leaf) for leaf in leaves], True)


def _subproof(m: int, hashes: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [_root_of_hashes(hashes)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, hashes[:k], complete), _root_of_hashes(hashes[k:])]
    return [*_subproof(m - k, hashes[k:], False), _root_of_hashes(hashes[:k])]


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree of ``old_size`` leaves with
    ``old_root`` is a prefix of the tree of ``new_size`` with ``new_root``
    (RFC 9162 2.1.4.2). Never raises on bad input."""
    if not 0 <= old_size <= new_size or any(len(p) != 32 for p in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT  # a prefix of every tree
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
