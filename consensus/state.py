"""The ledger state: an immutable key/value snapshot with a provable root.

Keys are strings; values are msgpack-able data (None, bool, int, str, bytes,
lists, string-keyed maps) stored in one canonical encoding, so every replica
that applies the same writes holds the same bytes and the same root. Floats
are refused: contracts that need fractions use fixed-point integers, which
is what the serverless round's bit-exact aggregation needs anyway.

Why two levels. One RFC 6962 tree over all sorted (key, value) pairs is the
plain design, but an insertion shifts every later leaf, so each block would
rehash everything to the right of its first new key: measured at ~120 ms
for 100k keys on this machine, i.e. ~120 µs per transaction of a 1000-tx
block. Instead each key lives in one of ``buckets`` fixed hash buckets
(first 4 bytes of SHA-256(key)); a bucket commits to its size and its
leaves (the msgpack arrays [key, value], in byte order) by one hash,
SHA-256(0x02 || size || their RFC 6962 leaf hashes end to end), and the
top is a 16-way tree over the buckets' hashes (SHA-256(0x01 || up to 16
children) per parent), kept level by level so a block rehashes only the
buckets it touched and their paths to the top.
Choose ``buckets`` (a genesis parameter) near keys / 8.

Why a flat bucket and not a tree per bucket (as up to v1): a touched
bucket is rebuilt whole either way, and a tree over its ~8-12 leaves cost
one Python-level hash call per node, while one call over the concatenated
leaf hashes costs about one node's. A 2,000-write apply on 200k keys (a
1,000-transaction block) went from ~63 to ~38 ms (A/B in the same minute).
The price is proof size: a proof carries the bucket's leaf hashes (32
bytes per key in the bucket, ~400 bytes at 12 per bucket) instead of a
path of log2 of them. A bucket someone crowds on purpose (grinding keys
into it takes ~``buckets`` tries a key) costs its writers and its provers
linearly, as a per-bucket tree rebuilt whole did.

Why 16-way at the top (v3; v2 was RFC 6962's binary tree): a write's path
to the root is 4 hashes of up to 512 bytes instead of 14 of 64 (16,384
buckets), and in Python each hash call costs far more than its bytes. A
140-write apply (a 70-transaction block) went from 2.51 to 1.68 ms, a
2,000-write one from 29.6 to 22.9 ms, verifying a proof from 21 to 16 µs
(interleaved A/B in one process). The price is proof size: each level of
the path carries the other 15 members of the node's group, 1,536 bytes
at 16,384 buckets against 448.

What v4 changed, for the two writes (a nonce and a value) that every
transaction makes on every validator: a bucket's hash is the top tree's
leaf itself (v3 took the RFC 6962 leaf hash of ``size || SHA-256(0x02 ||
hashes)``: one hash call more per touched bucket; the 0x02 prefix already
keeps a bucket apart from an interior node, 0x01, which is all that leaf
hash added), and a bucket holds whole leaves in byte order instead of keys
then values in str order (see ``_Bucket``). A 2,000-write apply on 250k
keys went from 7.0-10.1 to 5.8-8.4 µs a write (seven interleaved runs
each, with ``tune_for_throughput``'s collector settings).

Both levels bind their sizes (the bucket count is in the root, each
bucket's size in its hash), so a proof fixes the leaf's index, and
absence is proved by the key's two neighbours in its bucket's order (or
by the bucket being empty). Snapshots share untouched buckets (copy-on-write:
a child costs the touched buckets, ``buckets`` references and ~64 bytes per
bucket for the top tree's levels).
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, TypeAlias

import msgpack

from .errors import MalformedMessage

__all__ = [
    "DEFAULT_BUCKETS",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "ProofLeaf",
    "State",
    "StateProof",
    "bucket_of",
    "check_key",
    "decode_value",
    "encode_value",
    "packed_key",
    "verify_state_proof",
]

DEFAULT_BUCKETS = 16384
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1024 * 1024
_MAX_DEPTH = 16
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_ROOT_DOMAIN = b"fedchain/state/v4\x00"
_BUCKET_DOMAIN = b"\x02"
"""Distinct from RFC 6962's leaf (0x00) and node (0x01) prefixes."""
_index_of_digest = struct.Struct(">I").unpack_from
"""The first 4 bytes of a digest as an int (~0.1 µs less than slicing
and ``int.from_bytes``; it runs for every read and write)."""
_FAN_OUT_BITS = 4
"""The top tree groups 16 nodes under each parent (the last level: what is left)."""
MAX_TOP_LEVELS = 5
"""Levels of a proof's top path at most: 2**20 buckets in 16-way groups."""
MAX_TOP_SIBLINGS = (1 << _FAN_OUT_BITS) - 1
"""Hashes in one level of a proof's top path at most: the rest of a group."""
_sha256 = hashlib.sha256


def _normalize(value: object, depth: int = 0) -> object:
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is bytes:
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            raise ValueError("integer out of msgpack range")
        return value
    if kind is list or kind is tuple:
        return [_normalize(v, depth + 1) for v in value]  # type: ignore[attr-defined]
    if kind is dict:
        if any(type(k) is not str for k in value):  # type: ignore[attr-defined]
            raise ValueError("map keys are strings")
        return {k: _normalize(value[k], depth + 1) for k in sorted(value)}  # type: ignore[index]
    raise ValueError(f"{kind.__name__} is not a state value")


def encode_value(value: object) -> bytes:
    """The one canonical encoding of a state value (maps sorted by key).

    Raises ValueError for anything that is not a state value."""
    return msgpack.packb(_normalize(value), use_bin_type=True)


_FLAT = frozenset({str, bytes, int, bool, type(None)})
"""Types that :func:`_normalize` passes through unchanged (an int that
msgpack decoded is always in range)."""


def decode_value(data: bytes, *, max_bytes: int = MAX_VALUE_BYTES) -> object:
    """Strictly decode bytes from a peer or client as one canonical value."""
    if len(data) > max_bytes:
        raise MalformedMessage("value too large")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
        )
        if type(value) is list and _FLAT.issuperset(map(type, value)):
            # What every kv transaction's content is: encode_value without
            # _normalize, which would change nothing here (msgpack's ints
            # are in range by construction): 1.35 -> 0.92 µs a decode (timeit).
            canonical = msgpack.packb(value, use_bin_type=True)
        else:
            canonical = encode_value(value)
    except Exception as exc:
        raise MalformedMessage(f"not a state value: {exc.__class__.__name__}") from exc
    if canonical != data:
        raise MalformedMessage("non-canonical value encoding")
    return value


def check_key(key: object) -> bytes:
    """Raise ValueError unless ``key`` is a valid state key; its UTF-8 bytes."""
    if type(key) is not str or not key:
        raise ValueError("a state key is a non-empty string")
    raw = key.encode()
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError("state key too long")
    return raw


def bucket_of(key: str, buckets: int) -> int:
    """Which bucket holds ``key``: SHA-256(key) mod ``buckets`` (a power of two)."""
    return _index_of_digest(_sha256(key.encode()).digest())[0] & (buckets - 1)


def packed_key(key: str) -> bytes:
    """``msgpack.packb(key)`` for a str, without building a Packer: ~0.2 µs instead of
    ~1 µs, and it ran for every write (a tenth of a backup validator's
    time, py-spy at 8,000 offered tx/s)."""
    return _packed_raw_key(key.encode())


def _packed_raw_key(raw: bytes) -> bytes:
    """:func:`packed_key` of a key already in UTF-8."""
    n = len(raw)
    if n < 32:
        return bytes((0xA0 | n,)) + raw  # fixstr
    if n < 256:
        return b"\xd9" + bytes((n,)) + raw  # str 8
    if n < 65536:
        return b"\xda" + n.to_bytes(2, "big") + raw  # str 16
    return b"\xdb" + n.to_bytes(4, "big") + raw  # str 32


def _hash_leaf(leaf: bytes) -> bytes:
    """RFC 6962 leaf hash of a leaf, the canonical msgpack array [key, value]
    (see ``_Bucket``)."""
    return _sha256(b"\x00" + leaf).digest()


def _bucket_hash(size: int, hashes: bytes) -> bytes:
    """A bucket's hash, its leaf in the top tree: SHA-256(0x02 || size (8
    bytes) || its sorted leaves' hashes end to end)."""
    head = _BUCKET_HEADS[size] if size < 256 else _BUCKET_DOMAIN + size.to_bytes(8, "big")
    return _sha256(head + hashes).digest()


_BUCKET_HEADS = tuple(_BUCKET_DOMAIN + size.to_bytes(8, "big") for size in range(256))
"""What :func:`_bucket_hash` hashes before the leaf hashes, for buckets of
under 256 keys (all but one crowded on purpose), looked up: one per touched
bucket."""


def _top_shifts(buckets: int) -> list[int]:
    """log2 of each level's group size, bottom up: groups of 16 while 16 or
    more nodes remain, then one group of what is left (16,384 buckets: 16,
    16, 16 then 4; one bucket: no level above its leaf)."""
    shifts = []
    bits = buckets.bit_length() - 1
    while bits > 0:
        shift = min(_FAN_OUT_BITS, bits)
        shifts.append(shift)
        bits -= shift
    return shifts


def _node_hash(children: bytes) -> bytes:
    """An interior node: SHA-256(0x01 || its children's hashes end to end);
    RFC 6962's node hash when there are two."""
    return _sha256(b"\x01" + children).digest()


def _top_path(top: Sequence[bytes], shifts: Sequence[int], index: int) -> tuple[bytes, ...]:
    """For each level under the root, the other members of ``index``'s group
    end to end (its own slot left out), read off the flat levels (see
    :func:`_empty_top`): one slice on each side of the slot."""
    path = []
    for level, shift in zip(top[:-1], shifts, strict=True):
        first, end = (index >> shift) << shift, ((index >> shift) + 1) << shift
        path.append(level[first << 5 : index << 5] + level[(index + 1) << 5 : end << 5])
        index >>= shift
    return tuple(path)


_Bucket: TypeAlias = tuple
"""One bucket: ``(bucket hash, hashes, leaf_0 .. leaf_n-1)``: its leaves,
each the canonical msgpack array ``[key, value]`` (0x92, the packed key,
the encoded value), in byte order, and their RFC 6962 leaf hashes end to
end (32 bytes each, in the same order) in one flat tuple; see
:func:`_bucket_hash`. Packed keys are length-prefixed, so no leaf's key
part is a prefix of another's: leaves in byte order are keys in packed
order, and the leaf that holds a key is the one that starts with
:func:`_leaf_prefix` of it.

Why one flat tuple, not an object with ``__slots__`` holding a keys tuple
and a values tuple (as up to v2): a block rebuilds ~2 buckets per
transaction, and a write then allocates one tuple and one hash string
instead of three objects and a string. A backup's per-transaction work in
one process (forward admission, proposal decoding, execution, store
append; no verification) went from 29.2-30.0 to 25.2-27.6 µs, and at
8,000 offered tx/s a validator's CPU per committed transaction from 86-92
to 84-87 µs (alternating runs, the same roots). A tuple of bytes also
drops out of the garbage collector's tracking at its first pass, so the
older generations' passes never walk the state's buckets. Splicing a
single write into the tuple and the hash string (not list copies and a
join) is what keeps it one allocation each.

Why whole leaves, not keys then values (v4): rebuilding a bucket touches
every member's reference count, and on a big state each member is a cache
miss: one object per key instead of a str and a bytes halves them (with
v3's layout, a write on a 250k-key state cost ~0.14 µs more per key
already in its bucket, comparing bucket counts). A key also costs one
object less: 100k keys of 81 characters took 186 bytes each instead of
241 (tracemalloc). The leaf is what gets hashed anyway, so it is built
once."""


def _leaf_prefix(raw_key: bytes) -> bytes:
    """What the leaf of a key (in UTF-8) starts with: 0x92 and the packed key."""
    n = len(raw_key)
    return _LEAF_HEADS[n] + raw_key if n < 256 else b"\x92" + _packed_raw_key(raw_key)


_LEAF_HEADS = tuple(b"\x92" + _packed_raw_key(bytes(n))[: -n or None] for n in range(256))
"""The start of :func:`_leaf_prefix` for keys under 256 bytes (all keys in
practice), looked up instead of built: it runs for every read and write."""


def _leaf_parts(leaf: bytes) -> tuple[str, bytes]:
    """``(key, encoded value)`` of a stored leaf (read back from its packed
    key's header; the leaf was built by this module, so it is well formed)."""
    tag = leaf[1]
    if tag < 0xC0:  # fixstr
        start, size = 2, tag & 0x1F
    elif tag == 0xD9:
        start, size = 3, leaf[2]
    elif tag == 0xDA:
        start, size = 4, int.from_bytes(leaf[2:4], "big")
    else:
        start, size = 6, int.from_bytes(leaf[2:6], "big")
    return leaf[start : start + size].decode(), leaf[start + size :]


def _make_bucket(leaves: Sequence[bytes], hashes: bytes) -> _Bucket:
    return (_bucket_hash(len(leaves), hashes), hashes, *leaves)


def _find(bucket: _Bucket, prefix: bytes) -> tuple[int, bool]:
    """Where the leaf starting with ``prefix`` is (True) or would go (False)."""
    i = bisect_left(bucket, prefix, 2)
    return i, i < len(bucket) and bucket[i].startswith(prefix)


def _bucket_get(bucket: _Bucket, raw_key: bytes) -> bytes | None:
    prefix = _leaf_prefix(raw_key)
    i, present = _find(bucket, prefix)
    return bucket[i][len(prefix) :] if present else None


_Write: TypeAlias = tuple[bytes, bytes | None]
"""A write as :meth:`State._fill` groups it: the key in UTF-8, the encoded value or None."""


def _bucket_with_one(bucket: _Bucket, raw: bytes, encoded: bytes | None) -> _Bucket:
    """The bucket after one write, the common case (a block's writes spread
    over the buckets): the tuple and the hash string spliced directly."""
    prefix = _leaf_prefix(raw)
    i = bisect_left(bucket, prefix, 2)  # _find, inlined (hot path)
    after = i + 1 if i < len(bucket) and bucket[i].startswith(prefix) else i
    hashes = bucket[1]
    cut, resume = 32 * (i - 2), 32 * (after - 2)
    size = len(bucket) - 2
    if encoded is None:
        if after == i:
            return bucket
        hashes = hashes[:cut] + hashes[resume:]
        return (_bucket_hash(size - 1, hashes), hashes, *bucket[2:i], *bucket[after:])
    leaf = prefix + encoded
    hashes = hashes[:cut] + _hash_leaf(leaf) + hashes[resume:]
    return (
        _bucket_hash(size + 1 - (after - i), hashes),
        hashes,
        *bucket[2:i],
        leaf,
        *bucket[after:],
    )


def _bucket_with_many(bucket: _Bucket, writes: Iterable[_Write]) -> _Bucket:
    """The bucket after several writes (in any order; one per key), in
    lists, so k writes into a bucket cost one rebuild, not k."""
    leaves = list(bucket[2:])
    blob = bucket[1]
    hashes = [blob[i : i + 32] for i in range(0, len(blob), 32)]
    for raw, encoded in writes:
        prefix = _leaf_prefix(raw)
        i = bisect_left(leaves, prefix)
        present = i < len(leaves) and leaves[i].startswith(prefix)
        if encoded is None:
            if present:
                del leaves[i], hashes[i]
            continue
        leaf = prefix + encoded
        if present:
            leaves[i] = leaf
            hashes[i] = _hash_leaf(leaf)
        else:
            leaves.insert(i, leaf)
            hashes.insert(i, _hash_leaf(leaf))
    return _make_bucket(leaves, b"".join(hashes))


_EMPTY_BUCKET: _Bucket = _make_bucket((), b"")


def _empty_top(buckets: int) -> list[bytes | bytearray]:
    """Levels of the top tree over ``buckets`` empty buckets (all equal).

    A level is its 32-byte nodes end to end in one buffer (``bytes`` here,
    the ``bytearray`` each block wrote afterwards), not a list of them:
    every block copies every level (copy-on-write), and the garbage
    collector traversed each new list's references (~2 x buckets of them,
    each a cache miss); flat levels made :meth:`State.apply` ~10% faster.
    Keeping the written copy instead of copying it once more into ``bytes``
    took a 26-write apply from ~1.1 to ~0.8 ms (the 2,000-write one is
    dominated by hashing and did not move)."""
    node = _EMPTY_BUCKET[0]
    levels = [node * buckets]
    for shift in _top_shifts(buckets):
        node = _node_hash(node * (1 << shift))
        buckets >>= shift
        levels.append(node * buckets)
    return levels


class ProofLeaf(NamedTuple):
    """A (key, encoded value) leaf at ``index`` of its bucket.

    Proofs are NamedTuples, not frozen dataclasses: one is built per query
    answered and a frozen dataclass costs three times as much to create."""

    index: int
    key: str
    value: bytes


class StateProof(NamedTuple):
    """What a client needs to check one key against a state root.

    ``bucket_hashes`` are the leaf hashes of the key's whole bucket, in
    order (they give its digest and size); ``leaves`` holds the key's own
    leaf (presence) or its sorted neighbours in the bucket (absence: the
    predecessor, the successor, or both)."""

    buckets: int
    top_root: bytes
    top_path: tuple[bytes, ...]
    bucket_hashes: tuple[bytes, ...]
    leaves: tuple[ProofLeaf, ...]


class State:
    """An immutable snapshot; :meth:`apply` returns a new one.

    Build one from Python values (``State({"a": 1})``) or from a genesis;
    executors write canonical encodings through :meth:`apply`."""

    __slots__ = ("_buckets", "_proof_top", "_root", "_shifts", "_size", "_top")

    def __init__(
        self, items: Mapping[str, object] | None = None, *, buckets: int = DEFAULT_BUCKETS
    ) -> None:
        if buckets < 1 or buckets & (buckets - 1) or buckets > 2**20:
            raise ValueError("buckets is a power of two up to 2**20")
        self._buckets: list[_Bucket] = [_EMPTY_BUCKET] * buckets
        self._size = 0
        self._root: bytes | None = None
        self._top = _empty_top(buckets)
        self._shifts = tuple(_top_shifts(buckets))
        self._proof_top: list[bytes] | None = None
        if items:
            self._fill({k: encode_value(v) for k, v in items.items()})

    def _fill(self, writes: Mapping[str, bytes | None]) -> None:
        """Apply encoded writes in place (only on a snapshot being built).

        Most buckets of a block get one write: those are grouped as the
        bare write, not a list of one (a list only where a second comes)."""
        grouped: dict[int, _Write | list[_Write]] = {}
        mask = len(self._buckets) - 1
        for key, encoded in writes.items():
            raw = check_key(key)
            if encoded is not None and type(encoded) is not bytes:
                raise ValueError("apply takes encoded values (bytes) or None")
            index = _index_of_digest(_sha256(raw).digest())[0] & mask  # bucket_of
            write = (raw, encoded)
            prior = grouped.setdefault(index, write)
            if prior is not write:
                if type(prior) is list:
                    prior.append(write)
                else:
                    grouped[index] = [prior, write]  # type: ignore[list-item]
        buckets = self._buckets
        size = self._size
        for index, change in grouped.items():
            old = buckets[index]
            if type(change) is list:
                new = _bucket_with_many(old, change)
            else:
                new = _bucket_with_one(old, *change)  # type: ignore[misc]
            size += len(new) - len(old)
            buckets[index] = new
        self._size = size
        self._update_top(grouped)

    def _update_top(self, changed: Iterable[int]) -> None:
        """Rehash only the top-tree paths above changed buckets.

        ``buckets`` is a power of two, so every group is full: node i of a
        level (bytes 32i to 32i + 32) whose groups below hold 2**shift
        nodes has children i << shift onwards, the 32 << shift bytes from
        i * (32 << shift). The copies are written through memoryviews,
        whose slicing costs less than a bytearray's."""
        top = [memoryview(bytearray(level)) for level in self._top]
        dirty = set(changed)
        leaves, buckets = top[0], self._buckets
        for i in dirty:
            leaves[32 * i : 32 * i + 32] = buckets[i][0]
        for depth, shift in enumerate(self._shifts, 1):
            below, level = top[depth - 1], top[depth]
            dirty = {i >> shift for i in dirty}
            width = 32 << shift
            for i in dirty:  # _node_hash, inlined (hot path)
                node = _sha256(b"\x01" + below[width * i : width * i + width]).digest()
                level[32 * i : 32 * i + 32] = node
        # Keep the fresh copies as they are (no second copy into bytes):
        # nothing writes a level once it is stored, the next block copies.
        self._top = [level.obj for level in top]
        self._root = self._proof_top = None

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    def __len__(self) -> int:
        return self._size

    def get_encoded(self, key: str) -> bytes | None:
        """The canonical encoding stored under ``key``, or None."""
        raw = key.encode()
        index = _index_of_digest(_sha256(raw).digest())[0] & (len(self._buckets) - 1)
        return _bucket_get(self._buckets[index], raw)

    def get(self, key: str, default: object = None) -> object:
        """A fresh copy of the value under ``key`` (mutating it changes nothing)."""
        encoded = self.get_encoded(key)
        return default if encoded is None else msgpack.unpackb(encoded, raw=False)

    def __contains__(self, key: object) -> bool:
        return type(key) is str and self.get_encoded(key) is not None

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted keys (all of them, or those starting with ``prefix``): O(n log n)."""
        return sorted(
            key
            for bucket in self._buckets
            for leaf in bucket[2:]
            if (key := _leaf_parts(leaf)[0]).startswith(prefix)
        )

    def items(self, prefix: str = "") -> list[tuple[str, object]]:
        return [(k, self.get(k)) for k in self.keys(prefix)]

    def apply(self, writes: Mapping[str, bytes | None]) -> State:
        """A new snapshot with ``writes`` (canonical encodings; None deletes).

        The caller vouches that the bytes came from :func:`encode_value`."""
        new = State.__new__(State)
        new._buckets = list(self._buckets)
        new._size = self._size
        new._root = None
        new._proof_top = None
        new._top = self._top
        new._shifts = self._shifts
        new._fill(writes)
        return new

    def update(self, changes: Mapping[str, object]) -> State:
        """Like :meth:`apply` with Python values (None deletes)."""
        return self.apply({k: None if v is None else encode_value(v) for k, v in changes.items()})

    @property
    def root(self) -> bytes:
        """SHA-256(domain || buckets || top root): commits to every pair."""
        if self._root is None:
            top = self._top[-1]
            self._root = _sha256(
                _ROOT_DOMAIN + len(self._buckets).to_bytes(4, "big") + top
            ).digest()
        return self._root

    def prove(self, key: str) -> tuple[object, StateProof]:
        """``(value, proof)``: the value under ``key`` (None if absent) and a
        proof that :func:`verify_state_proof` checks against :attr:`root`.

        On the query path (``fedchain bench consensus`` counts answers per
        second), so it reads the bucket once and slices the top path off
        the levels."""
        check_key(key)
        top = self._proof_top
        if top is None:
            # Once per snapshot that is queried: the levels as bytes, so a
            # path's slices need no copy each (the stored bytearrays would):
            # measured with v2's binary path, ~8.5 -> ~5 µs a path, against
            # ~0.2 ms once a block.
            top = self._proof_top = [bytes(level) for level in self._top]
        index = bucket_of(key, len(self._buckets))
        bucket = self._buckets[index]
        position, present = _find(bucket, _leaf_prefix(key.encode()))
        if present:
            picks: Sequence[int] = (position,)
        else:
            picks = tuple(i for i in (position - 1, position) if 2 <= i < len(bucket))
        leaves = tuple(ProofLeaf(i - 2, *_leaf_parts(bucket[i])) for i in picks)
        value = msgpack.unpackb(leaves[0].value, raw=False) if present else None
        blob = bucket[1]
        proof = StateProof(
            buckets=len(self._buckets),
            top_root=top[-1],
            top_path=_top_path(top, self._shifts, index),
            bucket_hashes=tuple([blob[i : i + 32] for i in range(0, len(blob), 32)]),
            leaves=leaves,
        )
        return value, proof

    def __repr__(self) -> str:
        return f"State({self._size} keys, root={self.root.hex()[:16]})"


def verify_state_proof(key: str, value: object, proof: StateProof, state_root: bytes) -> bool:
    """Whether ``proof`` shows ``key`` holds ``value`` (None: is absent) in
    the state with ``state_root``. Never raises on bad input."""
    try:
        return _verify(key, value, proof, state_root)
    except Exception:
        return False


def _top_root_from_path(
    bucket_hash: bytes, index: int, buckets: int, path: Sequence[bytes]
) -> bytes | None:
    """The top root that ``path`` (see :func:`_top_path`) gives bucket
    ``index``'s hash, or None if the path has the wrong shape."""
    shifts = _top_shifts(buckets)
    if type(path) is not tuple or len(path) != len(shifts):
        return None
    node = bucket_hash
    for others, shift in zip(path, shifts, strict=True):
        if type(others) is not bytes or len(others) != 32 * ((1 << shift) - 1):
            return None
        at = 32 * (index & ((1 << shift) - 1))
        node = _node_hash(others[:at] + node + others[at:])
        index >>= shift
    return node


def _verify(key: str, value: object, proof: StateProof, state_root: bytes) -> bool:
    check_key(key)
    n = proof.buckets
    if type(n) is not int or n < 1 or n & (n - 1) or n > 2**20:
        return False
    expected = _sha256(_ROOT_DOMAIN + n.to_bytes(4, "big") + proof.top_root).digest()
    if expected != state_root:
        return False
    hashes = proof.bucket_hashes
    if type(hashes) is not tuple or not all(type(h) is bytes and len(h) == 32 for h in hashes):
        return False
    size = len(hashes)
    bucket_hash = _bucket_hash(size, b"".join(hashes))
    if _top_root_from_path(bucket_hash, bucket_of(key, n), n, proof.top_path) != proof.top_root:
        return False
    for leaf in proof.leaves:
        index = leaf.index
        if (
            type(index) is not int
            or not 0 <= index < size
            or type(leaf.key) is not str
            or type(leaf.value) is not bytes
            or _hash_leaf(_leaf_prefix(leaf.key.encode()) + leaf.value) != hashes[index]
        ):
            return False
    leaves = proof.leaves
    if not leaves:
        return value is None and size == 0
    if value is not None:
        return len(leaves) == 1 and leaves[0].key == key and leaves[0].value == encode_value(value)
    # Absence: a bucket orders its leaves by bytes, so its keys by their
    # packed (length-prefixed) UTF-8, not as str compares them.
    packed = packed_key(key)
    if len(leaves) == 2:
        low, high = leaves
        return high.index == low.index + 1 and packed_key(low.key) < packed < packed_key(high.key)
    if len(leaves) == 1:
        (leaf,) = leaves
        if leaf.index == 0 and packed < packed_key(leaf.key):
            return True
        return leaf.index == size - 1 and packed_key(leaf.key) < packed
    return False
