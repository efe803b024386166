"""Long-term Ed25519 identities.

A peer *is* its 32-byte Ed25519 public key: there is no separate id space to
keep consistent. Keys can be derived from a numpy Generator so a seeded
simulation has the same keys, and therefore byte-identical signed traffic,
on every run (Ed25519 signing is deterministic).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
from nacl import bindings
from nacl.exceptions import CryptoError

PeerId = bytes
"""A peer's 32-byte Ed25519 public key."""

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class Identity:
    """An Ed25519 key pair. The secret never leaves this object except by
    :meth:`seed`, which is what a node home stores on disk."""

    __slots__ = ("_public", "_secret")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        self._public, self._secret = bindings.crypto_sign_seed_keypair(seed)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the OS's randomness (real nodes)."""
        import os

        return cls(os.urandom(32))

    @classmethod
    def from_rng(cls, rng: np.random.Generator) -> Identity:
        """A reproducible identity for seeded simulations."""
        return cls(rng.bytes(32))

    @property
    def public_key(self) -> PeerId:
        return self._public

    def seed(self) -> bytes:
        return bindings.crypto_sign_ed25519_sk_to_seed(self._secret)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of ``message``."""
        return bindings.crypto_sign(message, self._secret)[:SIGNATURE_BYTES]

    def __repr__(self) -> str:
        return f"Identity({short_id(self._public)})"


def verify(public_key: PeerId, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``message``.

    Never raises on hostile input: a key that is not a curve point, or a
    signature of the wrong size, simply does not verify.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        bindings.crypto_sign_open(signature + message, public_key)
    except (CryptoError, ValueError, TypeError):
        return False
    return True


class SignatureMemo:
    """A bounded memo of signatures that verified: :func:`verify` done once.

    Verification is a pure function of (public key, message, signature), and
    the key ``public key + SHA-256(message) + signature`` names exactly that,
    so a hit is as good as checking again. Only successes are remembered (a
    bad signature is checked, and refused, every time), and the oldest entry
    goes first past ``max_entries`` (~200 bytes each). An OrderedDict, not
    a dict: dropping a dict's first key (``next(iter(d))``) walks past every
    slot deleted since its last resize, so a full memo of 200,000 took
    ~19 µs per insert, as much as half a verification; ``popitem`` takes
    ~0.6.

    One validator uses it to check a commit vote once, not once as a COMMIT
    and again in the block's certificate; a simulation may share one memo
    among all its validators, so each signature is verified once in the
    process, not once per validator. Every message is still checked before
    use: a miss verifies.
    """

    __slots__ = ("_ok", "hits", "max_entries", "misses")

    def __init__(self, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError("a signature memo holds at least one entry")
        self.max_entries = max_entries
        self._ok: OrderedDict[Hashable, None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(public_key: PeerId, message: bytes, signature: bytes) -> bytes:
        return public_key + hashlib.sha256(message).digest() + signature

    def verify(self, public_key: PeerId, message: bytes, signature: bytes) -> bool:
        """:func:`verify`, remembering successes."""
        if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        return self.check(
            self._key(public_key, message, signature), verify, public_key, message, signature
        )

    def check(self, key: Hashable, verifier: Callable[..., bool], *args: object) -> bool:
        """Whether ``key`` is remembered (a hit) or ``verifier(*args)`` holds
        (a miss, remembered if so): for callers whose key names what the
        verifier checks (a transaction's digest and signature, say)."""
        ok = self._ok
        if key in ok:
            self.hits += 1
            return True
        self.misses += 1
        if not verifier(*args):
            return False
        self.remember(key)
        return True

    def known(self, key: Hashable) -> bool:
        """Whether a caller's own ``key`` was remembered (a hit if so).

        For callers that can name a verified statement more cheaply than by
        its signed bytes, e.g. ``(chain id, message)`` for an immutable,
        hashable message whose equality covers every signed field and the
        signature. Such keys share the bound with the others."""
        if key in self._ok:
            self.hits += 1
            return True
        return False

    def remember(self, key: Hashable) -> None:
        """Remember ``key`` as verified: call only after a success."""
        ok = self._ok
        ok[key] = None
        if len(ok) > self.max_entries:
            ok.popitem(last=False)

    def remembers(self, key: Hashable) -> bool:
        """Whether ``key`` is remembered (not counted as a hit)."""
        return key in self._ok

    def __contains__(self, item: tuple[PeerId, bytes, bytes]) -> bool:
        """Whether ``(public_key, message, signature)`` is remembered as valid."""
        public_key, message, signature = item
        return self._key(public_key, message, signature) in self._ok

    def __len__(self) -> int:
        return len(self._ok)


def verify_with(
    memo: SignatureMemo | None, public_key: PeerId, message: bytes, signature: bytes
) -> bool:
    """:func:`verify` through ``memo`` when one is given."""
    if memo is None:
        return verify(public_key, message, signature)
    return memo.verify(public_key, message, signature)


def short_id(peer: PeerId) -> str:
    """Eight hex digits of a key: enough to tell peers apart in logs."""
    return peer[:4].hex()
