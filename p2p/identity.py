"""Long-term Ed25519 identities.

A peer *is* its 32-byte Ed25519 public key: there is no separate id space to
keep consistent. Keys can be derived from a numpy Generator so a seeded
simulation has the same keys, and therefore byte-identical signed traffic,
on every run (Ed25519 signing is deterministic).
"""

from __future__ import annotations

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


def short_id(peer: PeerId) -> str:
    """Eight hex digits of a key: enough to tell peers apart in logs."""
    return peer[:4].hex()
